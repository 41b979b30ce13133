"""Memory estimator: how many MiB a model needs on each device, at a context and KV cache type.

Per device: weights share + KV cache for the layers it holds + compute buffer + runtime overhead
+ headroom. The constants and their sources live in data/estimator.yaml.

Example:
    >>> m = load_catalog().find("32b")
    >>> d = estimate_device(m, Slot("GPU0", 24564, "cuda"), layers=64, last=True, context=8192,
    ...                     kv_type="f16", flash_attention=True, headroom_mib=1024)
    >>> d.planned_mib <= d.capacity_mib
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import yaml

from r1fleet.plan.catalog import Model
from r1fleet.records import DevicePlan

MIB = 1024 * 1024
SlotKind = Literal["cuda", "rocm", "metal", "cpu", "unified"]


@dataclass(frozen=True)
class Constants:
    token_embd_bits_per_weight: float
    output_bits_per_weight: float
    kv_bytes_per_element: dict[str, float]
    kv_pad_tokens: int
    compute_batch: int
    overhead_mib: dict[str, int]
    driver_reserve_mib: dict[str, int]
    split_compute: dict[str, int]
    ollama_batch: dict
    flash_attention_off_cuda_below: float
    flash_attention_off_cuda_caps: list[str]
    cpu_os_reserve_mib: int
    prompt_cache_mib: int
    prompt_cache_step_mib: int
    efficiency: dict[str, float]
    speed_context_fill: int
    unknown_gpu_bandwidth_gbps: float
    context_step: int
    apple_os_reserve_mib: int
    health_base_s: int
    health_disk_read_mb_per_s: int
    disk_margin_mib: int
    pool: dict[str, float]


@lru_cache(maxsize=1)
def constants() -> Constants:
    path = Path(__file__).with_name("estimator.yaml")
    return Constants(**yaml.safe_load(path.read_text()))


@dataclass(frozen=True)
class Slot:
    """A device memory pool the planner may fill: a GPU, a unified pool, or system RAM."""

    name: str
    capacity_mib: int
    kind: SlotKind
    bandwidth_gbps: float = 0.0

    @property
    def holds_whole_file(self) -> bool:
        """On unified memory and the CPU the token embeddings share the same pool as the rest."""
        return self.kind in ("cpu", "unified", "metal")


@dataclass(frozen=True)
class WeightShares:
    """How a GGUF's bytes divide: embeddings (host memory), one block layer, the output tensor. The file is the larger of
    the model's GGUF and its Ollama layer (`Model.weights_bytes`), so a plan holds whichever its backend loads."""

    file_mib: float
    token_embd_mib: float
    output_mib: float
    per_layer_mib: float


def weight_shares(model: Model) -> WeightShares:
    c = constants()
    a = model.arch
    file_mib = model.weights_bytes / MIB
    embd = a.vocab * a.embedding * c.token_embd_bits_per_weight / 8 / MIB
    output = a.vocab * a.embedding * c.output_bits_per_weight / 8 / MIB
    per_layer = max(file_mib - embd - output, 0.0) / a.layers
    return WeightShares(file_mib, embd, output, per_layer)


def padded_context(context: int) -> int:
    """The context llama.cpp really allocates (and reports in /props): padded to kv_pad_tokens."""
    pad = constants().kv_pad_tokens
    return math.ceil(context / pad) * pad


def kv_cache_mib(model: Model, layers: int, context: int, kv_type: str) -> float:
    """2 (K and V) x layers x kv_heads x head_dim x padded context x bytes per element (flash attention or not)."""
    a = model.arch
    per_element = constants().kv_bytes_per_element[kv_type]
    tokens = padded_context(context)
    return 2 * layers * a.kv_heads * a.head_dim * tokens * per_element / MIB


COMPUTE_TABLE = Path(__file__).with_name("compute_buffers.yaml")


@lru_cache(maxsize=1)
def compute_table() -> dict[str, dict[str, dict[str, int]]]:
    return yaml.safe_load(COMPUTE_TABLE.read_text()).get("models") or {}


def compute_slope_mib(model: Model, context: int, flash_attention: bool, split: bool, ubatch: int | None = None) -> float:
    """The part of llama-server's compute buffer that grows with the context, on one device."""
    c = constants().split_compute
    ub, copies = ubatch or c["ubatch"], (c["pipeline_copies"] if split else 1)
    tokens = padded_context(context)
    if flash_attention:
        return copies * ub * tokens * 2 / MIB
    return (copies * ub * tokens * 4 + model.arch.heads * ub * tokens * 4) / MIB


def compute_entry(split_first: bool | None, ubatch: int | None) -> str:
    """The compute table's key for a device: one device (at a micro-batch), or a split's first or other device."""
    if split_first is not None:
        return "split_first" if split_first else "split_other"
    return "single" if ubatch in (None, constants().split_compute["ubatch"]) else f"single_ub{ubatch}"


def llama_server_compute_mib(
    model: Model, context: int, flash_attention: bool, split_first: bool | None, ubatch: int | None = None
) -> float | None:
    """llama-server's compute buffer on one device, from llama.cpp's own projection; None for an unmeasured model."""
    entry = compute_table().get(model.id, {}).get(compute_entry(split_first, ubatch))
    if entry is None:
        return None
    base = entry["fa_on" if flash_attention else "fa_off"]
    return base + compute_slope_mib(model, context, flash_attention, split=split_first is not None, ubatch=ubatch)


def compute_buffer_mib(model: Model, context: int, flash_attention: bool = True) -> float:
    a = model.arch
    batch = constants().compute_batch
    attention = 0 if flash_attention else context * a.heads
    elements = max(a.embedding + a.vocab, 1 + 2 * a.embedding + context + attention)
    return 4 * batch * elements / MIB


