"""The table of the proof scenarios: one row per scenario run in this session, printed at
its end and written to ``bench/results/proof-<stamp>.md``."""

from __future__ import annotations

import datetime
import platform
import sys
from pathlib import Path

from tests.proof.judge import Verdict

RESULTS_DIR = Path(__file__).resolve().parents[2] / "bench" / "results"
HEADER = ("scenario", "injections", "presses", "delivered", "lost", "duplicates",
          "worst delay", "not confirmed", "verdict")


def _delay(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"


def row(verdict: Verdict) -> tuple[str, ...]:
    """``delivered`` counts confirmed presses whose alarm arrived; the presses the device
    never confirmed are counted apart, by what became of them."""
    unconfirmed = ", ".join(f"{count} {outcome}"
                            for outcome, count in sorted(verdict.unconfirmed.items())) or "0"
    return (verdict.scenario, str(verdict.injections), str(verdict.presses),
            f"{verdict.delivered}/{verdict.confirmed}", str(len(verdict.lost)),
            str(verdict.duplicates), _delay(verdict.worst_delay_s), unconfirmed,
            "held" if verdict.ok else f"FAILED ({len(verdict.problems)})")


def table(verdicts: list[Verdict]) -> str:
    rows = [HEADER, *(row(v) for v in verdicts)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) + " |"
             for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def write(verdicts: list[Verdict], *, soak: bool, seed: int) -> Path:
    stamp = datetime.datetime.now().astimezone()
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"proof-{stamp:%Y%m%d-%H%M%S}.md"
    mode = "soak (`--soak`)" if soak else "CI"
    path.write_text(
        f"# Proof suite, {mode}, {stamp:%Y-%m-%d %H:%M %Z}\n\n"
        f"`python -m pytest tests/proof{' --soak' if soak else ''}`, random seed {seed} "
        f"(`GUARDPOST_PROOF_SEED={seed}` replays the same choices); Python "
        f"{platform.python_version()} on {platform.node()} ({sys.platform}).\n\n"
        + table(verdicts) + "\n" + notes(verdicts))
    return path


def notes(verdicts: list[Verdict]) -> str:
    """Presses the device refused or ignored, and every broken promise, by scenario."""
    lines = []
    for v in verdicts:
        lines += [f"- {v.scenario}: {text}" for text in [*v.problems, *v.notes][:50]]
    return "\n" + "\n".join(lines) + "\n" if lines else ""
