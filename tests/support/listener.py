"""A test's own MQTT 5 client that hears everything below the topic root (a recorder of
what devices and platforms publish), connected and subscribed before it is returned."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

ROOT = "guardpost/v1"


def listen_to_everything(broker, client_id: str, on_message: Callable,
                         root: str = ROOT) -> paho.Client:
    subscribed = threading.Event()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=paho.MQTTv5)
    client.on_connect = lambda c, *a: c.subscribe(f"{root}/#", qos=1)
    client.on_subscribe = lambda *a: subscribed.set()
    client.on_message = on_message
    client.connect(broker.host, broker.port)
    client.loop_start()
    assert subscribed.wait(10), f"{client_id} did not subscribe"
    return client


class Waits:
    """``wait_for(condition)`` on ``self._cond`` (a ``threading.Condition`` the subclass
    creates and notifies whenever a message changed what it holds)."""

    _cond: threading.Condition

    def wait_for(self, condition, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not condition(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True
