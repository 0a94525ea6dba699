"""The whole configuration file, and the rules that span its sections."""

from __future__ import annotations

import hashlib

from pydantic import Field, model_validator

from edge.config.base import Identifier, Strict
from edge.config.hardware import (
    AlarmTestConfig,
    CameraConfig,
    FallbackConfig,
    GpioConfig,
    HealthConfig,
    InputConfig,
    ModemConfig,
    OutputsConfig,
)
from edge.config.link import BrokerConfig, DeviceConfig, StorageConfig, UplinkConfig
from edge.config.trust import TrustConfig
from edge.contract.events import Identity


class Config(Strict):
    """The whole configuration file."""

    device: DeviceConfig
    broker: BrokerConfig
    trust: TrustConfig
    uplink: UplinkConfig = UplinkConfig()
    storage: StorageConfig = StorageConfig()
    gpio: GpioConfig
    inputs: dict[Identifier, InputConfig] = Field(min_length=1)
    outputs: OutputsConfig = OutputsConfig()
    cameras: dict[Identifier, CameraConfig] = Field(default_factory=dict)
    health: HealthConfig = HealthConfig()
    alarm_test: AlarmTestConfig = AlarmTestConfig()
    modem: ModemConfig | None = None
    fallback: FallbackConfig | None = None

    @model_validator(mode="after")
    def _fallback_needs_modem(self) -> Config:
        if self.fallback is not None and self.modem is None:
            raise ValueError("fallback: needs a [modem] to send its SMS through")
        return self

    @model_validator(mode="after")
    def _test_relay_input(self) -> Config:
        relay = self.outputs.test_relay
        if relay is None:
            return self
        if relay.input is None and len(self.inputs) > 1:
            raise ValueError("outputs.test_relay.input: required with more than one input "
                             f"(one of {', '.join(sorted(self.inputs))})")
        if relay.input is not None and relay.input not in self.inputs:
            raise ValueError(f"outputs.test_relay.input: no input {relay.input!r} "
                             f"(inputs: {', '.join(sorted(self.inputs))})")
        spec = self.inputs[relay.input or next(iter(self.inputs))]
        needed = max(spec.min_press_ms, spec.hold_ms) + 50
        if relay.pulse_ms < needed:
            raise ValueError(f"outputs.test_relay.pulse_ms: must be at least {needed} (the "
                             "input's min_press_ms or hold_ms, plus 50) for the pulse to "
                             "count as a press")
        return self

    @property
    def test_input(self) -> str | None:
        """The panic input the test relay is wired to, if there is a relay."""
        relay = self.outputs.test_relay
        if relay is None:
            return None
        return relay.input or next(iter(self.inputs))

    @model_validator(mode="after")
    def _pins_used_once(self) -> Config:
        users = [(f"inputs.{name}", spec.pin) for name, spec in self.inputs.items()]
        users += [(f"inputs.{name}.supervision_pin", spec.supervision_pin)
                  for name, spec in self.inputs.items() if spec.supervision_pin is not None]
        users += [(f"outputs.{name}", spec.pin) for name in OutputsConfig.model_fields
                  if (spec := getattr(self.outputs, name)) is not None]
        owners: dict[int, str] = {}
        for key, pin in users:
            if pin in owners:
                raise ValueError(f"GPIO {pin} is used by both {owners[pin]} and {key}")
            owners[pin] = key
        return self

    @property
    def client_id(self) -> str:
        return self.broker.client_id or f"gp-{self.device.site_id}-{self.device.device_id}"

    @property
    def identity(self) -> Identity:
        """Who reports: copied into every payload."""
        d = self.device
        return Identity(site_id=d.site_id, device_id=d.device_id, location=d.location)

    @property
    def topic_prefix(self) -> str:
        """``{root}/{site_id}/{device_id}``: this device's subtree."""
        return f"{self.uplink.topic_root}/{self.device.site_id}/{self.device.device_id}"

    @property
    def simulated(self) -> bool:
        return self.gpio.pin_factory == "mock"

    def fingerprint(self) -> str:
        """Short hash of the effective configuration (comments and layout do not count)."""
        canonical = self.model_dump_json(exclude_none=False).encode()
        return hashlib.sha256(canonical).hexdigest()[:16]
