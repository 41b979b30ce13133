"""GPU driver policy: Hardware + HostPlan -> what the driver role must do (pure; no host access).

`decide_driver(hw, plan)` returns a `DriverAction`:
  none     the driver is right (or not ours to touch: Jetson, DGX OS, macOS, no GPU, a GPU passed through to a VM);
  install  no driver yet (e.g. lspci shows an NVIDIA card, nvidia-smi is absent);
  upgrade  a driver below the planned backend's minimum (e.g. 535 under Ollama >= 0.30), within the host's own
           family of packages (Ubuntu's server or desktop series, NVIDIA's CUDA repository, Debian's);
  reboot   a right driver is installed but not loaded (nvidia-smi: "Driver/library version mismatch" after an
           unattended update): only a reboot is needed, no package changes;
  refuse   r1fleet cannot do it safely; `reason` and `fix` say why and what the user does instead.

Branches, package names and minimums are data (data/drivers.yaml, with sources).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import re
from dataclasses import replace

import yaml

from r1fleet.hardware.gpu_table import lookup_gpu
from r1fleet.records import DriverFacts, Gpu, Hardware, HostPlan

DRIVERS_DATA_PATH = Path(__file__).with_name("drivers.yaml")

ActionKind = Literal["none", "install", "upgrade", "reboot", "refuse"]
# Whose packages the installed driver is: the owner of libcuda.so.1 says (r1fleet/hardware/driver.py).
Family = Literal["ubuntu-server", "ubuntu-desktop", "cuda-repo", "debian", "rpmfusion"]
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
    pin_package: str | None = None     # installed before the driver: NVIDIA's lock onto the branch
    codename: str | None = None
    fix: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def changes_host(self) -> bool:
        return self.kind in ("install", "upgrade", "reboot")


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


def ubuntu_kernel_series(release: str, kernel_packages: list[str] | None) -> str:
    """The kernel series a host follows, as ubuntu-drivers derives it (kerneldetection.py:81-160, detect.py:2128-2133):
    the installed linux-image metapackage of the running flavour, the greatest name winning ('generic-hwe-22.04' over
    'generic'), 'virtual' read as 'generic'; the `uname -r` flavour when the metapackages are unknown."""
    flavour = kernel_flavour(release)
    metas = [name.removeprefix("linux-image-") for name in kernel_packages or []
             if name.startswith("linux-image-") and not name.removeprefix("linux-image-")[:1].isdigit()
             and not name.startswith(("linux-image-unsigned-", "linux-image-uc-"))]
    metas = ["generic" if meta == "virtual" else meta for meta in metas]
    ours = [meta for meta in metas if meta == flavour or meta.startswith(f"{flavour}-")]
    return max(ours) if ours else flavour


def debian_kernel_flavour(release: str, arch: str = "") -> str:
    """Debian's kernel flavour from `uname -r`: '6.1.0-26-amd64' -> 'amd64', '6.12.43+deb13-cloud-amd64' -> 'cloud-amd64'
    (the ABI number dropped); the architecture's default when the release says none."""
    parts = release.strip().split("-")[1:]
    if parts and parts[0].isdecimal():
        parts = parts[1:]
    flavour = "-".join(parts)
    # Debian's flavours end with the architecture (linux-image-<flavour> exists only for those): a kernel built
    # elsewhere (6.18.44-custom) gets the architecture's default
    if re.fullmatch(r"(?:[a-z0-9]+-)*(?:amd64|arm64|686|686-pae|armmp|armmp-lpae|ppc64el|s390x|riscv64|loong64)", flavour):
        return flavour
    return "arm64" if arch in ("aarch64", "arm64") else "amd64"


def is_proxmox_kernel(release: str) -> bool:
    """Proxmox VE reports ID=debian; its kernel says what it is: 6.8.12-4-pve."""
    return release.strip().endswith("-pve")


