"""probe.sh run for real under dash, with stand-in GPU tools where this machine has none.

The stand-in `nvidia-smi`, `lspci` and `ssh` scripts written below are test doubles at the one
boundary this machine cannot reach (no GPU, no remote host); they print real captures from
tests/fixtures/.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from r1fleet.errors import R1FleetError
from r1fleet.probe.facts import PROBE_SCRIPT, R1Probe, probe_over_ssh
from r1fleet.hardware import parse_probe, split_sections

FIXTURES = Path(__file__).parents[1] / "fixtures"
SECTIONS = ["uname", "os-release", "init", "meminfo", "cpu", "nvidia-smi-query", "nvidia-smi-apps", "own-pids", "nvidia-smi", "lspci",
            "drm", "rocm-smi", "tegra", "sysctl", "system_profiler", "df", "df-install", "releases", "models", "haproxy",
            "llama-cpp-packages", "secureboot",
            "nvidia-smi-error", "nvidia-proc", "nvidia-modinfo", "libcuda-owner", "cuda-repo", "nvidia-installer",
            "kernel-packages", "apt-kernel", "dkms-status", "driver-reboot", "kfd"]
DASH = shutil.which("dash")
pytestmark = pytest.mark.skipif(DASH is None, reason="dash is not installed (apt-get install dash)")


def fixture(name: str) -> str:
    return "\n".join(l for l in (FIXTURES / name).read_text().splitlines() if not l.startswith("#")) + "\n"


def run_probe(*args: str, path: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": path or os.environ["PATH"]}
    return subprocess.run([DASH, str(PROBE_SCRIPT), *args], capture_output=True, text=True, env=env, timeout=60, check=False)


def stub(bin_dir: Path, name: str, body: str) -> None:
    script = bin_dir / name
    script.write_text("#!/bin/sh\n# TEST STAND-IN: prints a real capture from tests/fixtures/\n" + body)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


def real_memtotal_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise AssertionError("no MemTotal in /proc/meminfo")


def headers(text: str) -> list[str]:
    return [line.removeprefix("#### r1fleet:") for line in text.splitlines() if line.startswith("#### r1fleet:")]


def test_probe_runs_under_dash_and_parses_to_this_machine():
    result = run_probe()
    assert result.returncode == 0, result.stderr
    assert headers(result.stdout) == SECTIONS
    hw = parse_probe(result.stdout, "controller")
    assert hw.os.init == ("systemd" if os.path.isdir("/run/systemd/system") else Path("/proc/1/comm").read_text().strip())
    assert hw.ram_total_mib == real_memtotal_mib()
    assert hw.cpu_count == os.cpu_count()
    assert hw.disk_free_mib is not None and hw.disk_free_mib > 0
    if not shutil.which("nvidia-smi") and not shutil.which("rocm-smi"):
        assert hw.gpus == [] and hw.unified is None


def test_missing_tools_leave_empty_sections(tmp_path):
    # Only the basic utilities: no nvidia-smi, lspci, rocm-smi or mokutil on this PATH.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("uname", "cat", "awk", "nproc", "getconf", "df", "dirname", "tr", "timeout"):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    result = run_probe(path=str(bin_dir))
    assert result.returncode == 0
    sections = split_sections(result.stdout, "bare")
    assert list(sections) == SECTIONS
    # probe.sh appends /usr/sbin and /sbin to PATH (lspci and mokutil live there on some distros).
    sbin = {t for t in ("lspci", "mokutil") if any(Path(d, t).exists() for d in ("/usr/sbin", "/sbin"))}
    for name, tool in (("nvidia-smi-query", "nvidia-smi"), ("nvidia-smi-apps", "nvidia-smi"), ("nvidia-smi", "nvidia-smi"),
                       ("lspci", "lspci"), ("rocm-smi", "rocm-smi"), ("secureboot", "mokutil")):
        if tool not in sbin:
            assert sections[name] == [], name


def test_stub_nvidia_smi_and_lspci_fill_their_sections(tmp_path):
    query = fixture("nvidia-smi-query__linux-x86_64__nvidia-geforce-rtx-4080-super__595.71.05.csv")
    table = fixture("nvidia-smi-table__linux-x86_64__nvidia-geforce-rtx-4080-super__595.71.05.txt")
    (tmp_path / "query.csv").write_text(query)
    (tmp_path / "table.txt").write_text(table)
    stub(tmp_path, "nvidia-smi", f"""case "$*" in
  *--query-gpu=*) cat '{tmp_path}/query.csv' ;;
  *--query-compute-apps=*) echo 'GPU-00000000-0000-0000-0000-000000000000, 3141, /usr/bin/llama-server, 9000' ;;
  '') cat '{tmp_path}/table.txt' ;;
  *) exit 2 ;;
