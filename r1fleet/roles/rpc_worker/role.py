"""Pool worker role: ggml's rpc-server on the worker's pool address, behind a firewall that admits the head alone.

Install: the worker's own solo services retired (the pool needs its GPU memory), a check that the pool address is
one of the host's, Debian's rpc-server package with the GPU backend the worker needs and the RPC backend
(decide.rpc_worker_install: the llama.cpp role's sourcing, refused where it has no rpc-server), nftables, and the
`ggml-rpc` system user. Configure: the rules (`table inet r1fleet-rpc`: the head's address to the port, everyone
else dropped, this host's own users included), the unit that loads them (exposure's firewall unit template), and
the hardened r1fleet-rpc-server.service, which requires that firewall unit and whose own IPAddressAllow admits the
head alone, so the port stays the head's with the table gone. Activate: the firewall, then the service, healthy
once it listens on the pool address.

Built from a validated RpcWorker (decide.rpc_worker: refuses any setting that opens the port wider); see
decide.py for the security model.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Mapping

from pyinfra import host
from pyinfra.api import FactBase, deploy, operation
from pyinfra.facts.files import File
from pyinfra.facts.server import Which
from pyinfra.operations import files, server, systemd

from r1fleet.fleet.config import HostConfig
from r1fleet.records import HostPlan
from r1fleet.artifacts.pins import Platform, load_pins
from r1fleet.operations.common import (
    TEMPLATES as SHARED_TEMPLATES,
    AptCandidates,
    converge_service,
    converge_service_reads,
    refusal,
    retire_service,
    retire_service_reads,
    service_user,
    service_user_reads,
    unit_file,
)
from r1fleet.roles.exposure.decide import KEY_DIR, port_leaves_the_filter, rules_fingerprint
from r1fleet.roles.exposure.role import NftRules, load_rules
from r1fleet.operations.fact_batch import FactRequest, directory_reads, file_reads, package_reads, service_reads
from r1fleet.artifacts.llama_cpp_install import LlamaInstall
from r1fleet.roles.rpc_worker.decide import (
    HOME,
    RPC_FIREWALL_UNIT,
    RPC_RULES_FILE,
    RPC_TABLE,
    RPC_UNIT,
    USER,
    RpcWorker,
    firewall_context,
    host_address_problem,
    pool_packages,
    rpc_environment,
    rpc_server_args,
    rpc_worker,
    pinned,
    pool_install,
    pool_versions,
    version_check,
)
from r1fleet.operations.stages import HostContext, Role
from r1fleet.render.formats import nft_settings, unit_settings
from r1fleet.render.systemd_unit import LLAMA_UNIT, OLLAMA_PRELOAD_UNIT, OLLAMA_UNIT, UNIT_DIR, unit_context
from r1fleet.operations.tcp_health import ListenHealth

TEMPLATES = Path(__file__).resolve().parent / "templates"
FIREWALL_UNIT_PATH = f"{UNIT_DIR}/{RPC_FIREWALL_UNIT}"
HEALTH_S = 30  # rpc-server listens once its backends are loaded: seconds, not a model load


def choose_pool_install(plan: HostPlan, settings: HostConfig, platform: Platform, pool: str, role: str) -> LlamaInstall:
    """Ask apt (Debian hosts only) what it can install, then decide (pure) for a pool member: `role` is "worker"
    (rpc-server) or "head" (llama-server with the RPC backend). DeployError when the member cannot take part."""
    available: set[str] = set()
    if platform.distro_id == "debian":
        available = host.get_fact(AptCandidates, packages=pool_packages())
    return pool_install(plan, settings, platform, available, pool, role)


class HostAddresses(FactBase):
    """The IP addresses configured on the host's interfaces (iproute2; `hostname -I` where it is missing)."""

    default = list

    def command(self) -> str:
        return ("if command -v ip >/dev/null 2>&1; then ip -o addr show | awk '{split($4, a, \"/\"); print a[1]}'; "
                "else hostname -I 2>/dev/null | tr ' ' '\\n'; fi")

    def process(self, output: list[str]) -> list[str]:
        return [line.strip() for line in output if line.strip()]


@operation()
def check_pool_address(worker: RpcWorker):
    """Refuse the worker unless its pool address is one of the host's own (rpc-server binds nothing else)."""
    problem = host_address_problem(worker, host.get_fact(HostAddresses) or [])
    if problem is None:
        host.noop(f"{worker.bind} is an address of {worker.host}")
        return
    yield refusal(problem)