def driver_family(facts: DriverFacts, osid: str) -> Family | None:
    """Whose packages the installed driver is, from the owner of libcuda.so.1; None when no package owns it."""
    for package in facts.libcuda_packages:
        if re.fullmatch(r"libnvidia-compute-[0-9]+-server", package):
            return "ubuntu-server"
        if re.fullmatch(r"libnvidia-compute-[0-9]+", package):
            # NVIDIA's CUDA repository names it as Ubuntu's desktop series does
            return "cuda-repo" if facts.cuda_repo else ("ubuntu-desktop" if osid == "ubuntu" else None)
        if package == "libcuda1":
            return "cuda-repo" if facts.cuda_repo else "debian"
        if package.startswith("xorg-x11-drv-nvidia"):
            return "rpmfusion"
    return None


def kernel_rpm_newer_than_running(release: str, kernel_packages: list[str] | None) -> str | None:
    """Fedora: the newest installed kernel-core when it is not the running kernel (akmods builds for the newest)."""
    kernels = [name.removeprefix("kernel-core-") for name in kernel_packages or [] if name.startswith("kernel-core-")]
    if not kernels or release not in kernels:
        return None
    newest = max(kernels, key=_version_key)
    return newest if _version_key(newest) > _version_key(release) else None


def _version_key(text: str) -> tuple[int, ...]:
    return tuple(int(number) for number in re.findall(r"[0-9]+", text))


def is_dgx_os(hw: Hardware) -> bool:
    """DGX OS (incl. DGX Spark) manages its own driver stack."""
    text = f"{hw.os.id} {hw.os.pretty_name}".lower()
    return "dgx" in text or (hw.unified is not None and hw.unified.kind == "gb10")


def is_jetson(hw: Hardware) -> bool:
    return bool(hw.tegra_release) or (hw.unified is not None and hw.unified.kind == "jetson")


# ---------------------------------------------------------------- the decision


def decide_driver(hw: Hardware, plan: HostPlan, *, mok_enrolled: bool = False, hip_sdk: bool = False,
                  data: dict[str, Any] | None = None) -> DriverAction:
    """What the driver role must do on this host (see module docstring). `hip_sdk`: llama.cpp is built from source
    here (HIP needs the ROCm SDK on an AMD host)."""
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
        return _decide_amd(hw, plan, amd, hip_sdk, data)
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
    facts = hw.driver
    if installed is None:
        # nvidia-smi does not answer: what is on disk for the running kernel is the driver a reboot loads
        on_disk = facts.nvidia_module
        if on_disk is not None and (driver_major(on_disk) or 0) >= minimum:
            said = f" (nvidia-smi: {facts.nvidia_smi_error})" if facts.nvidia_smi_error else ""
            loaded = f"; {facts.nvidia_loaded} is still loaded" if facts.nvidia_loaded else ""
            return DriverAction("reboot", "nvidia", f"driver {on_disk} is installed but not loaded{said}{loaded}: "
                                "a reboot loads it", min_driver=minimum)
        installed = driver_major(on_disk) or driver_major(facts.nvidia_loaded)
    kind: ActionKind = "install" if installed is None else "upgrade"
    why = (f"no NVIDIA driver ({len(gpus)} GPU(s) seen by lspci)" if installed is None
           else f"driver {installed} is below {backend}'s minimum {minimum}")
    if facts.run_installer and not facts.libcuda_packages:
        return DriverAction(
            "refuse", "nvidia", f"{why}; the driver there came from NVIDIA's .run installer, and distribution packages "
            "would be installed over it (NVIDIA's CUDA installation guide, \"Handle Conflicting Installation Methods\")",
            min_driver=minimum,
            fix=f"remove it with `nvidia-uninstall`, reboot and re-run r1fleet; or install driver >= {minimum} with "
                "the .run installer yourself")
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
    family = driver_family(facts, osid)
    if osid == "ubuntu":
        action = _ubuntu(hw, version, use_open, family, data)
    elif osid == "debian":
        action = _debian(hw, version, use_open, blackwell, minimum, family, data)
    elif osid == "fedora":
        action = _fedora(hw, use_open, data)
    else:
        return DriverAction(
            "refuse", "nvidia", f"{why}; r1fleet installs NVIDIA drivers on Ubuntu, Debian and Fedora, not on "
            f"{hw.os.pretty_name or osid or 'this OS'}", min_driver=minimum,
            fix=f"install NVIDIA driver >= {minimum} by hand, then re-run")
    if action.kind == "refuse":
        return _with(action, reason=f"{why}; {action.reason}", min_driver=minimum)
    action = _with(action, kind=kind, reason=why, min_driver=minimum)
    if hw.secure_boot and action.module_build in ("dkms", "akmods") and not mok_enrolled:
        return _secure_boot_refusal(action, hw, data)
    return action


