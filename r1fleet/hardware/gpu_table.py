"""The GPU table (data/gpus.yaml): model, PCI ids, memory and bandwidth of known GPUs.

`lookup_gpu` answers "what is this GPU?" from whatever the probe saw: the name nvidia-smi or
rocm-smi printed (possibly truncated by the plain table), a PCI id from lspci before any driver
exists, and the memory size when one name covers several cards (RTX 3060 8/12 GB).
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from r1fleet.errors import R1FleetError
from r1fleet.records import Vendor

GPU_TABLE_PATH = Path(__file__).with_name("gpus.yaml")

_PCI_ID = r"^[0-9a-f]{4}:[0-9a-f]{4}$"
# Words a vendor prefixes to some spellings but not others ("GeForce GTX 1070" on old drivers,
# "Radeon RX 7900 XT" from rocm-smi, "NVIDIA-GB10" from gpud).
_VENDOR_WORDS = re.compile(r"^(nvidia|amd|ati)[ -]+")


class GpuSpec(BaseModel):
    """One row of the GPU table."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    vendor: Vendor
    names: tuple[str, ...] = ()
    pci_ids: tuple[str, ...] = ()
    pci_id_ranges: tuple[tuple[str, str], ...] = ()
    vram_mib: int | None = Field(None, gt=0)
    bandwidth_gbps: float = Field(gt=0)
    compute_cap: str | None = Field(None, pattern=r"^[0-9]+\.[0-9]+$")
    unified: bool = False
    gpu_cores: int | None = Field(None, gt=0)
    gfx: str | None = Field(None, pattern=r"^gfx[0-9a-f]{3,4}$")

    def matches_pci_id(self, pci_id: str) -> bool:
        if pci_id in self.pci_ids:
            return True
        return any(first <= pci_id <= last for first, last in self.pci_id_ranges)

    def spellings(self) -> set[str]:
        return {normalize_name(n) for n in (self.model, *self.names)}


class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid")
    gpus: list[GpuSpec]


def normalize_name(name: str) -> str:
    """Lower-case, single spaces, no leading vendor word: how table names are compared."""
    text = " ".join(name.lower().split())
    return _VENDOR_WORDS.sub("", text)


@lru_cache(maxsize=None)
def gpu_table(path: Path = GPU_TABLE_PATH) -> tuple[GpuSpec, ...]:
    """Load and validate the table once; a broken table is a bug in r1fleet, reported by file."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        table = _Table.model_validate(raw)
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        raise R1FleetError(f"cannot load the GPU table {path}: {exc}", field="gpus", fix="restore r1fleet/hardware/gpus.yaml") from exc
    for spec in table.gpus:
        bad = [p for p in (*spec.pci_ids, *(i for r in spec.pci_id_ranges for i in r)) if not re.match(_PCI_ID, p)]
        if bad:
            raise R1FleetError(f"GPU table entry {spec.model!r} has malformed PCI ids {bad}", field="pci_ids", fix="write them as vendor:device in lowercase hex")
    return tuple(table.gpus)


def _closest(candidates: list[GpuSpec], memory_mib: int | None, gpu_cores: int | None) -> GpuSpec | None:
    """Pick among several rows sharing a name or PCI id.

    With a measured memory size the row with the nearest VRAM wins; with a GPU core count (Apple
    bins) the row with that count wins; otherwise the most conservative row (least VRAM, then
    least bandwidth), because planning for a smaller card never overcommits the real one.
    """
    if not candidates:
        return None
    if gpu_cores is not None:
        binned = [c for c in candidates if c.gpu_cores == gpu_cores]
        if binned:
            candidates = binned
    if memory_mib is not None and any(c.vram_mib for c in candidates):
        sized = [c for c in candidates if c.vram_mib]
        return min(sized, key=lambda c: (abs(c.vram_mib - memory_mib), c.bandwidth_gbps))
    return min(candidates, key=lambda c: (c.vram_mib or 0, c.bandwidth_gbps))


def lookup_gpu(
    name: str | None = None,
    pci_id: str | None = None,
    memory_mib: int | None = None,
    gpu_cores: int | None = None,
) -> GpuSpec | None:
    """The table row for a GPU, or None when it is not in the table.

    `name` may be truncated the way nvidia-smi's table truncates it ("NVIDIA GeForce RTX 2080 ...").
    A PCI id is exact and wins over a name. `memory_mib` and `gpu_cores` only break ties.
    """
    table = gpu_table()
    if pci_id:
        wanted = pci_id.lower()
        by_id = [spec for spec in table if spec.matches_pci_id(wanted)]
        if by_id:
            return _closest(by_id, memory_mib, gpu_cores)
    if not name:
        return None
    key = normalize_name(name)
    if key.endswith("..."):
        prefix = key[:-3].rstrip()
        candidates = [s for s in table if any(n.startswith(prefix) for n in s.spellings())]
    else:
        candidates = [s for s in table if key in s.spellings()]
    return _closest(candidates, memory_mib, gpu_cores)


def lookup_by_substring(text: str, vendor: Vendor | None = None) -> GpuSpec | None:
    """The row whose model name occurs in a free-text board name, longest name first.

    Used for Jetson board names ("NVIDIA Jetson AGX Orin Developer Kit") and marketing strings.
    """
    haystack = normalize_name(text)
    rows = [s for s in gpu_table() if vendor is None or s.vendor == vendor]
    hits = [(len(n), s) for s in rows for n in s.spellings() if n and n in haystack]
    if not hits:
        return None
    return max(hits, key=lambda hit: hit[0])[1]