esac
""")
    stub(tmp_path, "lspci", """[ "$1" = -nnk ] || exit 1
echo '01:00.0 VGA compatible controller [0300]: NVIDIA Corporation AD103 [GeForce RTX 4080 SUPER] [10de:2702] (rev a1)'
echo '01:00.1 Audio device [0403]: NVIDIA Corporation AD103 High Definition Audio Controller [10de:22bb] (rev a1)'
""")
    result = run_probe(path=f"{tmp_path}:{os.environ['PATH']}")
    assert result.returncode == 0
    sections = split_sections(result.stdout, "stubbed")
    assert "\n".join(sections["nvidia-smi-query"]) == query.strip()
    assert "\n".join(sections["nvidia-smi"]) == table.rstrip("\n")
    assert len(sections["lspci"]) == 2
    gpu = parse_probe(result.stdout, "stubbed").gpus[0]
    assert (gpu.name, gpu.memory_total_mib, gpu.pci_id, gpu.compute_cap) == ("NVIDIA GeForce RTX 4080 SUPER", 16376, "10de:2702", "8.9")
    assert [(p.pid, p.name, p.used_mib) for p in gpu.processes] == [(3141, "/usr/bin/llama-server", 9000)]


def test_the_driver_sections_hold_what_the_tools_print_after_an_update_without_reboot(tmp_path):
    """nvidia-smi fails with the NVML mismatch; modinfo, dpkg, dpkg-query and apt-cache print as on Ubuntu 24.04 with
    Ubuntu's 580 server driver (the formats of tests/fixtures/probes/nvml-mismatch-580.probe)."""
    stub(tmp_path, "nvidia-smi", """echo 'Failed to initialize NVML: Driver/library version mismatch'
echo 'NVML library version: 580.95'
exit 18
""")
    stub(tmp_path, "modinfo", """[ "$*" = '-F version nvidia' ] && echo 580.95.05""")
    stub(tmp_path, "dpkg", """[ "$*" = '-S libcuda.so.1' ] || exit 1
echo 'libnvidia-compute-580-server:amd64: /usr/lib/x86_64-linux-gnu/libcuda.so.1'
""")
    stub(tmp_path, "dpkg-query", """printf 'ii  linux-image-6.8.0-79-generic\\nrc  linux-image-6.8.0-31-generic\\nii  linux-image-generic-hwe-24.04\\n'""")
    stub(tmp_path, "uname", """case "$1" in -r) echo 6.8.0-79-generic ;; -s) echo Linux ;; *) echo 'Linux 6.8.0-79-generic x86_64' ;; esac""")
    stub(tmp_path, "apt-cache", """case "$2" in
  linux-headers-6.8.0-79-generic) echo linux-headers-6.8.0-79-generic ;;
  linux-modules-nvidia-) printf 'linux-modules-nvidia-580-server-open-6.8.0-79-generic\\nlinux-modules-nvidia-580-server-open-6.8.0-85-generic\\n' ;;
esac""")
    result = run_probe(path=f"{tmp_path}:{os.environ['PATH']}")
    sections = split_sections(result.stdout, "mismatch")
    assert sections["nvidia-smi-error"][0] == "Failed to initialize NVML: Driver/library version mismatch"
    assert sections["kernel-packages"] == ["dpkg", "linux-image-6.8.0-79-generic", "linux-image-generic-hwe-24.04"]  # "rc": removed
    assert sections["apt-kernel"] == ["kernel 6.8.0-79-generic", "linux-headers-6.8.0-79-generic",
                                      "linux-modules-nvidia-580-server-open-6.8.0-79-generic"]   # only the running ABI's
    facts = parse_probe(result.stdout, "mismatch").driver
    assert (facts.nvidia_module, facts.libcuda_packages) == ("580.95.05", ["libnvidia-compute-580-server"])