def _with(action: DriverAction, **changes: Any) -> DriverAction:
    return replace(action, **changes)


def _ubuntu(hw: Hardware, version: str, use_open: bool, family: Family | None, data: dict[str, Any]) -> DriverAction:
    ub = data["nvidia"]["ubuntu"]
    if version not in ub["versions"]:
        return DriverAction("refuse", "nvidia", f"Ubuntu {version} is not a supported release ({', '.join(ub['versions'])})",
                            fix="upgrade to a supported Ubuntu LTS or install the driver by hand")
    if family == "cuda-repo":
        return _cuda_repo(hw, use_open, (), f"ubuntu{version.replace('.', '')}", data, repos=("nvidia-cuda",))
    branch = ub["branch"]
    suffix = "-open" if use_open else ""
    series = "desktop" if family == "ubuntu-desktop" else "server"
    server = "-server" if series == "server" else ""
    release = hw.os.kernel
    meta = ubuntu_kernel_series(release, hw.driver.kernel_packages)
    offers = hw.driver.apt_offers
    signed = bool(hw.secure_boot)
    notes: tuple[str, ...] = ()
    if family == "ubuntu-desktop":
        notes = (f"the installed driver is Ubuntu's desktop series (nvidia-driver-*): upgraded within it to "
                 f"nvidia-driver-{branch}{suffix}, never replaced by the server series (their packages Conflict)",)
    if signed:
        # Secure Boot on: Canonical-signed prebuilt modules load without MOK enrolment (drivers.md 1.2), but only for
        # a kernel that has them: the running ABI's package must exist.
        modules = ub["signed_modules"]
        running = modules.format(branch=branch, server=server, open=suffix, kernel=release)
        if offers is not None and running not in offers:
            return DriverAction(
                "refuse", "nvidia", f"Secure Boot is on and Ubuntu has no signed NVIDIA module for the running kernel "
                f"{release} ({running})", fix="update the kernel and reboot (apt-get update && apt-get full-upgrade && "
                "reboot), then re-run r1fleet")
        packages = tuple(t.format(branch=branch, open=suffix) for t in ub["signed_packages"][series])
        packages += (running, modules.format(branch=branch, server=server, open=suffix, kernel=meta))
        return DriverAction("install", "nvidia", "", family="apt", packages=packages, branch=branch,
                            open_modules=use_open, module_build="prebuilt", blacklist_nouveau=True, notes=notes)
    headers, kernel_note = _kernel_headers(
        release, meta, offers, (f"linux-headers-{release}", f"linux-headers-{meta}"),
        (f"linux-image-{meta}", f"linux-headers-{meta}"))
    packages = tuple(t.format(branch=branch, open=suffix) for t in ub["dkms_packages"][series]) + headers
    return DriverAction("install", "nvidia", "", family="apt", packages=packages, branch=branch, open_modules=use_open,
                        module_build="dkms", blacklist_nouveau=True, notes=notes + kernel_note)


