"""``guardpost broker-acl``: the broker's ACL file, written from the list of identities.

    guardpost broker-acl identities.toml [--output /etc/mosquitto/guardpost/acl]

The list (a TOML file; ``config/mosquitto/identities.example.toml`` explains each key)::

    topic_root = "guardpost/v1"          # optional: the devices' uplink.topic_root

    [[sites]]
    id = "school-330106-0042"
    devices = ["gate-south-1", "gate-north-1"]

    [[platforms]]
    name = "duty-desk-1"
    roles = ["ack"]                      # "ack" (a duty desk), "command" (an administrator)
    sites = ["school-330106-0042"]       # optional: every site when left out

Each identity's certificate carries a name (its CN) that the broker takes as the user
name and as the client id (``use_identity_as_username``, ``use_username_as_clientid``):
``{site_id}/{device_id}`` for a device (identifiers may not contain ``/``, so the name
cannot be read two ways) and ``platform:{name}`` for a platform identity (``:`` is not
allowed in identifiers, so it can never be a device's).

Devices also read every platform instance's presence
(``{root}/_platform/+/presence``), and a platform identity with the role ``ack``
publishes its own, ``{root}/_platform/{name}/presence``: the platform id of a duty
desk's presence is its identity's name.

Every identity gets explicit ``user``/``topic`` lines: no patterns that apply to every
certificate the CA ever signs, nothing copied by hand. Identifiers follow the device
configuration's rules. Bad input is reported with its key (exit 78) and nothing is
written; the file is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from edge.config.base import Identifier, Strict
from edge.config.link import UplinkConfig
from edge.contract.presence import presence_filter, presence_topic
from edge.runtime.durable import fsync_directory

DEVICE_WRITES = ("status", "health", "event/#", "snapshot/#", "rejected", "reply/#")
DEVICE_READS = ("ack", "cmd/#")
ROLE_WRITES = {"ack": "ack", "command": "cmd/#"}  # below {root}/{site}/{device}/
NEW_FILE_MODE = 0o644  # Mosquitto reads it after dropping to its own user


class IdentitiesError(Exception):
    """The list of identities cannot be used; ``problems`` holds one line per error."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


def _no_repeats(values: list[str] | None) -> list[str] | None:
    repeated = sorted({v for v in values or () if values.count(v) > 1})
    if repeated:
        raise ValueError(f"listed more than once: {', '.join(repeated)}")
    return values


class Site(Strict):
    id: Identifier
    devices: list[Identifier] = Field(min_length=1)

    _unique_devices = field_validator("devices")(_no_repeats)


class PlatformIdentity(Strict):
    name: Identifier
    roles: list[Literal["ack", "command"]] = Field(min_length=1)
    sites: list[Identifier] | None = Field(None, min_length=1)

    _unique = field_validator("roles", "sites")(_no_repeats)


class Identities(Strict):
    topic_root: str = "guardpost/v1"
    sites: list[Site] = Field(default_factory=list)
    platforms: list[PlatformIdentity] = Field(default_factory=list)

    @field_validator("topic_root")
    @classmethod
    def _same_rule_as_the_device(cls, root: str) -> str:
        try:
            return UplinkConfig(topic_root=root).topic_root
        except ValidationError as err:
            raise ValueError(err.errors()[0]["msg"]) from None

    @model_validator(mode="after")
    def _consistent(self) -> Identities:
        problems = []
        site_ids = [site.id for site in self.sites]
        problems += [f"sites: {s!r} is listed more than once"
                     for s in sorted({s for s in site_ids if site_ids.count(s) > 1})]
        names = [p.name for p in self.platforms]
        problems += [f"platforms: {n!r} is listed more than once"
                     for n in sorted({n for n in names if names.count(n) > 1})]
        for index, platform in enumerate(self.platforms):
            problems += [f"platforms.{index}.sites: {s!r} is not one of the [[sites]]"
                         for s in platform.sites or () if s not in site_ids]
        if not self.sites and not self.platforms:
            problems.append("no [[sites]] and no [[platforms]]: nothing to write")
        if problems:
            raise ValueError("; ".join(problems))
        return self


