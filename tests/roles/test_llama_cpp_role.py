"""Operation-level tests of roles/llama_cpp.py on a @fake stand-in host."""

from __future__ import annotations

import re

import pytest
from deploy_harness import llama_cpp_role, run_role
import facts_for as ff

from r1fleet.fleet.config import HostConfig
from r1fleet.artifacts.pins import Download, Platform
from r1fleet.artifacts.pins import load_pins
from r1fleet.artifacts.llama_cpp_install import llama_cpp_install
from r1fleet.records import GgufFile, HostPlan

UNIT = "/etc/systemd/system/r1fleet-llama-server.service"
SHA = "c" * 64
FORKY = Platform(arch="amd64", distro_id="debian", codename="forky", tegra_major=None)
BOOKWORM = Platform(arch="amd64", distro_id="debian", codename="bookworm", tegra_major=None)


def plan(**overrides) -> HostPlan:
    base = dict(
        host="h1", model="deepseek-r1-distill-llama-70b", ollama_tag="deepseek-r1:70b-llama-distill-q4_K_M",
        backend="llama.cpp", placement="multi-gpu", fits=True, context_length=8192, kv_cache_type="q8_0",
        flash_attention=True, tensor_split=[38, 42], vendor="nvidia", compute_caps=["8.6", "8.6"],
        gpu_uuids=["GPU-aaaa", "GPU-bbbb"],
        gguf=GgufFile(url="https://example.invalid/70b.gguf", file="70b.gguf", sha256=SHA),
    )
    base.update(overrides)
    return HostPlan(**base)


DOWNLOAD = Download(name="70b.gguf", url="https://example.invalid/70b.gguf", sha256=SHA, size=42_520_395_584)


def exec_args(unit: str) -> list[str]:
    line = next(l for l in unit.splitlines() if l.startswith("ExecStart="))
    return line.removeprefix("ExecStart=").split()


def test_from_package_on_forky_with_cuda_backend(monkeypatch):
    p, settings = plan(), HostConfig(name="h1", address="10.0.0.1")
    install = llama_cpp_install(FORKY, p, settings, {"llama.cpp-tools", "libggml0-backend-cuda"})
    assert install.method == "package"
    run = run_role(llama_cpp_role, p, settings, install, DOWNLOAD, monkeypatch=monkeypatch)
    assert not run.failed
    assert run.ran("llama.cpp packages", "install curl ca-certificates llama.cpp-tools libggml0-backend-cuda")
    assert run.never_ran("cmake")
    args = exec_args(run.uploads[UNIT])
    assert args == [
        "/usr/bin/llama-server", "-m", "/var/lib/r1fleet/models/llama.cpp/70b.gguf", "-c", "8192", "-ngl", "999",
        "--tensor-split", "38,43", "--split-mode", "layer", "-fa", "on",
        "--cache-type-k", "q8_0", "--cache-type-v", "q8_0", "--parallel", "1",
        "--host", "127.0.0.1", "--port", "8080", "--alias", "deepseek-r1:70b-llama-distill-q4_K_M",
        "--metrics", "--jinja", "--log-verbosity", "4", "--reasoning-format", "deepseek",
    ]
    assert 'Environment="CUDA_VISIBLE_DEVICES=GPU-aaaa,GPU-bbbb"' in run.uploads[UNIT]
    assert "IPAddressDeny=any" in run.uploads[UNIT] and "IPAddressAllow=localhost" in run.uploads[UNIT]
    fetch = run.script("70b.gguf.part")
    # every transfer stops at the pinned size, the first try's and the start-over's alike (issue 21)
    assert "curl -fSL --retry 3 --max-filesize 42520395584 -C -" in fetch and fetch.index("sha256sum") < fetch.index("mv -f")
    assert fetch.count("curl -fSL") == fetch.count("--max-filesize 42520395584 ") == 2
    assert "chown llama:llama" in fetch
    assert run.ran("Health of r1fleet-llama-server.service", "http://127.0.0.1:8080/health")


