"""GPU driver policy: Hardware + HostPlan -> what the driver role must do (pure; no host access).

`decide_driver(hw, plan)` returns a `DriverAction`:
  none     the driver is right (or not ours to touch: Jetson, DGX OS, macOS, no GPU);
  install  no driver yet (e.g. lspci shows an NVIDIA card, nvidia-smi is absent);
  upgrade  a driver below the planned backend's minimum (e.g. 535 under Ollama >= 0.30);
  refuse   r1fleet cannot do it safely; `reason` and `fix` say why and what the user does instead.

Branches, package names and minimums are data (data/drivers.yaml, with sources).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml

from r1fleet.records import Gpu, Hardware, HostPlan

DRIVERS_DATA_PATH = Path(__file__).with_name("drivers.yaml")

ActionKind = Literal["none", "install", "upgrade", "refuse"]
Repo = Literal["debian-nonfree", "nvidia-cuda", "rpmfusion", "rocm"]
ModuleBuild = Literal["dkms", "akmods", "prebuilt"]


@dataclass(frozen=True)
class DriverAction:
    """The driver role's instructions for one host."""

    kind: ActionKind
    vendor: str | None
    reason: str
    family: Literal["apt", "dnf"] | None = None
    repos: tuple[Repo, ...] = ()
    packages: tuple[str, ...] = ()
    branch: str | None = None
    open_modules: bool = False
    module_build: ModuleBuild | None = None
    min_driver: int | None = None
    blacklist_nouveau: bool = False
    distro: str | None = None          # e.g. "debian12" (CUDA repo path component)
    codename: str | None = None
    fix: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def changes_host(self) -> bool:
        return self.kind in ("install", "upgrade")


@lru_cache(maxsize=1)
def load_driver_data(path: Path = DRIVERS_DATA_PATH) -> dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        return yaml.safe_load(handle)


# ---------------------------------------------------------------- small pure helpers


def driver_major(version: str | None) -> int | None:
    """'535.183.01' -> 535; None or junk -> None."""
    if not version:
        return None
    head = version.strip().split(".", 1)[0]
    return int(head) if head.isdecimal() else None


def compute_cap_tuple(cap: str | None) -> tuple[int, int] | None:
    """'8.6' -> (8, 6); None or junk -> None."""
    if not cap:
        return None
    parts = cap.strip().split(".")
    if len(parts) != 2 or not all(p.isdecimal() for p in parts):
        return None
    return int(parts[0]), int(parts[1])


def device_id(gpu: Gpu) -> int | None:
    """The PCI device id of a GPU as an int ('10de:2204' -> 0x2204)."""
    if not gpu.pci_id or ":" not in gpu.pci_id:
        return None
    try:
        return int(gpu.pci_id.split(":", 1)[1], 16)
    except ValueError:
        return None


def needs_legacy_modules(gpu: Gpu, data: dict[str, Any]) -> bool | None:
    """True for Maxwell/Pascal/Volta (proprietary module only), False for Turing+; None if unknown."""
    nv = data["nvidia"]
    cap = compute_cap_tuple(gpu.compute_cap)
    if cap is not None:
        return cap < compute_cap_tuple(nv["open_modules_from_compute_cap"])
    dev = device_id(gpu)
    if dev is not None:
        return dev < nv["open_modules_from_device_id"]
    return None


def is_blackwell(gpu: Gpu, data: dict[str, Any]) -> bool:
    cap = compute_cap_tuple(gpu.compute_cap)
    if cap is not None:
        return cap[0] >= 10
    dev = device_id(gpu)
    return dev is not None and dev >= data["nvidia"]["blackwell_from_device_id"]


def min_driver_for(backend: str | None, caps: list[tuple[int, int]], data: dict[str, Any]) -> int:
    """Minimum NVIDIA driver major for the planned backend (Ollama when none is planned)."""
    table = data["nvidia"]["min_driver"][backend or "ollama"]
    if any(cap < (7, 0) for cap in caps):
        return max(table["default"], table["below_cc_7_0"])
    return table["default"]


