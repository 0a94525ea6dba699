"""The outbox is the one repository: SQL lives in edge/store/ and nowhere else, and a
daemon starts without the heavy libraries it does not use."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What running SQL looks like: a cursor's execute, sqlite-utils' table access, a
# connection of one's own.
SQL_CALL = re.compile(r"\.execute(many|script)?\(|\.db\[|sqlite3\.connect|\bsqlite_utils\b")


def _sources_outside_the_store():
    for package in ("edge", "drivers"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if (ROOT / "edge" / "store") not in path.parents:
                yield path


def test_no_module_outside_the_store_runs_sql():
    offenders = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
                 for path in _sources_outside_the_store()
                 for number, line in enumerate(path.read_text().splitlines(), 1)
                 if SQL_CALL.search(line)]
    assert offenders == [], "SQL belongs behind a method of edge/store/:\n" + "\n".join(
        offenders)


def test_the_check_sees_sql_where_it_is():
    """The pattern is not blind: the store itself is full of it."""
    outbox = (ROOT / "edge" / "store" / "outbox.py").read_text()
    assert SQL_CALL.search(outbox)


DAEMONS = {
    "edge.daemons.button.daemon": set(),
    "edge.daemons.uplink.daemon": set(),
    "edge.daemons.selftest.daemon": set(),
    "edge.daemons.fallback": set(),
    "edge.daemons.supervisor": set(),
    "edge.tools.cli": set(),
    # The camera daemon decodes pictures: OpenCV (and with it numpy) is its job.
    "edge.daemons.camera": {"cv2", "numpy"},
}
HEAVY = ("numpy", "cv2", "sqlite_utils")


@pytest.mark.parametrize("module", sorted(DAEMONS))
def test_a_daemon_imports_no_library_it_does_not_use(module):
    probe = (f"import sys, {module}\n"
             f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, check=True)
    loaded = set(filter(None, result.stdout.strip().split(",")))
    assert loaded <= DAEMONS[module], f"{module} imports {sorted(loaded - DAEMONS[module])}"
