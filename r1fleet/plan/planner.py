"""Planner: for one host's Hardware, the largest R1 distill that fits with a usable context and speed.

Pure and deterministic. Rules (DESIGN.md "Choosing the model"): candidates largest first; placements
in order one GPU, unified memory, several GPUs of one vendor split by layers, CPU; a candidate fits
when every device's planned memory at `min_context` is within its capacity, then the context grows
to `max_context`; too slow is rejected; every choice carries its reasons.

Example:
    >>> plan = plan_host(parse_probe(open("rtx4090.probe").read(), "box"), Policy())
    >>> plan.model, plan.backend
    ('deepseek-r1-distill-qwen-32b', 'ollama')
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from r1fleet.plan.catalog import Catalog, Model, load_catalog
from r1fleet.plan.memory import (
    MIB, bytes_read_per_token_gb, constants, llama_server_host_mib, ollama_ubatch, prompt_cache_mib, weight_shares,
)
from r1fleet.records import DevicePlan, Hardware, HostPlan
from r1fleet.plan.placement import PlacementOption, device_plans, gpu_capacity_mib, placements, split_layers
from r1fleet.plan.policy import Policy
from r1fleet.tensor_split import flag_for_layers, format_flag, rescale_blocks


@dataclass
class Attempt:
    model: Model
    placement: PlacementOption
    fits: bool
    context: int = 0
    kv_type: str = "f16"
    layers: list[int] = field(default_factory=list)
    devices: list[DevicePlan] = field(default_factory=list)
    tokens_per_second: float = 0.0
    why_not: str = ""
    flash_attention: bool = True
    ubatch: int | None = None


# ---------------------------------------------------------------- capacities and placements


EFFICIENCY_KIND = {"gpu": "gpu", "multi-gpu": "gpu", "unified": "unified", "cpu": "cpu"}


def _read_seconds(model: Model, placement: PlacementOption, layers: list[int], context: int, kv_type: str) -> float:
    """Decode is memory-bound: each device reads its share per token, one after another (at full bandwidth)."""
    seconds = 0.0
    for i, (slot, n) in enumerate(zip(placement.slots, layers)):
        gb = bytes_read_per_token_gb(model, n, i == len(layers) - 1, context, kv_type)
        seconds += gb / slot.bandwidth_gbps
    return seconds


def decode_seconds(model: Model, placement: PlacementOption, layers: list[int], context: int, kv_type: str) -> float:
    """Seconds per generated token at the calibrated efficiency, unrounded (a pool adds its network to it)."""
    return _read_seconds(model, placement, layers, context, kv_type) / constants().efficiency[EFFICIENCY_KIND[placement.kind]]


def tokens_per_second(model: Model, placement: PlacementOption, layers: list[int], context: int, kv_type: str) -> float:
    eff = constants().efficiency[EFFICIENCY_KIND[placement.kind]]
    seconds = _read_seconds(model, placement, layers, context, kv_type)
    return round(eff / seconds, 1) if seconds else 0.0


def runtime_flash_attention(placement: PlacementOption) -> tuple[bool, str]:
    """What the runtime's automatic choice does on these GPUs, and why when it turns flash attention off."""
    c = constants()
    for gpu in placement.gpus:
        cap = gpu.compute_cap
        if gpu.vendor != "nvidia" or not cap:
            continue
        try:
            too_old = float(cap) < c.flash_attention_off_cuda_below
        except ValueError:
            continue
        if too_old or cap in c.flash_attention_off_cuda_caps:
            return False, f"the runtime turns flash attention off on GPU{gpu.index} (compute capability {cap})"
    return True, ""


def flash_attention_for(placement: PlacementOption, policy: Policy) -> bool:
    if policy.flash_attention != "auto":
        return policy.flash_attention == "on"
    return runtime_flash_attention(placement)[0]


def runtime_ubatch(model: Model, placement: PlacementOption, context: int, policy: Policy) -> int | None:
    """The micro-batch the runtime will run: Ollama picks it for one device; llama-server's default otherwise."""
    if len(placement.slots) != 1 or _backend(placement, policy) != "ollama":
        return None
    slot = placement.slots[0]
    return ollama_ubatch(model, context, flash_attention_for(placement, policy), slot.capacity_mib, slot.kind == "cuda")


