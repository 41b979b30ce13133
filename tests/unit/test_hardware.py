"""hardware.parse_probe and the GPU table against real command outputs (tests/fixtures/).

Expected values are read off the fixture files by hand, not computed by the parser.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from r1fleet.errors import ProbeError
from r1fleet.hardware.gpu_table import gpu_table, lookup_gpu, normalize_name
from r1fleet.hardware import parse_nvidia_query, parse_probe, split_sections

FIXTURES = Path(__file__).parents[1] / "fixtures"
PROBES = FIXTURES / "probes"
MIB = 1024 * 1024


def fixture(name: str) -> str:
    """A fixture's content without its `#` source header lines."""
    lines = (FIXTURES / name).read_text(encoding="utf-8").splitlines()
    return "\n".join(line for line in lines if not line.startswith("#"))


def doc(**sections: str) -> str:
    """A probe document: the given sections plus a real 16 GB /proc/meminfo unless one is given."""
    sections.setdefault("meminfo", fixture("proc-meminfo-desktop-16gb-gtx1080ti.txt"))
    parts = []
    for name, body in sections.items():
        parts.append(f"#### r1fleet:{name.replace('_', '-') if name != 'system_profiler' else name}")
        parts.append(body)
    return "\n".join(parts) + "\n"


# --- NVIDIA: query CSV -------------------------------------------------------------------------

QUERY_CASES = [
    # file, name, total, used, free, bus, driver, compute cap, MIG (from the matching table)
    ("linux-x86_64__nvidia-geforce-rtx-2080-super__595.71.05", "NVIDIA GeForce RTX 2080 SUPER", 8192, 214, 7571, "0000:0c:00.0", "595.71.05", "7.5", False),
    ("linux-x86_64__nvidia-geforce-rtx-2080-super__610.57.04", "NVIDIA GeForce RTX 2080 SUPER", 8192, 211, 7582, "0000:0c:00.0", "610.57.04", "7.5", False),
    ("linux-x86_64__nvidia-geforce-rtx-4080-super__595.71.05", "NVIDIA GeForce RTX 4080 SUPER", 16376, 596, 15348, "0000:01:00.0", "595.71.05", "8.9", False),
    ("linux-x86_64__nvidia-h100-80gb-hbm3__590.48.01", "NVIDIA H100 80GB HBM3", 81559, 0, 81081, "0000:00:09.0", "590.48.01", "9.0", False),
    ("linux-x86_64__nvidia-h100-mig__590.48.01", "NVIDIA H100 80GB HBM3", 81559, 59, 81022, "0000:00:09.0", "590.48.01", "9.0", True),
    ("linux-x86_64__nvidia-h200__590.48.01", "NVIDIA H200", 143771, 0, 143158, "0000:83:00.0", "590.48.01", "9.0", False),
    ("linux-x86_64__nvidia-h200-mig__590.48.01", "NVIDIA H200", 143771, 55, 143103, "0000:83:00.0", "590.48.01", "9.0", True),
    ("linux-x86_64__nvidia-l40s__595.80", "NVIDIA L40S", 46068, 0, 45460, "0000:01:00.0", "595.80", "8.9", False),
    ("windows-x86_64__nvidia-geforce-rtx-2080-super__591.86", "NVIDIA GeForce RTX 2080 SUPER", 8192, 702, 7286, "0000:0c:00.0", "591.86", "7.5", False),
    ("windows-x86_64__nvidia-geforce-rtx-2080-super__610.62", "NVIDIA GeForce RTX 2080 SUPER", 8192, 797, 7191, "0000:0c:00.0", "610.62", "7.5", False),
]


@pytest.mark.parametrize("capture,name,total,used,free,bus,driver,cc,mig", QUERY_CASES)
def test_nvidia_query_capture(capture, name, total, used, free, bus, driver, cc, mig):
    text = doc(**{
        "nvidia-smi-query": fixture(f"nvidia-smi-query__{capture}.csv"),
        "nvidia-smi": fixture(f"nvidia-smi-table__{capture}.txt"),
    })
    hw = parse_probe(text, "gpu-box")
    assert len(hw.gpus) == 1
    gpu = hw.gpus[0]
    assert (gpu.name, gpu.memory_total_mib, gpu.memory_used_mib, gpu.memory_free_mib) == (name, total, used, free)
    assert (gpu.bus_id, gpu.driver_version, gpu.compute_cap, gpu.mig) == (bus, driver, cc, mig)
    assert gpu.source == "nvidia-smi-query" and gpu.vendor == "nvidia"
    assert gpu.uuid == "GPU-00000000-0000-0000-0000-000000000000"
    assert gpu.bandwidth_gbps is not None


