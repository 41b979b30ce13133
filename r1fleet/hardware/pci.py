"""Before any driver: lspci display devices and the kernel's DRM cards, mapped through the GPU table."""

from __future__ import annotations

import re
from dataclasses import dataclass

from r1fleet.hardware.gpu_table import GpuSpec, gpu_table, lookup_gpu
from r1fleet.hardware._base import MIB, DISPLAY_CLASSES, Found, LSPCI, VENDOR_IDS, reading, normalize_bus_id
from r1fleet.records import Gpu

# ---------------------------------------------------------------------------------------------
# PCI (lspci -nn) and DRM sysfs


@dataclass(frozen=True)
class PciDevice:
    slot: str
    class_code: str
    vendor_id: str
    device_id: str
    description: str
    kernel_driver: str | None = None

    @property
    def pci_id(self) -> str:
        return f"{self.vendor_id}:{self.device_id}"


def parse_lspci(lines: list[str]) -> list[PciDevice]:
    """GPU functions from `lspci -nn`: NVIDIA/AMD/Intel display classes only.

    Audio functions (class 0403) and virtual or BMC display adapters (QEMU 1234, VMware 15ad,
    ASPEED 1a03, Matrox 102b, virtio 1af4, QXL 1b36, VirtualBox 80ee) fall out by class or vendor.
    """
    records: list[list[str | None]] = []
    if any(line.startswith("Slot:") for line in lines):
        records = [[*record, None] for record in _lspci_machine_records(lines)]
    for line in lines:
        match = LSPCI.match(line.strip())
        if match:
            records.append([match.group("slot"), match.group("cls"), match.group("vendor"),
                            match.group("device"), match.group("desc"), None])
        elif records and line[:1].isspace() and (bound := _KERNEL_DRIVER.match(line.strip())):
            records[-1][5] = bound.group(1)   # `lspci -k`: the driver bound to the device above
    devices = []
    for slot, cls, vendor, device, description, driver in records:
        vendor, cls = (vendor or "").lower(), (cls or "").lower()
        if vendor not in VENDOR_IDS or cls not in DISPLAY_CLASSES:
            continue
        devices.append(PciDevice(
            slot=normalize_bus_id(slot or ""), class_code=cls, vendor_id=vendor, device_id=(device or "").lower(),
            description=description or "", kernel_driver=driver,
        ))
    return devices


# `lspci -k`'s line under a device: "Kernel driver in use: vfio-pci" (a module name)
_KERNEL_DRIVER = re.compile(r"Kernel driver in use:\s*([A-Za-z0-9_-]{1,64})$")
# The drivers that hand a device to a virtual machine: the host must leave such a GPU alone.
PASSTHROUGH_DRIVERS = {"vfio-pci", "pci-stub"}


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
            value = reading(attrs.get(key))
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


def pci_gpus(pci: list[PciDevice], vendor_id: str, found: Found, first_index: int = 0) -> None:
    """GPUs known only from lspci (no driver yet): model and VRAM from the GPU table."""
    index = first_index
    for device in pci:
        if device.vendor_id != vendor_id:
            continue
        if device.kernel_driver in PASSTHROUGH_DRIVERS:
            found.notes.append(f"GPU {device.pci_id} at {device.slot} is bound to {device.kernel_driver} (passed through "
                               "to a virtual machine): left alone, neither planned on nor given a driver")
            continue
        spec = lookup_gpu(pci_id=device.pci_id)
        if spec is None and vendor_id == "10de":
            # Any NVIDIA display device gets the driver; its memory is known once the driver reports it.
            found.gpus.append(Gpu(index=index, vendor="nvidia", name=f"NVIDIA {device.description.removeprefix('NVIDIA Corporation ')}".strip(),
                                  memory_total_mib=0, bus_id=device.slot, pci_id=device.pci_id, source="lspci",
                                  kernel_driver=device.kernel_driver))
            index += 1
            found.notes.append(
                f"PCI device {device.pci_id} at {device.slot} ({device.description}) is not in the GPU table: it gets "
                "the NVIDIA driver, and is planned on once the driver reports its memory (probe again after the install)"
            )
            continue
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
            vendor=VENDOR_IDS[vendor_id],
            name=spec.model,
            memory_total_mib=spec.vram_mib or 0,
            bus_id=device.slot,
            pci_id=device.pci_id,
            compute_cap=spec.compute_cap,
            bandwidth_gbps=spec.bandwidth_gbps,
            source="lspci",
            kernel_driver=device.kernel_driver,
            gfx_target=spec.gfx,
        ))
        index += 1
        if sum(g.source == "lspci" for g in found.gpus) == 1:
            found.notes.append("GPU memory estimated from PCI ids (no GPU driver yet); probe again after installing it")


def _all_for_pci(pci_id: str) -> list[GpuSpec]:
    return [s for s in gpu_table() if s.matches_pci_id(pci_id)]


