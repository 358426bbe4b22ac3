"""Local files written whole: a reader sees the old file or the complete new one, never half (the new one is written
beside it, fsynced and renamed over it), and whatever is written gets the modes the process umask gives.

The umask needs enforcing because not every writer follows it: tempfile.mkstemp and safetensors (which writes through
a temp file of its own) create files only their owner can read, and a rename keeps that mode, so a teammate or a
serving process could not read the weights. Object-store URIs are `rlhf.storage`'s, which writes through here locally.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from typing import Iterator


def umask() -> int:
    """The process umask, read without changing it where Linux shows it (/proc/self/status); elsewhere set and put
    back at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str) -> None:
    """Give `path`, and everything under it when it is a directory, the mode a plain create under the umask gives:
    read and write (and execute, for directories and executables) for everyone, less the umask."""
    mask = umask()

    def fix(target: str) -> None:
        mode = os.lstat(target).st_mode
        if stat.S_ISLNK(mode):
            return
        wanted = (0o777 if stat.S_ISDIR(mode) or mode & 0o111 else 0o666) & ~mask
        if stat.S_IMODE(mode) != wanted:
            os.chmod(target, wanted)

    fix(path)
    if os.path.isdir(path) and not os.path.islink(path):
        for directory, dirs, names in os.walk(path):
            for name in dirs + names:
                fix(os.path.join(directory, name))


def fsync(path: str) -> None:
    """Flush a file, or a directory (a rename is only durable once the directory holding it is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing(path: str) -> Iterator[str]:
    """A temp path beside `path` for any writer (open, safetensors, torch.save) to write the new file to. When the
    body returns, the file gets the umask's mode, is fsynced and renamed over `path`, and the directory is fsynced;
    when it raises, the temp file goes and `path` is left as it was."""
    directory, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        follow_umask(tmp)
        fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync(directory)


def write_text(path: str, text: str) -> None:
    """Write a whole text file (UTF-8) through `replacing`."""
    with replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def replace_directory(tmp: str, path: str, aside: str) -> None:
    """Rename the directory `tmp`, written whole, to `path`, with the umask's modes throughout. An old `path` is
    renamed to `aside` first and removed after: a crash leaves the old directory or the new one at `path` (or, between
    the two renames, the old one at `aside`), never half of one."""
    follow_umask(tmp)
    if os.path.exists(path):
        if os.path.exists(aside):
            shutil.rmtree(aside)
        os.rename(path, aside)
        os.rename(tmp, path)
        shutil.rmtree(aside)
    else:
        os.rename(tmp, path)
