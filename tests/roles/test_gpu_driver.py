"""roles/gpu_driver.py at the operation level, against pyinfra's @fake connector with faked facts."""

from __future__ import annotations

import re
from pathlib import Path

from deploy_harness import run_role
from r1fleet.hardware import parse_probe
from r1fleet.records import Gpu, Hardware, HostPlan, OsInfo
from r1fleet.roles.gpu_driver import role as gpu_driver

UBUNTU = OsInfo(id="ubuntu", version_id="24.04", codename="noble", arch="x86_64", kernel="6.8.0-45-generic")
DEBIAN_12 = OsInfo(id="debian", version_id="12", codename="bookworm", arch="x86_64", kernel="6.1.0-26-amd64")
DEBIAN_13 = OsInfo(id="debian", version_id="13", codename="trixie", arch="x86_64", kernel="6.12.9-amd64")
FEDORA = OsInfo(id="fedora", version_id="42", arch="x86_64", kernel="6.14.0-63.fc42.x86_64")
PLAN = HostPlan(host="h1", model="r1-14b", backend="ollama", placement="gpu", vendor="nvidia")
# A host where the reboot "happened": same uptime before and after (reboot delay 1 s in tests).
REBOOT_DATA = {"r1fleet_reboot_delay": 1, "r1fleet_reboot_timeout": 5}
UPTIME = {"/proc/uptime": "100"}


def rtx3090(driver: str | None = None) -> Gpu:
    return Gpu(index=0, vendor="nvidia", name="NVIDIA GeForce RTX 3090", memory_total_mib=24576, pci_id="10de:2204",
               driver_version=driver, compute_cap="8.6" if driver else None,
               source="nvidia-smi-query" if driver else "lspci")


def hw(os: OsInfo = UBUNTU, gpus: list[Gpu] | None = None, **extra) -> Hardware:
    return Hardware(host="h1", os=os, ram_total_mib=65536, gpus=[rtx3090()] if gpus is None else gpus, **extra)


def apt_install_line(run) -> str:
    """The last `apt-get install` pyinfra ran (the driver packages; earlier ones fetch tools)."""
    return [c for c in run.commands if re.search(r"apt-get -y .*install", c)][-1]


# After the install: the module is on disk, nvidia-smi does not answer yet, no reboot done for it.
INSTALLED = {"marker $(cat": ["installed 580.95.05", "boot 1111-aaaa", "marker"]}


def test_ubuntu_fresh_host_installs_blacklists_reboots_and_enables_persistence(monkeypatch):
    run = run_role(gpu_driver.install, hw(), PLAN, responses={**INSTALLED, **UPTIME}, data=REBOOT_DATA,
                   base_responses=False, monkeypatch=monkeypatch)
    assert not run.failed
    line = apt_install_line(run)
    assert "nvidia-headless-580-server-open" in line and "nvidia-utils-580-server" in line
    assert run.uploads[gpu_driver.NOUVEAU_BLACKLIST].splitlines()[1:] == ["blacklist nouveau", "options nouveau modeset=0"]
    assert run.ran("Rebuild the initramfs without nouveau", "update-initramfs -u -k all")   # every kernel's image
    # the initramfs follows the host, not this run: rebuilt while it predates the blacklist, else left alone (M9)
    built = run_role(gpu_driver.install, hw(), PLAN, data=REBOOT_DATA, base_responses=False, monkeypatch=monkeypatch,
                     responses={"/boot/initrd.img-$(uname -r)": "holds", **INSTALLED, **UPTIME})
    assert built.never_ran("update-initramfs -u")
    # nvidia-smi answers nothing after the install -> exactly one reboot, then persistence is enabled
    assert sum("reboot" in c and "sleep 1" in c for c in run.commands) == 1
    assert run.ran("NVIDIA persistence daemon", "systemctl enable nvidia-persistenced")
    assert not any("sources.list.d" in path for path in run.uploads)   # Ubuntu: archive packages only


