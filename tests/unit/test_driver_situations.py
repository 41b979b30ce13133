"""The driver situations of real home labs (issue 25), each from a probe document through r1fleet's own parser,
planner and driver decision: nothing here is built by hand but the documents (tests/fixtures/probes/make_probes.py,
`driver_situations`, says what each one is)."""

from __future__ import annotations

from pathlib import Path

import pytest

from r1fleet.hardware import parse_probe
from r1fleet.hardware.driver import gfx_name, parse_driver_facts, parse_kfd
from r1fleet.plan.drivers import (
    debian_kernel_flavour,
    decide_driver,
    driver_family,
    kernel_rpm_newer_than_running,
    rocm_override,
    ubuntu_kernel_series,
)
from r1fleet.plan.planner import plan_host
from r1fleet.records import DriverFacts, Gpu, Hardware, HostPlan, OsInfo
from r1fleet.roles.gpu_driver.decide import reboot_policy, waiting_for_reboot
from r1fleet.status.readings import parse_status
from r1fleet.status.report import host_status

PROBES = Path(__file__).resolve().parents[1] / "fixtures" / "probes"


def probe(name: str) -> Hardware:
    return parse_probe((PROBES / f"{name}.probe").read_text(), name)


def decided(name: str, **kwargs):
    hw = probe(name)
    return hw, decide_driver(hw, plan_host(hw), **kwargs)


# ---------------------------------------------------------------- 2: a driver that only needs a reboot


def test_a_driver_library_mismatch_after_an_update_is_a_reboot_not_a_new_driver():
    hw, action = decided("nvml-mismatch-580")
    assert hw.driver.nvidia_smi_error.startswith("Failed to initialize NVML: Driver/library version mismatch")
    assert (hw.driver.nvidia_loaded, hw.driver.nvidia_module) == ("580.82.07", "580.95.05")
    assert action.kind == "reboot" and not action.packages and not action.repos
    assert "580.95.05 is installed but not loaded" in action.reason and "580.82.07 is still loaded" in action.reason


def test_a_mismatch_below_the_minimum_is_upgraded_within_the_hosts_own_family():
    hw = probe("nvml-mismatch-580")
    old = hw.model_copy(update={"driver": hw.driver.model_copy(update={
        "nvidia_module": "535.274.02", "libcuda_packages": ["libnvidia-compute-535"]})})
    action = decide_driver(old, plan_host(old))
    assert action.kind == "upgrade" and "driver 535 is below" in action.reason
    assert action.packages[0] == "nvidia-driver-580-open"     # Ubuntu's desktop series, never the server one
    assert not any("server" in package for package in action.packages)


def test_an_ubuntu_host_on_nvidias_cuda_repository_stays_there():
    hw = probe("nvml-mismatch-580")
    cuda = hw.model_copy(update={"driver": hw.driver.model_copy(update={
        "nvidia_module": "550.163.01", "libcuda_packages": ["libnvidia-compute-550"], "cuda_repo": True})})
    action = decide_driver(cuda, HostPlan(host="x", model="m", backend="ollama", compute_caps=["6.1"]))
    assert action.kind == "upgrade" and action.repos == ("nvidia-cuda",) and action.distro == "ubuntu2404"
    assert action.packages[0] == "nvidia-open-580" and action.pin_package == "nvidia-driver-pinning-580"


def test_a_desktop_driver_is_upgraded_within_ubuntus_desktop_series():
    hw, action = decided("desktop-driver-535-hwe")
    assert driver_family(hw.driver, "ubuntu") == "ubuntu-desktop"
    assert action.kind == "upgrade"
    # the headers of the running HWE kernel and of its series (generic-hwe-22.04, not the GA generic)
    assert action.packages == ("nvidia-driver-580-open", "linux-headers-6.8.0-45-generic",
                               "linux-headers-generic-hwe-22.04")
    assert "desktop series" in action.notes[0]


def test_a_run_installer_driver_is_refused_with_its_uninstaller():
    _, action = decided("run-installer-535")
    assert action.kind == "refuse" and ".run installer" in action.reason
    assert "nvidia-uninstall" in action.fix and ">= 550" in action.fix


