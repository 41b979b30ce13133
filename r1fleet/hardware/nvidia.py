"""NVIDIA: nvidia-smi query and table, compute apps, and unified-memory boards (DGX Spark, Jetson)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from r1fleet.hardware.gpu_table import GpuSpec, lookup_by_substring, lookup_gpu
from r1fleet.hardware._base import (
    DRIVER_HEADER,
    Found,
    TABLE_GPU_ROW,
    TABLE_MEMORY,
    TABLE_PROCESS,
    reading,
    spec_for,
    present,
    normalize_bus_id,
)
from r1fleet.hardware.pci import PciDevice
from r1fleet.hardware.system import own_process, parse_own_pids
from r1fleet.records import Gpu, GpuProcess, UnifiedMemory

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
        values = [present(f) for f in fields]
        rows.append(NvidiaRow(
            index=int(fields[0]),
            name=fields[1],
            memory_total_mib=reading(values[2]),
            memory_used_mib=reading(values[3]),
            memory_free_mib=reading(values[4]),
            bus_id=normalize_bus_id(values[5]) if values[5] else None,
            uuid=values[6] if values[6] and re.fullmatch(GPU_UUID, values[6]) else None,
            driver_version=values[7],
            compute_cap=values[8] if len(values) == 9 and values[8] and re.match(r"^[0-9]+\.[0-9]+$", values[8]) else None,
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
        match = DRIVER_HEADER.search(line)
        if match:
            table.driver_version = match.group(1)
            break
    in_processes = False
    for i, line in enumerate(lines):
        if "Processes:" in line:
            in_processes = True
            continue
        if in_processes:
            proc = TABLE_PROCESS.match(line)
            if proc:
                table.processes.setdefault(int(proc.group("gpu")), []).append(
                    GpuProcess(pid=int(proc.group("pid")), name=proc.group("name"), used_mib=int(proc.group("mem")))
                )
            continue
        row = TABLE_GPU_ROW.match(line)
        if not row:
            continue
        following = lines[i + 1:i + 3]
        memory = TABLE_MEMORY.search(following[0]) if following else None
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
            GpuProcess(pid=int(head[1]), name=name.strip(), used_mib=reading(present(used)) or 0)
        )
    return by_uuid


def _is_nvidia_unified(name: str, pci_id: str | None) -> GpuSpec | None:
    spec = spec_for(name, pci_id, None)
    return spec if spec is not None and spec.unified else None


def nvidia_gpus(sections: dict[str, list[str]], pci: list[PciDevice], found: Found) -> list[NvidiaRow]:
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
        spec = spec_for(row.name, pci_id, row.memory_total_mib)
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


def nvidia_unified(
    sections: dict[str, list[str]], skipped: list[NvidiaRow], pci: list[PciDevice],
    meminfo: tuple[int, int | None] | None, found: Found,
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