@operation()
def check_rpc_server(binary: str, package: str):
    """Refuse the worker when the package did not put ggml-rpc-server where the unit runs it."""
    if host.get_fact(File, path=binary):
        host.noop(f"{binary} present")
        return
    yield refusal(f"{binary} is missing after installing {package}; has Debian moved it? (see dpkg -L {package})")


class RpcWorkerRole(Role):
    """rpc-server for a pool's head, on the worker's pool address, filtered to the head alone."""

    def __init__(self, worker: RpcWorker, settings: HostConfig, install: LlamaInstall,
                 versions: Mapping[str, str] | None = None):
        self.worker, self.settings, self.rpc, self.versions = worker, settings, install, dict(versions or {})

    @classmethod
    def prepare(cls, ctx: HostContext) -> "RpcWorkerRole":
        """The worker's pool settings checked (DeployError names a setting that would open the RPC port wider),
        rpc-server from Debian's packages, at the version every member of the pool runs (pool_versions)."""
        pool = ctx.served.pool
        worker = rpc_worker(pool, ctx.settings, ctx.members[pool.head], ctx.hardware)
        install = choose_pool_install(worker.plan, ctx.settings, ctx.platform(), pool.pool, "worker")
        versions = pool_versions(pool, ctx.pool_offers) if ctx.pool_offers else {}
        return cls(worker, ctx.settings, replace(install, packages=pinned(install.packages, versions)), versions)

    def reads(self) -> list[FactRequest]:
        return rpc_worker_reads(self.rpc)

    def install(self) -> None:
        self.changed = _install(self.worker, self.rpc)

    def configure(self) -> None:
        self.unit = _configure(self.worker, self.settings, self.rpc, self.versions)

    def activate(self) -> None:
        _activate(self.worker, self.rpc, self.unit, self.changed)


@deploy("RPC worker")
def _install(worker: RpcWorker, install: LlamaInstall) -> list:
    # The worker's own service would hold the GPU memory the pool planned for rpc-server.
    retire_service(OLLAMA_PRELOAD_UNIT)  # before the server it is bound to
    retire_service(OLLAMA_UNIT)
    retire_service(LLAMA_UNIT)
    check_pool_address(name=f"Pool {worker.pool} address {worker.bind} is this host's", worker=worker)
    packages = server.packages(name="rpc-server packages", packages=[*install.packages, "nftables"])
    check_rpc_server(name="ggml-rpc-server installed", binary=install.binary,
                     package=load_pins().llama_cpp.debian.rpc_server_package)
    service_user(USER, HOME, worker.plan.uses_gpu)
    return [packages]


@deploy("RPC worker")
def _configure(worker: RpcWorker, settings: HostConfig, install: LlamaInstall, versions: Mapping[str, str]):
    """The firewall's rules and unit, and rpc-server's unit (which requires the firewall's, and checks before each
    start that the worker still runs the pool's llama.cpp version)."""
    files.directory(name="r1fleet configuration directory", path=KEY_DIR, user="root", group="root", mode="700")
    files.template(
        name=f"RPC firewall rules: port {worker.port} from the head {worker.head} only",
        src=str(TEMPLATES / "nftables.conf.j2"), dest=RPC_RULES_FILE, user="root", group="root",
        mode="600", jinja_env_kwargs=nft_settings(), fingerprint=_fingerprint(worker), **firewall_context(worker))
    nft = host.get_fact(Which, command="nft") or "/usr/sbin/nft"  # installed by _install when missing
    firewall_unit = files.template(
        name="RPC firewall unit", src=str(SHARED_TEMPLATES / "r1fleet-firewall.service.j2"),
        dest=FIREWALL_UNIT_PATH, user="root", group="root", mode="644", port=worker.port, rules_path=RPC_RULES_FILE,
        nft=nft, service_unit=RPC_UNIT, table=RPC_TABLE, admitted=f"the head of pool {worker.pool} ({worker.head})",
        jinja_env_kwargs=unit_settings(whitespace=False))
    systemd.daemon_reload(name="Reload systemd for the RPC firewall unit", _if=firewall_unit.did_change)
    context = unit_context(
        worker.plan, settings,
        description=f"r1fleet ggml rpc-server (pool {worker.pool}, for its head {worker.head})",
        user=USER,
        exec_start=[install.binary, *rpc_server_args(worker)],
        environment=rpc_environment(worker, install),
        read_write_paths=[HOME],
        restrict_ip=True,
        # The head alone, whatever happens to nftables (a `flush ruleset`, the table deleted): systemd's own
        # filter on the service's sockets drops every other peer, this host's users included. So the deploy's
        # health check only sees that rpc-server listens; it does not connect.
        ip_allow=[worker.head],
        requires=[RPC_FIREWALL_UNIT],
        exec_start_pre=["/bin/bash", "-c", check] if (check := version_check(worker.pool, worker.host, "worker", versions)) else [],
        # rpc-server exits 0 when it cannot bind its address (one that comes up late at boot) or meets an unknown
        # flag (llama.cpp tools/rpc/rpc-server.cpp:151-155,258; ggml/src/ggml-rpc/ggml-rpc.cpp:2138-2141 at
        # 0c1e570), so Restart=on-failure would leave it dead
        restart_always=True,
    )
    return unit_file(RPC_UNIT, context)