def test_a_cuda_repository_driver_is_upgraded_in_the_cuda_repository():
    hw, action = decided("cuda-repo-550-pascal")
    assert driver_family(hw.driver, "debian") == "cuda-repo"
    assert action.kind == "upgrade" and "below ollama's minimum 570" in action.reason
    assert action.repos == ("debian-nonfree", "nvidia-cuda") and action.distro == "debian12"
    assert action.packages[0] == "cuda-drivers-580"   # Pascal: the proprietary flavour
    assert action.pin_package == "nvidia-driver-pinning-580"
    # on a Debian release whose own driver would do, the CUDA repository's host stays there
    trixie = hw.model_copy(update={"os": hw.os.model_copy(update={"version_id": "13", "codename": "trixie"}),
                                   "gpus": [g.model_copy(update={"driver_version": "535.1", "compute_cap": "8.6",
                                                                 "pci_id": "10de:2204"}) for g in hw.gpus]})
    kept = decide_driver(trixie, HostPlan(host="x", model="m", backend="ollama", compute_caps=["8.6"]))
    assert "nvidia-cuda" in kept.repos and "kept there" in kept.notes[0]


# ---------------------------------------------------------------- 1: Ubuntu, Secure Boot, HWE or older kernels


def test_secure_boot_on_an_hwe_kernel_gets_the_modules_of_the_running_abi_and_its_series():
    hw, action = decided("hwe-secureboot")
    assert action.kind == "install" and action.module_build == "prebuilt"
    assert "linux-modules-nvidia-580-server-open-6.8.0-45-generic" in action.packages
    assert "linux-modules-nvidia-580-server-open-generic-hwe-22.04" in action.packages
    assert "linux-modules-nvidia-580-server-open-generic" not in action.packages   # the GA (5.15) series


def test_secure_boot_on_a_kernel_without_signed_modules_asks_for_a_kernel_update():
    _, action = decided("old-kernel-secureboot")
    assert action.kind == "refuse"
    assert "linux-modules-nvidia-580-server-open-6.8.0-31-generic" in action.reason
    assert "update the kernel and reboot" in action.fix


@pytest.mark.parametrize("release, installed, series", [
    ("6.8.0-45-generic", ["linux-image-generic", "linux-image-generic-hwe-22.04", "linux-image-6.8.0-45-generic"],
     "generic-hwe-22.04"),
    ("5.15.0-122-generic", ["linux-image-generic", "linux-image-5.15.0-122-generic"], "generic"),
    ("6.8.0-1012-lowlatency", ["linux-image-lowlatency-hwe-22.04", "linux-image-generic"], "lowlatency-hwe-22.04"),
    ("6.8.0-45-generic", ["linux-image-virtual"], "generic"),
    ("6.8.0-45-generic", None, "generic"),   # an older probe: the uname flavour
])
def test_the_kernel_series_follows_the_installed_metapackage(release, installed, series):
    assert ubuntu_kernel_series(release, installed) == series


# ---------------------------------------------------------------- 3: kernel headers, Proxmox, passthrough


def test_proxmox_gets_proxmox_headers_and_defers_its_reboot():
    hw, action = decided("proxmox-host-gpu")
    assert hw.os.id == "debian" and action.kind == "install"
    assert "proxmox-headers-6.8.12-4-pve" in action.packages
    assert not any(p.startswith("linux-headers") for p in action.packages)
    assert reboot_policy(None, "pve", "192.168.1.5", hw.os.kernel)[0] == "defer"
    assert reboot_policy("auto", "pve", "192.168.1.5", hw.os.kernel)[0] == "auto"


def test_a_gpu_passed_through_to_a_vm_is_left_alone():
    hw, action = decided("proxmox-vfio")
    assert hw.gpus == [] and any("vfio-pci" in note for note in hw.notes)
    assert action.kind == "none"


def test_proxmox_without_its_running_kernels_headers_updates_to_the_default_kernel():
    hw = probe("proxmox-host-gpu")
    gone = hw.model_copy(update={"driver": hw.driver.model_copy(update={"apt_offers": []})})
    action = decide_driver(gone, plan_host(gone))
    assert action.packages[-2:] == ("proxmox-default-kernel", "proxmox-default-headers")
    assert "reboot starts it" in action.notes[-1]


