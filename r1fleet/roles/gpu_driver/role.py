"""GPU driver role: makes the host's NVIDIA/AMD driver right for the planned backend.

The decision is pure (r1fleet.plan.drivers.decide_driver); this module only turns a DriverAction
into pyinfra operations. A host whose driver is already right gets no operations at all;
Jetson and DGX OS hosts are never touched; an impossible or unsafe case (Secure Boot with an
unsigned module, an unsupported distro) fails that host with a message naming the fix.

The deploy prepares it first of a host's roles (DriverRole.prepare), before the backend.
"""

from __future__ import annotations

import shlex
from io import StringIO

from pyinfra import host, logger
from pyinfra.api import FactBase, deploy, operation
from pyinfra.api.command import StringCommand
from pyinfra.facts.files import File
from pyinfra.facts.rpm import RpmPackage
from pyinfra.operations import apt, dnf, files, server, systemd

from r1fleet.operations.stages import HostContext, Role
from r1fleet.plan.drivers import DriverAction, decide_driver, load_driver_data
from r1fleet.records import STATE_DIR, Hardware, HostPlan
from r1fleet.operations.common import refusal, refuse
from r1fleet.render.formats import unit_text
from r1fleet.roles.gpu_driver.decide import (
    PERSISTENCED,
    RebootPolicy,
    reboot_policy,
    CUDA_KEYRING,
    CUDA_PIN,
    CUDA_SOURCES,
    DEBIAN_NONFREE_SOURCES,
    NOUVEAU_BLACKLIST,
    NOUVEAU_BLACKLIST_TEXT,
    REBOOT_MARKER,
    ROCM_KEYRING,
    ROCM_SOURCES,
    driver_reboot_decision,
)


# ---------------------------------------------------------------- facts


class DriverBootState(FactBase):
    """(installed nvidia module version, current boot id, marker: 'version boot-id' of r1fleet's last reboot for a driver)."""

    @staticmethod
    def default() -> tuple:
        return (None, None, None)

    def command(self) -> str:
        # the module for the running kernel, else for another installed one (a kernel update DKMS built it for, which
        # the reboot starts)
        module = ("{ modinfo -F version nvidia 2>/dev/null || for k in $(ls /lib/modules 2>/dev/null); do "
                  "modinfo -k \"$k\" -F version nvidia 2>/dev/null && break; done; } | head -n 1")
        return (f"echo \"installed $({module})\"; echo \"boot $(cat /proc/sys/kernel/random/boot_id)\"; "
                f"echo \"marker $(cat {REBOOT_MARKER} 2>/dev/null)\"")

    def process(self, output: list[str]) -> tuple:
        values = dict((line.split(" ", 1) + [""])[:2] for line in output if line.strip())
        return tuple((values.get(k) or "").strip() or None for k in ("installed", "boot", "marker"))


MISSING_MODULE = ("r1fleet: no nvidia kernel module was built for any installed kernel (dkms or akmods failed; "
                  "missing kernel headers?): the build says")


@operation()
def defer_driver_reboot(why: str):
    """Stop this host where its driver waits for a reboot r1fleet must not do: the user reboots (status says so)."""
    installed, _, _ = host.get_fact(DriverBootState)
    yield refusal(f"NVIDIA driver {installed or ''} is installed and waits for a reboot, which r1fleet leaves to you "
                  f"({why}): reboot the host when it suits, then re-run r1fleet")


@operation()
def record_driver_reboot():
    """Write the marker and let the reboot follow, when the installed driver does not answer yet; fail the
    host when it did not answer after the reboot r1fleet already did for it."""
    loaded = host.get_fact(NvidiaDriverVersion)
    installed, boot, marker = host.get_fact(DriverBootState)
    decision = driver_reboot_decision(loaded, installed, boot, marker)
    if decision == "none":
        host.noop("the NVIDIA driver answers; no reboot")
        return
    if decision == "missing":
        # the build's own words, not a reboot into a kernel without the module
        yield StringCommand(
            f"{{ echo {shlex.quote(MISSING_MODULE)}; dkms status 2>&1; "
            "tail -n 40 /var/lib/dkms/nvidia*/*/build/make.log /var/cache/akmods/nvidia/*.failed.log 2>/dev/null; } >&2; "
            "exit 1")
        return
    if decision == "stuck":
        yield refusal(f"NVIDIA driver {installed} was installed and the host rebooted, but nvidia-smi still does not work: "
                      "see dmesg (Secure Boot? an unsupported GPU?); not rebooting again")
        return
    yield f"mkdir -p {STATE_DIR} && echo {shlex.quote(f'{installed} {boot}')} > {REBOOT_MARKER}"


