"""Pools: one model across several hosts with llama.cpp's RPC backend, chosen only when it beats each member alone.

Pure. After each member is planned alone, a pool tries the distills larger than the best solo plan (and that same
model, for a clearly longer context) across all its GPUs: the workers' GPUs as RPC devices first, then the head's
own, in the order llama.cpp itself gives the devices (src/llama.cpp, llama_model_load_from_file_impl /
llama_prepare_model_devices: "add RPC servers at the front of the list to minimize network transfers"), so the
output layer lands on the head's last GPU and the logits never cross the network. Each device's memory is the
single-host split's (r1fleet/plan/placement.py): an rpc-server holds weights, KV cache and a compute buffer on its GPU
as a local backend does. The speed is the split's bandwidth-bound decode plus the network's cost per token
(data/estimator.yaml `pool`). The pool is served by its head, so the head's policy applies.

Example:
    >>> pools, hosts = plan_pools({"big": PoolSettings(hosts=["a", "b"], head="a")}, hardware, plans, policies)
    >>> pools[0].pooled, pools[0].model
    (True, 'deepseek-r1-distill-llama-70b')
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping

from r1fleet.plan.catalog import Catalog, Model, load_catalog
from r1fleet.plan.memory import constants, llama_server_host_mib, prompt_cache_mib, weight_shares
from r1fleet.errors import DeployError
from r1fleet.records import DevicePlan, Gpu, Hardware, HostPlan, PoolDevice, PoolPlan
from r1fleet.plan.placement import PlacementOption, gpu_slot, placements
from r1fleet.plan.planner import Attempt, attempt, decode_seconds, ordered_candidates, plan_host, runtime_flash_attention
from r1fleet.plan.policy import Policy
from r1fleet.plan.pool_settings import PoolSettings
from r1fleet.tensor_split import flag_for_layers, format_flag


@dataclass(frozen=True)
class NetworkCost:
    """What one generated token costs on the pool's links."""

    crossings: int  # host boundaries an activation row crosses
    bytes_per_crossing: int
    round_trips: int
    seconds: float


@dataclass(frozen=True)
class PoolDevices:
    """The pool's GPUs in llama.cpp's device order, with the host of each."""

    placement: PlacementOption
    hosts: tuple[str, ...]


# ---------------------------------------------------------------- devices and network


def lent_gpus(hw: Hardware, policy: Policy) -> tuple[Gpu, ...]:
    """The GPUs a member lends a pool: those its own multi-GPU split would use, else its best GPU (the solo
    planner's choice: big enough, no MIG, one vendor per host since a host runs one GPU backend)."""
    options = {o.kind: o for o in placements(hw, policy)}
    chosen = options.get("multi-gpu") or options.get("gpu")
    return chosen.gpus if chosen else ()


def pool_devices(members: list[Hardware], policy: Policy) -> PoolDevices:
    """All members' GPUs as one layer split, in the members' order (workers in --rpc order, then the head).

    Each GPU's capacity is the solo planner's (placement.gpu_capacity_mib: the driver's free memory, so a
    worker's other programs keep theirs). Slot names carry the host, so reasons and device plans name it."""
    slots, gpus, hosts = [], [], []
    for hw in members:
        for gpu in lent_gpus(hw, policy):
            slot = gpu_slot(gpu)
            slots.append(replace(slot, name=f"{hw.host} {slot.name}"))
            gpus.append(gpu)
            hosts.append(hw.host)
    return PoolDevices(PlacementOption("multi-gpu", tuple(slots), tuple(gpus)), tuple(hosts))


def network_cost(model: Model, hosts: tuple[str, ...], layers: list[int], head: str, gbps: float) -> NetworkCost:
    """Per token: each worker's run of devices takes its input from the head and hands its output back (ggml RPC
    has no worker-to-worker path), one activation row each way; each RPC device costs round trips."""
    c = constants().pool
    used = [h for h, n in zip(hosts, layers) if n > 0]  # a device without layers is no split: nothing crosses
    segments = sum(1 for i, h in enumerate(used) if h != head and (i == 0 or used[i - 1] != h))
    row = model.arch.embedding * int(c["activation_bytes_per_value"])
    trips = int(c["round_trips_per_rpc_device"]) * sum(1 for h in used if h != head)
    seconds = 2 * segments * row * 8 / (gbps * 1e9) + trips * c["round_trip_ms"] / 1000
    return NetworkCost(2 * segments, row, trips, seconds)