def test_debian_on_a_kernel_whose_headers_left_the_mirror_updates_the_kernel():
    hw = probe("debian12-secureboot").model_copy(update={"secure_boot": False})
    offered = decide_driver(hw, plan_host(hw))
    assert offered.packages[-2:] == ("linux-headers-6.1.0-38-amd64", "linux-headers-amd64")
    gone = hw.model_copy(update={"driver": hw.driver.model_copy(update={"apt_offers": []})})
    action = decide_driver(gone, plan_host(gone))
    assert action.packages[-2:] == ("linux-image-amd64", "linux-headers-amd64")
    assert "6.1.0-38-amd64" in action.notes[-1]


@pytest.mark.parametrize("release, flavour", [
    ("6.1.0-38-amd64", "amd64"), ("6.12.43+deb13-amd64", "amd64"), ("6.12.43+deb13-cloud-amd64", "cloud-amd64"),
    ("6.1.0-38-rt-amd64", "rt-amd64"), ("6.12.9-arm64", "arm64"), ("garbage", "amd64"),
    ("6.18.44-fc-v1300", "amd64")])
def test_debian_kernel_flavour(release, flavour):
    assert debian_kernel_flavour(release, "x86_64") == flavour


def test_fedora_on_an_older_kernel_is_asked_to_update_and_reboot_instead_of_waiting():
    fedora = OsInfo(id="fedora", version_id="42", arch="x86_64", kernel="6.14.0-63.fc42.x86_64")
    gpu = Gpu(index=0, vendor="nvidia", name="NVIDIA GeForce RTX 3090", memory_total_mib=24576, pci_id="10de:2204",
              source="lspci")
    facts = parse_driver_facts({"kernel-packages": ["rpm", "kernel-core-6.14.0-63.fc42.x86_64",
                                                     "kernel-core-6.15.9-201.fc42.x86_64"]})
    hw = Hardware(host="f", os=fedora, ram_total_mib=65536, gpus=[gpu], driver=facts)
    action = decide_driver(hw, HostPlan(host="f", model="m", backend="ollama"))
    assert action.kind == "refuse" and "6.15.9-201.fc42.x86_64" in action.reason and "dnf update -y && reboot" in action.fix
    newest = hw.model_copy(update={"os": fedora.model_copy(update={"kernel": "6.15.9-201.fc42.x86_64"})})
    assert decide_driver(newest, HostPlan(host="f", model="m", backend="ollama")).kind == "install"
    assert kernel_rpm_newer_than_running("6.15.9-201.fc42.x86_64", None) is None


# ---------------------------------------------------------------- 4: Secure Boot MOK steps per Debian release


def test_debian_12_secure_boot_prints_steps_that_make_the_key_with_openssl():
    hw, action = decided("debian12-secureboot")
    assert action.kind == "refuse"
    assert "openssl req -new -x509" in action.fix and "-out /var/lib/dkms/mok.pub" in action.fix
    assert "generate_mok" not in action.fix   # bookworm's dkms 3.0.10 has no such command
    trixie = hw.model_copy(update={"os": hw.os.model_copy(update={"version_id": "13", "codename": "trixie"})})
    later = decide_driver(trixie, plan_host(trixie))
    assert "dkms generate_mok" in later.fix and "openssl" not in later.fix


# ---------------------------------------------------------------- 5: unknown NVIDIA cards


def test_an_nvidia_card_missing_from_the_table_still_gets_its_driver():
    hw, action = decided("unknown-nvidia-card")
    [gpu] = hw.gpus
    assert gpu.pci_id == "10de:2232" and gpu.memory_total_mib == 0 and gpu.name == "NVIDIA GA102GL [RTX A4500]"
    assert action.kind == "install" and action.open_modules   # 0x2232 is Ampere: open modules
    assert plan_host(hw).placement != "gpu"   # planned without it until the driver reports its memory


@pytest.mark.parametrize("pci, model", [("10de:21c4", "GTX 1660 SUPER"), ("10de:15f8", "P100"),
                                        ("10de:2531", "RTX A2000"), ("10de:27b0", "RTX 4000 SFF Ada")])
def test_the_tables_home_lab_gaps_are_filled(pci, model):
    text = (PROBES / "unknown-nvidia-card.probe").read_text().replace("10de:2232", pci)
    [gpu] = parse_probe(text, "h").gpus
    assert model in gpu.name and gpu.memory_total_mib > 0


