"""Side-by-side measurements, run on demand (`make bench`); never imported by the package."""