UBUNTU_2404 = Platform(arch="amd64", distro_id="ubuntu", codename="noble", tegra_major=None)
FEDORA = Platform(arch="amd64", distro_id="fedora", codename="", tegra_major=None)
BUNDLE = "/opt/r1fleet/ollama/0.32.9/lib/ollama"
SEES_TWO_GPUS = {"--list-devices": ["device CUDA0", "device CUDA1"]}


@pytest.mark.parametrize("target", [UBUNTU_2404, BOOKWORM, FEDORA], ids=["ubuntu-24.04", "debian-12", "fedora"])
def test_cuda_llama_server_from_the_pinned_ollama_archive(monkeypatch, target):
    """No toolkit, no build: the pinned archive's llama-server with its own CUDA 12 runtime."""
    p, settings = plan(), HostConfig(name="h1", address="10.0.0.1")
    install = llama_cpp_install(target, p, settings, set())
    assert install.method == "ollama-bundle" and install.binary == f"{BUNDLE}/llama-server"
    run = run_role(llama_cpp_role, p, settings, install, DOWNLOAD, responses=SEES_TWO_GPUS, monkeypatch=monkeypatch)
    assert not run.failed
    fetch = run.script("ollama-linux-amd64.tar.zst")
    assert "https://github.com/ollama/ollama/releases/download/v0.32.9/ollama-linux-amd64.tar.zst" in fetch
    assert fetch.index("sha256sum") < fetch.index("zstd -dc")
    # the tools the archive's script calls (tar is Essential on Debian) come from the packages operation, first
    packages = run.installs("llama.cpp packages")
    used = set(re.findall(r"(?:^|[ ;|({])(zstd|curl) ", fetch))
    assert used == {"zstd", "curl"} and used <= packages and "ca-certificates" in packages
    archive = next(name for name, command in run.by_op if "ollama-linux-amd64.tar.zst" in command)
    assert run.op_names.index(run.op("llama.cpp packages")) < run.op_names.index(archive)
    assert run.never_ran("cmake") and run.never_ran("nvcc")
    unit = run.uploads[UNIT]
    assert exec_args(unit)[0] == f"{BUNDLE}/llama-server"
    assert f'Environment="GGML_BACKEND_PATH={BUNDLE}/cuda_v12/libggml-cuda.so"' in unit
    assert f'Environment="LD_LIBRARY_PATH={BUNDLE}:{BUNDLE}/cuda_v12"' in unit
    assert 'Environment="OLLAMA_LLAMA_CPP_COMPAT=0"' in unit
    check = run.script("--list-devices")
    assert "CUDA_VISIBLE_DEVICES=GPU-aaaa,GPU-bbbb" in check and f"GGML_BACKEND_PATH={BUNDLE}/cuda_v12/libggml-cuda.so" in check
    assert "--tensor-split" in check and "--api-key-file" in check
    names = run.op_names
    check_at = next(i for i, n in enumerate(names) if n.endswith("llama-server flags and devices"))
    assert check_at < next(i for i, n in enumerate(names) if n.endswith(f"Unit {UNIT.rsplit('/', 1)[1]}"))
    assert run.never_ran("the plan needs") and run.never_ran(" lacks ")  # the check passed: nothing refused


def test_bundle_that_does_not_see_the_gpus_is_refused_before_the_unit(monkeypatch):
    p, settings = plan(), HostConfig(name="h1", address="10.0.0.1")
    install = llama_cpp_install(UBUNTU_2404, p, settings, set())
    run = run_role(llama_cpp_role, p, settings, install, DOWNLOAD, responses={"--list-devices": ["device CUDA0"]},
                   monkeypatch=monkeypatch)
    # (@fake runs nothing: the refusal is the command that stops the host)
    assert run.ran("llama-server flags and devices", "--list-devices shows CUDA0, the plan needs 2") and run.ran("llama-server flags and devices", "exit 1")


