"""Probe document -> Hardware: a pure parser for what r1fleet/probe.sh prints.

The document is a series of sections, each `#### r1fleet:<name>` followed by one command's raw
output (DESIGN.md "Probe document"). Each section has a small parser here; `parse_probe` combines
them into one `Hardware`, deciding which source to trust for what:

- NVIDIA: `nvidia-smi --query-gpu` CSV first, the plain table when the query is missing or failed
  (old drivers, the 610 branch's "KMD Version" header). The table also says whether MIG is on.
- Before any driver: `lspci -nn` display devices mapped through the GPU table (data/gpus.yaml),
  so a fresh host gets a plan before its driver is installed.
- AMD: the amdgpu driver's sysfs files (drm section) work without ROCm; rocm-smi or amd-smi JSON
  adds marketing names.
- Unified memory: Apple Silicon (sysctl), DGX Spark GB10 and Jetson (never NVML, whose memory
  figures are [N/A] there: /proc/meminfo instead), Strix Halo (GTT size from sysfs).

Memory is in MiB everywhere.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

from r1fleet.errors import ProbeError
from r1fleet.gpu_table import GpuSpec, gpu_table, lookup_by_substring, lookup_gpu
from r1fleet.models import Gpu, GpuProcess, Hardware, OsInfo, UnifiedMemory, Vendor

MIB = 1024 * 1024
# Below this an integrated GPU's BIOS carve-out is no place for a model (and never "VRAM").
MIN_DISCRETE_MIB = 1024
# Apple's default GPU working-set limit (Metal recommendedMaxWorkingSetSize): about 2/3 of RAM up
# to 36 GB and 3/4 above (logs in tests/fixtures/macos-metal-recommendedMaxWorkingSetSize-samples.txt:
# 16 GB -> 10922.67 MB, 32 GB -> 21845.34 MB, 96 GB -> 73728 MB). Apple does not document it.
APPLE_SMALL_RAM_MIB = 36 * 1024

_SECTION = re.compile(r"^#### r1fleet:([A-Za-z0-9_.-]+)\s*$")
_MISSING_VALUES = {"", "n/a", "[n/a]", "[not supported]", "not supported", "[unknown error]", "[insufficient permissions]"}
_VENDOR_IDS: dict[str, Vendor] = {"10de": "nvidia", "1002": "amd", "8086": "intel"}
_DISPLAY_CLASSES = {"0300", "0302", "0380"}
_DRIVER_HEADER = re.compile(r"(?:Driver|KMD) Version:\s*([0-9][0-9.]*)")
_TABLE_GPU_ROW = re.compile(
    r"^\|\s*(?P<index>\d+)\s+(?P<name>.+?)\s+(?P<mode>On|Off|WDDM|TCC|MCDM|N/A)\s*\|"
    r"\s*(?P<bus>[0-9A-Fa-f]{4,8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.[0-7]|N/A)\s+(?:On|Off|N/A)\s*\|"
)
_TABLE_MEMORY = re.compile(r"(\d+)MiB\s*/\s*(\d+)MiB")
_TABLE_PROCESS = re.compile(
    r"^\|\s*(?P<gpu>\d+)\s+\S+\s+\S+\s+(?P<pid>\d+)\s+(?P<type>[CGM+]+)\s+(?P<name>.+?)\s+(?P<mem>\d+)MiB\s*\|"
)
_LSPCI = re.compile(
    r"^(?P<slot>(?:[0-9a-fA-F]{4}:)?[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7])\s+(?P<class_name>[^\[]*?)\s*"
    r"\[(?P<cls>[0-9a-fA-F]{4})\]:\s*(?P<desc>.*?)\s*\[(?P<vendor>[0-9a-fA-F]{4}):(?P<device>[0-9a-fA-F]{4})\]"
)


def _fix(host: str) -> str:
    return f"save it again with `r1fleet probe {host} > {host}.probe`"


# ---------------------------------------------------------------------------------------------
# Sections


def split_sections(text: str, host: str) -> dict[str, list[str]]:
    """The document's sections by name, each as its lines. Text before the first marker is ignored."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for raw in text.replace("\r\n", "\n").split("\n"):
        match = _SECTION.match(raw)
        if match:
            current = sections.setdefault(match.group(1), [])
        elif current is not None:
            current.append(raw)
    if not sections:
        raise ProbeError(
            "no `#### r1fleet:` sections: this is not a probe document (or it is empty)",
            host=host, field="probe document", fix=_fix(host),
        )
    return {name: _trim(lines) for name, lines in sections.items()}


