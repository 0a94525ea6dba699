"""The configuration: one TOML file, validated once at start (pydantic).

Every daemon and tool loads it through :func:`load_config`; what is wrong is reported
with its key and exit code 78 (see :mod:`.loading`). The sections: the device, its
broker and storage (:mod:`.link`); what is wired to it and what uses that
(:mod:`.hardware`); the whole file and its cross-section rules (:mod:`.model`).
"""

from edge.config.hardware import CameraConfig, InputConfig
from edge.config.link import BrokerConfig
from edge.config.loading import (
    EX_CONFIG,
    ConfigError,
    credential_store,
    load_config,
    parse_config,
)
from edge.config.model import Config

__all__ = ["EX_CONFIG", "BrokerConfig", "CameraConfig", "Config", "ConfigError", "InputConfig",
           "credential_store", "load_config", "parse_config"]