def _fingerprint(worker: RpcWorker) -> str:
    """The RPC rules' fingerprint (exposure's rules_fingerprint): the deploy reloads a table without it."""
    return rules_fingerprint((TEMPLATES / "nftables.conf.j2").read_text(), firewall_context(worker))


@deploy("RPC worker")
def _activate(worker: RpcWorker, install: LlamaInstall, unit, changed: list) -> None:
    """The firewall first (a reload replaces the table in one nft transaction), then rpc-server. A worker whose
    port changes has its rpc-server stopped before the old port leaves the filter."""
    if port_leaves_the_filter(host.get_fact(NftRules, table=RPC_TABLE).ports, worker.port):
        systemd.service(name=f"Stop {RPC_UNIT} while its port changes", service=RPC_UNIT, running=False)
    systemd.service(name="Load the RPC firewall rules", service=RPC_FIREWALL_UNIT, running=True, enabled=True)
    load_rules(name="Reload the RPC firewall unless it holds the planned rules", fingerprint=_fingerprint(worker),
               table=RPC_TABLE, unit=RPC_FIREWALL_UNIT)
    converge_service(RPC_UNIT, unit, changed, ListenHealth(worker.bind, worker.port), HEALTH_S,
                     files_used=(install.binary,))


def rpc_worker_reads(install: LlamaInstall) -> list[FactRequest]:
    """Every fact RpcWorkerRole reads on a host where nothing changes (fetched in one round trip first)."""
    return [*retire_service_reads(OLLAMA_PRELOAD_UNIT), *retire_service_reads(OLLAMA_UNIT), *retire_service_reads(LLAMA_UNIT), (HostAddresses, {}),
            *package_reads(), (File, {"path": install.binary}), *service_user_reads(USER, HOME),
            *directory_reads(KEY_DIR), *file_reads(RPC_RULES_FILE), (Which, {"command": "nft"}),
            *file_reads(FIREWALL_UNIT_PATH), *service_reads(RPC_FIREWALL_UNIT), (NftRules, {"table": RPC_TABLE}),
            *converge_service_reads(RPC_UNIT, (install.binary,))]


# ---------------------------------------------------------------------------------------------
# A host that is no longer a worker


class RpcWorkerRetired(Role):
    """Remove a former worker's rpc-server, its firewall unit, rules and table (nothing when there are none)."""

    @classmethod
    def prepare(cls, ctx: HostContext) -> "RpcWorkerRetired":
        return cls()

    def reads(self) -> list[FactRequest]:
        return [*retire_service_reads(RPC_UNIT), (File, {"path": FIREWALL_UNIT_PATH}), (File, {"path": RPC_RULES_FILE})]

    def install(self) -> None:
        _retire()


@deploy("RPC worker")
def _retire() -> None:
    retire_service(RPC_UNIT)  # the service first: it never listens without its firewall
    if host.get_fact(File, path=FIREWALL_UNIT_PATH):
        # stopping the unit deletes its table (ExecStop)
        systemd.service(name="Stop the RPC firewall", service=RPC_FIREWALL_UNIT, running=False, enabled=False)
        files.file(name="Remove the RPC firewall unit", path=FIREWALL_UNIT_PATH, present=False)
        systemd.daemon_reload(name="Reload systemd without the RPC firewall")
    if host.get_fact(File, path=RPC_RULES_FILE):
        files.file(name="Remove the RPC firewall rules", path=RPC_RULES_FILE, present=False)