def _trim(lines: list[str]) -> list[str]:
    while lines and not lines[-1].strip():
        lines = lines[:-1]
    return lines


def _value(text: str) -> str | None:
    """A CSV field, or None when nvidia-smi says it has no value ([N/A], [Not Supported], ...)."""
    text = text.strip()
    return None if text.lower() in _MISSING_VALUES else text


# Larger than any memory a probe can report in MiB or KiB (16 EiB in KiB): anything above is not a reading.
_MAX_READING = 2**64


def _int(text: str | None) -> int | None:
    """A whole non-negative reading, or None for anything else (inf, nan, 400-digit numbers, words)."""
    if text is None:
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


# ---------------------------------------------------------------------------------------------
# System: uname, os-release, meminfo, cpu, df, secureboot, sysctl


def parse_uname(lines: list[str]) -> OsInfo:
    fields = " ".join(lines).split()
    system = fields[0] if fields else "Linux"
    kernel = fields[1] if len(fields) > 1 else ""
    arch = fields[-1] if len(fields) > 2 else ""
    return OsInfo(system=system, kernel=kernel, arch=arch)


def parse_os_release(lines: list[str], base: OsInfo) -> OsInfo:
    values: dict[str, str] = {}
    for line in lines:
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip().strip('"').strip("'")
    return base.model_copy(update={
        "id": values.get("ID", ""),
        "version_id": values.get("VERSION_ID", ""),
        "codename": values.get("VERSION_CODENAME", ""),
        "pretty_name": values.get("PRETTY_NAME", ""),
    })


def parse_meminfo(lines: list[str], host: str) -> tuple[int, int | None] | None:
    """(MemTotal, MemAvailable) in MiB; None when the section is empty; ProbeError when garbled."""
    if not any(line.strip() for line in lines):
        return None
    values: dict[str, int] = {}
    for line in lines:
        match = re.match(r"^\s*([A-Za-z0-9_()]+):\s+(\d+)\s*(kB)?\s*$", line)
        if match:
            values[match.group(1)] = int(match.group(2))
    total = values.get("MemTotal")
    if not total:
        raise ProbeError(
            "the meminfo section has no readable `MemTotal: N kB` line",
            host=host, field="meminfo", fix=_fix(host),
        )
    available = values.get("MemAvailable")
    return total // 1024, (available // 1024 if available is not None else None)


@dataclass(frozen=True)
class CpuInfo:
    count: int = 1
    name: str = ""
    avx2: bool = False
    avx512: bool = False


def parse_cpu(lines: list[str]) -> CpuInfo:
    count, name, flags = 1, "", set()
    for line in lines:
        text = line.strip()
        if text.isdecimal():
            count = max(1, int(text))
        key, sep, value = text.partition(":")
        if not sep:
            continue
        key = key.strip().lower()
        if key == "model name" and not name:
            name = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return CpuInfo(count=count, name=name, avx2="avx2" in flags, avx512="avx512f" in flags)


def parse_df(lines: list[str]) -> int | None:
    """Free space in MiB from `df -Pk` (header, then one line: fs, blocks, used, available, ...)."""
    for line in lines[1:]:
        fields = line.split()
        if len(fields) >= 4 and fields[3].isdecimal():
            return int(fields[3]) // 1024
    return None


# Before the probe listed r1fleet's own service processes, they were known by name only.
OWN_BACKEND_NAMES = ("ollama", "llama-server", "llama_server")


