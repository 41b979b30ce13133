"""Where a model can go on a host: the placement options (one GPU, unified memory, several GPUs, the CPU),
each GPU's capacity, and the layers and memory of each device for a given split. Pure.
"""

from __future__ import annotations

from dataclasses import dataclass

from r1fleet.plan.catalog import Model
from r1fleet.plan.memory import Slot, constants, estimate_device, fixed_cost_mib, layer_cost_mib
from r1fleet.records import DevicePlan, Gpu, Hardware
from r1fleet.plan.policy import Policy

SMALLEST_USABLE_GPU_MIB = 1024


@dataclass(frozen=True)
class PlacementOption:
    kind: str  # gpu | unified | multi-gpu | cpu
    slots: tuple[Slot, ...]
    gpus: tuple[Gpu, ...] = ()


def own_backend_mib(gpu: Gpu) -> int:
    return sum(p.used_mib for p in gpu.processes if p.own)


def gpu_capacity_mib(gpu: Gpu) -> int:
    """What the runtime can allocate: the driver's free memory (its reserve and other programs' memory
    already out), plus what r1fleet's own backend holds. Without a free figure (a GPU seen by lspci only,
    before its driver): total minus what is used minus the driver's usual reserve."""
    own = own_backend_mib(gpu)
    if gpu.memory_free_mib is not None and gpu.vendor == "nvidia":
        return min(gpu.memory_free_mib + own, gpu.memory_total_mib)
    used = gpu.memory_used_mib or 0
    reserve = constants().driver_reserve_mib.get(gpu.vendor, 0)
    return gpu.memory_total_mib - max(used - own, 0) - reserve


def gpu_slot(gpu: Gpu) -> Slot:
    kind = "rocm" if gpu.vendor == "amd" else "cuda"
    bandwidth = gpu.bandwidth_gbps or constants().unknown_gpu_bandwidth_gbps
    return Slot(f"GPU{gpu.index} {gpu.name}", gpu_capacity_mib(gpu), kind, bandwidth)


def cpu_slot(hw: Hardware, policy: Policy) -> Slot:
    available = hw.ram_available_mib or hw.ram_total_mib - constants().cpu_os_reserve_mib
    return Slot("RAM", max(available, 0), "cpu", policy.cpu_bandwidth_gbps)


def placements(hw: Hardware, policy: Policy) -> list[PlacementOption]:
    """The placement options in the planner's order of preference."""
    usable = [g for g in hw.gpus if g.memory_total_mib >= SMALLEST_USABLE_GPU_MIB and not g.mig]
    options: list[PlacementOption] = []
    if usable:
        best = max(usable, key=lambda g: (gpu_capacity_mib(g), -g.index))
        options.append(PlacementOption("gpu", (gpu_slot(best),), (best,)))
    if hw.unified:
        u = hw.unified
        kind = "metal" if u.kind == "apple" else "unified"
        limit = u.total_mib - constants().apple_os_reserve_mib if u.gpu_limit_raisable else u.gpu_limit_mib
        capacity = limit if u.available_mib is None else min(limit, u.available_mib)
        bandwidth = u.bandwidth_gbps or constants().unknown_gpu_bandwidth_gbps
        options.append(PlacementOption("unified", (Slot(f"unified {u.name}", capacity, kind, bandwidth),)))
    by_vendor: dict[str, list[Gpu]] = {}
    for gpu in usable:
        by_vendor.setdefault(gpu.vendor, []).append(gpu)
    groups = [sorted(g, key=lambda x: x.index) for g in by_vendor.values() if len(g) > 1]
    if groups:
        group = max(groups, key=lambda g: sum(gpu_capacity_mib(x) for x in g))
        options.append(PlacementOption("multi-gpu", tuple(gpu_slot(g) for g in group), tuple(group)))
    options.append(PlacementOption("cpu", (cpu_slot(hw, policy),)))
    return options


# ---------------------------------------------------------------- fitting one model in one placement


def split_position(index: int, devices: int) -> bool | None:
    """None for a model on one device; else whether this device is the split's first (its compute differs)."""
    return index == 0 if devices > 1 else None


def split_layers(
    model: Model, slots: tuple[Slot, ...], context: int, kv_type: str, fa: bool, headroom: int, ubatch: int | None = None
) -> list[int] | None:
    """Per-device layer counts so each device's total fits its own capacity, balanced by free room.

    None when the layers do not fit. The last device also carries the output tensor.
    """
    total = model.arch.layers
    budgets, limits = [], []
    for i, slot in enumerate(slots):
        last = i == len(slots) - 1
        room = slot.capacity_mib - fixed_cost_mib(
            model, slot, last=last, context=context, flash_attention=fa, headroom_mib=headroom,
            split_first=split_position(i, len(slots)), ubatch=ubatch,
        )
        cost = layer_cost_mib(model, slot, context=context, kv_type=kv_type)
        budgets.append(max(room, 0.0))
        limits.append(max(int(room // cost), 0))
    if sum(limits) < total:
        return None
    if len(slots) == 1:
        return [total]
    # Proportional to each device's room, largest remainder, then clamp to what each can hold.
    share = sum(budgets)
    raw = [total * b / share for b in budgets]
    counts = [min(int(r), lim) for r, lim in zip(raw, limits)]
    order = sorted(range(len(slots)), key=lambda i: (raw[i] - int(raw[i]), budgets[i]), reverse=True)
    while sum(counts) < total:
        for i in order:
            if sum(counts) < total and counts[i] < limits[i]:
                counts[i] += 1
    return counts


def device_plans(
    model: Model, slots: tuple[Slot, ...], layers: list[int], context: int, kv_type: str, fa: bool, headroom: int,
    ubatch: int | None = None,
) -> list[DevicePlan]:
    return [
        estimate_device(
            model, slot, layers=n, last=i == len(slots) - 1, context=context,
            kv_type=kv_type, flash_attention=fa, headroom_mib=headroom,
            split_first=split_position(i, len(slots)), ubatch=ubatch,
        )
        for i, (slot, n) in enumerate(zip(slots, layers))
    ]