def test_query_without_compute_cap_column_uses_the_table_value():
    # Drivers <= 470 reject compute_cap, so probe.sh retries with 8 columns.
    line = "0, GeForce GTX 1070, 8114, 1917, 6197, 00000000:24:00.0, GPU-1b2c3d4e-0000-0000-0000-000000000001, 470.239.06"
    hw = parse_probe(doc(**{"nvidia-smi-query": line}), "pascal")
    assert hw.gpus[0].compute_cap == "6.1"
    assert hw.gpus[0].memory_total_mib == 8114


def test_unsupported_fields_are_missing_not_numbers():
    # "[N/A]" on new drivers, "[Not Supported]" on old ones (fixture nvidia-smi-query-unsupported-na.csv).
    line = "0, NVIDIA GeForce GT 710, [N/A], [Not Supported], [N/A], 00000000:01:00.0, GPU-x, 470.82.01, [N/A]"
    rows = parse_nvidia_query([line])
    assert rows[0].memory_total_mib is None and rows[0].memory_used_mib is None and rows[0].compute_cap is None
    assert "[N/A]" in fixture("nvidia-smi-query-unsupported-na.csv")


# --- NVIDIA: plain table fallback --------------------------------------------------------------

TABLE_CASES = [
    # file, name as printed, used, total, bus, driver, MIG, processes
    ("nvidia-smi-table-gtx1070-396-legacy.txt", "GeForce GTX 1070", 1917, 8114, "0000:24:00.0", "396.24", False, 0),
    ("nvidia-smi-table-rtx3060-12gb.txt", "NVIDIA GeForce RTX 3060", 1, 12288, "0001:01:00.0", "580.95.05", False, 0),
    ("nvidia-smi-table-rtx3090-580.txt", "NVIDIA GeForce RTX 3090", 15005, 24576, "0000:07:00.0", "580.142", False, 0),
    ("nvidia-smi-table__linux-x86_64__nvidia-geforce-rtx-2080-super__595.71.05.txt", "NVIDIA GeForce RTX 2080 ...", 214, 8192, "0000:0c:00.0", "595.71.05", False, 2),
    ("nvidia-smi-table__linux-x86_64__nvidia-geforce-rtx-2080-super__610.57.04.txt", "NVIDIA GeForce RTX 2080 ...", 211, 8192, "0000:0c:00.0", "610.57.04", False, 2),
    ("nvidia-smi-table__linux-x86_64__nvidia-geforce-rtx-4080-super__595.71.05.txt", "NVIDIA GeForce RTX 4080 ...", 596, 16376, "0000:01:00.0", "595.71.05", False, 5),
    ("nvidia-smi-table__linux-x86_64__nvidia-h100-80gb-hbm3__590.48.01.txt", "NVIDIA H100 80GB HBM3", 0, 81559, "0000:00:09.0", "590.48.01", False, 0),
    ("nvidia-smi-table__linux-x86_64__nvidia-h100-mig__590.48.01.txt", "NVIDIA H100 80GB HBM3", 59, 81559, "0000:00:09.0", "590.48.01", True, 0),
    ("nvidia-smi-table__linux-x86_64__nvidia-h200__590.48.01.txt", "NVIDIA H200", 0, 143771, "0000:83:00.0", "590.48.01", False, 0),
    ("nvidia-smi-table__linux-x86_64__nvidia-h200-mig__590.48.01.txt", "NVIDIA H200", 55, 143771, "0000:83:00.0", "590.48.01", True, 0),
    ("nvidia-smi-table__linux-x86_64__nvidia-l40s__595.80.txt", "NVIDIA L40S", 0, 46068, "0000:01:00.0", "595.80", False, 0),
    # Windows: WDDM mode column; per-process memory is N/A, so no process carries a size.
    ("nvidia-smi-table__windows-x86_64__nvidia-geforce-rtx-2080-super__591.86.txt", "NVIDIA GeForce RTX 2080 ...", 702, 8192, "0000:0c:00.0", "591.86", False, 0),
    ("nvidia-smi-table__windows-x86_64__nvidia-geforce-rtx-2080-super__610.62.txt", "NVIDIA GeForce RTX 2080 ...", 797, 8192, "0000:0c:00.0", "610.62", False, 0),
]


