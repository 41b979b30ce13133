"""The gateway role's decisions, made without a host: which models the fleet's one endpoint routes, to which hosts,
with which keys, and HAProxy's configuration for it (`templates/haproxy.cfg.j2`).

    plan = gateway_plan(fleet.gateway, gateway_entry, endpoints, backend_keys)
    plan.models[0].name       # deepseek-r1:32b-qwen-distill-q4_K_M: the name clients send, every host serving it
    plan.skipped              # the hosts the gateway cannot reach, each with its field and fix

HAProxy routes on the request body's `model` (`option http-buffer-request`, then `req.body,json_query('$.model')`:
the configuration manual's proxy keywords and 7.3.1 "Converters"; run with Debian 12's HAProxy 2.6.12 in
tests/unit/test_gateway.py), so a request must fit its buffer: over
`max_request_kib` it is answered 413. Each host is reached through an internal frontend of its own (an abstract
socket) that sets that host's key, so one model's backend can balance hosts with different keys, the health checks
carry each host's key, and the client's gateway key never reaches a host.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass
from typing import Iterable, Mapping

from r1fleet.fleet.config import GatewaySettings, HostConfig
from r1fleet.records import CONFIG_DIR
from r1fleet.render.formats import HaproxyText
from r1fleet.render.systemd_unit import UNIT_DIR
from r1fleet.roles.exposure.endpoint import Endpoint

GATEWAY_UNIT = "r1fleet-gateway.service"
GATEWAY_DIR = f"{CONFIG_DIR}/gateway"
CONFIG_FILE = f"{GATEWAY_DIR}/haproxy.cfg"
MODELS_FILE = f"{GATEWAY_DIR}/models.json"
CLIENT_KEY_FILE = f"{GATEWAY_DIR}/api-key"  # the gateway's client key, one line, root's 0600
# HAProxy reads its private copy of the key (a systemd credential) as the pattern file of the client key
CLIENT_KEY_CREDENTIAL = "gateway-key"
CLIENT_KEY_PATTERN_FILE = HaproxyText(f'"${{CREDENTIALS_DIRECTORY}}/{CLIENT_KEY_CREDENTIAL}"')
RULES_FILE = f"{GATEWAY_DIR}/nftables.conf"
NFT_TABLE = "r1fleet-gateway"
FIREWALL_UNIT = "r1fleet-gateway-firewall.service"
PACKAGE = "haproxy"  # the distribution's own, security-supported build
BINARY = "/usr/sbin/haproxy"
SERVICE_USER = "haproxy"  # the package's account
DISTRO_UNIT = "haproxy.service"  # the package's own service, masked: r1fleet's unit runs the gateway
DISTRO_UNIT_MASK = f"{UNIT_DIR}/{DISTRO_UNIT}"  # the mask: a link to /dev/null, r1fleet's by that target
HEADER_ROOM_BYTES = 32 * 1024  # the request line and headers share HAProxy's buffer with the body
HEALTH_PATH = "/v1/models"  # both backends answer it; llama-server only with its key


@dataclass(frozen=True)
class HostServer:
    """One host serving a model, as the gateway reaches it."""

    host: str
    address: str
    port: int
    key: str | None  # the host's llama-server key; None for Ollama (no authentication)

    @property
    def slug(self) -> str:
        """The host's name in HAProxy's proxy, server and socket names (host names are already of that alphabet)."""
        return re.sub(r"[^A-Za-z0-9._-]", "_", self.host)

    @property
    def target(self) -> str:
        return f"[{self.address}]:{self.port}" if ":" in self.address else f"{self.address}:{self.port}"

    @property
    def authorization(self) -> str | None:
        """The Authorization header's value as HAProxy's set-header and http-check take it: a log-format string,
        where `%` starts a variable unless doubled (HAProxy configuration manual, 8.2.4 "Custom log format")."""
        return f"Bearer {self.key}".replace("%", "%%") if self.key else None


@dataclass(frozen=True)
class GatewayModel:
    name: str  # the name clients send: the served plan's Ollama tag (llama-server carries it as --alias)
    servers: tuple[HostServer, ...]


@dataclass(frozen=True)
class GatewayPlan:
    settings: GatewaySettings
    models: tuple[GatewayModel, ...]
    skipped: tuple[str, ...] = ()  # hosts left out, each with why and the fix

    @property
    def hosts(self) -> tuple[HostServer, ...]:
        """Every host behind the gateway once (a host serves one model)."""
        return tuple({s.host: s for m in self.models for s in m.servers}.values())

    @property
    def max_request_bytes(self) -> int:
        return self.settings.max_request_kib * 1024

    @property
    def bufsize(self) -> int:
        """HAProxy's buffer: the largest body routed plus the request's headers."""
        return self.max_request_bytes + HEADER_ROOM_BYTES


def gateway_plan(settings: GatewaySettings, gateway: HostConfig, endpoints: Iterable[Endpoint],
                 keys: Mapping[str, str]) -> GatewayPlan:
    """The models the gateway routes and the hosts behind each, from the hosts' endpoints (lock/served.py's plans,
    through roles/exposure/endpoint.py); `keys` holds each llama-server host's key as read on the controller."""
    by_model: dict[str, list[HostServer]] = {}
    skipped = []
    for endpoint in sorted(endpoints, key=lambda e: e.host):
        why = _unreachable(endpoint, settings, gateway, keys)
        if why:
            skipped.append(f"host {endpoint.host}: {why}")
            continue
        address = "127.0.0.1" if endpoint.host == gateway.name and not endpoint.lan else endpoint.address
        key = keys.get(endpoint.host) if endpoint.key_needed else None
        by_model.setdefault(endpoint.model, []).append(HostServer(endpoint.host, address, endpoint.port, key))
    models = tuple(GatewayModel(name, tuple(servers)) for name, servers in sorted(by_model.items()))
    return GatewayPlan(settings, models, tuple(skipped))


