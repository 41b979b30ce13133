"""One host's configuration: the fleet file's schema (`HostSettings`), and `HostConfig`, the resolved host
every role takes, however it was given (fleet file, Ansible inventory, `--data`), validated by one set of rules.

Example:
    >>> cfg = HostConfig(name="box", address="192.168.1.20", listen="192.168.1.20", allow=["192.168.1.0/24"])
    >>> cfg.local_api("ollama")
    'http://192.168.1.20:11434'
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from r1fleet.errors import FleetError
from r1fleet.records import CONFIG_DIR, DEFAULT_MODEL_DIR, INSTALL_ROOT, Backend
from r1fleet.net import host_port, is_loopback
from r1fleet.plan.policy import Policy, known_model

DEFAULT_PORTS = {"ollama": 11434, "llama.cpp": 8080}
# The llama-server API key of an exposed host: generated on the host, root-only, handed to the
# service as a systemd credential so it is never in argv, the unit or a log.
API_KEY_FILE = f"{CONFIG_DIR}/api-key"
API_KEY_MAX_BYTES = 4096
API_KEY_MIN_CHARS = 32
# A key with less variety than this is a word or a pattern, not a random string, whatever its length: 10 distinct
# characters, none in more than a third of the key (`openssl rand -hex 32` passes both but about once in 10^6 tries).
API_KEY_MIN_DISTINCT = 10
# pyinfra host data that overrides the fleet entry (`--data key=value`)
LOCAL_HOST = "@local"
HOST_DATA_OVERRIDES = ("api_key_file", "llama_cpp_install", "ollama_release", "mirror", "listen", "official_ollama_models",
                       "remove_models", "reboot")
# Directories a model_dir must not be (the deploy sets their owner and mode).
SYSTEM_DIRS = {"/var/lib", "/var/tmp", "/var/cache", "/var/log", "/usr/local", "/usr/share", "/usr/lib", INSTALL_ROOT,
               CONFIG_DIR, "/srv/tmp", "/dev/shm", "/run/user"}
# Trees of the system itself: no model_dir anywhere inside them (under /var, only /var/lib/r1fleet).
SYSTEM_TREES = {"root", "etc", "usr", "boot", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "proc", "sys", "dev",
                "run", "snap"}
# Directories r1fleet replaces as a whole (an upgrade prunes releases, a removal deletes them): no model_dir inside.
REPLACED_DIRS = (INSTALL_ROOT, CONFIG_DIR)
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


def merged_networks(allow: list[str], version: int) -> tuple[str, ...]:
    """The allow-list's networks of one IP version, overlapping and adjacent ones merged: nftables refuses
    overlapping intervals in a set ("conflicting intervals").

    >>> merged_networks(["192.168.1.0/24", "192.168.1.7", "192.168.0.0/24", "fd00::/64"], 4)
    ('192.168.0.0/23',)
    """
    networks = [ipaddress.ip_network(cidr, strict=False) for cidr in allow]
    return tuple(str(n) for n in ipaddress.collapse_addresses(n for n in networks if n.version == version))


def ollama_exposure_warning(listen: str | None, allow: list[str]) -> str | None:
    """What an exposed Ollama admits: Ollama has no authentication, so the allow-list is the only guard."""
    if is_loopback(listen):
        return None
    return (f"warning: Ollama has no authentication: anyone in {', '.join(allow)} can chat and also pull, create, "
            "copy and delete models on this host (use backend: llama.cpp for an API key)")


# A base URL r1fleet fetches from (urllib on the controller, curl's argv on the hosts): http(s), a host, an
# optional port and a path of plain characters; no user, query, fragment or other scheme (file://, ftp://).
HTTP_URL_PATTERN = r"https?://[A-Za-z0-9.\-\[\]:]+(/[A-Za-z0-9._~/-]*)?"
# A file path that lands in a unit line (LoadCredential=) or a shell command: absolute, plain characters.
PLAIN_PATH_PATTERN = r"/[A-Za-z0-9._/-]+"


def http_url(value: str | None, example: str, placeholders: str = "") -> str | None:
    """`value` when it is a plain http(s) base URL (see HTTP_URL_PATTERN; `placeholders` such as `{version}`
    allowed in its path), else ValueError naming an example."""
    if value is not None and not re.fullmatch(HTTP_URL_PATTERN, value.replace(placeholders, "x") if placeholders else value):
        raise ValueError(f"{value!r} is not an http(s) URL of a host, an optional port and a plain path; write e.g. {example}")
    return value


def plain_path(value: str | None, example: str) -> str | None:
    """`value` when it is an absolute path of letters, digits, '.', '_', '-' and '/', with no '.' or '..' part."""
    if value is not None and (not re.fullmatch(PLAIN_PATH_PATTERN, value)
                              or any(part in (".", "..") for part in value.split("/"))):
        raise ValueError(f"{value!r} must be an absolute path of letters, digits, '.', '_', '-' and '/' (no '..'), "
                         f"e.g. {example}")
    return value


def ssh_port_clash(port: int | None, ssh_port: int, listen: str | None) -> str | None:
    """Why `port` cannot be the service port of a host opened on `listen`, or None: r1fleet's firewall admits only
    the allow-list to the service port, loaded before the service fails to bind it, so SSH from anywhere else
    would be dropped."""
    if port is not None and port == ssh_port and not is_loopback(listen):
        return (f"port {port} is this host's ssh_port: the firewall r1fleet loads for the service port would drop "
                "SSH from outside allow; give the service another port (Ollama's is 11434, llama.cpp's 8080)")
    return None


def truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in {"1", "true", "yes", "on"}
    return bool(value)


class OllamaReleaseOverride(BaseModel):
    """Host data `ollama_release`: another place to get the pinned release (e.g. the lab mirror)."""

    model_config = ConfigDict(extra="forbid")
    version: str | None = None
    base_url: str | None = None
    sha256: dict[str, str] = {}

    @field_validator("version")
    @classmethod
    def _version_is_a_version(cls, value: str | None) -> str | None:
        # It names a directory the deploy replaces (/opt/r1fleet/ollama/<version>): a version, never a path.
        if value is not None and not re.fullmatch(r"[0-9]{1,6}(\.[0-9]{1,6}){0,3}(-[A-Za-z0-9]{1,32}(\.[A-Za-z0-9]{1,32})*)?", value):
            raise ValueError(f"{value!r} is not a release version; write e.g. 0.32.9 or 0.32.15-standin")
        return value

    @field_validator("base_url")
    @classmethod
    def _base_url_is_a_url(cls, value: str | None) -> str | None:
        return http_url(value, "http://mirror.lan:8088/ollama or https://github.com/ollama/ollama/releases/download/v{version}",
                        placeholders="{version}")

    @field_validator("sha256")
    @classmethod
    def _sums_are_sums(cls, value: dict[str, str]) -> dict[str, str]:
        # Each name is a file in a URL and on the host; each sum is checked by the host's sha256sum.
        for name, digest in value.items():
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}", name) or ".." in name:
                raise ValueError(f"{name!r} is not an archive's file name; write e.g. ollama-linux-amd64.tar.zst")
            if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
                raise ValueError(f"the sha256 of {name} is not 64 hex digits, as sha256sum prints it")
        return value


def read_api_key(source: str, host: str, field: str) -> bytes:
    """An API key file on the controller, as the deploy installs it (one line); FleetError (host, field, fix) when
    it cannot be read, others can read it, or it cannot be a key.

    Only a regular file of mode 0600 or stricter: a FIFO would hang the whole run on its first read, and a key
    others can read is no secret. At least API_KEY_MIN_CHARS characters, so the lock's 64-bit fingerprint of it
    (r1fleet/lock/file.py) is no help to a guess."""
    path = os.path.expanduser(source)
    create = f"`(umask 077; openssl rand -hex 32 > {path})`"
    try:
        # O_NONBLOCK: opening a FIFO with no writer returns at once instead of waiting for one
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        raise FleetError(f"{path}: cannot read the API key ({err.strerror})", host=host, field=field,
                         fix=f"create it, e.g. {create}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FleetError(f"{path}: not a regular file, so not read as the API key", host=host, field=field,
                             fix=f"point it at a plain file holding the key, e.g. {create}")
        if info.st_mode & 0o177:
            raise FleetError(f"{path}: mode {stat.S_IMODE(info.st_mode):04o}; an API key file must be 0600 or stricter",
                             host=host, field=field, fix=f"`chmod 600 {path}` (then rotate the key if others read it)")
        key = os.read(fd, API_KEY_MAX_BYTES + 1)
    finally:
        os.close(fd)
    key = key.strip()
    # the same shape as the key the host generates (roles/exposure.py): one line of printable characters
    if not API_KEY_MIN_CHARS <= len(key) <= API_KEY_MAX_BYTES or not all(33 <= byte < 127 for byte in key):
        raise FleetError(f"{path}: not an API key (one line of {API_KEY_MIN_CHARS} to {API_KEY_MAX_BYTES} printable "
                         "characters)", host=host, field=field,
                         fix=f"write a new key: {create}")
    weak = weak_key_reason(key.decode("ascii"))
    if weak:
        raise FleetError(f"{path}: not a random API key ({weak})", host=host, field=field,
                         fix=f"write a random key instead: {create}")
    return key + b"\n"


def weak_key_reason(key: str) -> str | None:
    """Why a key of the right length is plainly not random (one character repeated, a short string repeated, a
    word padded), or None; the reason quotes nothing of the key. A cheap screen for the obvious, not an entropy
    measure.

    >>> weak_key_reason("x" * 40)
    'only 1 distinct characters'
    >>> weak_key_reason("0123456789abcdef" * 2)
    'a string of 16 characters repeated'
    >>> weak_key_reason("9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08") is None
    True
    """
    distinct = len(set(key))
    if distinct < API_KEY_MIN_DISTINCT:
        return f"only {distinct} distinct characters"
    for period in range(1, len(key) // 2 + 1):
        if len(key) % period == 0 and key == key[:period] * (len(key) // period):
            return f"a string of {period} characters repeated"
    most = max(key.count(character) for character in set(key))
    if most * 3 > len(key):
        return f"one character makes up {most} of its {len(key)}"
    return None


def _policy_over(name: str, policy: Any, data: Mapping[str, Any]) -> dict[str, Any]:
    """The entry's policy with host data's `policy` keys, then its `model` and `backend`, over it."""
    merged = policy.model_dump(exclude_unset=True) if isinstance(policy, Policy) else dict(policy or {})
    given = data.get("policy")
    if given is not None and not isinstance(given, Mapping):
        raise FleetError(f"{given!r} is not a mapping of policy keys", host=name, field="policy",
                         fix="""give JSON, e.g. --data 'policy={"min_context": 4096}' (`r1fleet schema` lists the keys)""")
    merged.update(given or {})
    for shortcut in ("model", "backend"):
        value = data.get(shortcut)
        if value is not None:
            # `--data model=70` reaches here as a number: the catalog names it, or says it knows no such model
            merged[shortcut] = str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    return merged


# A lab host's Debian release (r1fleet/lab/image.py builds one image per suite); a real host runs what is installed.
LabDistro = Literal["bookworm", "trixie", "forky"]


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
    distro: LabDistro | None = Field(
        None, description="lab host's Debian release: bookworm (12), trixie (13) or forky (testing, the default); "
                          "lab fleets only")
    groups: list[str] | None = Field(None, description="extra pyinfra groups for this host")
    model_dir: str | None = Field(None, description="where models are stored on the host")
    mirror: str | None = Field(None, description="base URL of an artifact mirror (the lab sets it)")
    ollama_registry: str | None = Field(
        None, description="base URL of the Ollama registry to take models from (default https://registry.ollama.ai): "
                          "a mirror of it; the weights must still be the catalog's. With rehearsal, the stand-in is "
                          "taken from it by its tag instead of imported from its GGUF")
    reboot: Literal["auto", "defer"] | None = Field(
        None, description="whether r1fleet may reboot the host to load a new GPU driver: auto, or defer (the host stops "
                          "there, reported as waiting for its reboot, until you reboot it and re-run). Unset: auto, except "
                          "on a Proxmox VE host (defer: its VMs would stop); the machine r1fleet runs from is never rebooted")
    api_key_source: str | None = Field(
        None, description="an exposed llama.cpp host's API key as a file on the controller (your secret store; ~ is "
                          "expanded): the deploy installs it, so a rebuilt host keeps its key; the lock holds only its "
                          "fingerprint. Unset: a key is generated on the host, once")

    @field_validator("api_key_source")
    @classmethod
    def _api_key_source_is_a_path(cls, value: str | None) -> str | None:
        if value is not None and not os.path.isabs(os.path.expanduser(value)):
            raise ValueError(f"{value!r} must be an absolute path (or start with ~), e.g. ~/.config/r1fleet/box-a.key")
        return value

    @field_validator("ollama_registry")
    @classmethod
    def _registry_is_a_url(cls, value: str | None) -> str | None:
        return http_url(value, "https://registry.ollama.ai")

    @field_validator("mirror")
    @classmethod
    def _mirror_is_a_url(cls, value: str | None) -> str | None:
        return http_url(value, "http://mirror.lan:8088")

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

    @field_validator("ssh_user")
    @classmethod
    def _ssh_user_is_a_login_name(cls, value: str | None) -> str | None:
        # It reaches ssh's argv (`-l USER`, `USER@HOST`): a leading '-' or a space would be read as an option.
        if value is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}", value):
            raise ValueError(f"{value!r} is not a login name; write letters, digits, '_', '.' or '-', starting with a "
                             "letter or '_', at most 32 characters (e.g. admin)")
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
            # Inside the system's own trees, another service's state or a hidden folder (~/.ssh) the deploy would
            # take over, and a removal with remove_models would delete by name (audit M4, security review N3)
            hidden = any(p.startswith(".") for p in parts)
            system_tree = parts[0] in SYSTEM_TREES or (parts[:2] == ["var", "lib"] and parts[2:3] != ["r1fleet"]) or (
                parts[0] == "var" and parts[1:2] != ["lib"] and len(parts) > 1)
            if (dotted or top_level or temporary_or_home or hidden or system_tree
                    or "/" + "/".join(parts) in SYSTEM_DIRS):
                raise ValueError(f"{value!r} is a system, home or temporary directory r1fleet would take over; "
                                 "give a directory of its own, e.g. /var/lib/r1fleet/models or /srv/models/r1fleet")
            inside = next((d for d in REPLACED_DIRS if value.startswith(d + "/")), None)
            if inside:
                raise ValueError(f"{value!r} is inside {inside}, which r1fleet replaces as a whole (an upgrade or a "
                                 "removal would delete the models); give a directory of its own, e.g. /var/lib/r1fleet/models")
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


class OpenedByListen:
    """What follows from `listen` and `allow`, for whatever a fleet file may open to the LAN: a host's model server
    (HostConfig) and the gateway (GatewaySettings). The class using it has both fields."""

    @property
    def bind_address(self) -> str:
        """Where the service listens: 127.0.0.1 unless the fleet file opens it."""
        return self.listen or "127.0.0.1"

    @property
    def local_only(self) -> bool:
        return is_loopback(self.bind_address)

    @property
    def allow4(self) -> tuple[str, ...]:
        """The IPv4 networks of `allow`, merged for nftables (see merged_networks)."""
        return merged_networks(self.allow, 4)

    @property
    def allow6(self) -> tuple[str, ...]:
        """The IPv6 networks of `allow`, merged for nftables (see merged_networks)."""
        return merged_networks(self.allow, 6)


GATEWAY_PORT = 8000
GATEWAY_MAX_REQUEST_KIB = 1024


class GatewaySettings(OpenedByListen, BaseModel):
    """`gateway:`: one OpenAI endpoint for the fleet, an HAProxy on one of its hosts (roles/gateway/)."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field(description="the fleet's host that runs the gateway (it may also serve a model)")
    port: int = Field(GATEWAY_PORT, ge=1, le=65535, description="the gateway's port")
    listen: str | None = Field(None, description="address the gateway binds; unset = 127.0.0.1 only")
    allow: list[str] = Field([], validate_default=True,
                             description="networks (CIDR) admitted to the gateway's port when listen is set")
    api_key_source: str | None = Field(
        None, description="the gateway's client key as a file on the controller (~ is expanded); unset: one is "
                          "generated on the gateway host, once")
    max_request_kib: int = Field(GATEWAY_MAX_REQUEST_KIB, ge=64, le=16384,
                                 description="the largest request body the gateway reads to route it (a longer chat is "
                                             "refused with 413)")

    # the same rules as a host's listen, allow and key file, each reported under its own field
    @field_validator("listen")
    @classmethod
    def _listen_is_an_address(cls, value: str | None) -> str | None:
        return HostSettings._listen_is_an_address(value)

    @field_validator("api_key_source")
    @classmethod
    def _api_key_source_is_a_path(cls, value: str | None) -> str | None:
        return HostSettings._api_key_source_is_a_path(value)

    @field_validator("allow")
    @classmethod
    def _allow_is_networks_and_given_when_open(cls, value: list[str], info: ValidationInfo) -> list[str]:
        HostSettings._allow_are_networks(value)
        if not is_loopback(info.data.get("listen")) and not value:
            raise ValueError("listen is set but allow is empty; list the networks that may connect (e.g. "
                             "[192.168.1.0/24]), or write allow: [0.0.0.0/0] to open it to every network on purpose")
        return value



