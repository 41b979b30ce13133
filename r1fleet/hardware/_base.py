"""Shared pieces of the probe parsers: sections, readings, and what parse_probe collects."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from r1fleet.errors import ProbeError
from r1fleet.hardware.gpu_table import GpuSpec, lookup_gpu
from r1fleet.probe.text import probe_text
from r1fleet.records import Gpu, UnifiedMemory, Vendor

MIB = 1024 * 1024
# Below this an integrated GPU's BIOS carve-out is no place for a model (and never "VRAM").
MIN_DISCRETE_MIB = 1024
# Apple's default GPU working-set limit (Metal recommendedMaxWorkingSetSize): about 2/3 of RAM up
# to 36 GB and 3/4 above (logs in tests/fixtures/macos-metal-recommendedMaxWorkingSetSize-samples.txt:
# 16 GB -> 10922.67 MB, 32 GB -> 21845.34 MB, 96 GB -> 73728 MB). Apple does not document it.
APPLE_SMALL_RAM_MIB = 36 * 1024

_SECTION = re.compile(r"^#### r1fleet:([A-Za-z0-9_.-]+)\s*$")
_MISSING_VALUES = {"", "n/a", "[n/a]", "[not supported]", "not supported", "[unknown error]", "[insufficient permissions]"}
VENDOR_IDS: dict[str, Vendor] = {"10de": "nvidia", "1002": "amd", "8086": "intel"}
DISPLAY_CLASSES = {"0300", "0302", "0380"}
DRIVER_HEADER = re.compile(r"(?:Driver|KMD) Version:\s*([0-9][0-9.]*)")
TABLE_GPU_ROW = re.compile(
    r"^\|\s*(?P<index>[0-9]+)\s+(?P<name>.+?)\s+(?P<mode>On|Off|WDDM|TCC|MCDM|N/A)\s*\|"
    r"\s*(?P<bus>[0-9A-Fa-f]{4,8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.[0-7]|N/A)\s+(?:On|Off|N/A)\s*\|"
)
TABLE_MEMORY = re.compile(r"([0-9]+)MiB\s*/\s*([0-9]+)MiB")
TABLE_PROCESS = re.compile(
    r"^\|\s*(?P<gpu>[0-9]+)\s+\S+\s+\S+\s+(?P<pid>[0-9]+)\s+(?P<type>[CGM+]+)\s+(?P<name>.+?)\s+(?P<mem>[0-9]+)MiB\s*\|"
)
LSPCI = re.compile(
    r"^(?P<slot>(?:[0-9a-fA-F]{4}:)?[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7])\s+(?P<class_name>[^\[]*?)\s*"
    r"\[(?P<cls>[0-9a-fA-F]{4})\]:\s*(?P<desc>.*?)\s*\[(?P<vendor>[0-9a-fA-F]{4}):(?P<device>[0-9a-fA-F]{4})\]"
)


def probe_fix(host: str) -> str:
    return f"save it again with `r1fleet probe {host} > {host}.probe`"


# ---------------------------------------------------------------------------------------------
# Sections


def split_sections(text: str, host: str) -> dict[str, list[str]]:
    """The document's sections by name, each as its lines. Text before the first marker is ignored."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for raw in probe_text(text).split("\n"):
        match = _SECTION.match(raw)
        if match:
            current = sections.setdefault(match.group(1), [])
        elif current is not None:
            current.append(raw)
    if not sections:
        raise ProbeError(
            "no `#### r1fleet:` sections: this is not a probe document (or it is empty)",
            host=host, field="probe document", fix=probe_fix(host),
        )
    return {name: _trim(lines) for name, lines in sections.items()}


def _trim(lines: list[str]) -> list[str]:
    while lines and not lines[-1].strip():
        lines = lines[:-1]
    return lines


def present(text: str) -> str | None:
    """A CSV field, or None when nvidia-smi says it has no value ([N/A], [Not Supported], ...)."""
    text = text.strip()
    return None if text.lower() in _MISSING_VALUES else text


# Larger than any memory a probe can report in MiB or KiB (16 EiB in KiB): anything above is not a reading.
_MAX_READING = 2**64


def reading(text: str | None) -> int | None:
    """A whole non-negative reading, or None for anything else (inf, nan, 400-digit numbers, words, digits of
    other scripts, which Python's float() would read: '٣' is 3)."""
    if text is None or not text.isascii():
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    if not math.isfinite(value) or not 0 <= value < _MAX_READING:
        return None
    return int(value)


def normalize_bus_id(bus_id: str) -> str:
    """`00000000:01:00.0` (nvidia-smi), `01:00.0` (lspci) and `0000:01:00.0` (sysfs) -> `0000:01:00.0`."""
    parts = bus_id.strip().lower().split(":")
    if len(parts) == 2:
        parts.insert(0, "0000")
    domain = parts[0][-4:].rjust(4, "0")
    return ":".join([domain, *parts[1:]])


@dataclass
class Found:
    gpus: list[Gpu] = field(default_factory=list)
    unified: UnifiedMemory | None = None
    notes: list[str] = field(default_factory=list)


def spec_for(name: str | None, pci_id: str | None, memory_mib: int | None) -> GpuSpec | None:
    return lookup_gpu(name=name, pci_id=pci_id, memory_mib=memory_mib)