def test_old_driver_query_is_retried_without_compute_cap(tmp_path):
    # nvidia-smi-query-compute_cap-invalid-470.txt: exit status 2 and this message on stdout.
    stub(tmp_path, "nvidia-smi", """case "$*" in
  *compute_cap*) echo 'Field "compute_cap" is not a valid field to query.'; exit 2 ;;
  *--query-gpu=*) echo '0, GeForce GTX 1070, 8114, 1917, 6197, 00000000:24:00.0, GPU-1b2c3d4e, 470.239.06' ;;
  *) exit 0 ;;
esac
""")
    result = run_probe(path=f"{tmp_path}:{os.environ['PATH']}")
    sections = split_sections(result.stdout, "old")
    assert sections["nvidia-smi-query"] == ["0, GeForce GTX 1070, 8114, 1917, 6197, 00000000:24:00.0, GPU-1b2c3d4e, 470.239.06"]
    gpu = parse_probe(result.stdout, "old").gpus[0]
    assert (gpu.driver_version, gpu.compute_cap) == ("470.239.06", "6.1")


def test_df_uses_the_nearest_existing_parent_of_the_model_dir(tmp_path):
    result = run_probe(str(tmp_path / "not" / "yet" / "models"))
    df_lines = split_sections(result.stdout, "h")["df"]
    expected = subprocess.run(["df", "-Pk", str(tmp_path)], capture_output=True, text=True, check=True).stdout.splitlines()
    assert df_lines[1].split()[-1] == expected[1].split()[-1]
    assert df_lines[1].split()[0] == expected[1].split()[0]


def test_pyinfra_fact_command_runs_the_same_script(tmp_path):
    command = R1Probe().command(str(tmp_path)).get_raw_value()
    result = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=60, check=False)
    assert headers(result.stdout) == SECTIONS
    document = R1Probe().process(result.stdout.splitlines())
    assert parse_probe(document, "via-fact").ram_total_mib == real_memtotal_mib()


def test_probe_over_ssh_with_a_stand_in_client(tmp_path):
    # Plays the remote side: drops the -o options, the `--` and the host, then runs the remote command line.
    stub(tmp_path, "ssh", 'while [ "$1" = -o ]; do shift 2; done\n[ "$1" = -- ] && shift\nshift\nexec sh -c "$*"\n')
    text = probe_over_ssh("lab-host", str(tmp_path / "models"), ssh=str(tmp_path / "ssh"))
    assert headers(text) == SECTIONS
    assert parse_probe(text, "lab-host").ram_total_mib == real_memtotal_mib()


def test_probe_over_ssh_failure_names_the_host(tmp_path):
    stub(tmp_path, "ssh", 'echo "ssh: Could not resolve hostname nohost: Name or service not known" >&2\nexit 255\n')
    with pytest.raises(R1FleetError) as err:
        probe_over_ssh("nohost", ssh=str(tmp_path / "ssh"))
    assert "host nohost" in str(err.value) and "Could not resolve hostname" in str(err.value)
    assert "BatchMode" in str(err.value)


def test_the_llama_cpp_packages_section_names_the_pinned_packages_and_keeps_installed_versions():
    """Issue 23 item 6: `r1fleet lock` records a pool's version from what its members have installed."""
    from r1fleet.artifacts.pins import load_pins
    from r1fleet.hardware.system import parse_llama_cpp_apt

    debian = load_pins().llama_cpp.debian
    section = PROBE_SCRIPT.read_text().split("section llama-cpp-packages", 1)[1].split("section ", 1)[0]
    for package in (debian.server_package, debian.rpc_server_package, debian.rpc_backend_package,
                    *debian.backend_packages.values()):
        assert f" {package}" in section
    # apt-cache policy as a forky host prints it (LC_ALL=C); a version outside Debian's syntax is no version
    lines = ["lists: present", "llama.cpp-tools-extra:", "  Installed: 1:0.7.0+dfsg-2", "  Candidate: 1:0.7.0+dfsg-2",
             "  Version table:", " *** 1:0.7.0+dfsg-2 500", "        500 http://deb.debian.org/debian forky/main amd64 Packages",
             "        100 /var/lib/dpkg/status", "libggml0-backend-rpc:", "  Installed: (none)", "  Candidate: 0.9.4-1",
             "libggml0-backend-cuda:", "  Installed: (none)", "  Candidate: (none)", "llama.cpp-tools:",
             "  Installed: 1.0;reboot", "  Candidate: (none)"]
    apt = parse_llama_cpp_apt(lines)
    assert apt.lists and apt.installed == {"llama.cpp-tools-extra": "1:0.7.0+dfsg-2"}
    assert apt.candidates == {"llama.cpp-tools-extra": "1:0.7.0+dfsg-2", "libggml0-backend-rpc": "0.9.4-1"}
    assert not parse_llama_cpp_apt(["lists: absent"]).lists and parse_llama_cpp_apt([]) is None