def device_name(site_id: str, device_id: str) -> str:
    """The CN of a device's certificate, its MQTT user name and client id."""
    return f"{site_id}/{device_id}"


def platform_name(name: str) -> str:
    """The CN of a platform identity's certificate."""
    return f"platform:{name}"


def certificate_names(identities: Identities) -> list[tuple[str, str]]:
    """(CN, what it is) for every identity, in the order of the ACL file."""
    names = [(device_name(site.id, device), "device")
             for site in identities.sites for device in site.devices]
    for platform in identities.platforms:
        where = ", ".join(platform.sites) if platform.sites else "every site"
        names.append((platform_name(platform.name),
                      f"platform, {' and '.join(platform.roles)}, {where}"))
    return names


def acl_text(identities: Identities, source: str = "the list of identities") -> str:
    root = identities.topic_root
    lines = [f"# Written by `guardpost broker-acl` from {source}. Do not edit: change the",
             "# list, run the tool again, then reload Mosquitto (systemctl reload mosquitto).",
             "# Anything not granted here is refused; an identity not listed may connect",
             "# (its certificate is valid) but can neither publish nor read anything.", ""]
    for site in identities.sites:
        for device in site.devices:
            name = device_name(site.id, device)
            prefix = f"{root}/{name}"
            lines += [f"# device {device} of site {site.id}", f"user {name}"]
            lines += [f"topic write {prefix}/{leaf}" for leaf in DEVICE_WRITES]
            lines += [f"topic read {prefix}/{leaf}" for leaf in DEVICE_READS]
            lines.append(f"topic read {presence_filter(root)}")
            lines.append("")
    for platform in identities.platforms:
        lines += [f"# platform identity {platform.name}: {' and '.join(platform.roles)}",
                  f"user {platform_name(platform.name)}"]
        if platform.sites is None:  # every site: '+' is one topic level, the site id
            lines.append(f"topic read {root}/#")
            lines += [f"topic write {root}/+/+/{ROLE_WRITES[role]}" for role in platform.roles]
        for site in platform.sites or ():
            lines.append(f"topic read {root}/{site}/#")
            lines += [f"topic write {root}/{site}/+/{ROLE_WRITES[role]}"
                      for role in platform.roles]
        if "ack" in platform.roles:
            # a duty desk tells the devices it is there: its own presence, no other's
            lines.append(f"topic write {presence_topic(root, platform.name)}")
        lines.append(f"topic read {presence_filter(root)}")
        lines.append("")
    return "\n".join(lines)


def _describe(error: dict) -> str:
    location = ".".join(str(part) for part in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key (check the spelling)"
    elif error["type"] == "missing":
        message = "required key is missing"
    return f"{location}: {message}" if location else message


def load_identities(path: Path) -> Identities:
    """Read and validate the list; raises :class:`IdentitiesError` naming each bad key."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise IdentitiesError(str(path), [f"cannot read it: {err.strerror}"]) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise IdentitiesError(str(path), [f"not valid TOML ({err})"]) from None
    try:
        return Identities.model_validate(data)
    except ValidationError as err:
        raise IdentitiesError(str(path), [_describe(e) for e in err.errors()]) from None


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` at once: Mosquitto, reloading meanwhile, reads the old file or
    the new one, never half of one. An existing file keeps its mode and owner."""
    path = Path(path)
    try:
        before = path.stat()
    except FileNotFoundError:
        before = None
    temporary = path.with_name(f".{path.name}.new")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, NEW_FILE_MODE)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, before.st_mode & 0o7777 if before else NEW_FILE_MODE)
        if before is not None and os.geteuid() == 0:
            os.chown(temporary, before.st_uid, before.st_gid)
        temporary.replace(path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