def kernel_flavour(kernel_release: str) -> str:
    """Ubuntu kernel flavour from `uname -r`: '6.8.0-45-generic' -> 'generic' (default 'generic')."""
    parts = kernel_release.strip().split("-")
    if len(parts) >= 3 and parts[-1].isalpha():
        return parts[-1]
    return "generic"


def is_dgx_os(hw: Hardware) -> bool:
    """DGX OS (incl. DGX Spark) manages its own driver stack."""
    text = f"{hw.os.id} {hw.os.pretty_name}".lower()
    return "dgx" in text or (hw.unified is not None and hw.unified.kind == "gb10")


def is_jetson(hw: Hardware) -> bool:
    return bool(hw.tegra_release) or (hw.unified is not None and hw.unified.kind == "jetson")


# ---------------------------------------------------------------- the decision


def decide_driver(hw: Hardware, plan: HostPlan, *, mok_enrolled: bool = False,
                  data: dict[str, Any] | None = None) -> DriverAction:
    """What the driver role must do on this host (see module docstring)."""
    data = data or load_driver_data()
    if hw.os.system.lower() == "darwin":
        return DriverAction("none", "apple", "macOS: Metal needs no driver install")
    nvidia = [g for g in hw.gpus if g.vendor == "nvidia"]
    amd = [g for g in hw.gpus if g.vendor == "amd"]
    if is_jetson(hw):
        return DriverAction("none", "nvidia", f"Jetson (L4T {hw.tegra_release or 'unknown'}): JetPack owns the driver; never touched")
    if is_dgx_os(hw):
        return DriverAction("none", "nvidia", "DGX OS: the driver comes with the OS; never touched")
    if nvidia:
        return _decide_nvidia(hw, plan, nvidia, mok_enrolled, data)
    if amd:
        return _decide_amd(hw, plan, amd, data)
    return DriverAction("none", None, "no discrete GPU: nothing to install")


def _decide_nvidia(hw: Hardware, plan: HostPlan, gpus: list[Gpu], mok_enrolled: bool,
                   data: dict[str, Any]) -> DriverAction:
    caps = [c for c in (compute_cap_tuple(g.compute_cap) for g in gpus) if c is not None]
    caps += [c for c in (compute_cap_tuple(c) for c in plan.compute_caps) if c is not None]
    backend = plan.backend or "ollama"
    minimum = min_driver_for(backend, caps, data)
    floor = data["nvidia"]["min_compute_cap"].get(backend)
    if floor and caps and min(caps) < compute_cap_tuple(floor):
        low = min(caps)
        return DriverAction(
            "refuse", "nvidia", f"compute capability {low[0]}.{low[1]} is below {floor}, the minimum {backend} supports",
            min_driver=minimum, fix="plan this host for CPU (policy.backend / a smaller model) or replace the card")
    majors = [driver_major(g.driver_version) for g in gpus]
    installed = min((m for m in majors if m is not None), default=None)
    if installed is not None and installed >= minimum:
        return DriverAction("none", "nvidia", f"driver {installed} meets {backend}'s minimum {minimum}", min_driver=minimum)
    kind: ActionKind = "install" if installed is None else "upgrade"
    why = (f"no NVIDIA driver ({len(gpus)} GPU(s) seen by lspci)" if installed is None
           else f"driver {installed} is below {backend}'s minimum {minimum}")
    legacy_flags = [needs_legacy_modules(g, data) for g in gpus]
    legacy = any(flag is True for flag in legacy_flags)
    modern = any(flag is False for flag in legacy_flags)
    if legacy and modern and any(is_blackwell(g, data) for g in gpus):
        return DriverAction(
            "refuse", "nvidia", f"{why}; the host mixes a pre-Turing card (proprietary module only) with a Blackwell "
            "card (open module only): no single driver flavour loads both", min_driver=minimum,
            fix="remove one of the cards or install the drivers by hand")
    use_open = not legacy   # unknown generation -> open (the default since branch 560)
    blackwell = any(is_blackwell(g, data) for g in gpus)
    osid, version = hw.os.id.lower(), hw.os.version_id
    if osid == "ubuntu":
        action = _ubuntu(hw, version, use_open, data)
    elif osid == "debian":
        action = _debian(hw, version, use_open, blackwell, minimum, data)
    elif osid == "fedora":
        action = _fedora(use_open, data)
    else:
        return DriverAction(
            "refuse", "nvidia", f"{why}; r1fleet installs NVIDIA drivers on Ubuntu, Debian and Fedora, not on "
            f"{hw.os.pretty_name or osid or 'this OS'}", min_driver=minimum,
            fix=f"install NVIDIA driver >= {minimum} by hand, then re-run")
    if action.kind == "refuse":
        return _with(action, reason=f"{why}; {action.reason}", min_driver=minimum)
    action = _with(action, kind=kind, reason=why, min_driver=minimum)
    if hw.secure_boot and action.module_build in ("dkms", "akmods") and not mok_enrolled:
        return _secure_boot_refusal(action, data)
    return action


