"""The gateway host's part in the deploy: what every host of the fleet serves, as the gateway routes it.

The gateway host's data carries the fleet file's `gateway:` section (r1fleet/fleet/file.py). Its deploy probes the
other hosts through pyinfra (once per run, shared with the pools' members: r1fleet/deploy/pool_members.py), asks
r1fleet/lock/served.py what each serves, takes each host's endpoint (roles/exposure/endpoint.py) and the keys of
those whose llama-server needs one (their `api_key_source` on the controller), and decides the gateway's plan
(roles/gateway/decide.py). A host the gateway cannot route to is named, with its field and fix, and left out.
"""

from __future__ import annotations

from typing import Any

from pyinfra import state

from r1fleet.deploy.pool_members import member_config, member_hardware, pool_of
from r1fleet.errors import R1FleetError
from r1fleet.fleet.config import GatewaySettings, HostConfig, read_api_key
from r1fleet.lock.match import fleet_lock
from r1fleet.lock.served import served_plans
from r1fleet.roles.exposure.endpoint import Endpoint, endpoint_of
from r1fleet.roles.gateway.decide import GatewayPlan, gateway_plan

GATEWAY_DATA = "r1fleet_gateway"


def gateway_of(data: Any) -> GatewaySettings | None:
    """The gateway section this host's data carries (only the gateway host's does), or None."""
    raw = data.get(GATEWAY_DATA)
    return GatewaySettings.model_validate(raw) if raw else None


def fleet_gateway_plan(settings: GatewaySettings, gateway: HostConfig, fleet: str | None) -> GatewayPlan:
    """The gateway's plan from every host of the run's inventory: each probed, its served plan and endpoint."""
    names = [h.name for h in state.inventory if h.data.get("r1fleet")]
    hosts = {name: member_config(name) for name in names}
    pools = dict(filter(None, (pool_of(state.inventory.get_host(name).data) for name in names)))
    hardware, unprobed = {}, []
    for name in names:
        try:
            hardware[name] = member_hardware(name)
        except Exception as error:  # noqa: BLE001 - a host that cannot be probed is left out, named
            unprobed.append(f"host {name}: not probed ({error}); the gateway routes to the others")
    lock, relock = fleet_lock(fleet)
    endpoints: list[Endpoint] = []
    refused: list[str] = []
    for name, served in sorted(served_plans(hosts, pools, lock, hardware, relock).items()):
        if isinstance(served, R1FleetError):
            refused.append(f"host {name}: {served}")
            continue
        try:
            endpoint = endpoint_of(hosts[name], served.plan, served.role, served.pool.pool if served.pool else None)
        except R1FleetError as error:
            refused.append(f"host {name}: {error}")
            continue
        if endpoint is not None:
            endpoints.append(endpoint)
    keys = {}
    for endpoint in endpoints:
        if endpoint.key_needed and endpoint.key_file:
            try:
                keys[endpoint.host] = read_api_key(endpoint.key_file, endpoint.host, "api_key_source").decode().strip()
            except R1FleetError as error:
                refused.append(f"host {endpoint.host}: {error}")
    plan = gateway_plan(settings, gateway, endpoints, keys)
    return GatewayPlan(plan.settings, plan.models, (*unprobed, *refused, *plan.skipped))
