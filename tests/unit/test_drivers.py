"""The driver policy: Hardware + HostPlan -> DriverAction, for each platform path."""

from __future__ import annotations

import pytest

from r1fleet.plan.drivers import (
    compute_cap_tuple,
    decide_driver,
    driver_major,
    kernel_flavour,
    load_driver_data,
    min_driver_for,
)
from r1fleet.records import Gpu, Hardware, HostPlan, OsInfo, UnifiedMemory

UBUNTU_2404 = OsInfo(id="ubuntu", version_id="24.04", codename="noble", arch="x86_64", kernel="6.8.0-45-generic")
DEBIAN_12 = OsInfo(id="debian", version_id="12", codename="bookworm", arch="x86_64", kernel="6.1.0-26-amd64")
DEBIAN_13 = OsInfo(id="debian", version_id="13", codename="trixie", arch="x86_64", kernel="6.12.9-amd64")
FEDORA_42 = OsInfo(id="fedora", version_id="42", arch="x86_64", kernel="6.14.0-63.fc42.x86_64")


def nvidia(pci: str = "10de:2204", name: str = "NVIDIA GeForce RTX 3090", driver: str | None = None,
           cap: str | None = None, index: int = 0) -> Gpu:
    source = "nvidia-smi-query" if driver else "lspci"
    return Gpu(index=index, vendor="nvidia", name=name, memory_total_mib=24576, pci_id=pci,
               driver_version=driver, compute_cap=cap, source=source)


def host(os: OsInfo = UBUNTU_2404, gpus: list[Gpu] | None = None, **extra) -> Hardware:
    return Hardware(host="h1", os=os, ram_total_mib=65536, gpus=gpus or [], **extra)


def plan(backend: str | None = "ollama", caps: list[str] | None = None) -> HostPlan:
    return HostPlan(host="h1", model="r1-14b", backend=backend, compute_caps=caps or [])


def test_helpers_parse_versions_and_flavours():
    assert driver_major("535.183.01") == 535
    assert driver_major("[N/A]") is None
    assert compute_cap_tuple("8.6") == (8, 6)
    assert compute_cap_tuple("junk") is None
    assert kernel_flavour("6.8.0-45-generic") == "generic"
    assert kernel_flavour("6.8.0-1012-aws") == "aws"


def test_min_driver_depends_on_backend_and_compute_capability():
    data = load_driver_data()
    assert min_driver_for("ollama", [(8, 6)], data) == 550
    assert min_driver_for("ollama", [(6, 1)], data) == 570
    # llama.cpp runs the llama-server of the pinned Ollama archive (CUDA 12.8 runtime): the same floor
    assert min_driver_for("llama.cpp", [(8, 6)], data) == 550
    assert min_driver_for("llama.cpp", [(6, 1)], data) == 570


def test_ubuntu_fresh_host_installs_open_server_packages():
    action = decide_driver(host(gpus=[nvidia()]), plan())
    assert action.kind == "install"
    # DKMS builds against the running kernel's headers; the series' headers follow the next kernel (dkms only
    # Recommends them, and the role installs without Recommends)
    assert action.packages == ("nvidia-headless-580-server-open", "nvidia-utils-580-server",
                               "linux-headers-6.8.0-45-generic", "linux-headers-generic")
    assert action.open_modules and action.module_build == "dkms" and action.blacklist_nouveau


def test_ubuntu_pascal_card_gets_proprietary_legacy_branch():
    gtx1080 = nvidia(pci="10de:1b80", name="NVIDIA GeForce GTX 1080")
    action = decide_driver(host(gpus=[gtx1080]), plan())
    assert action.packages[:2] == ("nvidia-headless-580-server", "nvidia-utils-580-server")
    assert not action.open_modules
    assert action.min_driver == 550  # unknown compute cap from lspci: the default minimum