def estimate_device(
    model: Model,
    slot: Slot,
    *,
    layers: int,
    last: bool,
    context: int,
    kv_type: str,
    flash_attention: bool,
    headroom_mib: int,
    split_first: bool | None = None,
    ubatch: int | None = None,
) -> DevicePlan:
    """The planned memory on one device that holds `layers` block layers (and the output if `last`).

    split_first: None when the model runs on this device alone, else whether it is the split's first device.
    """
    shares = weight_shares(model)
    if slot.holds_whole_file:
        weights = shares.file_mib * layers / model.arch.layers
    else:
        weights = shares.per_layer_mib * layers + (shares.output_mib if last else 0.0)
    kv = kv_cache_mib(model, layers, context, kv_type)
    compute = device_compute_mib(model, context, flash_attention, split_first, ubatch) if layers else 0.0
    overhead = constants().overhead_mib[slot.kind] if layers else 0
    parts = [round(weights), round(kv), round(compute), overhead]
    return DevicePlan(
        device=slot.name,
        capacity_mib=slot.capacity_mib,
        planned_mib=sum(parts) + headroom_mib,
        weights_mib=parts[0],
        kv_cache_mib=parts[1],
        compute_mib=parts[2],
        overhead_mib=overhead,
        headroom_mib=headroom_mib,
        layers=layers,
    )


def llama_server_host_mib(model: Model, context: int, flash_attention: bool) -> float:
    """What llama-server holds in host RAM beside a plan's GPUs: the token embeddings (CPU_Mapped, used every
    token) and the CPU's compute buffer, bounded by Ollama's graph estimate (the 70B: 266 MiB, where llama.cpp
    projects 236.07 at context 19456 and 192.07 at 8192, docs/research/llamacpp-fit-oracle.md section 3)."""
    return weight_shares(model).token_embd_mib + compute_buffer_mib(model, context, flash_attention)


def prompt_cache_mib(ram_total_mib: int, held_mib: float) -> int:
    """llama-server's --cache-ram: llama.cpp's default where the host's RAM holds it beside what the server
    already holds there (`held_mib`) and the system's reserve, else what is left (0: no prompt cache)."""
    c = constants()
    room = max(ram_total_mib - c.cpu_os_reserve_mib - held_mib, 0.0)
    step = c.prompt_cache_step_mib
    return int(min(c.prompt_cache_mib, room // step * step))


def ollama_ubatch(model: Model, context: int, flash_attention: bool, free_mib: float, cuda: bool) -> int:
    """The batch Ollama hands its llama-server runner for this model, context and free memory."""
    c = constants().ollama_batch
    default = constants().split_compute["ubatch"]
    if not flash_attention and cuda:
        constrained = context > 4096 and free_mib <= c["constrained_gpu_max_mib"]
        return c["constrained"] if constrained else default
    predicted = weight_shares(model).file_mib + kv_cache_mib(model, model.arch.layers, context, "f16")
    for size in c["sizes"]:
        if context <= c["above_context"][size]:
            continue
        limit = free_mib * c["fits_pct"] / 100
        if predicted <= free_mib * c["headroom_pct"][size] / 100 and c["surcharge_mib"][size] <= limit - predicted:
            return size
    return default


def device_compute_mib(
    model: Model, context: int, flash_attention: bool, split_first: bool | None, ubatch: int | None = None
) -> float:
    """The compute buffer of one device: llama-server's graph (one device or a split's pipeline), as llama.cpp
    itself projects it. For a model llama.cpp was not asked about yet: Ollama's graph estimate without the context
    (its vocabulary-sized logits, above every measured base), at the micro-batch (the measured bases grow with it in
    proportion), plus the part llama.cpp grows with the context, so the estimate stays above the measurement to come
    (tests/unit/test_planner.py)."""
    measured = llama_server_compute_mib(model, context, flash_attention, split_first, ubatch)
    if measured is not None:
        return measured
    c = constants()
    base = compute_buffer_mib(model, 0, True) * (ubatch or c.split_compute["ubatch"]) / c.compute_batch
    return base + compute_slope_mib(model, context, flash_attention, split=split_first is not None, ubatch=ubatch)


def fixed_cost_mib(
    model: Model, slot: Slot, *, last: bool, context: int, flash_attention: bool, headroom_mib: int,
    split_first: bool | None = None, ubatch: int | None = None,
) -> float:
    """What a device spends before its first block layer: compute, overhead, headroom, and the output if last."""
    output = weight_shares(model).output_mib if last and not slot.holds_whole_file else 0.0
    compute = device_compute_mib(model, context, flash_attention, split_first, ubatch)
    return compute + constants().overhead_mib[slot.kind] + headroom_mib + output


def layer_cost_mib(model: Model, slot: Slot, *, context: int, kv_type: str) -> float:
    """Weights plus KV cache of one block layer on this device."""
    shares = weight_shares(model)
    weights = shares.file_mib / model.arch.layers if slot.holds_whole_file else shares.per_layer_mib
    return weights + kv_cache_mib(model, 1, context, kv_type)


def bytes_read_per_token_gb(model: Model, layers: int, last: bool, context: int, kv_type: str) -> float:
    """Decode reads every weight once per token, plus the KV cache filled to a typical conversation length."""
    shares = weight_shares(model)
    weights = shares.per_layer_mib * layers + (shares.output_mib if last else 0.0)
    kv = kv_cache_mib(model, layers, min(context, constants().speed_context_fill), kv_type)
    return (weights + kv) * MIB / 1e9