def parse_own_pids(lines: list[str]) -> set[int]:
    return {int(line.strip()) for line in lines if line.strip().isdecimal()}


def own_process(process: GpuProcess, own_pids: set[int] | None) -> bool:
    """r1fleet's own service: by its cgroup's processes, or (older probes) by the backend's name."""
    if own_pids is not None:
        return process.pid in own_pids
    return any(marker in process.name.lower() for marker in OWN_BACKEND_NAMES)


def parse_model_files(lines: list[str]) -> dict[str, int]:
    """{file name: bytes} from `ls -ln` lines (mode, links, uid, gid, size, date..., path)."""
    files: dict[str, int] = {}
    for line in lines:
        fields = line.split()
        if len(fields) >= 9 and fields[0].startswith("-") and fields[4].isdecimal():
            files[fields[-1].rsplit("/", 1)[-1]] = int(fields[4])
    return files


def parse_secureboot(lines: list[str]) -> bool | None:
    text = " ".join(lines).lower()
    if "secureboot enabled" in text:
        return True
    if "secureboot disabled" in text:
        return False
    return None


def parse_sysctl(lines: list[str]) -> dict[str, str]:
    """`key: value` lines (macOS sysctl) as a dict."""
    values: dict[str, str] = {}
    for line in lines:
        key, sep, value = line.partition(":")
        if sep and key.strip() and " " not in key.strip():
            values[key.strip()] = value.strip()
    return values


# ---------------------------------------------------------------------------------------------
# NVIDIA


@dataclass
class NvidiaRow:
    """One GPU as nvidia-smi printed it (query CSV or plain table)."""

    index: int
    name: str
    memory_total_mib: int | None
    memory_used_mib: int | None
    memory_free_mib: int | None
    bus_id: str | None = None
    uuid: str | None = None
    driver_version: str | None = None
    compute_cap: str | None = None
    mig: bool = False


# A GPU or MIG UUID as nvidia-smi prints it; it goes into units (CUDA_VISIBLE_DEVICES), so nothing else passes.
GPU_UUID = r"(GPU|MIG)-[0-9A-Fa-f-]{1,64}"


def parse_nvidia_query(lines: list[str]) -> list[NvidiaRow]:
    """`--query-gpu=index,name,memory.total,memory.used,memory.free,pci.bus_id,uuid,driver_version[,compute_cap]`."""
    rows = []
    for line in lines:
        fields = [f.strip() for f in line.split(",")]
        if len(fields) not in (8, 9) or not fields[0].isdecimal():
            continue
        values = [_value(f) for f in fields]
        rows.append(NvidiaRow(
            index=int(fields[0]),
            name=fields[1],
            memory_total_mib=_int(values[2]),
            memory_used_mib=_int(values[3]),
            memory_free_mib=_int(values[4]),
            bus_id=normalize_bus_id(values[5]) if values[5] else None,
            uuid=values[6] if values[6] and re.fullmatch(GPU_UUID, values[6]) else None,
            driver_version=values[7],
            compute_cap=values[8] if len(values) == 9 and values[8] and re.match(r"^\d+\.\d+$", values[8]) else None,
        ))
    return rows


@dataclass
class NvidiaTable:
    rows: list[NvidiaRow] = field(default_factory=list)
    processes: dict[int, list[GpuProcess]] = field(default_factory=dict)
    driver_version: str | None = None