def _kernel_headers(release: str, series: str, offers: list[str] | None, exact: tuple[str, ...],
                    update: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The headers DKMS builds against: the running kernel's (`exact`, its first package) while apt offers them, else a
    kernel update with its headers (`update`): the module is built for the new kernel, and the reboot boots it (NVIDIA's
    Ansible role falls back the same way). apt's offers unknown (an older probe): the running kernel's."""
    if offers is None or exact[0] in offers:
        return exact, ()
    return update, (f"apt offers no headers for the running kernel {release} (gone from the mirror after a point "
                    f"release?): installing the current {series} kernel and its headers; the reboot starts it",)


def _debian(hw: Hardware, version: str, use_open: bool, blackwell: bool, minimum: int, family: Family | None,
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
    headers, kernel_notes = _debian_headers(hw)
    distro_ok = deb["distro_driver"][major] >= minimum and not blackwell and family != "cuda-repo"
    if distro_ok:
        flavour = "open" if use_open and int(major) >= int(deb["open_from_version"]) else "proprietary"
        module = deb["kernel_module"][flavour]
        packages = tuple(p.format(kernel_module=module) for p in deb["distro_packages"]) + headers
        return DriverAction("install", "nvidia", "", family="apt", repos=("debian-nonfree",), packages=packages,
                            branch=str(deb["distro_driver"][major]), open_modules=flavour == "open",
                            module_build="dkms", blacklist_nouveau=True, codename=codename, notes=kernel_notes)
    why = ("the installed driver is from NVIDIA's CUDA repository; kept there" if family == "cuda-repo" and
           deb["distro_driver"][major] >= minimum and not blackwell else
           f"Debian {major} ships driver {deb['distro_driver'][major]}"
           + (" without Blackwell support" if blackwell else f", below the minimum {minimum}"))
    action = _cuda_repo(hw, use_open, headers, f"debian{major}", data, repos=("debian-nonfree", "nvidia-cuda"))
    return _with(action, codename=codename, notes=(f"{why}; using NVIDIA's CUDA repository (branch {action.branch})",)
                 + kernel_notes)


def _debian_headers(hw: Hardware) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Debian's headers for DKMS, and Proxmox VE's: it reports ID=debian, but its kernels are its own and so are their
    headers (proxmox-headers-<release> from PVE 8, pve-headers-<release> before; no linux-headers-*-pve exists)."""
    release, offers = hw.os.kernel, hw.driver.apt_offers
    if not release:
        return ("linux-headers-amd64",), ()
    if is_proxmox_kernel(release):
        for name in (f"proxmox-headers-{release}", f"pve-headers-{release}"):
            if offers is None or name in offers:
                return (name,), ()
        return _kernel_headers(release, "Proxmox default", offers, (f"proxmox-headers-{release}",),
                               ("proxmox-default-kernel", "proxmox-default-headers"))
    flavour = debian_kernel_flavour(release, hw.os.arch)
    return _kernel_headers(release, flavour, offers, (f"linux-headers-{release}", f"linux-headers-{flavour}"),
                           (f"linux-image-{flavour}", f"linux-headers-{flavour}"))


def _cuda_repo(hw: Hardware, use_open: bool, headers: tuple[str, ...], distro: str, data: dict[str, Any],
               repos: tuple[Repo, ...]) -> DriverAction:
    """NVIDIA's CUDA repository, locked to r1fleet's branch by NVIDIA's own pinning package (installed first)."""
    cuda = data["nvidia"]["cuda_repo"]
    branch = cuda["branch"]
    package = cuda["packages"]["open" if use_open else "proprietary"].format(branch=branch)
    pinning = cuda["pinning_package"].format(branch=branch)
    return DriverAction("install", "nvidia", "", family="apt", repos=repos, packages=(package,) + headers,
                        pin_package=pinning,
                        branch=branch, open_modules=use_open, module_build="dkms", blacklist_nouveau=True,
                        distro=distro, codename=hw.os.codename or None)


def _fedora(hw: Hardware, use_open: bool, data: dict[str, Any]) -> DriverAction:
    fed = data["nvidia"]["fedora"]
    newer = kernel_rpm_newer_than_running(hw.os.kernel, hw.driver.kernel_packages)
    if newer is not None:
        return DriverAction("refuse", "nvidia", f"the running kernel {hw.os.kernel} is not the newest installed ({newer}): "
                            "akmods would build the module for the newest only",
                            fix="dnf update -y && reboot (RPM Fusion's own advice), then re-run r1fleet")
    packages = tuple(fed["packages"]["open" if use_open else "proprietary"])
    return DriverAction("install", "nvidia", "", family="dnf", repos=("rpmfusion",), packages=packages,
                        branch="rpmfusion" if use_open else "580xx", open_modules=use_open,
                        module_build="akmods", blacklist_nouveau=True)


def _secure_boot_refusal(action: DriverAction, hw: Hardware, data: dict[str, Any]) -> DriverAction:
    nv = data["nvidia"]
    keys = nv["mok_keys"]
    if action.module_build == "akmods":
        steps = f"dnf install akmods mokutil openssl && kmodgenca -a && mokutil --import {keys['akmods']}"
    else:
        codename = action.codename or hw.os.codename
        make_key = nv["dkms_mok_steps"].get(codename, nv["dkms_mok_steps"]["default"])
        steps = f"{make_key} && mokutil --import {keys['dkms']}"
    return _with(
        action, kind="refuse",
        reason=(f"{action.reason}; Secure Boot is enabled and this install builds an unsigned kernel module "
                f"({action.module_build}), which the kernel would refuse to load"),
        fix=(f"enrol a Machine Owner Key: {steps}; reboot and confirm the key in MokManager at the console; "
             "then re-run r1fleet (or disable Secure Boot in the firmware)"))


def rocm_override(target: str, built: list[str]) -> str | None:
    """HSA_OVERRIDE_GFX_VERSION for a card whose target is a sibling of a built one (gfx1031 -> 10.3.0: same major and
    minor, docs/gpu.mdx's gfx1034 example); None when no built target is that close."""
    match = re.fullmatch(r"gfx([0-9]+)([0-9a-f])([0-9a-f])", target)
    if not match:
        return None
    for candidate in built:
        near = re.fullmatch(r"gfx([0-9]+)([0-9a-f])([0-9a-f])", candidate)
        if near and near.group(1, 2) == match.group(1, 2):
            return f"{int(near.group(1))}.{int(near.group(2), 16)}.{int(near.group(3), 16)}"
    return None


def _decide_amd(hw: Hardware, plan: HostPlan, gpus: list[Gpu], hip_sdk: bool, data: dict[str, Any]) -> DriverAction:
    amd = data["amd"]
    notes: list[str] = []
    built = amd["rocm_targets"]
    osid = hw.os.id.lower()
    vulkan = " ".join(amd["vulkan_packages"].get(osid, ["mesa-vulkan-drivers"]))
    for gpu in gpus:
        spec = lookup_gpu(name=gpu.name, pci_id=gpu.pci_id, memory_mib=gpu.memory_total_mib or None)
        gpu = gpu if gpu.gfx_target or spec is None else gpu.model_copy(update={"gfx_target": spec.gfx})
        if gpu.gfx_target is None:
            notes.append(f"GPU {gpu.index} ({gpu.name}): its gfx target is unknown (not in the GPU table, amdgpu not "
                         "reporting it): Ollama's ROCm build may not run on it; probe again once amdgpu drives it")
        elif gpu.gfx_target not in built:
            override = rocm_override(gpu.gfx_target, built)
            way_out = (f"set HSA_OVERRIDE_GFX_VERSION={override} (Ollama's documented override to the nearest built "
                       "target)" if override else f"Ollama's Vulkan backend (on by default) needs a Vulkan driver: "
                       f"install {vulkan}")
            notes.append(f"GPU {gpu.index} ({gpu.name}) is {gpu.gfx_target}, which Ollama's ROCm build does not "
                         f"include ({', '.join(built)}): without help it runs on the CPU; {way_out}")
    driver_bound = any(g.source in ("drm", "rocm-smi") for g in gpus)
    packages: list[str] = []
    repos: tuple[Repo, ...] = ()
    if not driver_bound and osid in amd["kernel_packages"]:
        kernel = hw.os.kernel or "generic"
        packages += [p.format(kernel=kernel) for p in amd["kernel_packages"][osid]]
        if osid == "debian":
            repos = ("debian-nonfree",)
    if hip_sdk and plan.backend == "llama.cpp" and osid == "ubuntu":
        packages += amd["rocm"]["sdk_packages"]
        repos = repos + ("rocm",)
    if not packages:
        why = "amdgpu is in the kernel; Ollama's ROCm archive brings its own libraries"
        return DriverAction("none", "amd", why, notes=tuple(notes))
    why = ("amdgpu not bound to the GPU (no DRM memory info): installing the kernel module/firmware"
           if not driver_bound else "the ROCm SDK for llama.cpp's HIP source build")
    return DriverAction("install", "amd", why, family="apt", repos=repos, packages=tuple(packages),
                        codename=hw.os.codename or None, notes=tuple(notes))