@pytest.mark.parametrize("capture,name,used,total,bus,driver,mig,processes", TABLE_CASES)
def test_nvidia_table_capture(capture, name, used, total, bus, driver, mig, processes):
    hw = parse_probe(doc(**{"nvidia-smi-query": "", "nvidia-smi": fixture(capture)}), "gpu-box")
    assert len(hw.gpus) == 1
    gpu = hw.gpus[0]
    assert (gpu.name, gpu.memory_used_mib, gpu.memory_total_mib, gpu.memory_free_mib) == (name, used, total, total - used)
    assert (gpu.bus_id, gpu.driver_version, gpu.mig, gpu.source) == (bus, driver, mig, "nvidia-smi")
    assert len(gpu.processes) == processes


def test_table_processes_keep_nvidia_smi_names():
    text = fixture("nvidia-smi-table__linux-x86_64__nvidia-geforce-rtx-2080-super__595.71.05.txt")
    gpu = parse_probe(doc(nvidia_smi=text), "desk").gpus[0]
    assert [(p.pid, p.name, p.used_mib) for p in gpu.processes] == [(1696, "/usr/bin/gnome-shell", 176), (4584, "/usr/bin/Xwayland", 3)]


def test_truncated_table_name_is_restored_from_the_pci_id():
    text = doc(**{
        "nvidia-smi": fixture("nvidia-smi-table__linux-x86_64__nvidia-geforce-rtx-2080-super__610.57.04.txt"),
        "lspci": "0c:00.0 VGA compatible controller [0300]: NVIDIA Corporation TU104 [GeForce RTX 2080 SUPER] [10de:1e81] (rev a1)\n"
                 "0c:00.1 Audio device [0403]: NVIDIA Corporation TU104 HD Audio Controller [10de:10f8] (rev a1)",
    })
    gpu = parse_probe(text, "desk").gpus[0]
    assert gpu.name == "NVIDIA GeForce RTX 2080 SUPER"
    assert gpu.pci_id == "10de:1e81"
    assert gpu.bandwidth_gbps == 496
    assert gpu.driver_version == "610.57.04"  # the 610 branch says "KMD Version"


def test_compute_apps_attach_to_their_gpu_by_uuid():
    query = ("0, NVIDIA GeForce RTX 3090, 24576, 22000, 2310, 00000000:01:00.0, GPU-aaaa, 570.172.08, 8.6\n"
             "1, NVIDIA GeForce RTX 3090, 24576, 1, 24309, 00000000:08:00.0, GPU-bbbb, 570.172.08, 8.6")
    apps = "GPU-aaaa, 4242, /usr/bin/llama-server, 21980"
    hw = parse_probe(doc(**{"nvidia-smi-query": query, "nvidia-smi-apps": apps}), "dual")
    assert [(p.pid, p.name, p.used_mib) for p in hw.gpus[0].processes] == [(4242, "/usr/bin/llama-server", 21980)]
    assert hw.gpus[1].processes == []


# --- GPUs before any driver: lspci -------------------------------------------------------------

def test_lspci_machine_readable_gtx1080ti_with_intel_gpus():
    hw = parse_probe(doc(lspci=fixture("lspci-vmmnD-gtx1080ti-arc-igpu.txt")), "fresh")
    assert [(g.name, g.memory_total_mib, g.pci_id, g.bus_id, g.source) for g in hw.gpus] == [
        ("NVIDIA GeForce GTX 1080 Ti", 11264, "10de:1b06", "0000:01:00.0", "lspci")]
    assert hw.gpus[0].compute_cap == "6.1"
    assert sum("Intel GPU" in n for n in hw.notes) == 2  # the iGPU 8086:0162 and the Arc 8086:56a2


