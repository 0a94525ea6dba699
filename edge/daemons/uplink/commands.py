"""The platform's commands other than the alarm test: ``ping``, ``reset``, ``silence`` and
``snapshot`` (the test is :meth:`edge.daemons.uplink.inbound.Inbound._take_test`).

Each is signed by a key with the ``command`` role (checked before it gets here), limited
in rate (``COMMAND_LIMITS``; a refusal says when to ask again) and answered on
``reply/{command}`` (or the request's Response Topic):

- ``ping``: ``done`` at once, with the device's time and whether its clock is
  synchronised: the platform measures the round trip and the clock's offset.
- ``reset``: the latched alarms (or the one of ``input``) are reset as by ``guardpost
  reset``, by the platform's ``by``; ``done`` names the reset events, ``refused`` says
  nothing was latched.
- ``silence``: the siren stops (the alarm stays latched: only a reset clears it); the
  button daemon does it.
- ``snapshot``: ``accepted`` with the snapshot id, then the camera daemon's pictures
  arrive on ``snapshot/{snapshot_id}``, one per camera (or the one named).

``silence`` and ``snapshot`` ask another daemon over its control socket. That is done by
one worker thread, never in the uplink's loop, which publishes alarms: a daemon that is
slow to answer delays the reply, not an alarm. At most :data:`MAX_WAITING` wait for it.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

from edge.config import Config
from edge.contract.events import utc_iso, utc_now, uuid7
from edge.contract.messages import COMMAND_LIMITS, Command
from edge.daemons.button.latch import AlarmLatch
from edge.daemons.uplink.lane import TokenBucket
from edge.runtime.clock import clock_synchronised, wall_ns
from edge.runtime.control import ControlUnavailable, request
from edge.runtime.wake import wake
from edge.store.outbox import Outbox

log = logging.getLogger(__name__)

MAX_WAITING = 4          # local requests waiting for the worker; more are refused
LOCAL_TIMEOUT_S = 5.0    # the button or camera daemon answers within this, or it failed


@dataclass
class Answer:
    """What to reply: ``status`` and the reply's fields."""

    status: str
    fields: dict = field(default_factory=dict)


@dataclass(frozen=True)
class HandOver:
    """A command another daemon carries out: its control socket, the request, and what
    the first answer (``accepted``) already says."""

    socket_name: str
    body: dict
    result: dict | None = None


class Commands:
    """Runs the platform's commands. Each comes with a ``ticket`` (where its answers go),
    which :meth:`finished` hands back with the later answer of a handed-over command."""

    def __init__(self, config: Config):
        self.config = config
        self._limits = {name: TokenBucket(rate, burst)
                        for name, (rate, burst) in COMMAND_LIMITS.items()}
        self._local: queue.Queue = queue.Queue(MAX_WAITING)
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._worker: threading.Thread | None = None

    def take(self, outbox: Outbox, command: Command, now: float, ticket: Any) -> Answer:
        """Run or hand over ``command``; returns the first answer (replied by the caller)."""
        bucket = self._limits[command.name]
        if not bucket.take(now):
            rate, burst = COMMAND_LIMITS[command.name]
            return Answer("refused", {
                "reason": f"cmd/{command.name} is limited to {rate * 60:g} a minute "
                          f"({burst} at once)", "retry_after_s": bucket.wait()})
        answer = getattr(self, f"_{command.name}")(outbox, command)
        if isinstance(answer, HandOver):
            return self._hand_over(command, ticket, answer)
        return answer

    # -- at once, in the uplink's loop (no waiting on anything but the outbox) -------------

    def _ping(self, outbox: Outbox, command: Command) -> Answer:
        return Answer("done", {"result": {"device_time": utc_iso(utc_now()),
                                          "clock_synced": clock_synchronised()}})

    def _reset(self, outbox: Outbox, command: Command) -> Answer:
        inputs = self.config.inputs
        if command.input is not None and command.input not in inputs:
            return Answer("refused", {"reason": f"no input {command.input!r} (inputs: "
                                                f"{', '.join(sorted(inputs))})"})
        by = f"platform: {command.by}" if command.by else "platform"
        events = AlarmLatch(outbox, inputs).reset(by=by, input_name=command.input)
        if not events:
            return Answer("refused", {"reason": "nothing is latched"})
        log.info("platform reset %d latched alarm(s) (request %s, by %s)", len(events),
                 command.request_id, by)
        for daemon in ("uplink", "button"):
            wake(self.config.storage.runtime_dir, daemon)
        return Answer("done", {"result": {"reset": [
            {"input": e.draft.input, "event_id": e.id} for e in events]}})

    # -- through another daemon, by the worker thread ---------------------------------------

    def _silence(self, outbox: Outbox, command: Command) -> HandOver:
        return HandOver("button.ctl", {"op": "silence", "by": command.by or "platform"})

    def _snapshot(self, outbox: Outbox, command: Command) -> Answer | HandOver:
        cameras = self.config.cameras
        if not cameras:
            return Answer("refused", {"reason": "this device has no camera"})
        if command.camera is not None and command.camera not in cameras:
            return Answer("refused", {"reason": f"no camera {command.camera!r} (cameras: "
                                                f"{', '.join(sorted(cameras))})"})
        snapshot_id = str(uuid7(wall_ns()))
        return HandOver("camera.ctl", {"op": "snapshot", "snapshot_id": snapshot_id,
                                       "camera": command.camera,
                                       "request_id": command.request_id},
                        {"snapshot_id": snapshot_id})

    def _hand_over(self, command: Command, ticket: Any, work: HandOver) -> Answer:
        self._start_worker()
        try:
            self._local.put_nowait((command, ticket, work))
        except queue.Full:
            return Answer("refused", {"reason": "busy: too many commands wait for the "
                                                "device's other daemons", "retry_after_s": 5})
        return Answer("accepted", {"result": work.result} if work.result else {})

    def _start_worker(self) -> None:
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._work, name="platform-commands",
                                            daemon=True)
            self._worker.start()

    def _work(self) -> None:
        while True:
            command, ticket, work = self._local.get()
            try:
                reply = request(self.config.storage.runtime_dir / work.socket_name, work.body,
                                timeout=LOCAL_TIMEOUT_S)
            except (ControlUnavailable, OSError, ValueError) as err:
                reply = {"ok": False,
                         "error": f"{work.socket_name.split('.')[0]} daemon: {err}"}
            except Exception as err:  # a defect of ours: the command failed, not the uplink
                log.exception("cmd/%s could not be handed over", command.name)
                reply = {"ok": False, "error": type(err).__name__}
            self._done.put((command, ticket, reply))

    def finished(self) -> list[tuple[Command, Any, Answer]]:
        """What the other daemons answered since the last call (the loop replies)."""
        answers = []
        while True:
            try:
                command, ticket, reply = self._done.get_nowait()
            except queue.Empty:
                return answers
            if reply.get("ok"):
                result = {k: v for k, v in reply.items() if k != "ok"}
                answers.append((command, ticket, Answer("done", {"result": result})))
            else:
                answers.append((command, ticket, Answer("failed", {
                    "reason": str(reply.get("error", "failed"))[:300]})))