def _fit_at(model: Model, placement: PlacementOption, context: int, kv_type: str, policy: Policy) -> list[int] | None:
    fa = flash_attention_for(placement, policy)
    ub = runtime_ubatch(model, placement, context, policy)
    return split_layers(model, placement.slots, context, kv_type, fa, policy.headroom_mib, ub)


def context_bounds(model: Model, policy: Policy) -> tuple[int, int]:
    top = min(policy.max_context, model.arch.context_train)
    return min(policy.min_context, top), top


def largest_context(model: Model, placement: PlacementOption, kv_type: str, low: int, high: int, policy: Policy) -> int:
    """The largest context in [low, high] (a step multiple, or `high` itself) that still fits; assumes `low` fits."""
    step = constants().context_step
    if _fit_at(model, placement, high, kv_type, policy):
        return high
    lo, hi = low // step, high // step  # in steps; lo fits (or is low itself), hi does not
    best = low
    while lo <= hi:
        mid = (lo + hi) // 2
        ctx = max(mid * step, low)
        if _fit_at(model, placement, ctx, kv_type, policy):
            best, lo = ctx, mid + 1
        else:
            hi = mid - 1
    return best


def attempt(model: Model, placement: PlacementOption, policy: Policy, context: int | None = None) -> Attempt:
    """Fit one model in one placement: the first allowed KV type that reaches the minimum context wins."""
    low, high = context_bounds(model, policy)
    if context is not None:
        low = high = context
        if context > model.arch.context_train:
            result = Attempt(model, placement, False, context, policy.kv_types[0], _even_layers(model, placement))
            result.why_not = f"context {context} is beyond what {model.size_label} was trained for ({model.arch.context_train})"
            return result
    fa = flash_attention_for(placement, policy)
    # A quantized V cache needs flash attention (llama.cpp src/llama-context.cpp; Ollama's FAQ).
    kv_types = allowed_kv_types(placement, policy)
    if not kv_types:
        result = Attempt(model, placement, False, low, policy.kv_types[0], _even_layers(model, placement), flash_attention=fa)
        result.why_not = f"a {policy.kv_types[0]} KV cache needs flash attention, which is off on {_describe(placement)}"
        return result
    for kv_type in kv_types:
        if _fit_at(model, placement, low, kv_type, policy):
            return fitted(model, placement, largest_context(model, placement, kv_type, low, high, policy), kv_type, policy)
    # Does not fit: report figures at the minimum context, as if the layers were spread by capacity.
    kv_type = kv_types[-1]
    layers = _even_layers(model, placement)
    result = Attempt(model, placement, False, low, kv_type, layers, flash_attention=fa)
    result.ubatch = runtime_ubatch(model, placement, low, policy)
    result.devices = device_plans(model, placement.slots, layers, low, kv_type, fa, policy.headroom_mib, result.ubatch)
    result.tokens_per_second = tokens_per_second(model, placement, layers, low, kv_type)
    need = sum(d.planned_mib for d in result.devices)
    have = sum(s.capacity_mib for s in placement.slots)
    result.why_not = f"needs {need:,} MiB at context {low} ({kv_type} KV) but {_describe(placement)} has {have:,} MiB"
    return result


def fitted(model: Model, placement: PlacementOption, ctx: int, kv_type: str, policy: Policy) -> Attempt:
    """The model fitted at context `ctx` (which fits) with its layers, devices and speed."""
    fa = flash_attention_for(placement, policy)
    layers = _fit_at(model, placement, ctx, kv_type, policy) or []
    result = Attempt(model, placement, True, ctx, kv_type, layers, flash_attention=fa)
    result.ubatch = runtime_ubatch(model, placement, ctx, policy)
    result.devices = device_plans(model, placement.slots, layers, ctx, kv_type, fa, policy.headroom_mib, result.ubatch)
    result.tokens_per_second = tokens_per_second(model, placement, layers, ctx, kv_type)
    return result