def test_lspci_machine_readable_laptop_rtx4050():
    hw = parse_probe(doc(lspci=fixture("lspci-vmmnD-rtx4050laptop-igpu.txt")), "laptop")
    assert [(g.name, g.memory_total_mib) for g in hw.gpus] == [("NVIDIA GeForce RTX 4050 Laptop GPU", 6144)]


def test_lspci_skips_audio_and_bmc_vga():
    text = doc(lspci="\n".join([
        "03:00.0 VGA compatible controller [0300]: ASPEED Technology, Inc. ASPEED Graphics Family [1a03:2000] (rev 52)",
        "00:02.0 VGA compatible controller [0300]: Red Hat, Inc. QXL paravirtual graphic card [1b36:0100] (rev 05)",
        "00:0f.0 VGA compatible controller [0300]: VMware SVGA II Adapter [15ad:0405]",
        "41:00.0 3D controller [0302]: NVIDIA Corporation GA100 [A100 PCIe 40GB] [10de:20f1] (rev a1)",
        "42:00.1 Audio device [0403]: NVIDIA Corporation GA102 High Definition Audio Controller [10de:1aef] (rev a1)",
    ]))
    hw = parse_probe(text, "server")
    assert [(g.name, g.memory_total_mib, g.bus_id) for g in hw.gpus] == [("NVIDIA A100-PCIE-40GB", 40960, "0000:41:00.0")]


def test_lspci_ambiguous_amd_id_plans_the_smallest_card():
    line = "03:00.0 VGA compatible controller [0300]: Advanced Micro Devices, Inc. [AMD/ATI] Navi 31 [Radeon RX 7900 XT/7900 XTX/7900 GRE/7900M] [1002:744c] (rev c8)"
    hw = parse_probe(doc(lspci=line), "fresh-amd")
    assert [(g.vendor, g.name, g.memory_total_mib) for g in hw.gpus] == [("amd", "AMD Radeon RX 7900 GRE", 16384)]
    assert any("probe again" in n for n in hw.notes)


def test_lspci_unknown_nvidia_device_is_kept_for_its_driver_not_sized():
    line = "01:00.0 VGA compatible controller [0300]: NVIDIA Corporation Device [10de:ffff] (rev a1)"
    hw = parse_probe(doc(lspci=line), "new")
    # it gets the NVIDIA driver (issue 25); no memory is guessed, so nothing is planned on it yet
    assert [(g.pci_id, g.memory_total_mib, g.compute_cap) for g in hw.gpus] == [("10de:ffff", 0, None)]
    assert any("10de:ffff" in n and "probe again" in n for n in hw.notes)


# --- AMD ---------------------------------------------------------------------------------------

def test_rocm_smi_json_rx7900xt():
    hw = parse_probe(doc(**{"rocm-smi": fixture("rocm-smi-showmeminfo-vram-json-rx7900xt.json")}), "radeon")
    assert len(hw.gpus) == 1
    gpu = hw.gpus[0]
    # 21458059264 B and 27856896 B in the fixture
    assert (gpu.vendor, gpu.name, gpu.memory_total_mib, gpu.memory_used_mib) == ("amd", "Radeon RX 7900 XT", 20464, 26)
    assert gpu.pci_id == "1002:744c"
    assert gpu.bandwidth_gbps == 800  # the 20 GB card of the three sharing 744c
    assert gpu.source == "rocm-smi"


def test_drm_sysfs_with_rocm_names():
    drm = ("card0 slot=0000:03:00.0 vendor=0x1002 device=0x744c class=0x030000 "
           "mem_info_vram_total=21458059264 mem_info_vram_used=27856896 mem_info_gtt_total=33554432000")
    hw = parse_probe(doc(drm=drm, **{"rocm-smi": fixture("rocm-smi-showmeminfo-vram-json-rx7900xt.json")}), "radeon")
    assert [(g.name, g.memory_total_mib, g.memory_free_mib, g.source) for g in hw.gpus] == [
        ("Radeon RX 7900 XT", 20464, 20438, "drm")]