def _unreachable(endpoint: Endpoint, settings: GatewaySettings, gateway: HostConfig, keys: Mapping[str, str]) -> str | None:
    if not endpoint.lan and endpoint.host != gateway.name:
        return (f"it serves on 127.0.0.1 only, which the gateway on {gateway.name} cannot reach (field listen; fix: "
                f"set listen and allow {gateway.address})")
    if endpoint.lan and endpoint.host != gateway.name and not _admits(endpoint.allow, gateway.address):
        return (f"its allow ({', '.join(endpoint.allow)}) does not admit the gateway's address {gateway.address} "
                "(field allow; fix: add it)")
    if endpoint.key_needed and not keys.get(endpoint.host):
        return ("its llama-server key is generated on the host, so the gateway cannot send it (field api_key_source; "
                "fix: keep the key on the controller with api_key_source)")
    return None


def _admits(allow: tuple[str, ...], address: str) -> bool:
    """Whether an allow-list admits an address; a DNS name is taken as admitted (it is resolved on the hosts)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return True
    return any(ip in ipaddress.ip_network(cidr, strict=False) for cidr in allow)


@dataclass(frozen=True)
class GatewayEndpoint:
    """Where a client reaches the fleet through its gateway: one URL and key for every model the gateway routes."""

    host: str  # the gateway host
    address: str
    port: int
    models: tuple[str, ...]
    lan: bool
    allow: tuple[str, ...]
    key_file: str | None  # the clients' key on the controller (gateway.api_key_source), when the fleet keeps it
    host_key_file: str = CLIENT_KEY_FILE

    @property
    def url(self) -> str:
        address = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{address}:{self.port}/v1"

    @property
    def key_where(self) -> str:
        return self.key_file or f"on {self.host} only, in {self.host_key_file} (set gateway.api_key_source to keep it here)"

    def document(self) -> dict:
        return {"host": self.host, "url": self.url, "models": list(self.models), "reach": "lan" if self.lan else "host",
                "allow": list(self.allow), "key_file": self.key_file, "host_key_file": self.host_key_file}


def gateway_endpoint(settings: GatewaySettings, gateway: HostConfig, endpoints: Iterable[Endpoint]) -> GatewayEndpoint:
    """The gateway's endpoint with the models it routes, from the hosts' endpoints as `gateway_plan` takes them (a
    llama-server host counts when its key is on the controller, as the deploy needs it)."""
    endpoints = list(endpoints)
    routed = gateway_plan(settings, gateway, endpoints, {e.host: "on the controller" for e in endpoints if e.key_file})
    wildcard = settings.listen in ("0.0.0.0", "::")
    return GatewayEndpoint(
        host=gateway.name, address=gateway.address if wildcard else settings.bind_address, port=settings.port,
        models=tuple(m.name for m in routed.models), lan=not settings.local_only,
        allow=(*settings.allow4, *settings.allow6), key_file=settings.api_key_source)


def models_document(plan: GatewayPlan) -> str:
    """`GET /v1/models` through the gateway: every model once, in OpenAI's list shape."""
    data = [{"id": m.name, "object": "model", "created": 0, "owned_by": "r1fleet"} for m in plan.models]
    return json.dumps({"object": "list", "data": data}, indent=2) + "\n"


def template_context(plan: GatewayPlan) -> dict:
    """The variables of templates/haproxy.cfg.j2 (each value passes render/formats.py's haproxy escaping)."""
    s = plan.settings
    return {
        "bind": f"[{s.bind_address}]" if ":" in s.bind_address else s.bind_address,
        "port": s.port,
        "bufsize": plan.bufsize,
        "max_request_bytes": plan.max_request_bytes,
        "max_request_kib": s.max_request_kib,
        "client_key_file": CLIENT_KEY_PATTERN_FILE,
        "models_file": MODELS_FILE,
        "health_path": HEALTH_PATH,
        "models": [{"name": m.name, "backend": f"model_{i}", "servers": list(m.servers)} for i, m in enumerate(plan.models)],
        "hosts": list(plan.hosts),
    }


def start_check_command() -> list[str]:
    """What the unit runs before each start: HAProxy's own check of the configuration."""
    return [BINARY, "-c", "-q", "-f", CONFIG_FILE]


def server_command() -> list[str]:
    """HAProxy in the foreground (the unit supervises it), master-worker for its reloads."""
    return [BINARY, "-W", "-db", "-f", CONFIG_FILE]