def test_no_reboot_when_the_new_driver_already_answers(monkeypatch):
    responses = {"nvidia-smi --query-gpu=driver_version": "580.95.05", **UPTIME}
    run = run_role(gpu_driver.install, hw(), PLAN, responses=responses, data=REBOOT_DATA,
                   base_responses=False, monkeypatch=monkeypatch)
    assert not any("reboot" in c and "sleep 1" in c for c in run.commands)


def test_ubuntu_old_driver_is_upgraded(monkeypatch):
    run = run_role(gpu_driver.install, hw(gpus=[rtx3090("535.183.01")]), PLAN, responses=UPTIME,
                   data=REBOOT_DATA, base_responses=False, monkeypatch=monkeypatch)
    assert "nvidia-headless-580-server-open" in apt_install_line(run)
    assert any("below ollama's minimum 550" in name for name in run.op_names)


def test_ubuntu_right_driver_is_a_no_op(monkeypatch):
    run = run_role(gpu_driver.install, hw(gpus=[rtx3090("580.95.05")]), PLAN,
                   base_responses=False, monkeypatch=monkeypatch)
    assert run.op_names == [] and run.commands == [] and run.uploads == {}


def test_debian_12_adds_nonfree_components_and_verified_cuda_repo(monkeypatch):
    run = run_role(gpu_driver.install, hw(DEBIAN_12), PLAN, responses=UPTIME, data=REBOOT_DATA,
                   base_responses=False, monkeypatch=monkeypatch)
    sources = run.uploads[gpu_driver.DEBIAN_NONFREE_SOURCES]
    assert "Suites: bookworm bookworm-updates" in sources and "Components: contrib non-free non-free-firmware" in sources
    cuda = run.uploads[gpu_driver.CUDA_SOURCES]
    assert "URIs: https://developer.download.nvidia.com/compute/cuda/repos/debian12/x86_64/" in cuda
    assert "Suites: /" in cuda and f"Signed-By: {gpu_driver.CUDA_KEYRING}" in cuda
    assert run.ran("NVIDIA CUDA repository key", "EB693B3035CD5710E231E123A4B469963BF863CC")   # key fingerprint checked before use
    # the key is fetched with curl and checked with gpg: both come from the tools operation, which runs first
    key = " ".join(run.op_commands("NVIDIA CUDA repository key"))
    tools = run.installs("Tools to fetch signing keys")
    assert re.search(r"\bcurl ", key) and re.search(r"\bgpg ", key) and {"curl", "gnupg", "ca-certificates"} <= tools
    assert run.op_names.index(run.op("Tools to fetch signing keys")) < run.op_names.index(run.op("NVIDIA CUDA repository key"))
    # NVIDIA's pinning package locks the repository to 580 before the driver comes from it; no blanket pin of ours
    assert gpu_driver.CUDA_PIN not in run.uploads and run.op("Drop r1fleet's former pin of the whole CUDA repository")
    assert run.installs("Lock NVIDIA's repository to branch 580") == {"nvidia-driver-pinning-580"}
    assert run.op_names.index(run.op("Lock NVIDIA's repository")) < run.op_names.index(run.op("NVIDIA driver (no NVIDIA"))
    line = apt_install_line(run)
    assert "nvidia-open-580" in line and "linux-headers-6.1.0-26-amd64" in line


def test_debian_13_uses_distro_open_dkms(monkeypatch):
    run = run_role(gpu_driver.install, hw(DEBIAN_13), PLAN, responses=UPTIME, data=REBOOT_DATA,
                   base_responses=False, monkeypatch=monkeypatch)
    line = apt_install_line(run)
    assert "nvidia-open-kernel-dkms" in line and "linux-headers-6.12.9-amd64" in line
    assert gpu_driver.CUDA_SOURCES not in run.uploads