def test_amd_smi_static_json_both_shapes():
    # Shape per ROCm/amdsmi amdsmi_commands.py (see amd-smi fixture note); asic block as in the RX 7800 XT capture.
    gpu = {"gpu": 0, "asic": {"market_name": "AMD Radeon RX 7800 XT", "vendor_id": "0x1002", "device_id": "0x747e"},
           "bus": {"bdf": "0000:03:00.0"}, "vram": {"type": "GDDR6", "size": {"value": 16368, "unit": "MB"}}}
    for payload in ({"gpu_data": [gpu]}, [gpu]):
        hw = parse_probe(doc(**{"rocm-smi": json.dumps(payload)}), "amd")
        assert [(g.name, g.memory_total_mib, g.pci_id, g.bandwidth_gbps) for g in hw.gpus] == [
            ("AMD Radeon RX 7800 XT", 16368, "1002:747e", 624)]


def test_amdgpu_without_rocm_discrete_from_sysfs():
    # dmesg-amdgpu-vram-gtt.txt, source A: "8144M of VRAM memory ready", "4031M of GTT memory ready" (RX 9060 XT)
    drm = f"card0 slot=0000:03:00.0 vendor=0x1002 device=0x7590 class=0x030000 mem_info_vram_total={8144 * MIB} mem_info_gtt_total={4031 * MIB}"
    hw = parse_probe(doc(drm=drm), "amd")
    assert [(g.vendor, g.memory_total_mib, g.source) for g in hw.gpus] == [("amd", 8144, "drm")]


def test_apu_with_small_carve_out_is_not_a_gpu():
    # dmesg-amdgpu-vram-gtt.txt, source B: Ryzen 5900HS iGPU, 512M VRAM carve-out, 7695M GTT
    drm = f"card0 slot=0000:04:00.0 vendor=0x1002 device=0x1638 class=0x030000 mem_info_vram_total={512 * MIB} mem_info_gtt_total={7695 * MIB}"
    hw = parse_probe(doc(drm=drm), "laptop")
    assert hw.gpus == [] and hw.unified is None
    assert any("integrated" in n for n in hw.notes)


def test_strix_halo_gtt_is_the_gpu_limit():
    # strix-halo-sysfs-gtt-ttm.txt: mem_info_gtt_total 103079215104 (96 GiB), mem_info_vram_total 4294967296 (4 GiB)
    drm = "card1 slot=0000:c5:00.0 vendor=0x1002 device=0x1586 class=0x030000 mem_info_vram_total=4294967296 mem_info_gtt_total=103079215104"
    meminfo = "MemTotal:       131528192 kB\nMemAvailable:   126877696 kB"
    hw = parse_probe(doc(drm=drm, meminfo=meminfo), "halo")
    assert hw.gpus == []
    assert hw.unified is not None
    assert (hw.unified.kind, hw.unified.gpu_limit_mib, hw.unified.bandwidth_gbps) == ("amd-apu", 98304, 256)
    assert (hw.unified.total_mib, hw.unified.available_mib) == (128445, 123904)


def test_unified_limit_never_exceeds_ram():
    drm = "card1 slot=0000:c5:00.0 vendor=0x1002 device=0x1586 mem_info_vram_total=536870912 mem_info_gtt_total=103079215104"
    hw = parse_probe(doc(drm=drm), "small-halo")  # 16 GB of RAM in the document
    assert hw.unified.gpu_limit_mib == 15880


# --- Apple Silicon -----------------------------------------------------------------------------

def apple_doc(memsize: int, brand: str, wired: int | None = 0, profiler: str = "") -> str:
    sysctl = f"hw.memsize: {memsize}\nhw.model: Mac14,13\nmachdep.cpu.brand_string: {brand}"
    if wired is not None:
        sysctl += f"\niogpu.wired_limit_mb: {wired}"
    return f"#### r1fleet:uname\nDarwin 24.6.0 arm64\n#### r1fleet:meminfo\n#### r1fleet:cpu\n8\n#### r1fleet:sysctl\n{sysctl}\n" \
           f"#### r1fleet:system_profiler\n{profiler}\n"


