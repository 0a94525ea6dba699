"""Reading the configuration: one TOML file, every problem named by its key.

A bad file raises :class:`ConfigError` carrying one line per problem, each naming the key
path (``inputs.gate.pin: ...``); the entry point prints them and exits with
:data:`EX_CONFIG` (78), which the systemd units list in ``RestartPreventExitStatus`` so
that a typo never becomes a restart loop.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from edge.config.model import Config

EX_CONFIG = 78  # sysexits.h: configuration error


class ConfigError(Exception):
    """The configuration cannot be used; ``problems`` holds one line per error."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


CREDENTIAL_PREFIX = "credential:"


@dataclass(frozen=True)
class CredentialStore:
    """Where ``credential:NAME`` paths of the configuration point."""

    directory: Path
    file_prefix: str = ""

    def path(self, name: str) -> Path:
        return self.directory / f"{self.file_prefix}{name}"


def credential_store(config_path: Path, environ: dict | None = None) -> CredentialStore:
    """systemd's private copy when run as a unit (``LoadCredential=gp:/etc/guardpost/
    credentials`` names each file ``gp_{name}``), else ``credentials/`` beside the
    configuration file, for commands an installer runs by hand as root."""
    env = os.environ if environ is None else environ
    if env.get("CREDENTIALS_DIRECTORY"):
        return CredentialStore(Path(env["CREDENTIALS_DIRECTORY"]), "gp_")
    return CredentialStore(Path(config_path).resolve().parent / "credentials")


def _resolve_credentials(config: Config, store: CredentialStore) -> Config:
    def resolve(path: Path | None) -> Path | None:
        if path is None or not str(path).startswith(CREDENTIAL_PREFIX):
            return path
        return store.path(str(path)[len(CREDENTIAL_PREFIX):])

    broker = config.broker.model_copy(
        update={"password_file": resolve(config.broker.password_file)})
    if broker.tls is not None:
        tls = broker.tls.model_copy(update={name: resolve(getattr(broker.tls, name))
                                            for name in ("ca_file", "cert_file", "key_file")})
        broker = broker.model_copy(update={"tls": tls})
    trust = config.trust.model_copy(update={"event_key": resolve(config.trust.event_key)})
    return config.model_copy(update={"broker": broker, "trust": trust})


def _check_files(config: Config) -> list[str]:
    """Files the configuration names must be readable now, not at the first alarm."""
    problems = []
    named: list[tuple[str, Path | None]] = [("broker.password_file", config.broker.password_file)]
    if config.broker.tls is not None:
        tls = config.broker.tls
        named += [("broker.tls.ca_file", tls.ca_file), ("broker.tls.cert_file", tls.cert_file),
                  ("broker.tls.key_file", tls.key_file)]
    for key, path in named:
        if path is None or str(path).startswith(CREDENTIAL_PREFIX):
            continue  # no credential store was given to resolve it: nothing to check
        try:
            with open(path, "rb"):
                pass
        except OSError as err:
            problems.append(f"{key}: cannot read {path}: {err.strerror}")
    return problems + _event_key_problems(config.trust.event_key)


def _event_key_problems(path: Path) -> list[str]:
    """The event-signing key must be usable now, not at the first alarm's publication."""
    if str(path).startswith(CREDENTIAL_PREFIX):
        return []  # no credential store was given to resolve it
    # Imported here: only what talks to the broker (the uplink) loads cryptography.
    from edge.contract.event_signature import load_private_key

    try:
        load_private_key(Path(path).read_bytes(), str(path))
    except OSError as err:
        return [f"trust.event_key: cannot read {path}: {err.strerror} (guardpost provision "
                "creates it)"]
    except ValueError as err:
        return [f"trust.event_key: {err} (guardpost provision creates one)"]
    return []


def _describe(error: dict) -> str:
    location = ".".join(str(part) for part in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key (not part of the configuration; check the spelling)"
    elif error["type"] == "missing":
        message = "required key is missing"
    # Cross-field rules of the whole file name their keys in the message itself.
    return f"{location}: {message}" if location else message


def _keys_with_nul(value, key: str = "") -> list[str]:
    if isinstance(value, str):
        return [key or "(value)"] if "\x00" in value else []
    if isinstance(value, dict):
        found = [f"{key}.{k}" if key else str(k) for k in value if "\x00" in str(k)]
        for name, item in value.items():
            found += _keys_with_nul(item, f"{key}.{name}" if key else str(name))
        return found
    if isinstance(value, list):
        return [k for index, item in enumerate(value)
                for k in _keys_with_nul(item, f"{key}[{index}]")]
    return []


def parse_config(data: dict, source: str = "<config>",
                 credentials: CredentialStore | None = None,
                 check_broker_files: bool = True) -> Config:
    """Validate an already-parsed TOML document; ``credential:NAME`` paths are resolved
    in ``credentials`` (see :func:`credential_store`).

    ``check_broker_files=False`` is for everything that never talks to the broker (the
    button daemon above all): the alarm path must not depend on the uplink's secrets,
    which it cannot even read, nor on a certificate the platform has not issued yet.
    """
    nul = [f"{key}: contains a NUL character" for key in _keys_with_nul(data)]
    if nul:
        # No path, host, topic or text may hold one: the C libraries underneath (the file
        # system, SQLite, OpenCV) refuse it, and MQTT strings must not contain it.
        raise ConfigError(source, nul)
    try:
        config = Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(source, [_describe(e) for e in err.errors()]) from None
    if credentials is not None:
        config = _resolve_credentials(config, credentials)
    problems = _check_files(config) if check_broker_files else []
    if problems:
        raise ConfigError(source, problems)
    return config


def load_config(path: str | Path, *, check_broker_files: bool = True) -> Config:
    """Read and validate the TOML file at ``path``; raise :class:`ConfigError` on any problem."""
    source = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise ConfigError(source, [f"(file): cannot read: {err.strerror}"]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(source, [f"(file): not UTF-8 text: {err}"]) from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(source, [f"(file): TOML syntax error: {err}"]) from None
    return parse_config(data, source, credentials=credential_store(Path(path)),
                        check_broker_files=check_broker_files)