def test_bundle_without_a_flag_is_refused(monkeypatch):
    p, settings = plan(), HostConfig(name="h1", address="10.0.0.1")
    install = llama_cpp_install(UBUNTU_2404, p, settings, set())
    responses = {"--list-devices": ["missing-flag --alias", "device CUDA0", "device CUDA1"]}
    run = run_role(llama_cpp_role, p, settings, install, DOWNLOAD, responses=responses, monkeypatch=monkeypatch)
    assert run.ran("llama-server flags and devices", "lacks --alias") and run.ran("llama-server flags and devices", "exit 1")


def test_from_source_only_when_asked(monkeypatch):
    p, settings = plan(), HostConfig(name="h1", address="10.0.0.1", llama_cpp_install="source")
    install = llama_cpp_install(BOOKWORM, p, settings, set())
    assert install.method == "source" and install.binary == "/opt/r1fleet/llama.cpp/b10069/bin/llama-server"
    run = run_role(llama_cpp_role, p, settings, install, DOWNLOAD, monkeypatch=monkeypatch)
    build = run.script("cmake -S")
    assert "-DGGML_CUDA=ON" in build and "-DCMAKE_CUDA_ARCHITECTURES=86" in build
    assert "-DLLAMA_BUILD_UI=OFF" in build and "-DLLAMA_BUILD_NUMBER=10069" in build
    assert "https://github.com/ggml-org/llama.cpp/archive/refs/tags/b10069.tar.gz" in build
    assert build.index("sha256sum") < build.index("cmake -S") < build.index('mv "$tmp/out" /opt/r1fleet/llama.cpp/b10069')
    # the tarball is compared with the pinned sha256 (versions.yaml), and a mismatch stops the script
    pinned = load_pins().llama_cpp.source_sha256
    compared = build.index(f"!= {pinned} ]")
    assert "sha256sum" in build[compared - 200:compared] and "exit 1" in build[compared:compared + 300]
    assert compared < build.index("cmake -S")
    assert exec_args(run.uploads[UNIT])[0] == install.binary


def test_source_build_skipped_when_tag_already_built(monkeypatch):
    p, settings = plan(), HostConfig(name="h1", address="10.0.0.1", llama_cpp_install="source")
    install = llama_cpp_install(BOOKWORM, p, settings, set())
    responses = ff.file_exists(install.binary, mode="-rwxr-xr-x")
    run = run_role(llama_cpp_role, p, settings, install, DOWNLOAD, responses=responses, monkeypatch=monkeypatch)
    assert run.never_ran("cmake -S")


def test_lab_host_uses_the_cpu_package(monkeypatch):
    p, settings = plan(), HostConfig(name="h1", address="10.0.0.1", profile="dual-rtx3090", rehearsal=True)
    install = llama_cpp_install(FORKY, p, settings, {"llama.cpp-tools"})
    assert install.method == "package" and install.packages == ("llama.cpp-tools",)


def test_api_key_is_a_credential_never_in_argv(monkeypatch):
    settings = HostConfig(name="h1", address="10.0.0.1", listen="0.0.0.0", allow=["192.168.1.0/24"], api_key_file="/etc/r1fleet/api-key")
    install = llama_cpp_install(FORKY, plan(), settings, {"llama.cpp-tools", "libggml0-backend-cuda"})
    run = run_role(llama_cpp_role, plan(), settings, install, DOWNLOAD, monkeypatch=monkeypatch)
    unit = run.uploads[UNIT]
    args = exec_args(unit)
    assert args[args.index("--api-key-file") + 1] == "%d/api-key"
    assert "--api-key" not in args
    assert "LoadCredential=api-key:/etc/r1fleet/api-key" in unit
    assert "IPAddressAllow=localhost 192.168.1.0/24" in unit
    assert args[args.index("--host") + 1] == "0.0.0.0"
    assert not any("cat /etc/r1fleet/api-key" in c for c in run.commands)


def test_no_api_key_flag_when_local_only(monkeypatch):
    settings = HostConfig(name="h1", address="10.0.0.1", api_key_file="/etc/r1fleet/api-key")
    install = llama_cpp_install(FORKY, plan(), settings, {"llama.cpp-tools", "libggml0-backend-cuda"})
    run = run_role(llama_cpp_role, plan(), settings, install, DOWNLOAD, monkeypatch=monkeypatch)
    assert "--api-key-file" not in run.uploads[UNIT] and "LoadCredential" not in run.uploads[UNIT]


