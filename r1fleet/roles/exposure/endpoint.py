"""Where a client reaches a host's model: the exposure role's decisions seen from the client's side.

    endpoint = endpoint_of(entry, served.plan, served.role)
    endpoint.url        # http://192.168.1.23:8080/v1: what an OpenAI client takes as its base URL
    endpoint.model      # deepseek-r1:70b-llama-distill-q4_K_M: the name it sends (llama-server's --alias)
    endpoint.key_file   # ~/.config/r1fleet/dual-3090.key: the key on the controller, when the fleet keeps one

Nothing is decided twice: the port and whether a key is needed come from `exposure_for` (the rule the deploy
applies), the bind address from HostConfig, the host's key file from the same default the exposure role
writes (`API_KEY_FILE`). The deploy's summary, `r1fleet status` and `r1fleet endpoints` all print this record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from r1fleet.fleet.config import API_KEY_FILE, HostConfig
from r1fleet.net import host_port, is_loopback
from r1fleet.records import HostPlan
from r1fleet.roles.exposure.decide import exposure_for

WILDCARD_BINDS = {"0.0.0.0", "::"}


@dataclass(frozen=True)
class Endpoint:
    host: str
    backend: str
    address: str  # where a client connects: the listen address, or 127.0.0.1 on a host that is not opened
    port: int
    model: str  # the name a client sends: the plan's Ollama tag, which llama-server carries as --alias
    stands_for: str | None = None  # in rehearsal: the distill the stand-in holds the slot for
    lan: bool = False  # opened to the allow-list (listen + allow); False: reachable on the host itself only
    allow: tuple[str, ...] = ()
    key_needed: bool = False
    key_file: str | None = None  # the key on the controller (api_key_source), when the fleet keeps it there
    host_key_file: str | None = None  # the key on the host, which the service loads
    ssh: str = ""  # user@address the host is reached at over SSH, for a tunnel to a host-only endpoint
    ssh_port: int = 22
    pool: str | None = None  # the pool whose model this host (its head) serves

    @property
    def base(self) -> str:
        """The server's own root (Ollama's native API lives here, its OpenAI-compatible one under /v1)."""
        return f"http://{host_port(self.address, self.port)}"

    @property
    def url(self) -> str:
        """The OpenAI-compatible base URL both backends answer on."""
        return f"{self.base}/v1"

    @property
    def tunnel(self) -> str:
        """The ssh command that brings a host-only endpoint to this machine's same port."""
        port_flag = f" -p {self.ssh_port}" if self.ssh_port != 22 else ""
        return f"ssh -N -L {self.port}:127.0.0.1:{self.port}{port_flag} {self.ssh}"

    @property
    def key_where(self) -> str:
        """Where the key is, as a person looks for it ('-' when none is needed)."""
        if not self.key_needed:
            return "-"
        if self.key_file:
            return self.key_file
        return f"on {self.host} only, in {self.host_key_file} (set api_key_source to keep it on the controller)"

    def describe(self) -> str:
        """One line: the host, its URL, the model name and how to reach it."""
        model = f"{self.model} (rehearsal for {self.stands_for})" if self.stands_for else self.model
        if self.key_needed:
            access = f"key: {self.key_where}"
        elif self.lan:
            access = "no key (Ollama: the allow-list is its only guard)"
        else:
            access = f"on the host only; from here: {self.tunnel}"
        return f"{self.host}: {self.url}  model {model}  {access}"

    def document(self) -> dict[str, Any]:
        """The record as `--json` prints it (never the key itself)."""
        return {
            "host": self.host, "backend": self.backend, "url": self.url, "base": self.base, "model": self.model,
            "stands_for": self.stands_for, "reach": "lan" if self.lan else "host", "allow": list(self.allow),
            "key_needed": self.key_needed, "key_file": self.key_file,
            "host_key_file": self.host_key_file if self.key_needed else None, "pool": self.pool,
            "tunnel": None if self.lan else self.tunnel,
        }


def client_address(entry: HostConfig) -> str:
    """The address a client uses: the listen address, the SSH address for a wildcard bind, else loopback."""
    if entry.listen in WILDCARD_BINDS:
        return entry.address
    return entry.bind_address


def endpoint_of(entry: HostConfig, plan: HostPlan, role: str = "alone", pool: str | None = None) -> Endpoint | None:
    """The endpoint a host serves under its plan; None for a pool's worker (its rpc-server answers no client) and
    for a host with no model. FleetError (host, field, fix) where the deploy refuses the exposure."""
    if role == "worker" or not plan.fits or not plan.backend or not plan.ollama_tag:
        return None
    exposure = exposure_for(entry, plan, darwin=plan.vendor == "apple")
    return Endpoint(
        host=entry.name, backend=plan.backend, address=client_address(entry), port=exposure.port,
        model=plan.ollama_tag, stands_for=plan.target_model if plan.rehearsal else None,
        lan=not is_loopback(entry.bind_address), allow=(*exposure.allow4, *exposure.allow6),
        key_needed=exposure.needs_api_key, key_file=entry.api_key_source if exposure.needs_api_key else None,
        host_key_file=entry.api_key_file or API_KEY_FILE, ssh=f"{entry.ssh_user}@{entry.address}",
        ssh_port=entry.ssh_port, pool=pool if role == "head" else None,
    )