def pooled_tokens_per_second(result: Attempt, devices: PoolDevices, net: NetworkCost) -> float:
    """The split's decode time (as on one host) plus the network's, per token."""
    local = decode_seconds(result.model, devices.placement, result.layers, result.context, result.kv_type)
    return round(1 / (local + net.seconds), 1) if local + net.seconds else 0.0


# ---------------------------------------------------------------- choosing


def _model_of(plan: HostPlan | None, catalog: Catalog) -> Model | None:
    return catalog.find(plan.model) if plan and plan.fits and plan.model else None


def best_alone(plans: list[HostPlan], catalog: Catalog) -> HostPlan | None:
    """The member plan to beat: the largest model any member holds alone, at its longest context."""
    fitting = [p for p in plans if _model_of(p, catalog)]
    return max(fitting, key=lambda p: (_model_of(p, catalog).params_b, p.context_length), default=None)


def _candidates(catalog: Catalog, policy: Policy, pinned: str | None, best: Model | None) -> list[Model]:
    if pinned:
        return [catalog.find(pinned)]
    return [m for m in ordered_candidates(catalog, policy) if best is None or m.params_b >= best.params_b]


def _short_of_gain(result: Attempt, best: HostPlan | None, catalog: Catalog) -> str | None:
    """Why this pooled result does not beat the best member alone (None when it does)."""
    alone = _model_of(best, catalog)
    m = result.model
    if best is None or alone is None or m.params_b > alone.params_b:
        return None
    gain = constants().pool["context_gain"]
    if m.id != alone.id:
        return f"{m.size_label} is not larger than the {alone.size_label} {best.host} holds alone"
    if result.context >= gain * best.context_length:
        return None
    return (f"pooled, {m.size_label} reaches context {result.context}, less than {gain:g}x the "
            f"{best.context_length} {best.host} has alone")


def plan_pool(
    name: str,
    pool: PoolSettings,
    hardware: dict[str, Hardware],
    solo: dict[str, HostPlan],
    policy: Policy,
    catalog: Catalog | None = None,
    model: str | None = None,
    context: int | None = None,
    unpoolable: Mapping[str, str] | None = None,
) -> PoolPlan:
    """Pool the members when that serves a larger model (or the same one at context_gain x the context) above the
    head policy's speed floor; otherwise keep them separate, with the reason. `model`/`context` force as in plan_host.
    `unpoolable`: {member: why its llama.cpp cannot take part (naming it), and what would make it possible}
    (r1fleet/artifacts/llama_cpp_install.py pool_source_problems): a pool that would serve is kept separate then,
    saying so, so that the plan offers only what the deploy can build."""
    planned = _plan_pool(name, pool, hardware, solo, policy, catalog or load_catalog(), model, context)
    cannot = [why for host, why in (unpoolable or {}).items() if host in pool.hosts]
    if not planned.pooled or not cannot:
        return planned
    catalog = catalog or load_catalog()
    size = catalog.find(planned.model).size_label
    members = [solo.get(h) for h in pool.hosts]
    base = PoolPlan(pool=name, head=pool.head, workers=pool.workers, network_gbps=pool.network_gbps, rpc_port=pool.rpc_port)
    return _separate(base, [
        f"pooled, it would serve {size} at context {planned.context_length}, but the deploy cannot build it: "
        + "; ".join(cannot)], pool, members, catalog)