def test_apple_m1_16gb_from_sysctl_fixture():
    text = fixture("macos-sysctl-cpu-mem.txt")
    assert "machdep.cpu.brand_string: Apple M1" in text and "17179869184" in text
    hw = parse_probe(apple_doc(17179869184, "Apple M1"), "mbp")
    assert hw.gpus == [] and hw.ram_total_mib == 16384 and hw.cpu_name == "Apple M1"
    # Metal's recommendedMaxWorkingSetSize on a 16 GB M1: 10922.67 MB
    assert (hw.unified.kind, hw.unified.total_mib, hw.unified.gpu_limit_mib, hw.unified.bandwidth_gbps) == ("apple", 16384, 10922, 68.25)


@pytest.mark.parametrize("gib,limit", [(32, 21845), (96, 73728)])  # 21845.34 MB and 73728.00 MB in the Metal samples
def test_apple_default_working_set(gib, limit):
    hw = parse_probe(apple_doc(gib * 1024 * MIB, "Apple M2 Max"), "mac")
    assert hw.unified.gpu_limit_mib == limit


def test_apple_wired_limit_overrides_the_default():
    assert "iogpu.wired_limit_mb: 26000 -> 26000" in fixture("macos-sysctl-iogpu-wired_limit_mb.txt")
    hw = parse_probe(apple_doc(32 * 1024 * MIB, "Apple M1 Max", wired=26000), "mac")
    assert (hw.unified.gpu_limit_mib, hw.unified.bandwidth_gbps) == (26000, 400)


def test_apple_early_big_sur_brand_string():
    profiler = fixture("macos-system_profiler-SPDisplaysDataType-m1-bigsur.json")  # an excerpt: not valid JSON
    hw = parse_probe(apple_doc(8 * 1024 * MIB, "Apple processor", wired=None, profiler=profiler), "old-mac")
    assert (hw.unified.kind, hw.unified.name, hw.unified.gpu_limit_mib) == ("apple", "Apple processor", 5461)


# --- Linux unified memory ----------------------------------------------------------------------

def test_gb10_uses_meminfo_never_nvml():
    meminfo = "MemTotal:       127601256 kB\nMemFree:        100000000 kB\nMemAvailable:   118523412 kB"
    query = "0, NVIDIA GB10, [N/A], [N/A], [N/A], 0000000F:01:00.0, GPU-1234, 580.95.05, 12.1"
    hw = parse_probe(doc(meminfo=meminfo, **{"nvidia-smi-query": query}), "spark")
    assert hw.gpus == []
    assert (hw.unified.kind, hw.unified.total_mib, hw.unified.available_mib, hw.unified.bandwidth_gbps) == ("gb10", 124610, 115745, 273)
    assert any("12.1" in n and "580.95.05" in n for n in hw.notes)


def test_jetson_from_tegra_release_and_board_name():
    tegra = ("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: Wed Jan  8 01:49:37 UTC 2025\n"
             "NVIDIA Jetson AGX Orin Developer Kit")
    meminfo = "MemTotal:       64335836 kB\nMemAvailable:   60123456 kB"
    hw = parse_probe(doc(meminfo=meminfo, tegra=tegra), "orin")
    assert hw.gpus == []
    assert (hw.unified.kind, hw.unified.total_mib, hw.unified.bandwidth_gbps) == ("jetson", 62827, 204.8)
    assert hw.tegra_release.startswith("# R36")


# --- CPU-only, disk, secure boot ---------------------------------------------------------------

def test_cpu_only_host():
    cpu = "4\nmodel name\t: Intel(R) Core(TM) i5-3570K CPU @ 3.40GHz\nflags\t\t: fpu sse sse2 avx avx2 fma"
    df = "Filesystem     1024-blocks     Used Available Capacity Mounted on\n/dev/vda         264212084 23129028  83261884      22% /"
    hw = parse_probe(doc(cpu=cpu, df=df, secureboot="SecureBoot enabled"), "cpu")
    assert (hw.ram_total_mib, hw.ram_available_mib) == (15880, 14414)  # 16262132 kB, 14760924 kB
    assert (hw.cpu_count, hw.avx2, hw.avx512, hw.disk_free_mib, hw.secure_boot) == (4, True, False, 81310, True)
    assert hw.gpus == [] and hw.unified is None


# --- bad documents -----------------------------------------------------------------------------