def parse_nvidia_table(lines: list[str]) -> NvidiaTable:
    """The plain `nvidia-smi` table: old 79-column and new 89-column layouts, Linux and Windows."""
    table = NvidiaTable()
    for line in lines:
        match = _DRIVER_HEADER.search(line)
        if match:
            table.driver_version = match.group(1)
            break
    in_processes = False
    for i, line in enumerate(lines):
        if "Processes:" in line:
            in_processes = True
            continue
        if in_processes:
            proc = _TABLE_PROCESS.match(line)
            if proc:
                table.processes.setdefault(int(proc.group("gpu")), []).append(
                    GpuProcess(pid=int(proc.group("pid")), name=proc.group("name"), used_mib=int(proc.group("mem")))
                )
            continue
        row = _TABLE_GPU_ROW.match(line)
        if not row:
            continue
        following = lines[i + 1:i + 3]
        memory = _TABLE_MEMORY.search(following[0]) if following else None
        used, total = (int(memory.group(1)), int(memory.group(2))) if memory else (None, None)
        # The third line of a GPU's block carries the "MIG M." column (absent before driver 450).
        mig = len(following) > 1 and following[1].rstrip().rstrip("|").strip().endswith("Enabled")
        bus = row.group("bus")
        table.rows.append(NvidiaRow(
            index=int(row.group("index")),
            name=row.group("name").strip(),
            memory_total_mib=total,
            memory_used_mib=used,
            memory_free_mib=(total - used) if total is not None and used is not None else None,
            bus_id=normalize_bus_id(bus) if bus != "N/A" else None,
            driver_version=table.driver_version,
            mig=mig,
        ))
    return table


def parse_nvidia_apps(lines: list[str]) -> dict[str, list[GpuProcess]]:
    """`--query-compute-apps=gpu_uuid,pid,process_name,used_memory`, by GPU uuid."""
    by_uuid: dict[str, list[GpuProcess]] = {}
    for line in lines:
        head = line.split(",", 2)
        if len(head) < 3 or not head[1].strip().isdecimal():
            continue
        name, _, used = head[2].rpartition(",")
        if not name:
            continue
        by_uuid.setdefault(head[0].strip(), []).append(
            # [N/A] (WDDM) counts as nothing held: the GPU's memory.used still accounts for it.
            GpuProcess(pid=int(head[1]), name=name.strip(), used_mib=_int(_value(used)) or 0)
        )
    return by_uuid


# ---------------------------------------------------------------------------------------------
# PCI (lspci -nn) and DRM sysfs


@dataclass(frozen=True)
class PciDevice:
    slot: str
    class_code: str
    vendor_id: str
    device_id: str
    description: str

    @property
    def pci_id(self) -> str:
        return f"{self.vendor_id}:{self.device_id}"


def parse_lspci(lines: list[str]) -> list[PciDevice]:
    """GPU functions from `lspci -nn`: NVIDIA/AMD/Intel display classes only.

    Audio functions (class 0403) and virtual or BMC display adapters (QEMU 1234, VMware 15ad,
    ASPEED 1a03, Matrox 102b, virtio 1af4, QXL 1b36, VirtualBox 80ee) fall out by class or vendor.
    """
    records: list[tuple[str, str, str, str, str]] = []
    if any(line.startswith("Slot:") for line in lines):
        records = _lspci_machine_records(lines)
    for line in lines:
        match = _LSPCI.match(line.strip())
        if match:
            records.append((match.group("slot"), match.group("cls"), match.group("vendor"),
                            match.group("device"), match.group("desc")))
    devices = []
    for slot, cls, vendor, device, description in records:
        vendor, cls = vendor.lower(), cls.lower()
        if vendor not in _VENDOR_IDS or cls not in _DISPLAY_CLASSES:
            continue
        devices.append(PciDevice(
            slot=normalize_bus_id(slot), class_code=cls, vendor_id=vendor, device_id=device.lower(),
            description=description,
        ))
    return devices


def _lspci_machine_records(lines: list[str]) -> list[tuple[str, str, str, str, str]]:
    """`lspci -vmmnD` records (`Slot:`, `Class:`, `Vendor:`, `Device:` blocks), as a saved probe may hold."""
    records, current = [], {}
    for line in [*lines, ""]:
        key, sep, value = line.partition(":")
        if sep and key in ("Slot", "Class", "Vendor", "Device"):
            current[key] = value.strip()
        elif not line.strip() and current:
            if all(k in current for k in ("Slot", "Class", "Vendor", "Device")):
                records.append((current["Slot"], current["Class"][:4], current["Vendor"], current["Device"], ""))
            current = {}
    return records