def test_fedora_rpmfusion_akmods_waits_for_the_module(monkeypatch):
    run = run_role(gpu_driver.install, hw(FEDORA), PLAN, responses=UPTIME, data=REBOOT_DATA,
                   base_responses=False, monkeypatch=monkeypatch)
    assert run.ran("RPM Fusion repository (rpmfusion-nonfree-release-{fedora}.noarch.rpm)", "rpmfusion-nonfree-release-42.noarch.rpm")
    # the release RPM is installed only after its signature checks out against RPM Fusion's keys (L9)
    fetch = next(c for c in run.commands if "rpmfusion-free-release-42.noarch.rpm" in c)
    assert fetch.index("rpmkeys --import /usr/share/distribution-gpg-keys/rpmfusion/") < fetch.index("curl") \
        < fetch.index("rpmkeys -K") < fetch.index("dnf install")
    assert any(re.search(r"dnf .*install.*distribution-gpg-keys", c) for c in run.commands)
    assert any(re.search(r"dnf .*install.*akmod-nvidia", c) for c in run.commands)
    assert run.uploads["/etc/rpm/macros.nvidia-kmod"].strip() == "%_with_kmod_nvidia_open 1"
    # modinfo printed nothing -> the role polls until akmods has built the module
    assert run.ran("Wait until akmods has built the nvidia module", "modinfo -F version nvidia >/dev/null 2>&1 && exit 0")
    assert run.ran("Rebuild the initramfs without nouveau", "dracut --force --regenerate-all")


def test_fedora_release_rpms_installed_once(monkeypatch):
    responses = {"rpm --queryformat": "rpmfusion-free-release 42-1.noarch", **UPTIME}
    run = run_role(gpu_driver.install, hw(FEDORA), PLAN, responses=responses, data=REBOOT_DATA,
                   base_responses=False, monkeypatch=monkeypatch)
    assert run.never_ran("rpmfusion-free-release-42.noarch.rpm")


def test_fedora_skips_the_wait_when_the_module_is_built(monkeypatch):
    responses = {"modinfo -F version": "580.95.05", **UPTIME}
    run = run_role(gpu_driver.install, hw(FEDORA), PLAN, responses=responses, data=REBOOT_DATA,
                   base_responses=False, monkeypatch=monkeypatch)
    assert run.never_ran("akmods --force")


def test_secure_boot_with_unsigned_module_fails_the_host_with_mok_message(monkeypatch):
    run = run_role(gpu_driver.install, hw(DEBIAN_13, secure_boot=True), PLAN,
                   responses={"exit 1": {"success": False}}, base_responses=False, monkeypatch=monkeypatch)
    assert run.failed
    assert any("mokutil --import /var/lib/dkms/mok.pub" in c for c in run.commands)
    assert not any(re.search(r"apt-get -y .*install", c) for c in run.commands)   # nothing half-installed


def test_secure_boot_with_enrolled_key_installs(monkeypatch):
    responses = {"mokutil --test-key": "/var/lib/dkms/mok.pub is already enrolled", **UPTIME}
    run = run_role(gpu_driver.install, hw(DEBIAN_13, secure_boot=True), PLAN, responses=responses,
                   data=REBOOT_DATA, base_responses=False, monkeypatch=monkeypatch)
    assert not run.failed and "nvidia-open-kernel-dkms" in apt_install_line(run)


def test_jetson_is_never_touched(monkeypatch):
    jetson = hw(gpus=[Gpu(index=0, vendor="nvidia", name="Orin (nvgpu)", memory_total_mib=0, source="nvidia-smi",
                          driver_version="540.4.0")], tegra_release="# R36 (release), REVISION: 4.3")
    run = run_role(gpu_driver.install, jetson, PLAN, base_responses=False, monkeypatch=monkeypatch)
    assert run.op_names == [] and run.commands == []