def _plan_pool(name: str, pool: PoolSettings, hardware: dict[str, Hardware], solo: dict[str, HostPlan], policy: Policy,
               catalog: Catalog, model: str | None, context: int | None) -> PoolPlan:
    base = PoolPlan(pool=name, head=pool.head, workers=pool.workers, network_gbps=pool.network_gbps, rpc_port=pool.rpc_port)
    members = [solo.get(h) for h in pool.hosts]
    unprobed = [h for h in pool.hosts if h not in hardware]
    if unprobed:
        return _separate(base, [f"no hardware known for {', '.join(unprobed)}"], pool, members, catalog)
    devices = pool_devices([hardware[h] for h in (*pool.workers, pool.head)], policy)
    blocked = _blocked(pool, devices, policy)
    if blocked:
        return _separate(base, [blocked], pool, members, catalog)
    best = best_alone([p for p in members if p], catalog)
    rejected = []
    for candidate in _candidates(catalog, policy, model or policy.model, _model_of(best, catalog)):
        result = attempt(candidate, devices.placement, policy, context)
        net = network_cost(candidate, devices.hosts, result.layers, pool.head, pool.network_gbps)
        why_not = _why_not(result, net, devices, pool, policy, best, catalog)
        if why_not is None:
            tps = pooled_tokens_per_second(result, devices, net)
            return _pooled(base, pool, result, devices, net, tps, members, hardware[pool.head], catalog)
        rejected.append(why_not)
    return _separate(base, rejected, pool, members, catalog)


def _blocked(pool: PoolSettings, devices: PoolDevices, policy: Policy) -> str | None:
    """Why this pool cannot be planned at all (None when it can)."""
    without = [h for h in pool.hosts if h not in devices.hosts]
    if without:
        return f"{', '.join(without)} has no discrete GPU to lend (only GPUs are pooled)"
    if policy.backend == "ollama":
        return f"the head {pool.head} forces backend ollama; a pool runs llama.cpp's llama-server"
    return None


def _why_not(
    result: Attempt, net: NetworkCost, devices: PoolDevices, pool: PoolSettings, policy: Policy,
    best: HostPlan | None, catalog: Catalog,
) -> str | None:
    """Why this pooled attempt is not the pool's plan (None when it is)."""
    size = result.model.size_label
    if not result.fits:
        return f"{size} does not fit across the pool: {result.why_not}"
    short = _short_of_gain(result, best, catalog)
    if short:
        return short
    tps = pooled_tokens_per_second(result, devices, net)
    if tps < policy.min_tokens_per_second:
        return (f"pool {size} estimated {tps} tokens/s < floor {policy.min_tokens_per_second:g} "
                f"({_network_text(result, net, pool)})")
    return None


def plan_members(name: str, pool: PoolSettings, hardware: list[Hardware], policies: list[Policy],
                 unpoolable: Mapping[str, str] | None = None) -> PoolPlan:
    """One pool planned from its members' hardware and policies, in `pool.hosts` order (each member's solo plan
    first, as plan_pools compares with them): what the lock, the deploy and verify plan for a pool."""
    (planned,), _ = plan_pools({name: pool}, hardware, [plan_host(hw, p) for hw, p in zip(hardware, policies)], policies,
                               unpoolable=unpoolable)
    return planned


def plan_pools(
    pools: dict[str, PoolSettings],
    hardware: list[Hardware],
    plans: list[HostPlan],
    policies: list[Policy],
    model: str | None = None,
    context: int | None = None,
    unpoolable: Mapping[str, str] | None = None,
) -> tuple[list[PoolPlan], list[HostPlan]]:
    """`r1fleet plan`'s hook: every pool's plan, and the host plans not taken into a pool.

    `hardware`, `plans` and `policies` are parallel lists, one entry per host; `unpoolable` as in plan_pool."""
    by_host = {hw.host: hw for hw in hardware}
    solo = {p.host: p for p in plans}
    policy_of = {hw.host: policy for hw, policy in zip(hardware, policies)}
    results = [
        plan_pool(name, pool, by_host, solo, policy_of.get(pool.head, Policy()), model=model, context=context,
                  unpoolable=unpoolable)
        for name, pool in pools.items()
    ]
    taken = {h for r in results if r.pooled for h in (r.head, *r.workers)}
    return results, [p for p in plans if p.host not in taken]


# ---------------------------------------------------------------- the plan and its reasons


def _alone_text(host: str, plan: HostPlan | None, catalog: Catalog) -> str:
    model = _model_of(plan, catalog)
    if plan is None or model is None:
        return f"{host} alone: nothing fits"
    return f"{host} alone: {model.size_label} at {plan.context_length} ({plan.est_tokens_per_second:g} tokens/s)"


