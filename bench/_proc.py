"""What a process costs, read from /proc: CPU seconds, resident and proportional memory.

PSS (proportional set size, /proc/<pid>/smaps_rollup) shares each page among the
processes that map it, so the PSS of several daemons adds up to what they cost the
machine together; RSS counts a shared library once in every process.
"""

from __future__ import annotations

import os
from pathlib import Path


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far (utime + stime of /proc/<pid>/stat)."""
    # The command name (field 2) may hold spaces and parentheses: split after its ")".
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _kib_field(path: str, name: str) -> float:
    for line in Path(path).read_text().splitlines():
        if line.startswith(f"{name}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid``, in MiB (VmRSS)."""
    return _kib_field(f"/proc/{pid}/status", "VmRSS")


def pss_mb(pid: int) -> float:
    """Proportional set size of ``pid``, in MiB (shared pages divided among their users)."""
    return _kib_field(f"/proc/{pid}/smaps_rollup", "Pss")


def children(pid: int) -> list[int]:
    """The live children of ``pid`` (from every process's PPid)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue  # gone meanwhile
        ppid = next((line.split()[1] for line in status.splitlines()
                     if line.startswith("PPid:")), None)
        if ppid == str(pid):
            found.append(int(entry.name))
    return sorted(found)


def command_line(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
