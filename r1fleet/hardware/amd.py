"""AMD: rocm-smi / amd-smi JSON and the amdgpu sysfs figures (discrete cards and APUs such as Strix Halo)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from r1fleet.hardware.gpu_table import GpuSpec
from r1fleet.hardware._base import MIB, MIN_DISCRETE_MIB, Found, reading, spec_for, normalize_bus_id
from r1fleet.hardware.pci import DrmCard, PciDevice
from r1fleet.records import Gpu, UnifiedMemory

# ---------------------------------------------------------------------------------------------
# AMD: rocm-smi / amd-smi JSON


@dataclass(frozen=True)
class AmdSmiGpu:
    name: str | None
    vram_total_mib: int | None
    vram_used_mib: int | None
    pci_id: str | None = None
    slot: str | None = None


def json_payload(lines: list[str]) -> object | None:
    """The JSON in a section, skipping warnings some tools print before it."""
    text = "\n".join(lines)
    starts = [i for i in (text.find("{"), text.find("[")) if i >= 0]
    if not starts:
        return None
    try:
        return json.loads(text[min(starts):])
    except (json.JSONDecodeError, RecursionError):  # nested deeper than any tool prints: not its output
        return None


def _get(mapping: dict, *keys: str) -> object | None:
    lowered = {str(k).lower(): v for k, v in mapping.items()}
    for key in keys:
        if key.lower() in lowered:
            return lowered[key.lower()]
    return None


def _amd_pci_id(device: object) -> str | None:
    text = str(device or "").lower().removeprefix("0x")
    return f"1002:{text.rjust(4, '0')}" if re.fullmatch(r"[0-9a-f]{1,4}", text) else None


def parse_rocm_smi(lines: list[str]) -> list[AmdSmiGpu]:
    """Both JSON shapes the section may hold.

    rocm-smi: `{"card0": {"VRAM Total Memory (B)": "21458059264", "Card Series": ..., ...}}` with
    byte counts as strings; amd-smi static: a list, or `{"gpu_data": [...]}` on newer releases, of
    `{"asic": {"market_name", "device_id"}, "vram": {"size": {"value": N, "unit": "MB"}}, "bus": {"bdf"}}`.
    """
    payload = json_payload(lines)
    if isinstance(payload, dict) and isinstance(payload.get("gpu_data"), list):
        payload = payload["gpu_data"]
    gpus: list[AmdSmiGpu] = []
    if isinstance(payload, list):
        for item in payload:
            if not isinstance(item, dict):
                continue
            asic = item.get("asic") if isinstance(item.get("asic"), dict) else {}
            vram = item.get("vram") if isinstance(item.get("vram"), dict) else {}
            size = vram.get("size") if isinstance(vram.get("size"), dict) else {}
            value = reading(str(size.get("value"))) if size else None
            unit = str(size.get("unit", "MB")).upper()
            total = value * 1024 if value is not None and unit == "GB" else value
            bus = item.get("bus") if isinstance(item.get("bus"), dict) else {}
            gpus.append(AmdSmiGpu(
                name=asic.get("market_name"),
                vram_total_mib=total,
                vram_used_mib=None,
                pci_id=_amd_pci_id(asic.get("device_id")),
                slot=normalize_bus_id(bus["bdf"]) if bus.get("bdf") else None,
            ))
    elif isinstance(payload, dict):
        for key in sorted(payload, key=lambda k: (len(str(k)), str(k))):
            card = payload[key]
            if not str(key).lower().startswith("card") or not isinstance(card, dict):
                continue
            total = reading(str(_get(card, "VRAM Total Memory (B)")))
            used = reading(str(_get(card, "VRAM Total Used Memory (B)")))
            name = _get(card, "Card Series", "Device Name", "Card series")
            gpus.append(AmdSmiGpu(
                name=str(name) if name else None,
                vram_total_mib=total // MIB if total is not None else None,
                vram_used_mib=used // MIB if used is not None else None,
                pci_id=_amd_pci_id(_get(card, "Card Model", "Device ID")),
            ))
    return gpus


def _amd_is_integrated(vram_mib: int | None, gtt_mib: int | None) -> bool:
    """Ollama's rule (discover/amd.go): VRAM <= 4 GiB with GTT >= 8 GiB and >= 4x VRAM is an iGPU."""
    if vram_mib is None or vram_mib < MIN_DISCRETE_MIB:
        return True
    return vram_mib <= 4096 and gtt_mib is not None and gtt_mib >= 8192 and gtt_mib >= 4 * vram_mib


