"""The whole r1fleet deploy of one host, as pyinfra runs it: probe -> plan -> roles.

A pyinfra user calls it from their own deploy file, as with any packaged pyinfra deploy:

    from r1fleet.deploy.serve import serve_r1

    serve_r1()

All decisions live in r1fleet (pure, tested); this only wires them to the host: what the host serves
(r1fleet/lock/served.py), the checks before any change, then which roles it gets (`ROLES`), each prepared from
one HostContext and applied in stages (r1fleet/operations/stages.py).
"""

from pyinfra import host, state

from r1fleet.deploy import refusals, summary
from r1fleet.deploy.gateway_peers import fleet_gateway_plan, gateway_of
from r1fleet.deploy.pool_members import member_config, member_offers, pool_of, pool_plan, remember
from r1fleet.errors import DeployError
from r1fleet.fleet.config import HostConfig
from r1fleet.hardware import parse_probe
from r1fleet.lock.match import fleet_lock
from r1fleet.lock.served import lock_note, served_alone, served_in_pool
from r1fleet.operations.stages import HostContext, Role, apply_roles
from r1fleet.plan.format import format_plan
from r1fleet.plan.pools import pool_heading
from r1fleet.probe.facts import R1Probe
from r1fleet.records import Hardware
from r1fleet.roles.exposure.endpoint import endpoint_of
from r1fleet.roles.exposure.role import ExposureRole
from r1fleet.roles.gateway.role import GatewayRole
from r1fleet.roles.gpu_driver.role import DriverRole
from r1fleet.roles.llama_cpp.role import LlamaCppRole
from r1fleet.roles.macos.role import MacOllamaRole
from r1fleet.roles.ollama.role import OllamaRole
from r1fleet.roles.rpc_worker.role import RpcWorkerRetired, RpcWorkerRole

# The roles each kind of host gets, in the order their stages run: the driver first, the firewall active before
# the backend starts; a former pool worker's rpc-server retired before this host's own service takes the GPU.
ROLES: dict[str, tuple[type[Role], ...]] = {
    "macos": (MacOllamaRole,),
    "ollama": (RpcWorkerRetired, DriverRole, ExposureRole, OllamaRole),
    "llama.cpp": (RpcWorkerRetired, DriverRole, ExposureRole, LlamaCppRole),
    "head": (RpcWorkerRetired, DriverRole, ExposureRole, LlamaCppRole),
    "worker": (DriverRole, ExposureRole, RpcWorkerRole),
}


def serve_r1() -> None:
    """Probe, plan and deploy the current pyinfra host (call it from a deploy file)."""
    summary.install(state)

    with summary.step(state, host, "plan"):
        settings = HostConfig.from_host_data(host.name, host.data.dict())
        hardware = parse_probe(host.get_fact(R1Probe, model_dir=settings.model_dir), host.name)  # one round trip
        remember(hardware)
        ctx = host_context(settings, hardware)
        roles = [role.prepare(ctx) for role in ROLES[kind_of(ctx)]]
        if gateway := gateway_of(host.data):  # the gateway host: HAProxy in front of the fleet, after its own roles
            planned = fleet_gateway_plan(gateway, settings, host.data.get("r1fleet_fleet"))
            for line in planned.skipped:
                print(f"[{host.name}] gateway: {line}")
            roles.append(GatewayRole.prepare(ctx, gateway=planned))
        pool = ctx.served.pool.pool if ctx.served.pool is not None else None
        summary.serves(endpoint_of(settings, ctx.plan, ctx.served.role, pool))

    if summary.ok(host):
        # A host's odd answer that still trips something while its operations are prepared fails it alone.
        with summary.step(state, host, "prepare"):
            apply_roles(roles)


def host_context(settings: HostConfig, hardware: Hardware) -> HostContext:
    """What this host serves (r1fleet/lock/served.py), printed and checked before anything changes on it."""
    pool = pool_of(host.data)
    if pool and hardware.os.system != "Darwin":
        planned, locked = pool_plan(*pool, host.data.get("r1fleet_fleet"))
        print(f"[{host.name}] {pool_heading(planned)}")
        for reason in planned.reasons:
            print(f"[{host.name}]   - {reason}")
        if planned.pooled:
            members = {name: member_config(name) for name in pool[1].hosts}
            offers = {name: member_offers(name) for name in pool[1].hosts}
            ctx = HostContext(settings, hardware, served_in_pool(settings, hardware, planned, locked), members, offers)
            if ctx.served.role == "head":
                check_before_change(ctx)
            return ctx
    lock, fleet = fleet_lock(host.data.get("r1fleet_fleet"))
    ctx = HostContext(settings, hardware, served_alone(settings, hardware, lock, fleet))
    print(format_plan(ctx.plan, settings.rehearsal))
    if note := lock_note(ctx.served, fleet):
        print(f"[{host.name}]   {note}")
    if not ctx.plan.fits or not ctx.plan.backend:
        raise DeployError("no model fits this host, so nothing is deployed: " + ("; ".join(ctx.plan.reasons) or "no reason given"),
                          host=host.name, fix="see `r1fleet plan`; lower the policy's min_context or min_tokens_per_second")
    check_before_change(ctx)
    return ctx


def kind_of(ctx: HostContext) -> str:
    return refusals.kind_of(ctx.served, ctx.system)


def check_before_change(ctx: HostContext) -> None:
    """What refuses a host before anything changes on it, naming the reason (r1fleet/deploy/refusals.py, which
    `r1fleet plan` shows too); prints the exposure's warning."""
    if warning := refusals.check_before_change(ctx.served, ctx.settings, ctx.hardware):
        print(f"[{ctx.host}]   {warning}")