def test_old_driver_is_upgraded_and_right_driver_is_left_alone():
    old = decide_driver(host(gpus=[nvidia(driver="535.183.01", cap="8.6")]), plan())
    assert old.kind == "upgrade" and "535" in old.reason and "550" in old.reason
    right = decide_driver(host(gpus=[nvidia(driver="580.95.05", cap="8.6")]), plan())
    assert right.kind == "none" and not right.packages
    # 550 is enough for an Ampere card but not for Pascal under Ollama (needs 570)
    pascal = nvidia(pci="10de:1b80", driver="550.163.01", cap="6.1")
    assert decide_driver(host(gpus=[pascal]), plan()).kind == "upgrade"
    assert decide_driver(host(gpus=[nvidia(driver="550.163.01", cap="8.6")]), plan()).kind == "none"


def test_llama_cpp_backend_upgrades_a_535_driver_and_keeps_a_550():
    """The bundled CUDA 12.8 runtime does not start on 535: upgraded, like Ollama's."""
    assert decide_driver(host(gpus=[nvidia(driver="535.183.01", cap="8.6")]), plan("llama.cpp")).kind == "upgrade"
    assert decide_driver(host(gpus=[nvidia(driver="550.163.01", cap="8.6")]), plan("llama.cpp")).kind == "none"


def test_debian_12_with_ollama_uses_cuda_repo_because_distro_driver_is_535():
    action = decide_driver(host(DEBIAN_12, [nvidia()]), plan())
    assert action.kind == "install"
    assert action.repos == ("debian-nonfree", "nvidia-cuda")
    # NVIDIA's pinning package first: it locks the repository to branch 580 before the driver comes from it
    assert action.packages == ("nvidia-open-580", "linux-headers-6.1.0-26-amd64", "linux-headers-amd64")
    assert action.pin_package == "nvidia-driver-pinning-580"
    assert action.distro == "debian12"


def test_debian_13_uses_distro_open_dkms_and_nonfree_components():
    action = decide_driver(host(DEBIAN_13, [nvidia(cap="8.6")]), plan())
    assert action.repos == ("debian-nonfree",)
    assert "nvidia-open-kernel-dkms" in action.packages and "firmware-nvidia-gsp" in action.packages
    assert "linux-headers-6.12.9-amd64" in action.packages


def test_debian_testing_without_version_id_is_planned_like_the_newest_stable():
    forky = OsInfo(id="debian", version_id="", codename="forky", arch="x86_64", kernel="6.18.0-1-amd64")
    action = decide_driver(host(forky, [nvidia(pci="10de:2684", name="NVIDIA GeForce RTX 4090")]), plan())
    assert action.kind == "install" and action.repos == ("debian-nonfree",)
    assert "nvidia-open-kernel-dkms" in action.packages and "linux-headers-6.18.0-1-amd64" in action.packages
    unknown = OsInfo(id="debian", version_id="", codename="hamm", arch="x86_64")
    assert decide_driver(host(unknown, [nvidia()]), plan()).kind == "refuse"


def test_debian_13_blackwell_needs_cuda_repo():
    rtx5090 = nvidia(pci="10de:2b85", name="NVIDIA GeForce RTX 5090")
    action = decide_driver(host(DEBIAN_13, [rtx5090]), plan())
    assert "nvidia-cuda" in action.repos and action.open_modules
    assert "Blackwell" in action.notes[0]


def test_fedora_uses_rpmfusion_akmods():
    action = decide_driver(host(FEDORA_42, [nvidia()]), plan())
    assert action.family == "dnf" and action.repos == ("rpmfusion",)
    assert action.packages == ("akmod-nvidia", "xorg-x11-drv-nvidia-cuda")
    assert action.module_build == "akmods"
    legacy = decide_driver(host(FEDORA_42, [nvidia(pci="10de:1b80")]), plan())
    assert legacy.packages == ("akmod-nvidia-580xx", "xorg-x11-drv-nvidia-580xx-cuda")