def amd_gpus(
    sections: dict[str, list[str]], drm: list[DrmCard], pci: list[PciDevice], meminfo: tuple[int, int | None] | None,
    found: Found,
) -> None:
    smi = parse_rocm_smi(sections.get("rocm-smi", []))
    cards = [c for c in drm if c.vendor_id == "1002"]
    pci_names = {d.slot: d.description for d in pci if d.vendor_id == "1002"}
    index = 0
    if cards:
        by_slot = {g.slot: g for g in smi if g.slot}
        paired = len(smi) == len(cards) and not by_slot
        for position, card in enumerate(cards):
            info = by_slot.get(card.slot) or (smi[position] if paired else None)
            pci_id = card.pci_id or (info.pci_id if info else None)
            spec = spec_for(info.name if info else None, pci_id, card.vram_total_mib)
            name = (info.name if info and info.name else None) or (spec.model if spec else None) \
                or pci_names.get(card.slot) or f"AMD GPU {pci_id}"
            if spec is not None and spec.unified:
                found.unified = amd_apu(name, spec, card.vram_total_mib, card.gtt_total_mib, meminfo)
                continue
            if _amd_is_integrated(card.vram_total_mib, card.gtt_total_mib):
                found.notes.append(f"integrated GPU {name} ({card.vram_total_mib} MiB carve-out) is not used")
                continue
            total = card.vram_total_mib or 0
            used = card.vram_used_mib if card.vram_used_mib is not None else (info.vram_used_mib if info else None)
            found.gpus.append(Gpu(
                index=index, vendor="amd", name=name, memory_total_mib=total, memory_used_mib=used,
                memory_free_mib=(total - used) if used is not None else None, bus_id=card.slot, pci_id=pci_id,
                bandwidth_gbps=spec.bandwidth_gbps if spec else None, source="drm",
            ))
            index += 1
        return
    for info in smi:
        spec = spec_for(info.name, info.pci_id, info.vram_total_mib)
        name = info.name or (spec.model if spec else "AMD GPU")
        if spec is not None and spec.unified:
            found.unified = amd_apu(name, spec, info.vram_total_mib, None, meminfo)
            continue
        if info.vram_total_mib is None or info.vram_total_mib < MIN_DISCRETE_MIB:
            found.notes.append(f"integrated GPU {name} is not used")
            continue
        used = info.vram_used_mib
        found.gpus.append(Gpu(
            index=index, vendor="amd", name=name, memory_total_mib=info.vram_total_mib, memory_used_mib=used,
            memory_free_mib=(info.vram_total_mib - used) if used is not None else None, bus_id=info.slot,
            pci_id=info.pci_id, bandwidth_gbps=spec.bandwidth_gbps if spec else None, source="rocm-smi",
        ))
        index += 1


def amd_apu(
    name: str, spec: GpuSpec, vram_mib: int | None, gtt_mib: int | None, meminfo: tuple[int, int | None] | None
) -> UnifiedMemory | None:
    """Strix Halo and kin: the GPU allocates from GTT (system RAM) beyond its small BIOS carve-out.

    The limit is the larger of GTT and the carve-out (llama.cpp's HIP backend reports the GTT size as
    its total); without the amdgpu driver GTT is unknown and defaults to about half of RAM.
    """
    if meminfo is None:
        return None
    total, available = meminfo
    limit = max(gtt_mib or total // 2, vram_mib or 0)
    return UnifiedMemory(
        kind="amd-apu", name=name, total_mib=total, gpu_limit_mib=min(limit, total),
        available_mib=available, bandwidth_gbps=spec.bandwidth_gbps,
    )


