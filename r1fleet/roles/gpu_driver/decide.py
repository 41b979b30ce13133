"""The GPU driver role's own decisions and names, made without a host. Which driver a host needs is decided
in r1fleet/plan/drivers.py (the lock records it too); this holds what the role writes and when it reboots."""

from __future__ import annotations

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


def driver_reboot_decision(loaded: str | None, installed: str | None, boot: str | None, marker: str | None) -> str:
    """"none" (the driver answers, or nothing to load), "reboot", or "stuck" (one reboot for this driver
    already happened and it still does not answer)."""
    if loaded is not None or installed is None:
        return "none"
    marked_version, _, marked_boot = (marker or "").partition(" ")
    if marked_version == installed and marked_boot and marked_boot != boot:
        return "stuck"
    return "reboot"
