"""Apple Silicon: unified memory from sysctl and system_profiler."""

from __future__ import annotations

from r1fleet.hardware.gpu_table import lookup_gpu
from r1fleet.hardware._base import APPLE_SMALL_RAM_MIB, MIB, Found, reading
from r1fleet.hardware.amd import json_payload
from r1fleet.records import UnifiedMemory

def apple_silicon(sysctl: dict[str, str], sections: dict[str, list[str]], found: Found) -> int | None:
    """Apple Silicon unified memory; returns RAM in MiB from hw.memsize (None when absent)."""
    memsize = reading(sysctl.get("hw.memsize"))
    if memsize is None:
        return None
    total = memsize // MIB
    brand = sysctl.get("machdep.cpu.brand_string", "")
    profiler = json_payload(sections.get("system_profiler", []))
    displays = profiler.get("SPDisplaysDataType", []) if isinstance(profiler, dict) else []
    display = displays[0] if isinstance(displays, list) and displays and isinstance(displays[0], dict) else {}
    model = str(display.get("sppci_model", "")) or ""
    cores = reading(str(display.get("sppci_cores"))) if display.get("sppci_cores") else None
    if not brand.startswith("Apple M") and model.startswith("Apple M"):
        brand = model  # very early Big Sur said "Apple processor"
    if not brand.startswith("Apple"):
        return total  # an Intel Mac: RAM only
    wired = reading(sysctl.get("iogpu.wired_limit_mb"))
    if wired:
        limit = wired
    elif total <= APPLE_SMALL_RAM_MIB:
        limit = total * 2 // 3
    else:
        limit = total * 3 // 4
    spec = lookup_gpu(name=brand, gpu_cores=cores)
    found.unified = UnifiedMemory(
        kind="apple", name=brand, total_mib=total, gpu_limit_mib=min(limit, total),
        gpu_limit_raisable=not wired,  # a limit the owner set is theirs; the default one r1fleet may raise
        bandwidth_gbps=spec.bandwidth_gbps if spec else None,
    )
    if spec is None:
        found.notes.append(f"{brand} is not in the GPU table: no memory bandwidth known")
    return total