def _with(action: DriverAction, **changes: Any) -> DriverAction:
    from dataclasses import replace

    return replace(action, **changes)


def _ubuntu(hw: Hardware, version: str, use_open: bool, data: dict[str, Any]) -> DriverAction:
    ub = data["nvidia"]["ubuntu"]
    if version not in ub["versions"]:
        return DriverAction("refuse", "nvidia", f"Ubuntu {version} is not a supported release ({', '.join(ub['versions'])})",
                            fix="upgrade to a supported Ubuntu LTS or install the driver by hand")
    branch = ub["branch"]
    suffix = "-open" if use_open else ""
    signed = bool(hw.secure_boot)
    # Secure Boot on: Canonical-signed prebuilt modules load without MOK enrolment (drivers.md 1.2).
    templates = ub["signed_packages"] if signed else ub["dkms_packages"]
    flavour = kernel_flavour(hw.os.kernel)
    packages = tuple(t.format(branch=branch, open=suffix, flavour=flavour) for t in templates)
    return DriverAction("install", "nvidia", "", family="apt", packages=packages, branch=branch, open_modules=use_open,
                        module_build="prebuilt" if signed else "dkms", blacklist_nouveau=True)


def _debian(hw: Hardware, version: str, use_open: bool, blackwell: bool, minimum: int,
            data: dict[str, Any]) -> DriverAction:
    deb = data["nvidia"]["debian"]
    major = version.split(".", 1)[0]
    codename = deb["codenames"].get(major)
    if not version and hw.os.codename in deb.get("testing_codenames", []):
        # testing/sid have no VERSION_ID; they carry the newest stable's packages or newer ones.
        major, codename = max(deb["codenames"]), hw.os.codename
    if codename is None:
        return DriverAction("refuse", "nvidia", f"Debian {version or '(unknown version)'} is not supported (12, 13 or testing)",
                            fix="use Debian 12, 13 or testing, or install the driver by hand")
    headers = f"linux-headers-{hw.os.kernel}" if hw.os.kernel else "linux-headers-amd64"
    distro_ok = deb["distro_driver"][major] >= minimum and not blackwell
    if distro_ok:
        flavour = "open" if use_open and int(major) >= int(deb["open_from_version"]) else "proprietary"
        module = deb["kernel_module"][flavour]
        packages = tuple(p.format(kernel_module=module) for p in deb["distro_packages"]) + (headers,)
        return DriverAction("install", "nvidia", "", family="apt", repos=("debian-nonfree",), packages=packages,
                            branch=str(deb["distro_driver"][major]), open_modules=flavour == "open",
                            module_build="dkms", blacklist_nouveau=True, codename=codename)
    cuda = data["nvidia"]["cuda_repo"]
    branch = cuda["branch"]
    package = cuda["packages"]["open" if use_open else "proprietary"].format(branch=branch)
    return DriverAction("install", "nvidia", "", family="apt", repos=("debian-nonfree", "nvidia-cuda"),
                        packages=(package, headers), branch=branch, open_modules=use_open, module_build="dkms",
                        blacklist_nouveau=True, distro=f"debian{major}", codename=codename,
                        notes=(f"Debian {major} ships driver {deb['distro_driver'][major]}"
                               + (" without Blackwell support" if blackwell else f", below the minimum {minimum}")
                               + f"; using NVIDIA's CUDA repository (branch {branch})",))


