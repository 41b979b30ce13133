"""The GPU driver role's own decisions and names, made without a host. Which driver a host needs is decided
in r1fleet/plan/drivers.py (the lock records it too); this holds what the role writes and when it reboots."""

from __future__ import annotations

from typing import Literal

from r1fleet.fleet.config import LOCAL_HOST
from r1fleet.net import is_loopback
from r1fleet.plan.drivers import is_proxmox_kernel
from r1fleet.records import STATE_DIR

NOUVEAU_BLACKLIST = "/etc/modprobe.d/r1fleet-blacklist-nouveau.conf"
# docs/research/drivers.md 1.7: blacklist nouveau and disable its modesetting, then rebuild the initramfs.
NOUVEAU_BLACKLIST_TEXT = "# written by r1fleet: the NVIDIA driver needs nouveau unloaded\nblacklist nouveau\noptions nouveau modeset=0\n"
DEBIAN_NONFREE_SOURCES = "/etc/apt/sources.list.d/r1fleet-debian-nonfree.sources"
CUDA_SOURCES = "/etc/apt/sources.list.d/r1fleet-nvidia-cuda.sources"
CUDA_KEYRING = "/etc/apt/keyrings/r1fleet-nvidia-cuda.asc"
CUDA_PIN = "/etc/apt/preferences.d/r1fleet-nvidia-cuda"
ROCM_SOURCES = "/etc/apt/sources.list.d/r1fleet-rocm.sources"
ROCM_KEYRING = "/etc/apt/keyrings/r1fleet-rocm.asc"
REBOOT_MARKER = f"{STATE_DIR}/driver-reboot"
# Ubuntu's nvidia-persistenced unit runs the daemon with --no-persistence-mode; this drop-in starts it as NVIDIA's
# Ansible role does (files/nvidia-persistenced-override.conf: ExecStart reset, then the daemon with --verbose only).
PERSISTENCED = "/usr/bin/nvidia-persistenced"

RebootPolicy = Literal["auto", "defer"]


def reboot_policy(setting: RebootPolicy | None, host_name: str, address: str | None, kernel: str) -> tuple[RebootPolicy, str]:
    """Whether r1fleet may reboot this host for its driver, and why: never the machine r1fleet runs from (@local, or an
    address of its own loopback); else the host's `reboot` setting; unset, a Proxmox VE host defers (its VMs would go
    down with it) and any other reboots."""
    if host_name == LOCAL_HOST or (address is not None and is_loopback(address)):
        return "defer", "it is the machine r1fleet runs from"
    if setting is not None:
        return setting, f"reboot: {setting} in the fleet file"
    if is_proxmox_kernel(kernel):
        return "defer", "a Proxmox VE host (its virtual machines would stop); set reboot: auto to let r1fleet reboot it"
    return "auto", "r1fleet reboots a host for its driver"


def driver_reboot_decision(loaded: str | None, installed: str | None, boot: str | None, marker: str | None) -> str:
    """"none" (the driver answers), "missing" (no module was built for any installed kernel: the build failed),
    "reboot", or "stuck" (one reboot for this driver already happened and it still does not answer)."""
    if loaded is not None:
        return "none"
    if installed is None:
        return "missing"
    marked_version, _, marked_boot = (marker or "").partition(" ")
    if marked_version == installed and marked_boot and marked_boot != boot:
        return "stuck"
    return "reboot"


def waiting_for_reboot(marker: str | None, boot: str | None) -> str | None:
    """The driver version a host waits to load, when r1fleet recorded a reboot for it in this very boot (the reboot
    was deferred, or has not happened yet); None otherwise."""
    version, _, marked_boot = (marker or "").partition(" ")
    return version if version and marked_boot and marked_boot == boot else None
