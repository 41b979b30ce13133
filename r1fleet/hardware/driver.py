"""The GPU driver beyond nvidia-smi: the probe's driver sections read into `DriverFacts`, and AMD's gfx targets.

Every reading is total: a line that is not what the tool prints is skipped, never trusted, so a garbled section
leaves the fact unknown (None or empty) rather than failing the host.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from r1fleet.hardware._base import normalize_bus_id
from r1fleet.records import DriverFacts

# A driver version as modinfo and /proc/driver/nvidia/version print it: 580.95.05, 535.183.01, 470.256.02.
NVIDIA_VERSION = re.compile(r"[0-9]{2,4}\.[0-9]{1,4}(?:\.[0-9]{1,4})?")
# A Debian/RPM package name (Debian policy 5.6.1; RPM names are a superset we do not need).
PACKAGE_NAME = re.compile(r"[a-z0-9][a-z0-9.+_-]{0,127}")
_BOOT_ID = re.compile(r"[0-9a-f-]{8,64}")
# What a line of nvidia-smi's failure may be, at most: enough for "Failed to initialize NVML: Driver/library version mismatch"
_ERROR_CHARS = 200


def parse_driver_facts(sections: dict[str, list[str]]) -> DriverFacts:
    """The driver sections of a probe document (r1fleet/probe/probe.sh); missing sections leave their fact unknown."""
    marker, boot_id = _reboot_record(sections.get("driver-reboot", []))
    return DriverFacts(
        nvidia_smi_error=_first_line(sections.get("nvidia-smi-error", [])),
        nvidia_loaded=_proc_version(sections.get("nvidia-proc", [])),
        nvidia_module=_version(sections.get("nvidia-modinfo", [])),
        libcuda_packages=_owners(sections.get("libcuda-owner", [])),
        cuda_repo=any(line.strip() for line in sections.get("cuda-repo", [])),
        run_installer=any(line.strip().endswith("/nvidia-uninstall") for line in sections.get("nvidia-installer", [])),
        kernel_packages=_listing(sections, "kernel-packages", ("dpkg", "rpm")),
        apt_offers=_listing(sections, "apt-kernel", ("kernel",)),
        dkms_status=[line.strip()[:_ERROR_CHARS] for line in sections.get("dkms-status", [])[:20] if line.strip()],
        reboot_marker=marker,
        boot_id=boot_id,
    )


def _first_line(lines: list[str]) -> str | None:
    text = next((line.strip() for line in lines if line.strip()), "")
    return text[:_ERROR_CHARS] or None


def _version(lines: list[str]) -> str | None:
    text = next((line.strip() for line in lines if line.strip()), "")
    return text if NVIDIA_VERSION.fullmatch(text) else None


def _proc_version(lines: list[str]) -> str | None:
    """`NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.183.01  Sun May 12 ...` (or `... Open Kernel Module for
    x86_64  580.95.05  Release Build ...`): the first word after "Kernel Module" that is a version."""
    for line in lines:
        if not line.startswith("NVRM version:"):
            continue
        for word in line.partition("Kernel Module")[2].split():
            if NVIDIA_VERSION.fullmatch(word):
                return word
    return None


def _owners(lines: list[str]) -> list[str]:
    """`libnvidia-compute-535:amd64: /usr/lib/x86_64-linux-gnu/libcuda.so.1` (dpkg -S) or `name: path` (rpm)."""
    owners: list[str] = []
    for line in lines:
        if line.startswith("diversion by"):
            continue
        head, sep, _ = line.partition(": ")
        for name in head.split(","):
            name = name.strip().partition(":")[0]
            if sep and PACKAGE_NAME.fullmatch(name) and name not in owners:
                owners.append(name)
    return owners


def _listing(sections: dict[str, list[str]], name: str, headers: tuple[str, ...]) -> list[str] | None:
    """A section whose first line says the tool answered (`dpkg`, `kernel 6.8.0-45-generic`), then package names;
    None when the section is missing or the tool was not there."""
    lines = [line.strip() for line in sections.get(name, []) if line.strip()]
    if not lines or lines[0].split(" ", 1)[0] not in headers:
        return None
    return [line for line in lines[1:] if PACKAGE_NAME.fullmatch(line)]


def _reboot_record(lines: list[str]) -> tuple[str | None, str | None]:
    marker = boot = None
    for line in lines:
        words = line.split()
        if len(words) == 2 and words[0] == "boot" and _BOOT_ID.fullmatch(words[1]):
            boot = words[1]
        elif len(words) == 2 and NVIDIA_VERSION.fullmatch(words[0]) and _BOOT_ID.fullmatch(words[1]):
            marker = line.strip()
    return marker, boot


# ---------------------------------------------------------------------------------------------
# AMD: the gfx target of each GPU node (KFD topology)


@dataclass(frozen=True)
class KfdNode:
    pci_id: str | None
    slot: str | None
    gfx_target: str


def gfx_name(version: int) -> str | None:
    """KFD's gfx_target_version as the LLVM target Ollama compares: 110000 -> gfx1100, 90010 -> gfx90a, 100100 -> gfx1010
    (major, then minor and stepping in hex, as ollama discover/amd_linux.go formats it). 0 (a CPU node) -> None."""
    major, minor, stepping = version // 10000, version // 100 % 100, version % 100
    if major == 0 or minor > 15 or stepping > 15:
        return None
    return f"gfx{major}{minor:x}{stepping:x}"


def parse_kfd(lines: list[str]) -> list[KfdNode]:
    """`node N` then `gfx_target_version 110000`, `vendor_id 4098`, `device_id 29772`, `location_id 768`, `domain 0`."""
    nodes: list[KfdNode] = []
    current: dict[str, int] = {}

    def close() -> None:
        gfx = gfx_name(current.get("gfx_target_version", 0))
        if gfx and current.get("vendor_id") == 0x1002:
            device = current.get("device_id")
            location = current.get("location_id")
            slot = None
            if location is not None:
                slot = normalize_bus_id(f"{current.get('domain', 0):04x}:{location >> 8 & 0xff:02x}:"
                                        f"{location >> 3 & 0x1f:02x}.{location & 0x7}")
            pci_id = f"1002:{device:04x}" if device is not None and 0 <= device <= 0xffff else None
            nodes.append(KfdNode(pci_id=pci_id, slot=slot, gfx_target=gfx))

    for line in lines:
        words = line.split()
        if len(words) == 2 and words[0] == "node":
            close()
            current = {}
        elif len(words) == 2 and words[1].isdecimal() and len(words[1]) <= 12:
            current[words[0]] = int(words[1])
    close()
    return nodes
