"""Every benchmark, one after another, each in its own process (its own Ray, nothing shared); what `make bench` runs.

Each script prints its table and writes benchmarks/results/<name>.json (or --out); this one ends with every target
and whether it was met. Sizes are each script's defaults (about 10 minutes on 2 CPU cores); --quick runs the
smallest sizes once, as a smoke test.

    python benchmarks/run_all.py [--quick] [--reps N] [--out DIR] [--only rm_vs_trl scaling ...] [--profile]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ("rm_vs_trl", "grpo_vs_trl", "ppo_overhead", "scaling", "overlap")


def run(script: str, extra: list[str]) -> int:
    began = time.time()
    print(f"\n=== {script} {' '.join(extra)}", flush=True)
    code = subprocess.call([sys.executable, str(HERE / f"{script}.py"), *extra])
    print(f"=== {script}: exit {code} after {time.time() - began:.0f} s", flush=True)
    return code


def targets(out: Path, names: list[str]) -> list[str]:
    lines = []
    for name in names:
        path = out / f"{name}.json"
        if not path.exists():
            continue
        record = json.loads(path.read_text(encoding="utf-8"))
        t = record.get("target")
        if t:
            verdict = "met" if t["met"] else "NOT met"
            lines.append(f"{name}: {t['name']} = {t['value']:.3g} (goal {t['goal']}): {verdict}")
        else:
            lines.append(f"{name}: no target; see {path}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smallest sizes, one repetition")
    p.add_argument("--reps", type=int, default=0, help="repetitions for every benchmark (0: each one's default)")
    p.add_argument("--out", default="", help="directory for the JSON records (default benchmarks/results)")
    p.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS))
    p.add_argument("--profile", action="store_true",
                   help="also the diagnostics: py-spy over PPO and RM runs (profile_roles.py)")
    args = p.parse_args(argv)
    extra = (["--quick"] if args.quick else []) + (["--reps", str(args.reps)] if args.reps else []) + \
            (["--out", args.out] if args.out else [])
    began = time.time()
    failed = [name for name in args.only if run(name, extra) != 0]
    if args.profile:  # diagnostics: py-spy over a PPO run and an RM run
        out = ["--out", args.out] if args.out else []
        failed += [f"profile_roles {w}" for w in ("ppo", "rm") if run("profile_roles", [w, *out]) != 0]
    out = Path(args.out) if args.out else HERE / "results"
    print(f"\n=== all done in {time.time() - began:.0f} s", *targets(out, args.only), sep="\n")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