def test_not_a_probe_document():
    with pytest.raises(ProbeError) as err:
        parse_probe("Permission denied (publickey).\n", "gpu-box-1")
    message = str(err.value)
    assert "gpu-box-1" in message and "probe document" in message and "r1fleet probe gpu-box-1" in message


def test_garbled_meminfo():
    with pytest.raises(ProbeError) as err:
        parse_probe("#### r1fleet:uname\nLinux 6.1 x86_64\n#### r1fleet:meminfo\nMemTotal: lots\n", "box")
    assert "host box" in str(err.value) and "field meminfo" in str(err.value) and "r1fleet probe box" in str(err.value)


def test_no_memory_at_all():
    with pytest.raises(ProbeError, match="meminfo"):
        parse_probe("#### r1fleet:uname\nLinux 6.1 x86_64\n#### r1fleet:meminfo\n", "box")


def test_garbage_in_gpu_sections_is_ignored_not_a_traceback():
    text = doc(**{"nvidia-smi-query": "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.",
                  "nvidia-smi": "Failed to initialize NVML: Driver/library version mismatch",
                  "rocm-smi": "{not json", "drm": "card0 vendor=zz", "lspci": "garbage"})
    assert parse_probe(text, "broken").gpus == []


def test_sections_keep_their_raw_lines():
    sections = split_sections("preamble\n#### r1fleet:a\nx\n\n#### r1fleet:b\n", "h")
    assert sections == {"a": ["x"], "b": []}


# --- the example probe documents ---------------------------------------------------------------

EXAMPLES = {
    # name: (GPUs as (name, total MiB, used MiB), unified (kind, gpu limit MiB) or None, RAM MiB)
    "rtx3060-12g": ([("NVIDIA GeForce RTX 3060", 12288, 1)], None, 32023),
    "rtx4090": ([("NVIDIA GeForce RTX 4090", 24564, 2)], None, 64042),
    "busy-4090": ([("NVIDIA GeForce RTX 4090", 24564, 6446)], None, 64042),
    "rerun-4090": ([("NVIDIA GeForce RTX 4090", 24564, 22830)], None, 64042),
    "dual-rtx3090": ([("NVIDIA GeForce RTX 3090", 24576, 1)] * 2, None, 128751),
    "mixed-3090-3060": ([("NVIDIA GeForce RTX 3090", 24576, 1), ("NVIDIA GeForce RTX 3060", 12288, 1)], None, 64234),
    "old-driver-535": ([("NVIDIA GeForce GTX 1080 Ti", 11264, 2)], None, 15880),
    "h200": ([("NVIDIA H200", 143771, 0)], None, 257866),
    "gpu-no-driver": ([("NVIDIA GeForce RTX 3090", 24576, None)], None, 64234),
    "cpu-16g": ([], None, 15880),
    "mac-studio-64g": ([], ("apple", 49152), 65536),
    "dgx-spark": ([], ("gb10", 124610), 124610),
    "strix-halo-128g": ([], ("amd-apu", 98304), 128445),
}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_probe(name):
    gpus, unified, ram = EXAMPLES[name]
    hw = parse_probe((PROBES / f"{name}.probe").read_text(), name)
    assert [(g.name, g.memory_total_mib, g.memory_used_mib) for g in hw.gpus] == gpus
    assert ((hw.unified.kind, hw.unified.gpu_limit_mib) if hw.unified else None) == unified
    assert hw.ram_total_mib == ram
    assert all(g.bandwidth_gbps for g in hw.gpus)


def test_example_processes_keep_their_names():
    busy = parse_probe((PROBES / "busy-4090.probe").read_text(), "busy-4090").gpus[0]
    rerun = parse_probe((PROBES / "rerun-4090.probe").read_text(), "rerun-4090").gpus[0]
    assert [(p.name, p.used_mib) for p in busy.processes] == [("/usr/bin/python3", 6144)]
    assert [(p.name, p.used_mib) for p in rerun.processes] == [("/usr/local/bin/ollama", 22528)]


def test_example_old_driver_keeps_driver_and_compute_capability():
    gpu = parse_probe((PROBES / "old-driver-535.probe").read_text(), "old").gpus[0]
    assert (gpu.driver_version, gpu.compute_cap, gpu.pci_id) == ("535.247.01", "6.1", "10de:1b06")