# ---------------------------------------------------------------- 6: AMD targets of the pinned build


def test_amd_cards_outside_the_rocm_build_are_named_with_what_to_do():
    hw, action = decided("amd-rx5700xt")
    assert hw.gpus[0].gfx_target == "gfx1010"
    assert "gfx1010" in action.notes[0] and "mesa-vulkan-drivers" in action.notes[0]
    hw, action = decided("amd-mi50")
    assert hw.gpus[0].gfx_target == "gfx906" and "runs on the CPU" in action.notes[0]


def test_a_supported_rdna4_card_gets_no_warning():
    hw, action = decided("amd-r9700")
    assert hw.gpus[0].gfx_target == "gfx1201" and action.kind == "none" and action.notes == ()


def test_a_card_the_kernel_does_not_drive_gets_the_module_packages():
    hw, action = decided("amd-rx9070-ga-kernel")
    assert hw.gpus[0].source == "lspci" and hw.gpus[0].gfx_target == "gfx1201"
    assert action.kind == "install" and action.packages == ("linux-modules-extra-6.8.0-79-generic",)


def test_gfx_names_and_overrides():
    assert [gfx_name(v) for v in (110000, 90010, 100100, 90006, 120001, 0)] == \
        ["gfx1100", "gfx90a", "gfx1010", "gfx906", "gfx1201", None]
    assert rocm_override("gfx1031", ["gfx1030", "gfx1100"]) == "10.3.0"
    assert rocm_override("gfx1010", ["gfx1030", "gfx1100"]) is None
    assert parse_kfd(["node 1", "gfx_target_version 110000", "vendor_id 4098", "device_id 29772",
                      "location_id 768", "domain 0"])[0].slot == "0000:03:00.0"


# ---------------------------------------------------------------- 7: reboots


def test_the_machine_r1fleet_runs_from_is_never_rebooted():
    assert reboot_policy("auto", "@local", None, "6.8.0-45-generic")[0] == "defer"
    assert reboot_policy("auto", "box", "127.0.0.1", "6.8.0-45-generic")[0] == "defer"
    assert reboot_policy(None, "box", "192.168.1.9", "6.8.0-45-generic")[0] == "auto"
    assert reboot_policy("defer", "box", "192.168.1.9", "6.8.0-45-generic")[0] == "defer"


def test_a_host_waits_for_its_reboot_only_in_the_boot_r1fleet_recorded_it():
    assert waiting_for_reboot("580.95.05 1111-aaaa", "1111-aaaa") == "580.95.05"
    assert waiting_for_reboot("580.95.05 1111-aaaa", "2222-bbbb") is None
    assert waiting_for_reboot(None, "1111-aaaa") is None


def test_driver_sections_read_totally():
    facts = parse_driver_facts({"nvidia-modinfo": ["not a version"], "nvidia-proc": ["NVRM version: garbage"],
                                "libcuda-owner": ["$(rm -rf /): /x"], "kernel-packages": ["linux-image-generic"],
                                "apt-kernel": ["kernel 6.8", "BAD NAME"], "driver-reboot": ["580.95.05 `id`"]})
    assert facts == DriverFacts(apt_offers=[])


def test_status_reports_a_host_waiting_for_its_reboot():
    text = (PROBES / "nvml-mismatch-580.probe").read_text()
    boot = "5f0c2a61-8d3e-4b9a-a7c4-2e6f1d0b9a31"
    waiting = text.replace(f"#### r1fleet:driver-reboot\nboot {boot}",
                           f"#### r1fleet:driver-reboot\n580.95.05 {boot}\nboot {boot}")
    assert waiting != text
    hw = parse_probe(waiting, "box")
    status = host_status("box", parse_status(waiting, "box"), plan_host(hw), hardware=hw)
    assert status.state == "waiting for reboot" and not status.healthy
    assert "580.95.05" in status.reason and "reboot box" in status.reason
    # the reboot happened (another boot id): no longer waiting, whatever the service says
    rebooted = parse_probe(text.replace(f"boot {boot}", f"580.95.05 {boot}\nboot 0000aaaa-1111"), "box")
    assert host_status("box", parse_status(text, "box"), plan_host(rebooted), hardware=rebooted).state != "waiting for reboot"