def gateway_clash(gateway: GatewaySettings, entry: "HostConfig") -> str | None:
    """Why the gateway's port cannot be used on its host, or None: the host's model port (its `port`, or either
    backend's default while the plan may pick either) or its ssh_port."""
    model_ports = [entry.port] if entry.port else list(DEFAULT_PORTS.values())
    if gateway.port in model_ports:
        which = f"host {entry.name}'s model port" if entry.port else \
            f"a model server's default port (Ollama 11434, llama.cpp 8080), which host {entry.name} may bind"
        return f"port {gateway.port} is {which}"
    if gateway.port == entry.ssh_port:
        return f"port {gateway.port} is host {entry.name}'s ssh_port"
    return None


# The settings HostSettings' validators check, applied to a HostConfig built any other way.
_CHECKED_SETTINGS = ("address", "ssh_user", "ssh_port", "listen", "allow", "port", "groups", "model_dir", "api_key_source",
                     "ollama_registry", "mirror")


class HostConfig(OpenedByListen, BaseModel):
    """One host with every setting resolved: the fleet file (defaults merged in), an Ansible inventory or
    pyinfra host data (`--data` overrides), validated by the same rules whichever way it came. Every role
    takes it."""

    model_config = ConfigDict(extra="forbid")

    name: str
    address: str
    ssh_user: str = "root"
    ssh_key: str | None = None
    ssh_port: int = 22
    listen: str | None = None
    allow: list[str] = Field([], validate_default=True)  # listen without allow is refused (_exposure_needs_an_allow_list)
    port: int | None = None
    policy: Policy = Policy()
    rehearsal: bool = False
    ollama_public: bool = False
    profile: str | None = None
    distro: LabDistro | None = None  # a lab host's Debian release (HostSettings.distro)
    # The known_hosts file a plug-in pins its own hosts' keys in (the lab's); never a fleet file's key, host data
    # or an Ansible variable, so no file can turn host-key checking off for a real host (audit L1).
    ssh_known_hosts: str | None = None
    groups: list[str] = []
    model_dir: str = DEFAULT_MODEL_DIR
    mirror: str | None = None
    ollama_registry: str | None = None
    # deploy knobs (host data or the fleet file)
    api_key_file: str | None = None  # the llama-server API key of an exposed host (set for one by from_host_data)
    api_key_source: str | None = None  # that key as a file on the controller, installed by the deploy
    llama_cpp_install: Literal["auto", "package", "source"] = "auto"
    ollama_release: OllamaReleaseOverride | None = None
    official_ollama_models: Literal["keep", "remove"] = "keep"  # an official Ollama install's models on takeover
    reboot: Literal["auto", "defer"] | None = None  # a GPU driver's reboot: HostSettings.reboot
    remove_models: bool = False  # a removal (deploy/remove.py) deletes the models too

    @field_validator("remove_models", mode="before")
    @classmethod
    def _remove_models_is_yes_or_no(cls, value: Any) -> Any:
        # `--data remove_models=...` arrives as text: anything but a plain yes or no is refused, never guessed
        # (a typo must not delete 43 GB, nor silently keep what the user meant to free).
        words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in words:
            return words[value.strip().lower()]
        raise ValueError(f"{value!r} is not true or false; write remove_models=true to delete the models, "
                         "or leave it out to keep them")

    @model_validator(mode="before")
    @classmethod
    def _same_rules_as_the_fleet_file(cls, data: Any) -> Any:
        """Settings that did not come through a fleet file (`--data`, a test) meet its validators too."""
        if isinstance(data, dict):
            HostSettings.model_validate({k: data[k] for k in _CHECKED_SETTINGS if data.get(k) is not None})
        return data

    @field_validator("port")
    @classmethod
    def _port_is_not_ssh(cls, value: int | None, info: ValidationInfo) -> int | None:
        if problem := ssh_port_clash(value, info.data.get("ssh_port", 22), info.data.get("listen")):
            raise ValueError(problem)
        return value

    @field_validator("ollama_registry")
    @classmethod
    def _registry_is_https_outside_the_lab(cls, value: str | None, info: ValidationInfo) -> str | None:
        # The manifest it serves is trusted for everything but the weights (their digest is pinned): only TLS
        # keeps a man in the middle out of it. The lab's registry is the controller's own mirror.
        if value is not None and value.startswith("http://") and not info.data.get("profile"):
            raise ValueError(f"{value!r} is plain http: a registry is read over https outside the lab; write "
                             f"{'https://' + value.removeprefix('http://')}")
        return value

    @field_validator("api_key_file")
    @classmethod
    def _api_key_file_is_plain(cls, value: str | None) -> str | None:
        # It lands in the unit's LoadCredential= line and in shell commands on the host; the deploy moves the key over
        # it and makes it root's 0600, so it must be a file of r1fleet's: /etc/shadow is not (security review N7).
        path = plain_path(value, API_KEY_FILE)
        if path is not None and not path.startswith(f"{CONFIG_DIR}/"):
            raise ValueError(f"{path!r} is not in {CONFIG_DIR}: the deploy writes the key there and owns the file; "
                             f"write e.g. {API_KEY_FILE}")
        return path

    @field_validator("allow")
    @classmethod
    def _exposure_needs_an_allow_list(cls, value: list[str], info: ValidationInfo) -> list[str]:
        if not is_loopback(info.data.get("listen")) and not value:
            raise ValueError(
                "listen is set but allow is empty; list the networks that may connect (e.g. [192.168.1.0/24]), "
                "or write allow: [0.0.0.0/0] to open it to every network on purpose"
            )
        return value

    def exposure_check(self, backend: str, host_name: str | None = None) -> str | None:
        """The exposure rules that depend on the planned backend, for the plan and the deploy alike: the service port
        (the backend's default when unset) is not the ssh_port of an opened host; an exposed Ollama (no authentication) whose allow-list reaches beyond private ranges is refused (FleetError) unless
        `ollama_public`; otherwise the warning an exposed Ollama carries, or None."""
        if problem := ssh_port_clash(self.port_for(backend), self.ssh_port, self.listen):
            raise FleetError(problem, host=host_name or self.name, field="port",
                             fix=f"set port: to another number than ssh_port ({self.ssh_port})")
        if backend != "ollama" or self.listen is None:
            return None
        wide = public_networks([*self.allow4, *self.allow6])
        if wide and not self.ollama_public:
            raise FleetError(
                f"an exposed Ollama has no authentication, and allow reaches beyond private ranges ({', '.join(wide)})",
                host=host_name or self.name, field="allow",
                fix="narrow allow to your LAN, use backend: llama.cpp (API key), or set ollama_public: true on purpose",
            )
        return ollama_exposure_warning(self.listen, self.allow)

    def api_key_text(self) -> bytes | None:
        """The API key from `api_key_source`, read on the controller; None when the host generates its own."""
        return read_api_key(self.api_key_source, self.name, "api_key_source") if self.api_key_source else None

    def port_for(self, backend: str) -> int:
        return self.port or DEFAULT_PORTS[backend]

    def local_api(self, backend: str) -> str:
        """The URL the deploy uses on the host itself to reach the service."""
        address = self.bind_address
        if address in {"0.0.0.0", "::"}:
            address = "127.0.0.1"
        return f"http://{host_port(address, self.port_for(backend))}"

    @classmethod
    def from_host_data(cls, name: str, data: Mapping[str, Any]) -> "HostConfig":
        """The host's config from pyinfra host data: the fleet entry under `r1fleet`, then top-level keys
        (`--data` wins), through the same validators. `--data rehearsal=true` arrives as a string; `model`,
        `backend` and `policy` override the entry's policy key by key, as a host's own settings do in a fleet file."""
        merged: dict[str, Any] = {"name": name, **dict(data.get("r1fleet") or {})}
        for key in HOST_DATA_OVERRIDES:
            if data.get(key) is not None:
                merged[key] = data[key]
        if data.get("rehearsal") is not None:
            merged["rehearsal"] = truthy(data["rehearsal"])
        merged["policy"] = _policy_over(name, merged.get("policy"), data)
        # `@local`, pyinfra's local connector, is the machine the deploy runs on: served at 127.0.0.1, no fleet file
        merged.setdefault("address", data.get("ssh_hostname") or ("127.0.0.1" if name == LOCAL_HOST else name))
        if not is_loopback(merged.get("listen")) and not merged.get("api_key_file"):
            merged["api_key_file"] = API_KEY_FILE  # written once on the host by roles/exposure.py
        try:
            return cls.model_validate(merged)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"])
            if field in ("policy.model", "policy.backend") and data.get(field[len("policy."):]) is not None:
                field = field[len("policy."):]  # named as the host data gave it
            raise FleetError(first["msg"].removeprefix("Value error, "), host=name, field=field,
                             fix="correct this value in the fleet file or --data") from None

    def ssh_args(self) -> tuple[str, ...]:
        """Options for the system `ssh` client that reach this host as the fleet file says."""
        args = ["-l", self.ssh_user, "-p", str(self.ssh_port)]
        if self.ssh_key:
            args += ["-i", self.ssh_key, "-o", "IdentitiesOnly=yes"]
        if self.ssh_known_hosts:  # a plug-in's own hosts: their keys, and no other, from its known_hosts
            args += ["-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={self.ssh_known_hosts}"]
        return tuple(args)
