"""llama.cpp's `--tensor-split`: from the plan's blocks per device to the flag, and back.

llama.cpp does not read the flag as block counts. It spreads `n_layer + 1` slots (the blocks, then
the output layer) over the devices by the cumulative shares of the flag: slot `il` goes to the first
device whose cumulative share, in float32, is greater than `il / (n_layer + 1)`
(src/llama-model.cpp, `load_tensors`, `get_layer_buft_list`: `std::upper_bound(splits, ...,
float(il - i_gpu_start) / act_gpu_layers)`, with `act_gpu_layers = min(n_gpu_layers, n_layer + 1)`;
the output is `get_layer_buft_list(n_layer)`). With `-ngl 999` every slot is offloaded.

So a plan of 41 blocks | 39 blocks + output on two GPUs is the flag `41,40`, not `41,39` (which
llama.cpp places as 42 | 38 + output).

Example:
    >>> flag_for_layers([41, 39])
    [41, 40]
    >>> placed_blocks([41, 40], n_layer=80)
    [41, 39]
"""

from __future__ import annotations

import bisect
import struct


def _f32(value: float) -> float:
    """Round to the nearest IEEE float32, as llama.cpp's `float` arithmetic does."""
    return struct.unpack("f", struct.pack("f", value))[0]


def flag_for_layers(blocks_per_device: list[int]) -> list[int]:
    """The `--tensor-split` values that make llama.cpp place exactly these blocks, output on the last."""
    if not blocks_per_device or any(n < 0 for n in blocks_per_device):
        raise ValueError(f"blocks per device must be non-negative counts, got {blocks_per_device}")
    return [*blocks_per_device[:-1], blocks_per_device[-1] + 1]


def slot_devices(flag: list[float], n_layer: int, n_gpu_layers: int = 999) -> list[int | None]:
    """For each slot (blocks 0..n_layer-1, then the output), the device index llama.cpp picks (None: CPU)."""
    if not flag or sum(flag) <= 0:
        raise ValueError(f"a tensor split needs a positive share, got {flag}")
    cumulative, total = [], 0.0
    for share in flag:
        total = _f32(total + _f32(share))
        cumulative.append(total)
    splits = [_f32(c / total) for c in cumulative]
    start = max(n_layer + 1 - n_gpu_layers, 0)
    active = min(n_gpu_layers, n_layer + 1)
    devices: list[int | None] = []
    for il in range(n_layer + 1):
        if il < start or il - start >= active:
            devices.append(None)
            continue
        device = bisect.bisect_right(splits, _f32(_f32(il - start) / active))
        devices.append(min(device, len(flag) - 1))
    return devices


def placed_blocks(flag: list[float], n_layer: int, n_gpu_layers: int = 999) -> list[int]:
    """How many blocks (not counting the output) llama.cpp puts on each device for this flag."""
    devices = slot_devices(flag, n_layer, n_gpu_layers)
    return [sum(1 for d in devices[:n_layer] if d == i) for i in range(len(flag))]


def output_device(flag: list[float], n_layer: int, n_gpu_layers: int = 999) -> int | None:
    """The device that holds the output layer (None: the CPU)."""
    return slot_devices(flag, n_layer, n_gpu_layers)[n_layer]


def rescale_blocks(blocks_per_device: list[int], n_layer: int) -> list[int]:
    """The same proportions for a model of `n_layer` blocks (largest remainder; rehearsal's stand-in)."""
    total = sum(blocks_per_device)
    if total <= 0:
        raise ValueError(f"blocks per device must sum to more than 0, got {blocks_per_device}")
    raw = [n * n_layer / total for n in blocks_per_device]
    counts = [int(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: raw[i] - counts[i], reverse=True)
    for i in order[: n_layer - sum(counts)]:
        counts[i] += 1
    return counts


def format_flag(flag: list[int]) -> str:
    return ",".join(str(v) for v in flag)