def converged_responses(unit_text: str) -> dict:
    """What a host that the deploy has converged answers."""
    return {
        "cat /etc/group": ["root:x:0:", "video:x:44:", "render:x:993:", "llama:x:998:"],
        **ff.users(("llama", "/var/lib/llama", "/usr/sbin/nologin", ["video", "render"])),
        **ff.directory("/var/lib/llama", "llama", "llama", "drwxr-x---"),
        **ff.directory("/var/lib/r1fleet/models/llama.cpp", "llama", "llama", "drwxr-x---"),
        **ff.directory("/var/lib/r1fleet/models", "root", "root", "drwxr-xr-x"),
        **ff.directory("/etc/systemd/system", "root", "root", "drwxr-xr-x"),
        **ff.sha256_of("/var/lib/r1fleet/models/llama.cpp/70b.gguf", SHA),
        **ff.file_content(UNIT, unit_text),
        **ff.running("r1fleet-llama-server.service"),
        "dpkg -l": ff.dpkg_installed("curl", "ca-certificates", "llama.cpp-tools", "libggml0-backend-cuda"),
    }


def test_already_present_changes_nothing(monkeypatch):
    p, settings = plan(), HostConfig(name="h1", address="10.0.0.1")
    install = llama_cpp_install(FORKY, p, settings, {"llama.cpp-tools", "libggml0-backend-cuda"})
    first = run_role(llama_cpp_role, p, settings, install, DOWNLOAD, monkeypatch=monkeypatch)
    responses = converged_responses(first.uploads[UNIT])
    run = run_role(llama_cpp_role, p, settings, install, DOWNLOAD, responses=responses, monkeypatch=monkeypatch)
    assert run.changed == []
    assert run.never_ran("systemctl restart") and run.never_ran("/health")


def test_changed_model_restarts_the_service(monkeypatch):
    p, settings = plan(), HostConfig(name="h1", address="10.0.0.1")
    install = llama_cpp_install(FORKY, p, settings, {"llama.cpp-tools", "libggml0-backend-cuda"})
    responses = ff.running("r1fleet-llama-server.service")
    run = run_role(llama_cpp_role, p, settings, install, DOWNLOAD, responses=responses, monkeypatch=monkeypatch)
    assert run.ran("Restart r1fleet-llama-server.service", "systemctl restart r1fleet-llama-server.service") and run.ran("Health of r1fleet-llama-server.service", "/health")


def test_switching_from_ollama_retires_its_service_first(monkeypatch):
    """A plan that moved to llama.cpp stops, disables and removes r1fleet's Ollama unit before starting its own (H3)."""
    p, settings = plan(), HostConfig(name="h1", address="10.0.0.1")
    install = llama_cpp_install(FORKY, p, settings, {"llama.cpp-tools", "libggml0-backend-cuda"})
    responses = {**ff.file_exists("/etc/systemd/system/r1fleet-ollama.service"), **ff.running("r1fleet-ollama.service")}
    run = run_role(llama_cpp_role, p, settings, install, DOWNLOAD, responses=responses, monkeypatch=monkeypatch)
    stop = next(i for i, c in enumerate(run.commands) if "systemctl stop r1fleet-ollama.service" in c)
    assert run.ran("Stop r1fleet-ollama.service (the plan moved to the other backend)", "systemctl disable r1fleet-ollama.service") and run.ran("Remove r1fleet-ollama.service", "rm -f /etc/systemd/system/r1fleet-ollama.service")
    starts = [i for i, c in enumerate(run.commands) if "systemctl start r1fleet-llama-server.service" in c]
    assert starts and stop < starts[0]
    clean = run_role(llama_cpp_role, p, settings, install, DOWNLOAD, monkeypatch=monkeypatch)
    assert clean.never_ran("systemctl stop r1fleet-ollama.service") and clean.never_ran("rm -f /etc/systemd/system/r1fleet-ollama")


