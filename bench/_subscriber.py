"""A separate subscriber process for the benchmarks: prints "event-id monotonic-time".

CLOCK_MONOTONIC is shared by every process on the machine, so its arrival times can be
compared with the mock pin's edge times taken in the button daemon. With ``--quiet`` it
takes every message (QoS 0) and prints nothing: a platform that listens, at the least
cost to the machine, so that the broker does not answer "no matching subscribers".
"""

import json
import sys
import time

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion


def main() -> None:
    host, port, topic = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    quiet = sys.argv[4:] == ["--quiet"]
    client = paho.Client(CallbackAPIVersion.VERSION2,
                         client_id="bench-listener" if quiet else "bench-subscriber",
                         protocol=paho.MQTTv5)

    def on_connect(client, userdata, flags, reason_code, properties):
        client.subscribe(topic, qos=0 if quiet else 1)

    def on_subscribe(client, userdata, mid, reason_codes, properties):
        print("SUBSCRIBED", flush=True)

    def on_message(client, userdata, message):
        if quiet:
            return
        now = time.monotonic()
        body = json.loads(message.payload)
        print(f"{body['id']} {now:.9f}", flush=True)

    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    client.connect(host, port)
    client.loop_forever()


if __name__ == "__main__":
    main()