@dataclass(frozen=True)
class DrmCard:
    card: str
    slot: str | None
    vendor_id: str | None
    device_id: str | None
    vram_total_mib: int | None
    vram_used_mib: int | None
    gtt_total_mib: int | None

    @property
    def pci_id(self) -> str | None:
        return f"{self.vendor_id}:{self.device_id}" if self.vendor_id and self.device_id else None


def parse_drm(lines: list[str]) -> list[DrmCard]:
    """`cardN slot=... vendor=0x1002 device=0x744c mem_info_vram_total=BYTES ...` lines."""
    cards = []
    for line in lines:
        words = line.split()
        if not words or not words[0].startswith("card"):
            continue
        attrs = dict(w.split("=", 1) for w in words[1:] if "=" in w)

        def mib(key: str) -> int | None:
            value = _int(attrs.get(key))
            return value // MIB if value is not None else None

        def hex_id(key: str) -> str | None:
            value = attrs.get(key, "").lower().removeprefix("0x")
            return value[-4:].rjust(4, "0") if value else None

        cards.append(DrmCard(
            card=words[0],
            slot=normalize_bus_id(attrs["slot"]) if attrs.get("slot", "").count(":") >= 1 else None,
            vendor_id=hex_id("vendor"),
            device_id=hex_id("device"),
            vram_total_mib=mib("mem_info_vram_total"),
            vram_used_mib=mib("mem_info_vram_used"),
            gtt_total_mib=mib("mem_info_gtt_total"),
        ))
    return cards


# ---------------------------------------------------------------------------------------------
# AMD: rocm-smi / amd-smi JSON


@dataclass(frozen=True)
class AmdSmiGpu:
    name: str | None
    vram_total_mib: int | None
    vram_used_mib: int | None
    pci_id: str | None = None
    slot: str | None = None


def _json_payload(lines: list[str]) -> object | None:
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
    payload = _json_payload(lines)
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
            value = _int(str(size.get("value"))) if size else None
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
            total = _int(str(_get(card, "VRAM Total Memory (B)")))
            used = _int(str(_get(card, "VRAM Total Used Memory (B)")))
            name = _get(card, "Card Series", "Device Name", "Card series")
            gpus.append(AmdSmiGpu(
                name=str(name) if name else None,
                vram_total_mib=total // MIB if total is not None else None,
                vram_used_mib=used // MIB if used is not None else None,
                pci_id=_amd_pci_id(_get(card, "Card Model", "Device ID")),
            ))
    return gpus


# ---------------------------------------------------------------------------------------------
# Combining


@dataclass
class _Found:
    gpus: list[Gpu] = field(default_factory=list)
    unified: UnifiedMemory | None = None
    notes: list[str] = field(default_factory=list)


def _spec_for(name: str | None, pci_id: str | None, memory_mib: int | None) -> GpuSpec | None:
    return lookup_gpu(name=name, pci_id=pci_id, memory_mib=memory_mib)


def _is_nvidia_unified(name: str, pci_id: str | None) -> GpuSpec | None:
    spec = _spec_for(name, pci_id, None)
    return spec if spec is not None and spec.unified else None