def test_switching_from_ollama_retires_its_preload_unit_before_its_server(monkeypatch):
    """The unit that loads Ollama's model after every start goes too, and first: nothing r1fleet-ollama-* stays."""
    p, settings = plan(), HostConfig(name="h1", address="10.0.0.1")
    install = llama_cpp_install(FORKY, p, settings, {"llama.cpp-tools", "libggml0-backend-cuda"})
    units = ("r1fleet-ollama-preload.service", "r1fleet-ollama.service")
    responses = {key: value for unit in units
                 for key, value in {**ff.file_exists(f"/etc/systemd/system/{unit}"), **ff.running(unit)}.items()}
    run = run_role(llama_cpp_role, p, settings, install, DOWNLOAD, responses=responses, monkeypatch=monkeypatch)
    assert run.ran("Remove r1fleet-ollama-preload.service", "rm -f /etc/systemd/system/r1fleet-ollama-preload.service")
    stops = [next(i for i, c in enumerate(run.commands) if f"systemctl stop {unit}" in c) for unit in units]
    assert stops[0] < stops[1]


def test_the_hosts_own_address_passes_the_ip_allow_list(monkeypatch):
    """The health check runs on the host against its LAN address: that source must be allowed (audit M5)."""
    settings = HostConfig(name="h1", address="10.0.0.1", listen="192.168.1.23", allow=["10.8.0.0/24"], api_key_file="/etc/r1fleet/api-key")
    install = llama_cpp_install(FORKY, plan(), settings, {"llama.cpp-tools", "libggml0-backend-cuda"})
    run = run_role(llama_cpp_role, plan(), settings, install, DOWNLOAD, monkeypatch=monkeypatch)
    assert "IPAddressAllow=localhost 192.168.1.23 10.8.0.0/24" in run.uploads[UNIT]


def test_a_service_older_than_its_files_is_restarted_on_the_next_run(monkeypatch):
    """A deploy stopped after writing the unit but before restarting leaves nothing 'changed' for the next
    run; the host's own state (the service predates its files) decides the restart (audit M9)."""
    p, settings = plan(), HostConfig(name="h1", address="10.0.0.1")
    install = llama_cpp_install(FORKY, p, settings, {"llama.cpp-tools", "libggml0-backend-cuda"})
    first = run_role(llama_cpp_role, p, settings, install, DOWNLOAD, monkeypatch=monkeypatch)
    converged = converged_responses(first.uploads[UNIT])
    stale = run_role(llama_cpp_role, p, settings, install, DOWNLOAD, responses={"NeedDaemonReload": "stale", **converged},
                     monkeypatch=monkeypatch)
    assert stale.ran("Restart r1fleet-llama-server.service if it predates its files",
                     "systemctl daemon-reload && systemctl reset-failed r1fleet-llama-server.service; "
                     "systemctl restart r1fleet-llama-server.service") and stale.ran("Health of r1fleet-llama-server.service", "/health")
    fresh = run_role(llama_cpp_role, p, settings, install, DOWNLOAD, responses=converged, monkeypatch=monkeypatch)
    assert fresh.never_ran("systemctl restart") and fresh.never_ran("/health")


def test_the_plans_prompt_cache_reaches_the_unit(monkeypatch):
    """--cache-ram from the plan (a small-RAM host's cap); a plan without one (an older lock) leaves llama.cpp's default."""
    settings = HostConfig(name="h1", address="10.0.0.1")
    for cache, expected in ((5120, ["--cache-ram", "5120"]), (0, ["--cache-ram", "0"]), (None, [])):
        p = plan(cache_ram_mib=cache)
        install = llama_cpp_install(FORKY, p, settings, {"llama.cpp-tools", "libggml0-backend-cuda"})
        args = exec_args(run_role(llama_cpp_role, p, settings, install, DOWNLOAD, monkeypatch=monkeypatch).uploads[UNIT])
        found = args[args.index("--cache-ram"):args.index("--cache-ram") + 2] if "--cache-ram" in args else []
        assert found == expected
        assert args[args.index("--parallel") + 1] == "1"