def allowed_kv_types(placement: PlacementOption, policy: Policy) -> list[str]:
    """The policy's KV types the placement can run: a quantized V cache needs flash attention."""
    return policy.kv_types if flash_attention_for(placement, policy) else [t for t in policy.kv_types if t == "f16"]


def _even_layers(model: Model, placement: PlacementOption) -> list[int]:
    total = model.arch.layers
    caps = [max(s.capacity_mib, 1) for s in placement.slots]
    counts = [total * c // sum(caps) for c in caps]
    counts[-1] += total - sum(counts)
    return counts


def _describe(placement: PlacementOption) -> str:
    if placement.kind == "cpu":
        return "system RAM"
    return " + ".join(s.name for s in placement.slots)


# ---------------------------------------------------------------- choosing


def ordered_candidates(catalog: Catalog, policy: Policy) -> list[Model]:
    models = catalog.largest_first()
    if policy.prefer == "math":
        return sorted(models, key=lambda m: (m.benchmarks.aime2024 or 0.0, m.params_b), reverse=True)
    if policy.prefer == "general":
        return sorted(models, key=lambda m: (m.focus == "general", m.params_b), reverse=True)
    if policy.prefer == "compact":
        classes = {m.size_class: m.params_b for m in reversed(models)}  # each size by its largest distill
        return sorted(models, key=lambda m: (-classes[m.size_class], footprint_mib(m, policy)))
    return models


def footprint_mib(model: Model, policy: Policy) -> float:
    """What `compact` compares at one size: the weights and an f16 KV cache of the policy's smallest context."""
    return weight_shares(model).file_mib + model.kv_bytes_per_token_f16 * policy.min_context / MIB


PREFER_WHY = {
    "largest": "more parameters",
    "compact": "less memory",
    "math": "a better AIME 2024",
    "general": "generalists first, then more parameters",
}


def same_size_sibling(chosen: Model, candidates: list[Model]) -> Model | None:
    """The distill of the chosen one's size that the order tried after it, if any (R1-0528's 8B and the Llama 8B)."""
    return next((m for m in candidates[candidates.index(chosen) + 1:] if m.size_class == chosen.size_class), None)


def same_size_choice(chosen: Model, other: Model, other_tried: Attempt, policy: Policy) -> str:
    """Why the plan serves this distill rather than the other of its size: the two compared on what tells them
    apart, and the `prefer` that would try the other first, or why the other would not fit anyway."""
    head = (f"{chosen.size_label} ({chosen.name}) rather than {other.size_label} ({other.name}), by prefer: "
            f"{policy.prefer} ({PREFER_WHY[policy.prefer]}): {_compared(chosen, other, policy)}; ")
    if not (other_tried.fits and other_tried.tokens_per_second >= policy.min_tokens_per_second):
        return head + f"{other.size_label} would not fit here either: {other_tried.why_not}"
    steer = next(p for p in ("compact", "largest") if p != policy.prefer)
    return head + f"prefer: {steer} tries {other.size_label} before {chosen.size_label}, or pin model: {other.size_label}"


def _compared(a: Model, b: Model, policy: Policy) -> str:
    marks = []
    for name, label in (("aime2024", "AIME 2024"), ("aime2025", "AIME 2025"), ("math500", "MATH-500")):
        x, y = getattr(a.benchmarks, name), getattr(b.benchmarks, name)
        if x is not None or y is not None:
            marks.append(f"{label} {_mark(x)} vs {_mark(y)}")
    memory = (f"{footprint_mib(a, policy):,.0f} vs {footprint_mib(b, policy):,.0f} MiB of weights and f16 KV at "
              f"context {policy.min_context}")
    return ", ".join([*marks, memory])


def _mark(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def judged(model: Model, options: list[PlacementOption], policy: Policy, context: int | None) -> list[Attempt]:
    """The model tried in each placement, one that fits but is slower than the policy's floor marked as not fitting."""
    tried = [attempt(model, p, policy, context) for p in options]
    if any(a.fits and a.tokens_per_second >= policy.min_tokens_per_second for a in tried):
        return tried
    for a in tried:
        if a.fits:
            a.why_not = _too_slow(a, policy)
            a.fits = False
    return tried


def _too_slow(a: Attempt, policy: Policy) -> str:
    return (f"on {_describe(a.placement)} it is estimated at {a.tokens_per_second} tokens/s, "
            f"below min_tokens_per_second {policy.min_tokens_per_second:g}")


def best_attempt(model: Model, options: list[PlacementOption], policy: Policy, context: int | None) -> Attempt:
    """The first placement (in preference order) where the model fits and is fast enough."""
    tried = judged(model, options, policy, context)
    for a in tried:
        if a.fits and a.tokens_per_second >= policy.min_tokens_per_second:
            return a
    # Explain with the first accelerator placement tried; the CPU only when there is nothing else. Each reason once:
    # placements that fail alike (a context beyond the model's training) say the same.
    shown = tried[0]
    shown.why_not = "; ".join(dict.fromkeys(a.why_not for a in tried if a.why_not))
    return shown


# ---------------------------------------------------------------- when the model does not fit


ORDINALS = {2: "second", 3: "third", 4: "fourth"}
MORE_GPUS = 3  # how many more GPUs like the host's a remedy may name


@dataclass
class NoFit:
    """Why a model fits nowhere on a host at the context asked, and what would make it fit."""

    model: Model
    context: int  # the context it was asked to fit (the policy's min_context unless forced)
    closest: Attempt  # the placement closest to fitting, with its figures at `context`
    largest: Attempt | None = None  # the largest context below `context` that fits fast enough, and where
    remedies: list[str] = field(default_factory=list)
    elsewhere: list[str] = field(default_factory=list)  # the other placements' reasons, each once
    floor: float = 0.0  # the policy's min_tokens_per_second

    def reasons(self) -> list[str]:
        """The answer in a few lines: by how much and where, the largest context that fits, what would make it fit."""
        m, a = self.model, self.closest
        over = any(d.planned_mib > d.capacity_mib for d in a.devices)
        if not a.devices:  # beyond what the model was trained for: no figures to give
            lines = [a.why_not]
        elif over:
            devices = ", ".join(f"{d.device.split(' ')[0]} {d.planned_mib:,}/{d.capacity_mib:,} MiB"
                                + (f" ({d.planned_mib - d.capacity_mib:,} over)" if d.planned_mib > d.capacity_mib else "")
                                for d in a.devices)
            lines = [f"{m.size_label} does NOT fit at context {self.context} ({a.kv_type} KV): closest on "
                     f"{_describe(a.placement)}: {devices}"]
        else:
            lines = [f"{m.size_label} does NOT fit at context {self.context} ({a.kv_type} KV): {a.why_not}"]
        if self.largest is not None:
            b = self.largest
            lines.append(f"the largest context that fits: {b.context} ({b.kv_type} KV) on {_describe(b.placement)}, "
                         f"est {b.tokens_per_second} tokens/s")
        else:
            lines.append(f"no context fits {m.size_label} here at min_tokens_per_second {self.floor:g} or faster")
        if self.remedies:
            lines.append(f"it would fit at context {self.context} with: {'; or '.join(self.remedies)}")
        if self.elsewhere:
            lines.append(f"elsewhere: {'; '.join(self.elsewhere)}")
        return lines


def no_fit(model: Model, options: list[PlacementOption], policy: Policy, context: int | None) -> NoFit:
    """The answer for a model that fits no placement: the closest placement (the fast enough ones first, then the
    least memory over capacity), the largest context that fits, and what would make the asked context fit."""
    target = context if context is not None else context_bounds(model, policy)[0]
    tried = judged(model, options, policy, context)

    def distance(a: Attempt) -> tuple[bool, int]:
        over = sum(max(d.planned_mib - d.capacity_mib, 0) for d in a.devices)
        return a.tokens_per_second < policy.min_tokens_per_second, over

    closest = min((a for a in tried if a.devices), key=distance, default=tried[0])
    answer = NoFit(model, target, closest, floor=policy.min_tokens_per_second)
    answer.elsewhere = list(dict.fromkeys(a.why_not for a in tried if a is not closest and a.why_not != closest.why_not))
    high = min(target - 1, model.arch.context_train)
    answer.largest = largest_fit(model, options, policy, high)
    if target <= model.arch.context_train:
        answer.remedies = remedies(model, closest, policy, target)
    return answer


def largest_fit(model: Model, options: list[PlacementOption], policy: Policy, high: int) -> Attempt | None:
    """The largest context up to `high` that fits fast enough, over every placement and allowed KV type."""
    best = None
    for placement in options:
        for kv_type in allowed_kv_types(placement, policy):
            low = min(constants().context_step, high)
            if low < 1 or not _fit_at(model, placement, low, kv_type, policy):
                continue
            result = fitted(model, placement, largest_context(model, placement, kv_type, low, high, policy), kv_type, policy)
            if result.tokens_per_second >= policy.min_tokens_per_second and (best is None or result.context > best.context):
                best = result
    return best


def remedies(model: Model, closest: Attempt, policy: Policy, context: int) -> list[str]:
    """What would make `context` fit where the model came closest: a KV type the policy leaves out, more GPUs like
    the ones it has, or (fitting but too slow) a lower speed floor."""
    placement = closest.placement
    if closest.devices and all(d.planned_mib <= d.capacity_mib for d in closest.devices):
        return [f"min_tokens_per_second lowered to {closest.tokens_per_second:g} (policy), for its estimated speed"]
    out = []
    if flash_attention_for(placement, policy):
        for kv_type in ("q8_0", "q4_0"):
            quantized = policy.model_copy(update={"kv_types": [kv_type]})
            if kv_type not in policy.kv_types and _fits_fast(attempt(model, placement, quantized, context), policy):
                out.append(f"a {kv_type} KV cache (--kv-type {kv_type}, or policy kv_types)")
                break
    if placement.kind in ("gpu", "multi-gpu"):
        gpu, slot = placement.gpus[0], placement.slots[0]
        for extra in range(1, MORE_GPUS + 1):
            copies = [replace(slot, name=f"GPU{len(placement.slots) + i} {gpu.name} (another)") for i in range(extra)]
            more = PlacementOption("multi-gpu", (*placement.slots, *copies), (*placement.gpus, *[gpu] * extra))
            if _fits_fast(attempt(model, more, policy, context), policy):
                total = len(placement.slots) + extra
                what = f"a {ORDINALS[total]} {gpu.name}" if extra == 1 and total in ORDINALS else \
                    f"{extra} more {gpu.name} ({total} in all)"
                out.append(f"{what} ({slot.capacity_mib:,} MiB free, split by llama.cpp)")
                break
    return out


def _fits_fast(a: Attempt, policy: Policy) -> bool:
    return a.fits and a.tokens_per_second >= policy.min_tokens_per_second


def plan_host(
    hw: Hardware,
    policy: Policy | None = None,
    catalog: Catalog | None = None,
    model: str | None = None,
    context: int | None = None,
) -> HostPlan:
    """Choose model, placement, context, KV type, backend and split for one host, with reasons."""
    policy = policy or Policy()
    catalog = catalog or load_catalog()
    options = placements(hw, policy)
    pinned = model or policy.model
    candidates = [catalog.find(pinned)] if pinned else ordered_candidates(catalog, policy)
    rejected: list[Attempt] = []
    for candidate in candidates:
        result = best_attempt(candidate, options, policy, context)
        if result.fits:
            other = None if pinned else same_size_sibling(candidate, candidates)
            choice = same_size_choice(candidate, other, best_attempt(other, options, policy, context), policy) if other else None
            return _host_plan(hw, policy, result, rejected, forced=bool(pinned or context), choice=choice)
        if pinned:
            answer = no_fit(candidate, options, policy, context)
            return _host_plan(hw, policy, answer.closest, rejected, forced=True, answer=answer)
        rejected.append(result)
    answer = no_fit(rejected[-1].model, options, policy, context) if rejected else None
    return _host_plan(hw, policy, None, rejected, forced=False, answer=answer)


def _backend(placement: PlacementOption, policy: Policy) -> str:
    if policy.backend:
        return policy.backend
    return "llama.cpp" if placement.kind == "multi-gpu" else "ollama"


def _host_plan(hw: Hardware, policy: Policy, chosen: Attempt | None, rejected: list[Attempt], forced: bool,
               answer: NoFit | None = None, choice: str | None = None) -> HostPlan:
    gpus = [
        {"index": g.index, "name": g.name, "memory_total_mib": g.memory_total_mib, "memory_free_mib": gpu_capacity_mib(g)}
        for g in hw.gpus
    ]
    reasons = [f"not {a.model.size_label}: {a.why_not}" for a in rejected[-1:]]
    base = dict(host=hw.host, gpus=gpus, unified_memory_mib=hw.unified.total_mib if hw.unified else None)
    if chosen is None:
        smallest = rejected[-1].model.size_label if rejected else "any model"
        if answer is not None:
            first, *more = answer.reasons()
            reasons = [f"not {smallest}: {first}", *more]
        return HostPlan(model=None, reasons=[f"nothing fits: even {smallest} does not", *reasons], **base)
    m, p = chosen.model, chosen.placement
    backend = _backend(p, policy)
    lead = "requested" if forced else "largest that fits"
    if answer is not None:
        first, *more = answer.reasons()
        reasons = [f"{lead}: {first}", *more, *reasons]
    else:
        used = ", ".join(f"{d.device} {d.planned_mib:,}/{d.capacity_mib:,} MiB" for d in chosen.devices)
        why = (f"{m.size_label} fits on {_describe(p)} at context {chosen.context} ({chosen.kv_type} KV): {used}; "
               f"est {chosen.tokens_per_second} tokens/s")
        reasons = [f"{lead}: {why}", *reasons, *([choice] if choice else [])]
    overflows = any(d.planned_mib > d.capacity_mib for d in chosen.devices)
    if backend == "llama.cpp" and p.kind == "multi-gpu" and chosen.fits:
        reasons.append(
            f"llama.cpp llama-server, blocks {chosen.layers} across {len(p.slots)} GPUs with the output on the last "
            f"(--tensor-split {format_flag(flag_for_layers(chosen.layers))}: llama.cpp counts the output as one more layer); "
            "Ollama refuses tight multi-GPU fits"
        )
    gpu_devices = [d for d, slot in zip(chosen.devices, p.slots) if slot.kind in ("cuda", "rocm")]
    if gpu_devices and chosen.fits:
        margin = min(d.capacity_mib - (d.weights_mib + d.kv_cache_mib + d.compute_mib) for d in gpu_devices)
        reasons.append(
            f"margin: each GPU keeps at least {margin:,} MiB beyond llama.cpp's own buffers (weights, KV, compute) "
            f"for the GPU runtime's context, cuBLAS and pools ({gpu_devices[0].overhead_mib:,} planned) "
            f"and the headroom ({policy.headroom_mib:,})"
        )
    if policy.flash_attention == "auto" and not chosen.flash_attention:
        reasons.append(f"flash attention off: {runtime_flash_attention(p)[1]}, so the KV cache stays f16")
    u = hw.unified
    if p.kind == "unified" and u and u.gpu_limit_raisable and chosen.devices[0].planned_mib > u.gpu_limit_mib:
        reasons.append(
            f"needs more than macOS's default GPU working set ({u.gpu_limit_mib:,} MiB): the deploy raises "
            f"iogpu.wired_limit_mb at boot, leaving {constants().apple_os_reserve_mib:,} MiB to macOS"
        )
    cache_ram = None
    if backend == "llama.cpp" and chosen.devices:
        cache_ram, note = llama_prompt_cache(hw, m, p, chosen)
        reasons += [note] if note else []
    shares = weight_shares(m)
    disk_needed = round(shares.file_mib)
    if hw.disk_free_mib is not None and hw.disk_free_mib < disk_needed:
        reasons.append(f"warning: the model needs {disk_needed:,} MiB of disk, {hw.disk_free_mib:,} MiB free")
    return HostPlan(
        model=m.id,
        ollama_tag=m.ollama_tag,
        backend=backend,
        placement=p.kind,
        fits=chosen.fits,
        context_length=chosen.context,
        kv_cache_type=chosen.kv_type,
        flash_attention=chosen.flash_attention,
        ubatch=chosen.ubatch or constants().split_compute["ubatch"],
        flash_attention_forced=policy.flash_attention != "auto" or chosen.kv_type != "f16",
        tensor_split=chosen.layers if p.kind == "multi-gpu" else None,
        gpu_uuids=[g.uuid for g in p.gpus if g.uuid],
        gpu_indices=[g.index for g in p.gpus],
        devices=chosen.devices,
        # a speed for memory the host does not have would read as a promise
        est_tokens_per_second=None if overflows or not chosen.devices else chosen.tokens_per_second,
        reasons=reasons,
        gguf=m.pinned_gguf(),
        n_layers=m.arch.layers,
        compute_caps=[g.compute_cap for g in p.gpus if g.compute_cap],
        vendor=_vendor(hw, p),
        disk_needed_mib=disk_needed,
        cache_ram_mib=cache_ram,
        **base,
    )


def llama_prompt_cache(hw: Hardware, model: Model, placement: PlacementOption, chosen: Attempt) -> tuple[int, str | None]:
    """llama-server's prompt cache (--cache-ram) for this host's RAM, and why when it is below llama.cpp's default.

    On the CPU or a unified pool the plan's one device is host RAM already; beside GPUs the server holds its token
    embeddings and the CPU's compute buffer there."""
    if placement.kind in ("cpu", "unified"):
        held = float(chosen.devices[0].planned_mib)
    else:
        held = llama_server_host_mib(model, chosen.context, chosen.flash_attention)
    cache = prompt_cache_mib(hw.ram_total_mib, held)
    default = constants().prompt_cache_mib
    if cache >= default:
        return cache, None
    what = f"capped at {cache:,} MiB (--cache-ram {cache})" if cache else "off (--cache-ram 0)"
    return cache, (f"host RAM: llama-server's prompt cache {what}, below llama.cpp's default {default:,}: "
                   f"{hw.ram_total_mib:,} MiB of RAM holds {round(held):,} MiB of the server's own and "
                   f"{constants().cpu_os_reserve_mib:,} for the system")


UNIFIED_VENDOR = {"apple": "apple", "amd-apu": "amd", "jetson": "nvidia", "gb10": "nvidia"}


def _vendor(hw: Hardware, placement: PlacementOption) -> str | None:
    """The GPU vendor the plan runs on (None on the CPU): drives drivers, archives and device access."""
    if placement.gpus:
        return placement.gpus[0].vendor
    if placement.kind == "unified" and hw.unified:
        return UNIFIED_VENDOR[hw.unified.kind]
    return None


def rehearse(plan: HostPlan, catalog: Catalog | None = None) -> HostPlan:
    """The same plan (backend, placement, split, flags) serving the small stand-in model instead.

    The context is capped at what the stand-in was trained for, so drivers, services and network are
    proven before a large download.
    """
    if plan.model is None:
        return plan
    catalog = catalog or load_catalog()
    stand_in = catalog.stand_ins[0]
    split = rescale_blocks(plan.tensor_split, stand_in.arch.layers) if plan.tensor_split else None
    return plan.model_copy(
        update={
            "rehearsal": True,
            "target_model": plan.model,
            "model": stand_in.id,
            "ollama_tag": stand_in.ollama_tag,
            "context_length": min(plan.context_length, stand_in.arch.context_train),
            "gguf": stand_in.pinned_gguf(),
            "n_layers": stand_in.arch.layers,
            "tensor_split": split,
            "reasons": [*plan.reasons, f"rehearsal: serving {stand_in.name} in the planned slot instead of {plan.model}"],
        }
    )
