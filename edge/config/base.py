"""What every section of the configuration is made of: strict models, safe identifiers."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field
from pydantic.functional_validators import AfterValidator


def _topic_safe(value: str) -> str:
    # Identifiers become MQTT topic levels: wildcards or separators in them
    # would let one device publish into another's subtree.
    for forbidden in ("/", "+", "#", "\x00"):
        if forbidden in value:
            raise ValueError(f"must not contain {forbidden!r} (it becomes an MQTT topic level)")
    return value


Identifier = Annotated[
    str,
    Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"),
    AfterValidator(_topic_safe),
]
GpioPin = Annotated[int, Field(ge=0, le=53, description="BCM GPIO number")]


class Strict(BaseModel):
    """Base of every section: unknown keys are refused, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)