class InitramfsHolds(FactBase):
    """Whether the running kernel's initramfs was built after `path` changed (so it holds it).

    Debian/Ubuntu name it /boot/initrd.img-<release>, Fedora /boot/initramfs-<release>.img; both copy
    /etc/modprobe.d into it, so a blacklist written after the image was built is not in it yet."""

    default = bool  # no answer: assume it does not, and rebuild

    def command(self, path: str) -> str:
        return (f"for img in /boot/initrd.img-$(uname -r) /boot/initramfs-$(uname -r).img; do "
                f"[ -e \"$img\" ] && [ ! {shlex.quote(path)} -nt \"$img\" ] && echo holds; done; true")

    def process(self, output: list[str]) -> bool:
        return "holds" in "".join(output)


@operation()
def rebuild_initramfs(holding: str, command: str):
    """Rebuild the initramfs when it predates `holding`: decided from the host, so a run interrupted between
    writing the file and rebuilding is repaired by the next one.

    Example: rebuild_initramfs(holding="/etc/modprobe.d/r1fleet-blacklist-nouveau.conf", command="update-initramfs -u")"""
    if host.get_fact(InitramfsHolds, path=holding):
        host.noop(f"the initramfs already holds {holding}")
        return
    yield command


class NvidiaDriverVersion(FactBase):
    """The driver version nvidia-smi reports, or None when nvidia-smi is absent or not working
    (e.g. 'Driver/library version mismatch' after an install without reboot)."""

    @staticmethod
    def default() -> None:
        return None

    def command(self) -> str:
        return "nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null || true"

    def process(self, output: list[str]) -> str | None:
        lines = [line.strip() for line in output if line.strip()]
        return lines[0] if lines and lines[0][:1].isdigit() else None


class KernelModuleVersion(FactBase):
    """`modinfo -F version MODULE`: the version of a built kernel module, or None."""

    @staticmethod
    def default() -> None:
        return None

    def command(self, module: str) -> str:
        return f"modinfo -F version {shlex.quote(module)} 2>/dev/null || true"

    def process(self, output: list[str]) -> str | None:
        lines = [line.strip() for line in output if line.strip()]
        return lines[0] if lines else None


class MokKeyEnrolled(FactBase):
    """Whether a module-signing key is already enrolled (`mokutil --test-key KEY`)."""

    default = bool

    def command(self, key: str) -> str:
        return f"mokutil --test-key {shlex.quote(key)} 2>&1 || true"

    def process(self, output: list[str]) -> bool:
        return any("is already enrolled" in line for line in output)


# ---------------------------------------------------------------- operations