def _members_text(pool: PoolSettings, members: list[HostPlan | None], catalog: Catalog) -> str:
    return "; ".join(_alone_text(h, p, catalog) for h, p in zip(pool.hosts, members))


def _network_text(result: Attempt, net: NetworkCost, pool: PoolSettings) -> str:
    return (f"{result.tokens_per_second:g} if these GPUs were in one host; the network adds {net.seconds * 1000:.1f} ms "
            f"per token: {net.crossings} crossings of {net.bytes_per_crossing // 1024} KiB at {pool.network_gbps:g} Gbit/s "
            f"and {net.round_trips} round trips of {constants().pool['round_trip_ms']:g} ms")


def _separate(base: PoolPlan, why: list[str], pool: PoolSettings, members: list[HostPlan | None], catalog: Catalog) -> PoolPlan:
    largest = catalog.largest_first()[0]
    if all(_model_of(p, catalog) == largest for p in members):
        why = [f"each member already holds the largest distill ({largest.size_label}) alone", *why]
    reasons = [f"kept separate: {'; '.join(why)}", f"members: {_members_text(pool, members, catalog)}"]
    return base.model_copy(update={"reasons": reasons})


def _pooled(
    base: PoolPlan, pool: PoolSettings, result: Attempt, devices: PoolDevices, net: NetworkCost, tps: float,
    members: list[HostPlan | None], head: Hardware, catalog: Catalog,
) -> PoolPlan:
    m = result.model
    last = len(result.devices) - 1
    listed = [
        PoolDevice(**d.model_dump(exclude={"device"}), device=d.device.removeprefix(f"{host} "), host=host,
                   rpc=host != pool.head, gpu_index=gpu.index, gpu_uuid=gpu.uuid, output=i == last)
        for i, (d, host, gpu) in enumerate(zip(result.devices, devices.hosts, devices.placement.gpus))
    ]
    used = ", ".join(f"{d.device} {d.planned_mib:,}/{d.capacity_mib:,} MiB" for d in result.devices)
    best = _model_of(best_alone([p for p in members if p], catalog), catalog)
    gain = "a longer context" if best and best.id == m.id else "a larger model"
    reasons = [
        f"pooled: {m.size_label} across {', '.join(dict.fromkeys(devices.hosts))} at context {result.context} "
        f"({result.kv_type} KV): {used}; est {tps} tokens/s ({_network_text(result, net, pool)})",
        f"{gain} than any member alone: {_members_text(pool, members, catalog)}",
        f"llama.cpp: llama-server on {pool.head} with --rpc to {', '.join(pool.workers)} (port {pool.rpc_port}) and "
        f"--tensor-split {format_flag(flag_for_layers(result.layers))} (blocks {result.layers}, the RPC devices first "
        f"as llama.cpp orders them, the output on {pool.head}'s last GPU)",
    ]
    if not result.flash_attention:
        reasons.append(f"flash attention off: {runtime_flash_attention(devices.placement)[1]}, so the KV cache stays f16")
    file_mib = round(weight_shares(m).file_mib)
    if head.disk_free_mib is not None and head.disk_free_mib < file_mib:
        reasons.append(f"warning: the head {pool.head} needs {file_mib:,} MiB of disk for the model, {head.disk_free_mib:,} MiB free")
    return base.model_copy(update={
        "pooled": True, "model": m.id, "ollama_tag": m.ollama_tag, "backend": "llama.cpp",
        "context_length": result.context, "kv_cache_type": result.kv_type, "flash_attention": result.flash_attention,
        "tensor_split": result.layers, "devices": listed, "est_tokens_per_second": tps,
        "est_tokens_per_second_one_host": result.tokens_per_second, "network_ms_per_token": round(net.seconds * 1000, 2),
        "gguf": m.pinned_gguf(),
        "n_layers": m.arch.layers, "reasons": reasons,
    })


# ---------------------------------------------------------------- printing (r1fleet plan's table)