def _fedora(use_open: bool, data: dict[str, Any]) -> DriverAction:
    fed = data["nvidia"]["fedora"]
    packages = tuple(fed["packages"]["open" if use_open else "proprietary"])
    return DriverAction("install", "nvidia", "", family="dnf", repos=("rpmfusion",), packages=packages,
                        branch="rpmfusion" if use_open else "580xx", open_modules=use_open,
                        module_build="akmods", blacklist_nouveau=True)


def _secure_boot_refusal(action: DriverAction, data: dict[str, Any]) -> DriverAction:
    keys = data["nvidia"]["mok_keys"]
    if action.module_build == "akmods":
        steps = f"dnf install akmods mokutil openssl && kmodgenca -a && mokutil --import {keys['akmods']}"
    else:
        steps = f"apt-get install dkms mokutil (the key is created on first DKMS build) && mokutil --import {keys['dkms']}"
    return _with(
        action, kind="refuse",
        reason=(f"{action.reason}; Secure Boot is enabled and this install builds an unsigned kernel module "
                f"({action.module_build}), which the kernel would refuse to load"),
        fix=(f"enrol a Machine Owner Key: {steps}; reboot and confirm the key in MokManager at the console; "
             "then re-run r1fleet (or disable Secure Boot in the firmware)"))


def _decide_amd(hw: Hardware, plan: HostPlan, gpus: list[Gpu], data: dict[str, Any]) -> DriverAction:
    amd = data["amd"]
    notes: list[str] = []
    supported = [name.lower() for name in amd["ollama_supported_names"]]
    for gpu in gpus:
        if not any(name in gpu.name.lower() for name in supported):
            notes.append(
                f"GPU {gpu.index} ({gpu.name}) is not on Ollama's ROCm support list; it may run on the CPU. "
                "Documented ways out: set HSA_OVERRIDE_GFX_VERSION to the nearest supported gfx target "
                "(e.g. 10.3.0 for RDNA2, 11.0.0 for RDNA3), or use Vulkan (OLLAMA_VULKAN=1)")
    osid = hw.os.id.lower()
    driver_bound = any(g.source in ("drm", "rocm-smi") for g in gpus)
    packages: list[str] = []
    repos: tuple[Repo, ...] = ()
    if not driver_bound and osid in amd["kernel_packages"]:
        kernel = hw.os.kernel or "generic"
        packages += [p.format(kernel=kernel) for p in amd["kernel_packages"][osid]]
        if osid == "debian":
            repos = ("debian-nonfree",)
    if plan.backend == "llama.cpp" and osid == "ubuntu":
        packages += amd["rocm"]["packages"]
        repos = repos + ("rocm",)
    if not packages:
        why = "amdgpu is in the kernel; Ollama's ROCm archive brings its own libraries"
        return DriverAction("none", "amd", why, notes=tuple(notes))
    why = ("amdgpu not bound to the GPU (no DRM memory info): installing the kernel module/firmware"
           if not driver_bound else "ROCm runtime for the llama.cpp HIP backend")
    return DriverAction("install", "amd", why, family="apt", repos=repos, packages=tuple(packages),
                        codename=hw.os.codename or None, notes=tuple(notes))