@operation()
def wait_for_kernel_module(module: str, timeout_s: int = 900, interval_s: int = 10):
    """Wait until `modinfo` finds MODULE (akmods builds it in the background after the install)."""
    if host.get_fact(KernelModuleVersion, module=module):
        host.noop(f"kernel module {module} is built")
        return
    tries = max(1, timeout_s // interval_s)
    message = (f"r1fleet: the {module} kernel module was not built within {timeout_s}s; akmods says "
               "(or run `dnf update -y && reboot` if the running kernel is not the newest):")
    yield StringCommand(
        f"akmods --force --kernels \"$(uname -r)\" >/dev/null 2>&1 || true; "
        f"for i in $(seq 1 {tries}); do modinfo -F version {shlex.quote(module)} >/dev/null 2>&1 && exit 0; "
        f"sleep {interval_s}; done; {{ echo {shlex.quote(message)}; tail -n 40 /var/cache/akmods/{shlex.quote(module)}/*.failed.log "
        "2>/dev/null; journalctl -u akmods -n 20 --no-pager 2>/dev/null; } >&2; exit 1")


# The most a signing key or a repository's release RPM may be (a few KiB each): a server answering more is not
# serving one, and no host's disk fills with it (curl(1) --max-filesize).
SMALL_DOWNLOAD_MAX_BYTES = 1 << 20


@operation()
def verified_key(src: str, dest: str, fingerprint: str | None = None, sha1: str | None = None):
    """Download an apt signing key once, kept only if it has the pinned fingerprint (or file sha1)."""
    if host.get_fact(File, path=dest):
        host.noop(f"signing key {dest} present")
        return
    tmp = f"{dest}.r1fleet-tmp"
    check = ""
    if fingerprint:
        check = (f" && gpg --show-keys --with-colons {shlex.quote(tmp)} | grep -q '^fpr:*{fingerprint}:'"
                 f" || {{ rm -f {shlex.quote(tmp)}; echo 'r1fleet: {src} does not have fingerprint {fingerprint}' >&2; exit 1; }}")
    elif sha1:
        check = (f" && echo {shlex.quote(sha1 + '  ' + tmp)} | sha1sum -c --status"
                 f" || {{ rm -f {shlex.quote(tmp)}; echo 'r1fleet: {src} is not the key with sha1 {sha1}' >&2; exit 1; }}")
    yield StringCommand(
        f"install -d -m 0755 {shlex.quote(dest.rsplit('/', 1)[0])} && "
        f"curl -fsSL --proto '=https' --max-filesize {SMALL_DOWNLOAD_MAX_BYTES} {shlex.quote(src)} -o {shlex.quote(tmp)}{check}; "
        f"chmod 0644 {shlex.quote(tmp)} && mv -f {shlex.quote(tmp)} {shlex.quote(dest)}")


@operation()
def signed_release_rpm(src: str, keys: list[str]):
    """Install a repository's release RPM once, only if its signature checks out against `keys`.

    Example: signed_release_rpm(src="https://.../rpmfusion-free-release-42.noarch.rpm",
    keys=["/usr/share/distribution-gpg-keys/rpmfusion/RPM-GPG-KEY-rpmfusion-free-fedora-2020"])"""
    package = src.rsplit("/", 1)[-1].rsplit("-", 1)[0]  # rpmfusion-free-release
    if host.get_fact(RpmPackage, package=package):
        host.noop(f"{package} installed")
        return
    tmp = shlex.quote(f"/var/tmp/r1fleet-{src.rsplit('/', 1)[-1]}")
    message = shlex.quote(f"r1fleet: {src} is not signed by {', '.join(keys)}")
    # rpmkeys -K exits non-zero for a bad or missing signature (NOKEY) as well as a bad digest
    yield StringCommand(
        f"rpmkeys --import {' '.join(shlex.quote(k) for k in keys)} && "
        f"curl -fsSL --proto '=https' --max-filesize {SMALL_DOWNLOAD_MAX_BYTES} {shlex.quote(src)} -o {tmp} && "
        f"{{ rpmkeys -K {tmp} | grep -q 'signatures OK' || {{ rm -f {tmp}; echo {message} >&2; exit 1; }}; }} && "
        f"dnf install -y {tmp}; status=$?; rm -f {tmp}; exit $status")


# ---------------------------------------------------------------- the deploy


class DriverRole(Role):
    """The GPU driver the plan needs; all of it happens in the install stage (a reboot, when one is due and allowed, is
    the driver's own operation there)."""

    def __init__(self, hw: Hardware, plan: HostPlan, reboot: RebootPolicy | None = None, address: str | None = None,
                 hip_sdk: bool = False):
        self.hw, self.plan, self.reboot, self.address, self.hip_sdk = hw, plan, reboot, address, hip_sdk

    @classmethod
    def prepare(cls, ctx: HostContext) -> "DriverRole":
        return cls(ctx.hardware, ctx.plan, reboot=ctx.settings.reboot, address=ctx.settings.address,
                   hip_sdk=ctx.settings.llama_cpp_install == "source")

    def install(self) -> None:
        install(self.hw, self.plan, reboot=self.reboot, address=self.address, hip_sdk=self.hip_sdk)


@deploy("GPU driver")
def install(hw: Hardware, plan: HostPlan, reboot: RebootPolicy | None = None, address: str | None = None,
            hip_sdk: bool = False):
    """Bring the GPU driver to what `plan` needs (see module docstring)."""
    action = decide_driver(hw, plan, hip_sdk=hip_sdk)
    if action.kind == "refuse" and hw.secure_boot and action.module_build in ("dkms", "akmods"):
        key = load_driver_data()["nvidia"]["mok_keys"][action.module_build]
        if host.get_fact(MokKeyEnrolled, key=key):
            action = decide_driver(hw, plan, mok_enrolled=True, hip_sdk=hip_sdk)
    for note in action.notes:
        logger.warning(f"{host.name}: {note}")
    if action.kind == "none":
        return
    if action.kind == "refuse":
        message = action.reason + (f" (fix: {action.fix})" if action.fix else "")
        refuse(name=f"Refuse GPU driver change: {action.reason}", message=message)
        return
    policy = reboot_policy(reboot, host.name, address, hw.os.kernel)
    logger.info(f"{host.name}: GPU driver {action.kind}: {action.reason}"
                + (f"; packages {', '.join(action.packages)}" if action.packages else ""))
    if action.kind == "reboot":
        _reboot_and_persist(hw, policy)
        return
    _repositories(hw, action)
    if action.vendor == "nvidia":
        _nvidia(hw, action, policy)
    else:
        _amd(hw, action)


def _repositories(hw: Hardware, action: DriverAction) -> None:
    data = load_driver_data()
    arch = "sbsa" if hw.os.arch in ("aarch64", "arm64") else "x86_64"   # drivers.md 1.5: aarch64 -> sbsa
    needs_fetch = {"nvidia-cuda", "rocm"} & set(action.repos)
    if needs_fetch:
        apt.packages(name="Tools to fetch signing keys", packages=["ca-certificates", "curl", "gnupg"])
    if "debian-nonfree" in action.repos:
        deb = data["nvidia"]["debian"]
        codename = action.codename or hw.os.codename
        keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
        sources = _deb822([deb["mirror"]], [codename, f"{codename}-updates"], deb["components"], keyring) + "\n" + \
            _deb822([deb["security_mirror"]], [f"{codename}-security"], deb["components"], keyring)
        if codename in deb.get("testing_codenames", []):  # testing/sid: one suite, no -updates or -security
            sources = _deb822([deb["mirror"]], [codename], deb["components"], keyring)
        files.put(
            name="Debian contrib/non-free/non-free-firmware components",
            src=StringIO(sources),
            dest=DEBIAN_NONFREE_SOURCES, mode="644")
    if "nvidia-cuda" in action.repos:
        cuda = data["nvidia"]["cuda_repo"]
        url = cuda["url"].format(distro=action.distro, arch=arch)
        verified_key(name="NVIDIA CUDA repository key", src=cuda["key"].format(distro=action.distro, arch=arch),
                     dest=CUDA_KEYRING, fingerprint=cuda["key_fingerprint"])
        # A flat repository: suite "/" and no components.
        files.put(name="NVIDIA CUDA repository", src=StringIO(_deb822([url], ["/"], [], CUDA_KEYRING)),
                  dest=CUDA_SOURCES, mode="644")
        # NVIDIA's pinning package locks the repository to the branch (installed before the driver, in _nvidia);
        # r1fleet's earlier blanket pin over every package of the repository goes
        files.file(name="Drop r1fleet's former pin of the whole CUDA repository", path=CUDA_PIN, present=False)
    if "rocm" in action.repos:
        rocm = data["amd"]["rocm"]
        verified_key(name="ROCm repository key", src=rocm["key"], dest=ROCM_KEYRING, sha1=rocm["key_sha1"])
        files.put(name="ROCm repository",
                  src=StringIO(_deb822([rocm["repo"].format(version=rocm["version"])], [hw.os.codename], ["main"],
                                       ROCM_KEYRING)),
                  dest=ROCM_SOURCES, mode="644")
    if "rpmfusion" in action.repos:
        fedora = data["nvidia"]["fedora"]
        dnf.packages(name="RPM Fusion's signing keys, as Fedora ships them", packages=[fedora["release_keys_package"]])
        for rpm in fedora["release_rpms"]:
            signed_release_rpm(name=f"RPM Fusion repository ({rpm.rsplit('/', 1)[-1]})",
                               src=rpm.format(fedora=hw.os.version_id), keys=fedora["release_keys"])


def _deb822(uris: list[str], suites: list[str], components: list[str], signed_by: str) -> str:
    lines = ["Types: deb", f"URIs: {' '.join(uris)}", f"Suites: {' '.join(suites)}"]
    if components:
        lines.append(f"Components: {' '.join(components)}")
    lines.append(f"Signed-By: {signed_by}")
    return "# written by r1fleet\n" + "\n".join(lines) + "\n"


def _nvidia(hw: Hardware, action: DriverAction, policy: tuple[RebootPolicy, str]) -> None:
    data = load_driver_data()
    files.put(name="Blacklist nouveau", src=StringIO(NOUVEAU_BLACKLIST_TEXT), dest=NOUVEAU_BLACKLIST, mode="644")
    if action.family == "dnf":
        fed = data["nvidia"]["fedora"]
        if action.open_modules:
            # rpmfusion.org/Howto/NVIDIA#Kernel_Open: must be set before akmods builds (Blackwell needs it).
            files.put(name="Build the open NVIDIA kernel modules", src=StringIO(fed["open_macro"] + "\n"),
                      dest=fed["open_macro_file"], mode="644")
        dnf.packages(name=f"NVIDIA driver ({action.reason})", packages=list(action.packages))
        wait_for_kernel_module(name="Wait until akmods has built the nvidia module", module="nvidia",
                               timeout_s=fed["akmods_wait_seconds"])
        rebuild_initramfs(name="Rebuild the initramfs without nouveau", holding=NOUVEAU_BLACKLIST,
                          command="dracut --force --regenerate-all")
    else:
        if action.pin_package:
            apt.packages(name=f"Lock NVIDIA's repository to branch {action.branch}", packages=[action.pin_package],
                         update=True, no_recommends=True)
        apt.packages(name=f"NVIDIA driver ({action.reason})", packages=list(action.packages), update=True,
                     no_recommends=True)
        # every installed kernel's image: -u alone rebuilds only the newest, so an older running one kept nouveau
        rebuild_initramfs(name="Rebuild the initramfs without nouveau", holding=NOUVEAU_BLACKLIST,
                          command="update-initramfs -u -k all")
    if hw.os.id.lower() == "ubuntu" and not action.repos:
        files.put(name="Turn persistence mode on (Ubuntu's unit starts the daemon with it off)",
                  src=StringIO(f"# written by r1fleet\n[Service]\nExecStart=\nExecStart={unit_text(PERSISTENCED)} --verbose\n"),
                  dest=data["nvidia"]["persistence_dropin"], mode="644")
    _reboot_and_persist(hw, policy)


def _reboot_and_persist(hw: Hardware, policy: tuple[RebootPolicy, str]) -> None:
    # Decided from the host, not from this run: a driver installed by an interrupted run still gets its
    # reboot, and a driver that did not come up after one reboot is reported instead of rebooting again.
    mark_reboot = record_driver_reboot(name="Remember the reboot for this NVIDIA driver")
    allowed, why = policy
    if allowed == "defer":
        defer_driver_reboot(name="Leave the reboot for the NVIDIA driver to the user", why=why,
                            _if=mark_reboot.did_change)
    else:
        server.reboot(
            name="Reboot to load the new NVIDIA driver (only when nvidia-smi does not work yet)",
            delay=int(host.data.get("r1fleet_reboot_delay", 10)),
            reboot_timeout=int(host.data.get("r1fleet_reboot_timeout", 600)),
            _if=mark_reboot.did_change,
        )
    systemd.service(name="NVIDIA persistence daemon", service="nvidia-persistenced", running=True, enabled=True,
                    daemon_reload=True)


class AmdgpuBound(FactBase):
    """The PCI slots of AMD display devices amdgpu drives (/sys/bus/pci/drivers/amdgpu)."""

    default = list

    def command(self) -> str:
        return "ls /sys/bus/pci/drivers/amdgpu 2>/dev/null | grep -E '^[0-9a-f]{4}:' || true"

    def process(self, output: list[str]) -> list[str]:
        return [line.strip() for line in output if line.strip()]


@operation()
def require_amdgpu(slots: list[str], fix: str):
    """Fail the host when amdgpu, loaded, still drives none of its GPUs: the kernel predates the card."""
    bound = host.get_fact(AmdgpuBound)
    if not slots or any(slot in bound for slot in slots):
        host.noop("amdgpu drives the GPU")
        return
    yield refusal(f"amdgpu does not drive the GPU at {', '.join(slots)} after loading: the kernel "
                  f"{host.get_fact(KernelRelease) or ''} predates the card, and the model would run on the CPU ({fix})")


class KernelRelease(FactBase):
    """`uname -r`."""

    def command(self) -> str:
        return "uname -r"

    def process(self, output: list[str]) -> str | None:
        return output[0].strip() if output else None


def _amd(hw: Hardware, action: DriverAction) -> None:
    packages = apt.packages(name=f"AMD GPU driver pieces ({action.reason})", packages=list(action.packages),
                            update=True, no_recommends=True)
    server.shell(name="Load amdgpu", commands=["modprobe amdgpu"], _if=packages.did_change)
    slots = [g.bus_id for g in hw.gpus if g.vendor == "amd" and g.bus_id]
    fix = ("install the HWE kernel (apt-get install linux-generic-hwe-" + hw.os.version_id + ") and reboot"
           if hw.os.id.lower() == "ubuntu" else "install a newer kernel (or AMD's amdgpu-dkms) and reboot")
    require_amdgpu(name="Check that amdgpu drives the GPU", slots=slots, fix=fix + ", then re-run r1fleet")
