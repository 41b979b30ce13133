"""Probe document -> Hardware: a pure parser for what r1fleet/probe/probe.sh prints.

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

from r1fleet.errors import ProbeError
from r1fleet.hardware.gpu_table import lookup_gpu
from r1fleet.hardware._base import Found, probe_fix, split_sections
from r1fleet.hardware.amd import amd_apu, amd_gpus, parse_rocm_smi
from r1fleet.hardware.apple import apple_silicon
from r1fleet.hardware.driver import KfdNode, parse_driver_facts, parse_kfd
from r1fleet.hardware.nvidia import nvidia_gpus, nvidia_unified, parse_nvidia_apps, parse_nvidia_query
from r1fleet.hardware.pci import pci_gpus, parse_drm, parse_lspci
from r1fleet.hardware.system import (
    parse_cpu,
    parse_llama_cpp_apt,
    parse_df,
    parse_disk,
    parse_installed_releases,
    parse_meminfo,
    parse_model_files,
    parse_init,
    parse_os_release,
    parse_apt_policy,
    parse_secureboot,
    parse_sysctl,
    parse_uname,
)
from r1fleet.records import DiskSpace, Gpu, Hardware

__all__ = ["parse_nvidia_apps", "parse_nvidia_query", "parse_probe", "split_sections"]


def parse_probe(text: str, host: str) -> Hardware:
    """Parse a whole probe document into `Hardware`; ProbeError (naming host and section) when it cannot."""
    sections = split_sections(text, host)
    os_info = parse_uname(sections.get("uname", []))
    os_info = parse_os_release(sections.get("os-release", []), os_info)
    os_info = os_info.model_copy(update={"init": parse_init(sections.get("init", []))})
    cpu = parse_cpu(sections.get("cpu", []))
    sysctl = parse_sysctl(sections.get("sysctl", []))
    meminfo = parse_meminfo(sections.get("meminfo", []), host)
    found = Found()

    apple_ram = apple_silicon(sysctl, sections, found) if sysctl else None
    if meminfo is None and apple_ram is None:
        raise ProbeError(
            "no memory size: the meminfo section (Linux) and sysctl hw.memsize (macOS) are both empty",
            host=host, field="meminfo", fix=probe_fix(host),
        )
    if meminfo is None:
        meminfo = (apple_ram or 0, None)

    pci = parse_lspci(sections.get("lspci", []))
    drm = parse_drm(sections.get("drm", []))
    skipped = nvidia_gpus(sections, pci, found)
    if not any(g.vendor == "nvidia" for g in found.gpus) and not skipped:
        pci_gpus(pci, "10de", found)
    nvidia_unified(sections, skipped, pci, meminfo, found)
    if not any(c.vendor_id == "1002" for c in drm) and not parse_rocm_smi(sections.get("rocm-smi", [])):
        apu = [d for d in pci if d.vendor_id == "1002" and (s := lookup_gpu(pci_id=d.pci_id)) and s.unified]
        if apu:
            spec = lookup_gpu(pci_id=apu[0].pci_id)
            found.unified = found.unified or amd_apu(spec.model, spec, None, None, meminfo)
            found.notes.append(f"{spec.model}: no amdgpu driver loaded; GTT assumed to be half of RAM")
        pci_gpus(pci, "1002", found)
    else:
        amd_gpus(sections, drm, pci, meminfo, found)
    for device in pci:
        if device.vendor_id == "8086":
            found.notes.append(f"Intel GPU {device.pci_id} at {device.slot} is not used (integrated or unsupported)")

    gpus = _with_gfx_targets(found.gpus, parse_kfd(sections.get("kfd", [])))
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
        gpus=gpus,
        unified=found.unified,
        disk_free_mib=parse_df(sections.get("df", [])),
        model_mount=(parse_disk(sections.get("df", [])) or DiskSpace(mount="", free_mib=0)).mount or None,
        install_disk=parse_disk(sections.get("df-install", [])),
        installed_releases=parse_installed_releases(sections.get("releases", [])),
        model_files=parse_model_files(sections.get("models", [])),
        secure_boot=parse_secureboot(sections.get("secureboot", [])),
        tegra_release=tegra[0] if tegra else None,
        driver=parse_driver_facts(sections),
        haproxy=parse_apt_policy(sections.get("haproxy", [])),
        llama_cpp_apt=parse_llama_cpp_apt(sections.get("llama-cpp-packages", [])),
        notes=found.notes,
    )
    _check_readings(hardware)
    return hardware


def _with_gfx_targets(gpus: list[Gpu], nodes: list[KfdNode]) -> list[Gpu]:
    """Each AMD GPU's gfx target: what amdgpu reports for it (KFD, by slot, else by device id), else the GPU table's."""
    result = []
    for gpu in gpus:
        if gpu.vendor == "amd":
            node = next((n for n in nodes if gpu.bus_id and n.slot == gpu.bus_id), None) \
                or next((n for n in nodes if gpu.pci_id and n.pci_id == gpu.pci_id), None)
            spec = lookup_gpu(name=gpu.name, pci_id=gpu.pci_id, memory_mib=gpu.memory_total_mib or None)
            gfx = node.gfx_target if node else (gpu.gfx_target or (spec.gfx if spec else None))
            gpu = gpu.model_copy(update={"gfx_target": gfx})
        result.append(gpu)
    return result


# No memory or count a probe reports comes near this (1 EiB in MiB); a larger number is not a reading.
_IMPLAUSIBLE = 2**40


def _check_readings(hw: Hardware) -> None:
    """Refuse (naming host and section) a number no machine has, before the planner computes with it."""
    readings = [("meminfo", hw.ram_total_mib), ("meminfo", hw.ram_available_mib), ("cpu", hw.cpu_count),
                ("df", hw.disk_free_mib), ("df-install", hw.install_disk.free_mib if hw.install_disk else None),
                *(("models", size) for size in hw.model_files.values())]
    for gpu in hw.gpus:
        readings += [("nvidia-smi", v) for v in (gpu.index, gpu.memory_total_mib, gpu.memory_used_mib, gpu.memory_free_mib)]
        readings += [("nvidia-smi-apps", v) for p in gpu.processes for v in (p.pid, p.used_mib)]
    if hw.unified:
        readings += [("unified memory", v) for v in (hw.unified.total_mib, hw.unified.gpu_limit_mib, hw.unified.available_mib)]
    for section, value in readings:
        if value is not None and not 0 <= value < _IMPLAUSIBLE:
            raise ProbeError(f"the {section} section reports {value}, which no machine has", host=hw.host, field=section,
                             fix=probe_fix(hw.host))