# --- the GPU table -----------------------------------------------------------------------------

def test_lookup_by_name_pci_id_and_memory():
    assert lookup_gpu("NVIDIA GeForce RTX 3090").bandwidth_gbps == 936
    assert lookup_gpu("GeForce GTX 1070").model == "NVIDIA GeForce GTX 1070"  # old drivers drop "NVIDIA "
    assert lookup_gpu("NVIDIA GeForce RTX 3060", memory_mib=8192).bandwidth_gbps == 240
    assert lookup_gpu("NVIDIA GeForce RTX 3060", memory_mib=12288).bandwidth_gbps == 360
    assert lookup_gpu(pci_id="10de:2684").model == "NVIDIA GeForce RTX 4090"
    assert lookup_gpu(pci_id="10de:2e12").model == "NVIDIA GB10"
    assert lookup_gpu("Apple M4 Max", gpu_cores=40).bandwidth_gbps == 546
    assert lookup_gpu("NVIDIA Quantum 9000") is None


def test_table_pci_ids_agree_with_nvidia_supported_gpus_list():
    listed: dict[str, set[str]] = {}
    for line in fixture("nvidia-open-supported-devices-580.txt").splitlines():
        device, _, name = line.partition(" ")
        listed.setdefault("10de:" + device.lower().removeprefix("0x"), set()).add(normalize_name(name))
    checked = 0
    for spec in gpu_table():
        for pci_id in spec.pci_ids:
            if pci_id in listed:
                checked += 1
                assert listed[pci_id] & spec.spellings(), (spec.model, pci_id, listed[pci_id])
    assert checked >= 60


def test_table_vram_agrees_with_akash_for_pre_turing_cards():
    rows = [line.split(",") for line in fixture("akash-pci-id-to-vram.csv").splitlines()[1:]]
    akash = {f"{v}:{d}": int(size.removesuffix("Gi")) * 1024 for v, d, _, _, size in rows}
    for pci_id in ("10de:1b81", "10de:1b80", "10de:1b06", "10de:1b38", "10de:1db1", "10de:1db5", "10de:2204", "10de:2684"):
        assert lookup_gpu(pci_id=pci_id).vram_mib == akash[pci_id], pci_id


def test_a_gpu_uuid_that_could_break_a_unit_line_is_dropped():
    """A UUID goes into CUDA_VISIBLE_DEVICES in a unit file: only GPU-/MIG- and hex digits pass (audit L3)."""
    from r1fleet.hardware import parse_nvidia_query

    rows = parse_nvidia_query(['0, NVIDIA GeForce RTX 3090, 24576, 1, 24000, 00000000:01:00.0, GPU-a" "LD_PRELOAD=/tmp/x.so, 580.95.05, 8.6',
                               "1, NVIDIA GeForce RTX 3090, 24576, 1, 24000, 00000000:02:00.0, GPU-c4d2a7e1-8b3f-4e5a-a1c0-3090a0000002, 580.95.05, 8.6"])
    assert rows[0].uuid is None and rows[1].uuid == "GPU-c4d2a7e1-8b3f-4e5a-a1c0-3090a0000002"


def test_own_backend_is_known_by_its_service_cgroup_not_its_name():
    """Another user's `ollama` is not r1fleet's: with the probe's own-pids section only r1fleet's service
    processes count as free memory (audit L8); older probes without it fall back to the name."""
    from r1fleet.hardware import parse_probe

    probe = (FIXTURES / "probes" / "rerun-4090.probe").read_text()
    assert parse_probe(probe, "old").gpus[0].processes[0].own  # no own-pids section: by name
    foreign = probe.replace("#### r1fleet:nvidia-smi\n", "#### r1fleet:own-pids\n1234\n#### r1fleet:nvidia-smi\n", 1)
    assert not parse_probe(foreign, "new").gpus[0].processes[0].own  # pid 2214 is not in r1fleet's cgroup
    ours = probe.replace("#### r1fleet:nvidia-smi\n", "#### r1fleet:own-pids\n2214\n#### r1fleet:nvidia-smi\n", 1)
    assert parse_probe(ours, "new").gpus[0].processes[0].own