def test_amd_unbound_card_gets_kernel_module_and_rocm_repo_for_llama_cpp(monkeypatch):
    card = Gpu(index=0, vendor="amd", name="Radeon RX 7900 XT", memory_total_mib=20464, pci_id="1002:744c",
               source="lspci")
    plan = HostPlan(host="h1", model="r1-14b", backend="llama.cpp", vendor="amd")
    # install(hw, plan, reboot, address, hip_sdk): llama.cpp built from source here
    run = run_role(gpu_driver.install, hw(gpus=[card]), plan, None, None, True, base_responses=False,
                   monkeypatch=monkeypatch)
    line = apt_install_line(run)
    assert "linux-modules-extra-6.8.0-45-generic" in line and "rocm-hip-sdk" in line
    assert "repo.radeon.com/rocm/apt/6.4.1" in run.uploads[gpu_driver.ROCM_SOURCES]
    assert run.ran("Load amdgpu", "modprobe amdgpu")
    # the repository key is kept only when it is the one AMD published
    assert run.ran("ROCm repository key", "73f5d8100de6048aa38a8b84cd9a87f05177d208") and run.ran("ROCm repository key", "sha1sum -c --status")


def test_amd_supported_card_with_ollama_is_a_no_op(monkeypatch):
    card = Gpu(index=0, vendor="amd", name="Radeon RX 7900 XT", memory_total_mib=20464, source="rocm-smi")
    run = run_role(gpu_driver.install, hw(gpus=[card]), PLAN.model_copy(update={"vendor": "amd"}),
                   base_responses=False, monkeypatch=monkeypatch)
    assert run.op_names == []


def test_the_reboot_is_decided_from_the_host_and_never_repeated_for_a_driver_that_does_not_load(monkeypatch):
    """A driver that still does not answer after r1fleet's reboot for it is reported, not rebooted again on
    every run; a reboot an interrupted run missed still happens (audit M9)."""
    decide = gpu_driver.driver_reboot_decision
    assert decide(None, "580.95.05", "boot-2", None) == "reboot"               # installed, never rebooted for it
    assert decide(None, "580.95.05", "boot-2", "580.95.05 boot-1") == "stuck"  # rebooted once, still silent
    assert decide(None, "580.95.05", "boot-1", "580.95.05 boot-1") == "reboot"  # marked, but the reboot never came
    assert decide(None, "590.10", "boot-2", "580.95.05 boot-1") == "reboot"     # a newer driver deserves its reboot
    assert decide("580.95.05", "580.95.05", "boot-2", None) == "none"
    stuck = {"marker $(cat": ["installed 580.95.05", "boot 2222-bbbb", "marker 580.95.05 1111-aaaa"],
             "not rebooting again": {"success": False}, **UPTIME}
    run = run_role(gpu_driver.install, hw(), PLAN, responses=stuck, data=REBOOT_DATA, base_responses=False,
                   monkeypatch=monkeypatch)
    assert run.failed and run.ran("Remember the reboot for this NVIDIA driver", "not rebooting again")
    assert not any("reboot" in c and "sleep 1" in c for c in run.commands)


# ---------------------------------------------------------------- issue 25: reboots, families, kernels, AMD targets

PROBES = Path(__file__).resolve().parents[1] / "fixtures" / "probes"


def probed(name: str) -> Hardware:
    return parse_probe((PROBES / f"{name}.probe").read_text(), name)


def test_a_driver_that_only_needs_a_reboot_gets_the_reboot_and_no_package(monkeypatch):
    hw_ = probed("nvml-mismatch-580")
    waiting = {"marker $(cat": ["installed 580.95.05", "boot 1111-aaaa", "marker"], **UPTIME}
    run = run_role(gpu_driver.install, hw_, PLAN, responses=waiting, data=REBOOT_DATA, base_responses=False,
                   monkeypatch=monkeypatch)
    assert not run.failed and not any(re.search(r"apt-get .*install", c) for c in run.commands)
    assert sum("reboot" in c and "sleep 1" in c for c in run.commands) == 1
    assert run.ran("NVIDIA persistence daemon", "systemctl enable nvidia-persistenced")


