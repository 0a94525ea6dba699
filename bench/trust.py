"""What believing a platform message costs the uplink (edge/daemons/uplink/gate.py).

Every acknowledgement and command is opened by the gate before anything else: parsed,
its key looked up, its Ed25519 signature verified, its time and nonce checked. A flood of
forgeries takes the dearest path (a known key id, a signature that does not verify), so
both are timed, beside two baselines measured in this run: parsing the same bytes as
JSON (what an unsigned contract cost per message), and one durable commit (the floor of
bench/_floor.py: what recording an acknowledgement costs anyway). Ratios, not times:
this machine is noisy.

    .venv/bin/python bench/trust.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._floor import plain_commit_latencies
from edge.contract.events import utc_now
from edge.contract.signing import Rejected, open_envelope
from tests.support.trust import DUTY_DESK, STRANGER, trust_section

PREFIX = "guardpost/v1/bench-school/gate-1"
EVENT_ID = "01a23c19-d487-73b4-8000-0000009b4fd0"


def per_call_us(func, number: int) -> float:
    """The best of five runs of ``number`` calls, per call (the least disturbed)."""
    return min(timeit.repeat(func, number=number, repeat=5)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    number = 300 if args.quick else 3000

    from edge.config.trust import TrustConfig

    keyring = TrustConfig.model_validate(trust_section()).keyring()
    topic, valid = DUTY_DESK.ack(PREFIX, EVENT_ID, by="110 duty desk")
    forged = STRANGER.sign(topic, json.loads(valid)["body"]).replace(
        b'"key_id":"test-stranger"', b'"key_id":"test-duty-desk"')
    now = utc_now()

    def open_valid():
        open_envelope(valid, topic, keyring, "ack", now=now, clock_synced=True,
                      newest_accepted=None, seen_nonce=lambda nonce: False)

    def open_forged():
        try:
            open_envelope(forged, topic, keyring, "ack", now=now, clock_synced=True,
                          newest_accepted=None, seen_nonce=lambda nonce: False)
        except Rejected:
            return
        raise AssertionError("a forgery was believed")

    json_us = per_call_us(lambda: json.loads(valid), number * 10)
    valid_us = per_call_us(open_valid, number)
    forged_us = per_call_us(open_forged, number)
    with tempfile.TemporaryDirectory() as tmp:
        commits = plain_commit_latencies(Path(tmp) / "floor.db", 50 if args.quick else 300,
                                         valid)
    commit_us = statistics.median(commits) * 1e6

    print("bench/trust.py: opening a signed platform message (per message)")
    print(f"  JSON parse of the same bytes (baseline)   {json_us:8.1f} us")
    print(f"  one durable commit (baseline, median)     {commit_us:8.1f} us")
    print(f"  a valid acknowledgement, opened           {valid_us:8.1f} us   "
          f"{valid_us / json_us:5.1f}x JSON   {valid_us / commit_us:5.2f}x a commit")
    print(f"  a forgery (known key, bad signature)      {forged_us:8.1f} us   "
          f"{forged_us / json_us:5.1f}x JSON   {forged_us / commit_us:5.2f}x a commit")
    print(f"  forgeries one core can refuse             {1e6 / forged_us:8.0f} /s")


if __name__ == "__main__":
    main()