def test_secure_boot_with_dkms_is_refused_with_mok_instructions():
    action = decide_driver(host(DEBIAN_13, [nvidia()], secure_boot=True), plan())
    assert action.kind == "refuse"
    assert "Secure Boot" in action.reason and "mokutil --import /var/lib/dkms/mok.pub" in action.fix
    fedora = decide_driver(host(FEDORA_42, [nvidia()], secure_boot=True), plan())
    assert "kmodgenca" in fedora.fix
    # once the key is enrolled, the install proceeds
    assert decide_driver(host(DEBIAN_13, [nvidia()], secure_boot=True), plan(), mok_enrolled=True).kind == "install"


def test_secure_boot_on_ubuntu_uses_signed_prebuilt_modules():
    action = decide_driver(host(gpus=[nvidia()], secure_boot=True), plan())
    assert action.kind == "install" and action.module_build == "prebuilt"
    assert "linux-modules-nvidia-580-server-open-generic" in action.packages
    assert "nvidia-headless-no-dkms-580-server-open" in action.packages


def test_jetson_and_dgx_are_never_touched():
    jetson = host(gpus=[nvidia(driver="540.4.0")], tegra_release="R36 (release), REVISION: 4.3")
    assert decide_driver(jetson, plan()).kind == "none"
    spark = host(gpus=[nvidia(driver="535.1", name="NVIDIA GB10")],
                 unified=UnifiedMemory(kind="gb10", name="GB10", total_mib=124000, gpu_limit_mib=120000))
    assert decide_driver(spark, plan()).kind == "none"


def test_unsupported_distro_and_compute_capability_are_refused():
    arch = host(OsInfo(id="arch", pretty_name="Arch Linux"), [nvidia()])
    refused = decide_driver(arch, plan())
    assert refused.kind == "refuse" and "Arch Linux" in refused.reason and "550" in refused.fix
    kepler = nvidia(pci="10de:1004", driver="470.256.02", cap="3.5")
    assert decide_driver(host(gpus=[kepler]), plan()).kind == "refuse"


def test_amd_supported_card_needs_nothing_unsupported_card_gets_a_way_out():
    rx7900 = Gpu(index=0, vendor="amd", name="Radeon RX 7900 XT", memory_total_mib=20464, source="rocm-smi")
    ok = decide_driver(host(gpus=[rx7900]), plan())
    assert ok.kind == "none" and not ok.notes
    rx6600 = Gpu(index=0, vendor="amd", name="Radeon RX 6600", memory_total_mib=8176, source="drm")
    warned = decide_driver(host(gpus=[rx6600]), plan())
    assert warned.kind == "none" and "gfx target is unknown" in warned.notes[0]


def test_amd_without_bound_driver_installs_kernel_module_and_the_rocm_sdk_only_for_a_source_build():
    unbound = Gpu(index=0, vendor="amd", name="Radeon RX 7900 XT", memory_total_mib=20464, pci_id="1002:744c",
                  source="lspci")
    # the llama-server of the Ollama archive brings its own ROCm libraries: no ROCm repository for it
    bundled = decide_driver(host(gpus=[unbound]), plan("llama.cpp"))
    assert bundled.kind == "install" and bundled.packages == ("linux-modules-extra-6.8.0-45-generic",)
    assert bundled.repos == ()
    # a HIP source build needs the SDK (hipcc), not the runtime
    action = decide_driver(host(gpus=[unbound]), plan("llama.cpp"), hip_sdk=True)
    assert action.packages == ("linux-modules-extra-6.8.0-45-generic", "rocm-hip-sdk")
    assert action.repos == ("rocm",)


def test_no_gpu_and_macos_need_nothing():
    assert decide_driver(host(), plan()).kind == "none"
    mac = Hardware(host="mac", os=OsInfo(system="Darwin", arch="arm64"), ram_total_mib=65536)
    assert decide_driver(mac, plan()).vendor == "apple"


@pytest.mark.parametrize("version", ["22.04", "24.04", "26.04"])
def test_each_supported_ubuntu_release_installs(version):
    os = OsInfo(id="ubuntu", version_id=version, kernel="6.8.0-45-generic")
    assert decide_driver(host(os, [nvidia()]), plan()).kind == "install"
    assert decide_driver(host(OsInfo(id="ubuntu", version_id="20.04"), [nvidia()]), plan()).kind == "refuse"