def test_the_reboot_is_left_to_the_user_on_the_controller_and_on_proxmox(monkeypatch):
    waiting = {"marker $(cat": ["installed 580.95.05", "boot 1111-aaaa", "marker"], "waits for a reboot": {"success": False},
               **UPTIME}
    # install(hw, plan, reboot, address): the deploy's own machine, whatever the fleet file says
    local = run_role(gpu_driver.install, probed("nvml-mismatch-580"), PLAN, "auto", "127.0.0.1", responses=waiting,
                     data=REBOOT_DATA, base_responses=False, monkeypatch=monkeypatch)
    assert local.failed and local.ran("Leave the reboot for the NVIDIA driver to the user", "the machine r1fleet runs from")
    assert not any("reboot" in c and "sleep 1" in c for c in local.commands)
    assert local.never_ran("systemctl enable nvidia-persistenced")
    pve = run_role(gpu_driver.install, probed("proxmox-host-gpu"), PLAN, responses=waiting, data=REBOOT_DATA,
                   base_responses=False, monkeypatch=monkeypatch)
    assert pve.failed and pve.ran("Leave the reboot for the NVIDIA driver to the user", "Proxmox VE")
    assert "proxmox-headers-6.8.12-4-pve" in apt_install_line(pve)
    assert not any("reboot" in c and "sleep 1" in c for c in pve.commands)
    # the record is written first, so status reports the host as waiting and a later run after the reboot goes on
    assert pve.ran("Remember the reboot for this NVIDIA driver", "580.95.05 1111-aaaa")


def test_no_module_for_any_kernel_fails_with_the_builds_own_log_instead_of_rebooting(monkeypatch):
    missing = {"marker $(cat": ["installed", "boot 1111-aaaa", "marker"], "dkms status": {"success": False}, **UPTIME}
    run = run_role(gpu_driver.install, hw(), PLAN, responses=missing, data=REBOOT_DATA, base_responses=False,
                   monkeypatch=monkeypatch)
    assert run.failed and run.ran("Remember the reboot for this NVIDIA driver", "dkms status")
    assert run.ran("Remember the reboot for this NVIDIA driver", "build/make.log")
    assert not any("reboot" in c and "sleep 1" in c for c in run.commands)


def test_ubuntu_persistence_is_turned_on_for_real(monkeypatch):
    run = run_role(gpu_driver.install, hw(), PLAN, responses={**INSTALLED, **UPTIME}, data=REBOOT_DATA,
                   base_responses=False, monkeypatch=monkeypatch)
    dropin = run.uploads["/etc/systemd/system/nvidia-persistenced.service.d/r1fleet-persistence.conf"]
    assert dropin.splitlines()[1:] == ["[Service]", "ExecStart=", "ExecStart=/usr/bin/nvidia-persistenced --verbose"]
    assert run.ran("NVIDIA persistence daemon", "systemctl daemon-reload")


def test_a_kernel_older_than_the_amd_card_fails_the_host_with_the_hwe_fix(monkeypatch):
    plan = HostPlan(host="h1", model="r1-14b", backend="ollama", vendor="amd")
    unbound = {"ls /sys/bus/pci/drivers/amdgpu": "", re.compile(r"^uname -r$"): "6.8.0-79-generic",
               "predates the card": {"success": False}}
    run = run_role(gpu_driver.install, probed("amd-rx9070-ga-kernel"), plan, responses=unbound, base_responses=False,
                   monkeypatch=monkeypatch)
    assert run.failed and run.ran("Check that amdgpu drives the GPU", "linux-generic-hwe-24.04")
    assert run.ran("Check that amdgpu drives the GPU", "the kernel 6.8.0-79-generic predates the card")
    bound = {"ls /sys/bus/pci/drivers/amdgpu": ["0000:03:00.0", "bind", "unbind"]}
    ok = run_role(gpu_driver.install, probed("amd-rx9070-ga-kernel"), plan, responses=bound, base_responses=False,
                  monkeypatch=monkeypatch)
    assert not ok.failed and not ok.ran("Check that amdgpu drives the GPU", "predates the card")