def pool_row(pool: PoolPlan, catalog: Catalog | None = None) -> tuple[str, ...]:
    """A pooled pool as one row of `r1fleet plan`'s table (the columns of a host's row)."""
    catalog = catalog or load_catalog()
    names: dict[str, int] = {}
    for d in pool.devices:
        label = d.device.split(" ", 1)[-1].replace("NVIDIA ", "").replace("GeForce ", "")
        names[label] = names.get(label, 0) + 1
    hosts = len({d.host for d in pool.devices})
    gpus = ", ".join(f"{n}x {label}" for label, n in names.items()) + f" on {hosts} hosts"
    blocks = "|".join(str(n) for n in pool.tensor_split or [])
    backend = f"llama.cpp --rpc -ts {format_flag(pool.tensor_split_flag or [])} (blocks {blocks}+out)"
    memory = ", ".join(f"{d.host}:{d.device.split(' ')[0]} {d.planned_mib:,}/{d.capacity_mib:,}" for d in pool.devices)
    model = catalog.find(pool.model).size_label if pool.model else "-"
    tps = f"{pool.est_tokens_per_second:g}" if pool.est_tokens_per_second else "-"
    return (f"pool {pool.pool}", gpus, model, backend, str(pool.context_length), pool.kv_cache_type, memory, tps)


def pool_heading(pool: PoolPlan) -> str:
    """The line above a pool's reasons in `r1fleet plan`'s output."""
    return f"pool {pool.pool} (head {pool.head}; workers {', '.join(pool.workers)}):"


# ---------------------------------------------------------------- one member's part


def pool_refusal(pool: str, host: str, field: str, message: str, fix: str) -> DeployError:
    return DeployError(f"pool {pool}: {message}", host=host, field=field, fix=fix)


def member_plan(pool: PoolPlan, host: str, hardware: Hardware) -> HostPlan:
    """The pool as one member runs it, as a HostPlan (what the driver, sourcing and unit decisions read): the
    member's own GPUs in gpu_uuids/gpu_indices; on the head also the model and the whole split over every
    device (tensor_split, in llama.cpp's device order: the workers' first)."""
    devices = [d for d in pool.devices if d.host == host]
    gpus = {g.index: g for g in hardware.gpus}
    lost = [d.gpu_index for d in devices if d.gpu_index not in gpus]
    if not devices or lost:
        what = f"GPU {', '.join(map(str, lost))} of the plan is not in its probe" if devices else "the plan gives it no device"
        raise pool_refusal(pool.pool, host, "pools", what, "plan again (r1fleet plan --fleet) and deploy that plan")
    mine = [gpus[d.gpu_index] for d in devices]
    uuids = [d.gpu_uuid for d in devices]
    head = host == pool.head
    return HostPlan(
        host=host, model=pool.model, ollama_tag=pool.ollama_tag, backend="llama.cpp",
        placement="multi-gpu" if head or len(devices) > 1 else "gpu", fits=pool.pooled,
        context_length=pool.context_length, kv_cache_type=pool.kv_cache_type, flash_attention=pool.flash_attention,
        tensor_split=pool.tensor_split if head else None,
        gpu_uuids=[u for u in uuids if u] if all(uuids) else [], gpu_indices=[d.gpu_index for d in devices],
        devices=[_device_plan(d) for d in devices],
        est_tokens_per_second=pool.est_tokens_per_second if head else None,
        reasons=list(pool.reasons) if head else [f"worker of pool {pool.pool}: rpc-server for {pool.head}"],
        gguf=pool.gguf if head else None, n_layers=pool.n_layers,
        compute_caps=[g.compute_cap for g in mine if g.compute_cap], vendor=mine[0].vendor,
        cache_ram_mib=head_prompt_cache(pool, hardware) if head else None,
    )


def head_prompt_cache(pool: PoolPlan, hardware: Hardware) -> int | None:
    """The head's llama-server prompt cache (--cache-ram) in its own RAM, as on a host alone (planner.py)."""
    if pool.model is None:
        return None
    model = load_catalog().find(pool.model)
    return prompt_cache_mib(hardware.ram_total_mib, llama_server_host_mib(model, pool.context_length, pool.flash_attention))


def _device_plan(device: PoolDevice) -> DevicePlan:
    return DevicePlan(**device.model_dump(include=set(DevicePlan.model_fields)))
