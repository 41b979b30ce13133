"""Hardware profiles (data in profiles/*.yaml) and the per-host files rendered from them.

A lab host reads these files through the stand-in tools: gpus.conf (nvidia-smi),
lspci-nn.txt (lspci) and meminfo (bind-mounted over /proc/meminfo at boot).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from r1fleet.lab import paths

# Chipset devices every simulated machine has, so lspci output is not GPU-only.
BASE_PCI = (
    "00:00.0 Host bridge [0600]: Advanced Micro Devices, Inc. [AMD] Starship/Matisse Root Complex [1022:1480]",
    "00:14.0 SMBus [0c05]: Advanced Micro Devices, Inc. [AMD] FCH SMBus Controller [1022:790b] (rev 61)",
    "05:00.0 Ethernet controller [0200]: Intel Corporation Ethernet Controller I225-V [8086:15f3] (rev 03)",
)


class ProfileError(ValueError):
    pass


def available() -> list[str]:
    return sorted(p.stem for p in paths.PROFILES_DIR.glob("*.yaml"))


def load(name: str) -> dict[str, Any]:
    path = paths.PROFILES_DIR / f"{name}.yaml"
    if not path.exists():
        raise ProfileError(f"unknown lab profile {name!r}; fix: use one of {', '.join(available())}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data.get("ram_mib"), int):
        raise ProfileError(f"profile {name}: ram_mib must be an integer (MiB)")
    data.setdefault("gpus", [])
    data.setdefault("driver", None)
    return data


def has_driver(profile: dict) -> bool:
    return bool(profile.get("driver")) and bool(profile["gpus"])


def gpus_conf(profile: dict) -> str:
    driver = profile.get("driver") or {}
    lines = ["# index|name|memory_total_mib|memory_used_mib|uuid|bus_id|driver_version|cuda_version|"
             "compute_cap|power_limit_w|pci_device_id   (r1fleet lab: simulated GPUs)"]
    for index, gpu in enumerate(profile["gpus"]):
        vendor, device = gpu["pci_id"].split(":")
        lines.append("|".join(str(v) for v in (
            index, gpu["name"], gpu["memory_mib"], gpu.get("memory_used_mib", 0), gpu["uuid"],
            gpu["bus_id"], driver.get("version", ""), driver.get("cuda", ""), gpu["compute_cap"],
            gpu.get("power_limit_w", 300), f"0x{device.upper()}{vendor.upper()}",
        )))
    return "\n".join(lines) + "\n"


def lspci_nn(profile: dict) -> str:
    lines = list(BASE_PCI)
    for gpu in profile["gpus"]:
        slot = gpu["bus_id"].split(":", 1)[1].lower()  # 00000000:01:00.0 -> 01:00.0
        lines.append(f"{slot} VGA compatible controller [0300]: NVIDIA Corporation "
                     f"{gpu['pci_name']} [{gpu['pci_id']}] (rev a1)")
    return "\n".join(sorted(lines)) + "\n"


def meminfo(profile: dict) -> str:
    """A /proc/meminfo for the profile's RAM (the kernel keeps ~2% for itself, as on real boxes)."""
    total = profile["ram_mib"] * 1024 * 98 // 100
    free = total * 90 // 100
    available = total * 95 // 100
    rows = [
        ("MemTotal", total), ("MemFree", free), ("MemAvailable", available), ("Buffers", 65536),
        ("Cached", total * 4 // 100), ("SwapCached", 0), ("Active", total * 3 // 100),
        ("Inactive", total * 2 // 100), ("SwapTotal", 0), ("SwapFree", 0), ("Dirty", 0),
        ("AnonPages", total * 2 // 100), ("Shmem", 8192), ("Slab", 131072),
        ("CommitLimit", total // 2), ("Committed_AS", total * 3 // 100), ("HugePages_Total", None),
        ("HugePages_Free", None), ("Hugepagesize", 2048),
    ]
    out = []
    for key, value in rows:
        if value is None:
            out.append(f"{key + ':':<16}{0:>8}")
        else:
            out.append(f"{key + ':':<16}{value:>8} kB")
    return "\n".join(out) + "\n"


def host_files(profile: dict) -> dict[str, tuple[str, int]]:
    """Files to write into a host's root: path -> (content, mode)."""
    files = {
        "etc/r1fleet-lab/meminfo": (meminfo(profile), 0o444),
        "etc/r1fleet-lab/lspci-nn.txt": (lspci_nn(profile), 0o644),
        "etc/r1fleet-lab/gpus.conf": (gpus_conf(profile), 0o644),
        "etc/r1fleet-lab/gpu-rpc-base-port": (f"{paths.GPU_RPC_BASE_PORT}\n", 0o644),
        "usr/local/bin/lspci": ((paths.STANDINS_DIR / "lspci").read_text(), 0o755),
    }
    if has_driver(profile):
        files["usr/local/bin/nvidia-smi"] = ((paths.STANDINS_DIR / "nvidia-smi").read_text(), 0o755)
    return files


def profile_summary(profile: dict) -> str:
    return str(profile.get("description", ""))


def profile_path(name: str) -> Path:
    return paths.PROFILES_DIR / f"{name}.yaml"