def _nvidia_gpus(sections: dict[str, list[str]], pci: list[PciDevice], found: _Found) -> list[NvidiaRow]:
    """NVIDIA discrete GPUs from nvidia-smi (query, else table). Returns the unified rows it skipped."""
    query = parse_nvidia_query(sections.get("nvidia-smi-query", []))
    table = parse_nvidia_table(sections.get("nvidia-smi", []))
    rows = query or table.rows
    table_by_index = {row.index: row for row in table.rows}
    apps = parse_nvidia_apps(sections.get("nvidia-smi-apps", []))
    own_pids = parse_own_pids(sections["own-pids"]) if "own-pids" in sections else None
    pci_by_slot = {d.slot: d for d in pci if d.vendor_id == "10de"}
    skipped: list[NvidiaRow] = []
    for row in rows:
        from_table = table_by_index.get(row.index)
        if from_table is not None:
            row.mig = row.mig or from_table.mig
            row.driver_version = row.driver_version or from_table.driver_version
        device = pci_by_slot.get(row.bus_id) if row.bus_id else None
        pci_id = device.pci_id if device else None
        if _is_nvidia_unified(row.name, pci_id) or row.memory_total_mib is None:
            skipped.append(row)
            continue
        spec = _spec_for(row.name, pci_id, row.memory_total_mib)
        name = row.name
        if name.endswith("...") and spec is not None and pci_id is not None:
            name = spec.model  # the table truncated it; the PCI id names it exactly
        if apps:
            processes = apps.get(row.uuid or "", [])
        else:
            processes = table.processes.get(row.index, [])
        processes = [p.model_copy(update={"own": own_process(p, own_pids)}) for p in processes]
        found.gpus.append(Gpu(
            index=row.index,
            vendor="nvidia",
            name=name,
            memory_total_mib=row.memory_total_mib,
            memory_used_mib=row.memory_used_mib,
            memory_free_mib=row.memory_free_mib,
            uuid=row.uuid,
            bus_id=row.bus_id,
            pci_id=pci_id,
            driver_version=row.driver_version,
            compute_cap=row.compute_cap or (spec.compute_cap if spec else None),
            bandwidth_gbps=spec.bandwidth_gbps if spec else None,
            source="nvidia-smi-query" if query else "nvidia-smi",
            processes=processes,
            mig=row.mig,
        ))
        if row.mig:
            found.notes.append(f"GPU {row.index} ({name}) has MIG enabled: its memory is split into instances")
        if spec is None:
            found.notes.append(f"GPU {row.index} ({name}) is not in the GPU table: no memory bandwidth known")
    return skipped


def _pci_gpus(pci: list[PciDevice], vendor_id: str, found: _Found, first_index: int = 0) -> None:
    """GPUs known only from lspci (no driver yet): model and VRAM from the GPU table."""
    index = first_index
    for device in pci:
        if device.vendor_id != vendor_id:
            continue
        spec = lookup_gpu(pci_id=device.pci_id)
        if spec is None:
            found.notes.append(
                f"PCI device {device.pci_id} at {device.slot} ({device.description}) is not in the GPU table; "
                "install its driver and probe again to size it"
            )
            continue
        if spec.unified:
            continue
        candidates = [s.model for s in _all_for_pci(device.pci_id)]
        if len(set(candidates)) > 1:
            found.notes.append(
                f"PCI id {device.pci_id} is one of {', '.join(sorted(set(candidates)))}: planned as the smallest "
                f"({spec.model}); probe again after the driver is installed"
            )
        found.gpus.append(Gpu(
            index=index,
            vendor=_VENDOR_IDS[vendor_id],
            name=spec.model,
            memory_total_mib=spec.vram_mib or 0,
            bus_id=device.slot,
            pci_id=device.pci_id,
            compute_cap=spec.compute_cap,
            bandwidth_gbps=spec.bandwidth_gbps,
            source="lspci",
        ))
        index += 1
        if sum(g.source == "lspci" for g in found.gpus) == 1:
            found.notes.append("GPU memory estimated from PCI ids (no GPU driver yet); probe again after installing it")


def _all_for_pci(pci_id: str) -> list[GpuSpec]:
    return [s for s in gpu_table() if s.matches_pci_id(pci_id)]


def _amd_is_integrated(vram_mib: int | None, gtt_mib: int | None) -> bool:
    """Ollama's rule (discover/amd.go): VRAM <= 4 GiB with GTT >= 8 GiB and >= 4x VRAM is an iGPU."""
    if vram_mib is None or vram_mib < MIN_DISCRETE_MIB:
        return True
    return vram_mib <= 4096 and gtt_mib is not None and gtt_mib >= 8192 and gtt_mib >= 4 * vram_mib


