"""Small file systems the tests mount, fill and damage: a full SD card, a bad file."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_disk(path: Path, size_kib: int):
    """A tmpfs of ``size_kib`` at ``path`` (made for the test, unmounted after it). Needs
    root (CI runs as root); elsewhere the test is skipped, saying why."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k,mode=0755",
                           "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(directory: Path, name: str = "filler") -> Path:
    """Write zeros into ``directory/name`` until the file system refuses (0 bytes free
    for anyone); returns the file, to be removed when space should come back."""
    filler = directory / name
    with open(filler, "ab", buffering=0) as f:
        for size in (1 << 20, 1 << 16, 1 << 12, 1 << 9, 1):
            while True:
                try:
                    f.write(b"\0" * size)
                except OSError as err:
                    if err.errno != errno.ENOSPC:
                        raise
                    break
    return filler


def free_bytes(directory: Path) -> int:
    info = os.statvfs(directory)
    return info.f_bavail * info.f_frsize


def damage(path: Path, offset: int, length: int, byte: int = 0xA5) -> None:
    """Overwrite ``length`` bytes of ``path`` at ``offset`` (a bad page, a bad header)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(bytes([byte]) * length)
