"""The whole r1fleet deploy of one host, as pyinfra runs it: probe -> plan -> roles.

A pyinfra user calls it from their own deploy file, as with any packaged pyinfra deploy:

    from r1fleet.deploy.serve import serve_r1

    serve_r1()

All decisions live in r1fleet (pure, tested); this only wires them to the host: plan, then the roles
(driver, exposure, backend; macOS: one LaunchDaemon role; a pool member: its part of the pool, see
r1fleet/deploy/pool_members.py) in stages (r1fleet/operations/stages.py).
"""

from pyinfra import host, state

from r1fleet.fleet.config import HostConfig
from r1fleet.plan.format import format_plan
from r1fleet.errors import DeployError
from r1fleet.artifacts.pins import check_disk, model_download, platform_from_hardware
from r1fleet.probe.facts import R1Probe
from r1fleet.hardware import parse_probe
from r1fleet.lock.match import lock_path, read_lock, relock_fleet
from r1fleet.lock.served import Served, served_alone, served_in_pool
from r1fleet.records import Hardware, HostPlan
from r1fleet.deploy import summary
from r1fleet.roles.exposure import role as exposure
from r1fleet.roles.exposure.role import ExposureRole
from r1fleet.roles.gpu_driver.role import DriverRole
from r1fleet.roles.macos.role import MacOllamaRole
from r1fleet.operations.stages import Role, apply_roles
from r1fleet.roles.llama_cpp.role import LlamaCppRole, choose_install
from r1fleet.roles.llama_cpp.pool import pool_head
from r1fleet.roles.ollama.role import OllamaRole, release_for
from r1fleet.roles.ollama.decide import takes_from_registry
from r1fleet.plan.pool_settings import PoolSettings
from r1fleet.plan.pools import pool_heading
from r1fleet.deploy.pool_members import member_config, pool_of, pool_plan, remember
from r1fleet.roles.rpc_worker.role import RpcWorkerRetired, RpcWorkerRole, choose_pool_install
from r1fleet.roles.rpc_worker.decide import rpc_worker


def served_here(hardware: Hardware, settings: HostConfig) -> Served:
    """What this host serves outside a pool (r1fleet/lock/served.py): the fleet lock's plan when the fleet has a lock
    that names it (LockMismatch, naming the differences and the relock command, when the hardware changed), else
    today's plan; in rehearsal the stand-in in the planned slot."""
    fleet = host.data.get("r1fleet_fleet")
    lock = read_lock(lock_path(fleet)) if fleet else None
    return served_alone(settings, hardware, lock, relock_fleet(fleet) if fleet else None)


def serve_r1() -> None:
    """Probe, plan and deploy the current pyinfra host (call it from a deploy file)."""
    summary.install(state)

    with summary.step(state, host, "plan"):
        settings = HostConfig.from_host_data(host.name, host.data.dict())
        hardware = parse_probe(host.get_fact(R1Probe, model_dir=settings.model_dir), host.name)  # one round trip
        remember(hardware)
        pool = pool_of(host.data)
        on_macos = hardware.os.system == "Darwin"
        roles = pool_member_roles(pool, settings, hardware) if pool and not on_macos else None
        if roles is None:
            roles = host_roles(served_here(hardware, settings).plan, settings, hardware)
            if not on_macos:  # a former pool worker frees its GPU before this host's own service starts
                roles = [RpcWorkerRetired(), *roles]

    if summary.ok(host):
        apply_roles(roles)


def check_before_change(plan: HostPlan, settings: HostConfig, hardware: Hardware) -> None:
    """What refuses a host before anything changes on it, naming the reason; prints the exposure's warning."""
    check_disk(host.name, plan, hardware, imports_stand_in(plan, settings, hardware))  # 43 GB never fill the disk
    exposure.exposure_for(settings, plan, host.name, darwin=hardware.os.system == "Darwin")
    settings.api_key_text()  # an unreadable api_key_source
    if settings.ollama_registry and hardware.os.system == "Darwin":
        raise DeployError("the macOS role pulls its model from registry.ollama.ai itself (or imports the rehearsal "
                          "stand-in): it does not take one from another registry", host=host.name,
                          field="ollama_registry", fix="remove ollama_registry for this host")
    if warning := settings.exposure_check(plan.backend, host.name):
        print(f"[{host.name}]   {warning}")


def imports_stand_in(plan: HostPlan, settings: HostConfig, hardware: Hardware) -> bool:
    """An Ollama host imports its rehearsal stand-in from the GGUF (`ollama create`), unless it names a registry
    that serves it (Linux: the Mac role always imports it); any other Ollama model comes from a registry."""
    return plan.backend == "ollama" and settings.rehearsal and not takes_from_registry(plan, settings, hardware.os.system)


def host_roles(plan: HostPlan, settings: HostConfig, hardware: Hardware) -> list[Role]:
    """A host serving on its own: its served plan checked and printed, then the driver, the exposure (its firewall
    is active before the backend starts) and the backend. A Mac has one role, its LaunchDaemon Ollama."""
    print(format_plan(plan, settings.rehearsal))
    if not plan.fits or not plan.backend:
        raise DeployError("no model fits this host, so nothing is deployed: " + ("; ".join(plan.reasons) or "no reason given"),
                          host=host.name, fix="see `r1fleet plan`; lower the policy's min_context or min_tokens_per_second")
    check_before_change(plan, settings, hardware)
    on_macos = hardware.os.system == "Darwin"
    needs_gguf = plan.backend == "llama.cpp" or imports_stand_in(plan, settings, hardware)
    download = model_download(host.name, plan, settings) if needs_gguf else None
    if on_macos:
        return [MacOllamaRole(plan, settings, hw=hardware, download=download)]
    platform = platform_from_hardware(hardware)
    backend = (OllamaRole(plan, settings, release_for(plan, settings, platform), download, hardware.model_files)
               if plan.backend == "ollama"
               else LlamaCppRole(plan, settings, choose_install(plan, settings, platform), download))
    return [DriverRole(hardware, plan), ExposureRole(settings, plan), backend]


def pool_member_roles(pool: tuple[str, PoolSettings], settings: HostConfig, hardware: Hardware) -> list[Role] | None:
    """A pool member's roles (see r1fleet/deploy/pool_members.py), or None when its pool is kept separate."""
    planned, locked = pool_plan(*pool, host.data.get("r1fleet_fleet"))
    print(f"[{host.name}] {pool_heading(planned)}")
    for reason in planned.reasons:
        print(f"[{host.name}]   - {reason}")
    if not planned.pooled:
        return None
    platform = platform_from_hardware(hardware)
    served = served_in_pool(settings, hardware, planned, locked)
    if served.role == "head":
        head = pool_head(planned, settings, served.plan, {w: member_config(w) for w in planned.workers})
        check_before_change(head.plan, settings, hardware)
        install = choose_pool_install(head.plan, settings, platform, planned.pool, "head")
        download = model_download(host.name, head.plan, settings)
        return [RpcWorkerRetired(), DriverRole(hardware, head.plan), ExposureRole(settings, head.plan),
                LlamaCppRole(head.plan, settings, install, download, pool=head)]
    worker = rpc_worker(planned, settings, member_config(planned.head), hardware)
    install = choose_pool_install(worker.plan, settings, platform, planned.pool, "worker")
    closed = settings.model_copy(update={"listen": None, "allow": []})  # a worker serves no API: no LAN exposure
    return [DriverRole(hardware, worker.plan), ExposureRole(closed, worker.plan), RpcWorkerRole(worker, settings, install)]