def _amd_gpus(
    sections: dict[str, list[str]], drm: list[DrmCard], pci: list[PciDevice], meminfo: tuple[int, int | None] | None,
    found: _Found,
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
            spec = _spec_for(info.name if info else None, pci_id, card.vram_total_mib)
            name = (info.name if info and info.name else None) or (spec.model if spec else None) \
                or pci_names.get(card.slot) or f"AMD GPU {pci_id}"
            if spec is not None and spec.unified:
                found.unified = _amd_apu(name, spec, card.vram_total_mib, card.gtt_total_mib, meminfo)
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
        spec = _spec_for(info.name, info.pci_id, info.vram_total_mib)
        name = info.name or (spec.model if spec else "AMD GPU")
        if spec is not None and spec.unified:
            found.unified = _amd_apu(name, spec, info.vram_total_mib, None, meminfo)
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


def _amd_apu(
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


def _nvidia_unified(
    sections: dict[str, list[str]], skipped: list[NvidiaRow], pci: list[PciDevice],
    meminfo: tuple[int, int | None] | None, found: _Found,
) -> None:
    """DGX Spark (GB10) and Jetson: size from /proc/meminfo, never from NVML."""
    if meminfo is None:
        return
    total, available = meminfo
    tegra = [line.strip() for line in sections.get("tegra", []) if line.strip()]
    if tegra:
        board = next((line for line in tegra if not line.startswith("#")), "")
        spec = lookup_by_substring(board, vendor="nvidia") if board else None
        if spec is None and skipped:
            spec = lookup_gpu(name=skipped[0].name)
        name = board or (skipped[0].name if skipped else "NVIDIA Jetson")
        found.unified = UnifiedMemory(
            kind="jetson", name=name, total_mib=total, gpu_limit_mib=total, available_mib=available,
            bandwidth_gbps=spec.bandwidth_gbps if spec else None,
        )
        return
    gb10 = [row for row in skipped if _is_nvidia_unified(row.name, None)]
    for row in skipped:
        if row not in gb10:
            found.notes.append(f"GPU {row.index} ({row.name}) reports no memory size and is not a known unified-memory GPU; not used")
    gb10_pci = [d for d in pci if d.vendor_id == "10de" and (s := lookup_gpu(pci_id=d.pci_id)) is not None and s.unified]
    if gb10 or gb10_pci:
        spec = lookup_gpu(name="NVIDIA GB10")
        row = gb10[0] if gb10 else None
        found.unified = UnifiedMemory(
            kind="gb10", name=row.name if row else "NVIDIA GB10", total_mib=total, gpu_limit_mib=total,
            available_mib=available, bandwidth_gbps=spec.bandwidth_gbps if spec else None,
        )
        if row is not None:
            found.notes.append(
                f"{row.name}: unified memory sized from /proc/meminfo; driver {row.driver_version or 'unknown'}, "
                f"compute capability {row.compute_cap or 'unknown'}"
            )


def _apple(sysctl: dict[str, str], sections: dict[str, list[str]], found: _Found) -> int | None:
    """Apple Silicon unified memory; returns RAM in MiB from hw.memsize (None when absent)."""
    memsize = _int(sysctl.get("hw.memsize"))
    if memsize is None:
        return None
    total = memsize // MIB
    brand = sysctl.get("machdep.cpu.brand_string", "")
    profiler = _json_payload(sections.get("system_profiler", []))
    displays = profiler.get("SPDisplaysDataType", []) if isinstance(profiler, dict) else []
    display = displays[0] if isinstance(displays, list) and displays and isinstance(displays[0], dict) else {}
    model = str(display.get("sppci_model", "")) or ""
    cores = _int(str(display.get("sppci_cores"))) if display.get("sppci_cores") else None
    if not brand.startswith("Apple M") and model.startswith("Apple M"):
        brand = model  # very early Big Sur said "Apple processor"
    if not brand.startswith("Apple"):
        return total  # an Intel Mac: RAM only
    wired = _int(sysctl.get("iogpu.wired_limit_mb"))
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


def parse_probe(text: str, host: str) -> Hardware:
    """Parse a whole probe document into `Hardware`; ProbeError (naming host and section) when it cannot."""
    sections = split_sections(text, host)
    os_info = parse_uname(sections.get("uname", []))
    os_info = parse_os_release(sections.get("os-release", []), os_info)
    cpu = parse_cpu(sections.get("cpu", []))
    sysctl = parse_sysctl(sections.get("sysctl", []))
    meminfo = parse_meminfo(sections.get("meminfo", []), host)
    found = _Found()

    apple_ram = _apple(sysctl, sections, found) if sysctl else None
    if meminfo is None and apple_ram is None:
        raise ProbeError(
            "no memory size: the meminfo section (Linux) and sysctl hw.memsize (macOS) are both empty",
            host=host, field="meminfo", fix=_fix(host),
        )
    if meminfo is None:
        meminfo = (apple_ram or 0, None)

    pci = parse_lspci(sections.get("lspci", []))
    drm = parse_drm(sections.get("drm", []))
    skipped = _nvidia_gpus(sections, pci, found)
    if not any(g.vendor == "nvidia" for g in found.gpus) and not skipped:
        _pci_gpus(pci, "10de", found)
    _nvidia_unified(sections, skipped, pci, meminfo, found)
    if not any(c.vendor_id == "1002" for c in drm) and not parse_rocm_smi(sections.get("rocm-smi", [])):
        apu = [d for d in pci if d.vendor_id == "1002" and (s := lookup_gpu(pci_id=d.pci_id)) and s.unified]
        if apu:
            spec = lookup_gpu(pci_id=apu[0].pci_id)
            found.unified = found.unified or _amd_apu(spec.model, spec, None, None, meminfo)
            found.notes.append(f"{spec.model}: no amdgpu driver loaded; GTT assumed to be half of RAM")
        _pci_gpus(pci, "1002", found)
    else:
        _amd_gpus(sections, drm, pci, meminfo, found)
    for device in pci:
        if device.vendor_id == "8086":
            found.notes.append(f"Intel GPU {device.pci_id} at {device.slot} is not used (integrated or unsupported)")

    brand = sysctl.get("machdep.cpu.brand_string", "")
    tegra = [line.strip() for line in sections.get("tegra", []) if line.strip()]
    hardware = Hardware(
        host=host,
        os=os_info,
        ram_total_mib=meminfo[0],
        ram_available_mib=meminfo[1],
        cpu_count=cpu.count,
        cpu_name=cpu.name or brand,
        avx2=cpu.avx2,
        avx512=cpu.avx512,
        gpus=found.gpus,
        unified=found.unified,
        disk_free_mib=parse_df(sections.get("df", [])),
        model_files=parse_model_files(sections.get("models", [])),
        secure_boot=parse_secureboot(sections.get("secureboot", [])),
        tegra_release=tegra[0] if tegra else None,
        notes=found.notes,
    )
    _check_readings(hardware)
    return hardware


# No memory or count a probe reports comes near this (1 EiB in MiB); a larger number is not a reading.
_IMPLAUSIBLE = 2**40


def _check_readings(hw: Hardware) -> None:
    """Refuse (naming host and section) a number no machine has, before the planner computes with it."""
    readings = [("meminfo", hw.ram_total_mib), ("meminfo", hw.ram_available_mib), ("cpu", hw.cpu_count),
                ("df", hw.disk_free_mib), *(("models", size) for size in hw.model_files.values())]
    for gpu in hw.gpus:
        readings += [("nvidia-smi", v) for v in (gpu.index, gpu.memory_total_mib, gpu.memory_used_mib, gpu.memory_free_mib)]
        readings += [("nvidia-smi-apps", v) for p in gpu.processes for v in (p.pid, p.used_mib)]
    if hw.unified:
        readings += [("unified memory", v) for v in (hw.unified.total_mib, hw.unified.gpu_limit_mib, hw.unified.available_mib)]
    for section, value in readings:
        if value is not None and not 0 <= value < _IMPLAUSIBLE:
            raise ProbeError(f"the {section} section reports {value}, which no machine has", host=hw.host, field=section,
                             fix=_fix(hw.host))
