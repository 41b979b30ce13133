"""Pure decisions behind the roles (decide.py of each role, r1fleet/render/systemd_unit.py and artifacts.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from r1fleet.errors import FleetError
from r1fleet.fleet.config import HostConfig, OllamaReleaseOverride
from r1fleet.errors import DeployError
from r1fleet.artifacts.pins import Platform, model_download, platform_from_hardware
from r1fleet.artifacts.llama_cpp_install import cuda_architectures
from r1fleet.roles.llama_cpp.decide import llama_server_args
from r1fleet.artifacts.ollama_release import ollama_asset_stems, ollama_release, parse_sha256sums
from r1fleet.roles.ollama.decide import ollama_environment
from r1fleet.render.systemd_unit import device_allow
from r1fleet.records import DevicePlan, GgufFile, Hardware, HostPlan, OsInfo
from r1fleet.hardware import parse_probe
from r1fleet.lock.served import served_alone

PROBES = Path(__file__).resolve().parents[1] / "fixtures" / "probes"

AMD64 = Platform("amd64", "debian", "forky", None)


def plan(**kw) -> HostPlan:
    base = dict(host="h", model="deepseek-r1-distill-qwen-14b", backend="ollama", placement="gpu", fits=True,
                context_length=8192, vendor="nvidia")
    base.update(kw)
    return HostPlan(**base)


def test_asset_stems_follow_vendor_and_tegra():
    assert ollama_asset_stems(AMD64, "nvidia", "gpu") == ["ollama-linux-amd64"]
    assert ollama_asset_stems(AMD64, "amd", "gpu") == ["ollama-linux-amd64", "ollama-linux-amd64-rocm"]
    assert ollama_asset_stems(AMD64, "amd", "cpu") == ["ollama-linux-amd64"]
    jetson = Platform("arm64", "ubuntu", "jammy", 36)
    assert ollama_asset_stems(jetson, "nvidia", "unified") == ["ollama-linux-arm64", "ollama-linux-arm64-jetpack6"]


def test_pinned_release_uses_zstd_archive_with_its_sha():
    rel = ollama_release("h", AMD64, plan())
    assert [a.name for a in rel.assets] == ["ollama-linux-amd64.tar.zst"]
    assert rel.assets[0].url == "https://github.com/ollama/ollama/releases/download/v0.32.9/ollama-linux-amd64.tar.zst"
    assert rel.needs_zstd and rel.binary == "/opt/r1fleet/ollama/0.32.9/bin/ollama"


def test_mirror_override_falls_back_to_tgz_and_ignores_pinned_sums():
    sums = parse_sha256sums(f"{'a' * 64}  ./ollama-linux-amd64.tgz\n{'b' * 64} *ollama-linux-arm64.tgz\n")
    assert sums == {"ollama-linux-amd64.tgz": "a" * 64, "ollama-linux-arm64.tgz": "b" * 64}
    rel = ollama_release("h", AMD64, plan(), OllamaReleaseOverride(version="0.32.15-standin", base_url="http://m/ollama", sha256=sums))
    assert [(a.name, a.url, a.sha256) for a in rel.assets] == [("ollama-linux-amd64.tgz", "http://m/ollama/ollama-linux-amd64.tgz", "a" * 64)]
    assert not rel.needs_zstd and rel.version == "0.32.15-standin"


def test_missing_sha_is_refused_with_the_fix():
    jetson = Platform("arm64", "ubuntu", "jammy", 36)
    with pytest.raises(DeployError, match="no sha256 is pinned for ollama-linux-arm64-jetpack6.tar.zst"):
        ollama_release("h", jetson, plan(placement="unified"))


def test_host_data_adds_a_missing_sha_to_the_pinned_ones():
    jetson = Platform("arm64", "ubuntu", "jammy", 36)
    rel = ollama_release("h", jetson, plan(placement="unified"),
                         OllamaReleaseOverride(sha256={"ollama-linux-arm64-jetpack6.tar.zst": "c" * 64}))
    assert [a.sha256[:4] for a in rel.assets] == ["7961", "cccc"]


def test_an_amd_host_gets_the_pinned_rocm_add_on():
    """audit-ollama row 21: the ROCm add-on is pinned, so an AMD host deploys instead of being refused."""
    rel = ollama_release("h", AMD64, plan(vendor="amd"))
    assert [a.name for a in rel.assets] == ["ollama-linux-amd64.tar.zst", "ollama-linux-amd64-rocm.tar.zst"]
    assert rel.assets[1].sha256 == "ab93c931df3ea570827f57fa752b3bea7bbc961af71412fc0d4cdaf5c48a356a"


def test_cpu_plan_hides_gpus_and_uses_no_devices():
    p = plan(placement="cpu", vendor=None)
    env = ollama_environment(p, HostConfig(name="h1", address="10.0.0.1"), "/m")
    assert env["CUDA_VISIBLE_DEVICES"] == "-1" and device_allow(p) == []
    # by device class, so a /dev/kfd created after the start is covered; CUDA needs no /dev/dri (audit L11)
    assert device_allow(plan(vendor="amd")) == ["char-kfd rw", "char-drm rw"]
    assert "char-drm rw" not in device_allow(plan(vendor="nvidia"))


def test_gpu_plan_pins_uuids_and_gives_the_runtime_the_plans_margin():
    p = plan(gpu_uuids=["GPU-aaaa"], devices=[DevicePlan(device="GPU0", capacity_mib=24564, planned_mib=24000, weights_mib=18514,
                                 kv_cache_mib=4608, compute_mib=307, overhead_mib=600, headroom_mib=512, layers=64)])
    env = ollama_environment(p, HostConfig(name="h1", address="10.0.0.1"), "/m")
    assert env["LLAMA_ARG_FIT_TARGET"] == "512"  # Ollama's llama-server must not spill what the plan fits
    assert env["CUDA_VISIBLE_DEVICES"] == ",".join(p.gpu_uuids) and env["OLLAMA_KEEP_ALIVE"] == "-1"
    assert "LLAMA_ARG_FIT_TARGET" not in ollama_environment(plan(placement="cpu", vendor=None), HostConfig(name="h1", address="10.0.0.1"), "/m")


def test_ipv6_listen_is_bracketed_for_ollama_and_the_local_api():
    s = HostConfig(name="h1", address="10.0.0.1", listen="fd00::5", allow=["fd00::/64"])
    assert ollama_environment(plan(), s, "/m")["OLLAMA_HOST"] == "[fd00::5]:11434"
    assert s.local_api("ollama") == "http://[fd00::5]:11434"


def test_an_exposed_host_gets_the_key_file_and_a_local_one_does_not():
    exposed = HostConfig.from_host_data("h", {"r1fleet": {"listen": "192.168.1.23", "allow": ["192.168.1.0/24"]}})
    assert exposed.api_key_file == "/etc/r1fleet/api-key"
    assert HostConfig.from_host_data("h", {"r1fleet": {}}).api_key_file is None
    assert HostConfig.from_host_data("h", {"r1fleet": {"listen": "127.0.0.2"}}).api_key_file is None  # still loopback


def test_llama_args_only_split_when_several_gpus_and_reasoning_only_for_r1():
    single = llama_server_args(plan(backend="llama.cpp", tensor_split=[48]), HostConfig(name="h1", address="10.0.0.1"), "/m.gguf", None)
    assert "--tensor-split" not in single and "--reasoning-format" in single
    standin = llama_server_args(plan(model="smollm2-135m-instruct-q4_1", tensor_split=[15, 15]), HostConfig(name="h1", address="10.0.0.1", port=9000), "/m.gguf", None)
    assert "--reasoning-format" not in standin
    assert standin[standin.index("--tensor-split") + 1] == "15,16" and standin[standin.index("--port") + 1] == "9000"


def test_host_data_rehearsal_string_from_cli_and_local_api():
    s = HostConfig.from_host_data("h", {"r1fleet": {"listen": "0.0.0.0", "allow": ["10.0.0.0/8"], "rehearsal": False}, "rehearsal": "true"})
    assert s.rehearsal is True
    assert s.local_api("ollama") == "http://127.0.0.1:11434"
    with pytest.raises(FleetError, match="field port"):
        HostConfig.from_host_data("h", {"r1fleet": {"port": 70000}})
    # --data meets the fleet file's validators too (one set of rules, issue 12)
    with pytest.raises(FleetError, match="field listen"):
        HostConfig.from_host_data("h", {"r1fleet": {}, "listen": "everywhere"})


def test_host_data_model_backend_and_policy_override_the_fleet_entry_key_by_key():
    """`--data model=7b` (and backend, policy) reach the plan as a fleet file's own settings do (issue 22 item 7)."""
    entry = HostConfig(name="box", address="192.168.1.21", policy={"max_context": 16384, "model": "32b"}).model_dump(mode="json")
    s = HostConfig.from_host_data("box", {"r1fleet": entry, "model": "7b", "backend": "llama.cpp",
                                          "policy": {"min_context": 4096, "model": "14b"}})
    assert (s.policy.model, s.policy.backend, s.policy.min_context, s.policy.max_context) == ("7b", "llama.cpp", 4096, 16384)
    hw = parse_probe((PROBES / "rtx4090.probe").read_text(), "box")
    served = served_alone(s, hw, None)
    assert served.plan.model == "deepseek-r1-distill-qwen-7b" and served.plan.backend == "llama.cpp"
    assert HostConfig.from_host_data("box", {"r1fleet": entry}).policy.model == "32b"  # nothing given: the entry's


@pytest.mark.parametrize("data,expected", [
    ({"model": "13b"}, "host box: field model: unknown model '13b'"),
    ({"model": 70}, "host box: field model: unknown model '70'"),
    ({"backend": "vllm"}, "host box: field backend: Input should be 'ollama' or 'llama.cpp'"),
    ({"policy": "fast"}, "host box: field policy: 'fast' is not a mapping of policy keys"),
    ({"policy": {"min_contxt": 4096}}, "host box: field policy.min_contxt: Extra inputs are not permitted"),
    ({"policy": {"min_context": 65536, "max_context": 8192}}, "host box: field policy: max_context (8192) is below min_context"),
])
def test_bad_host_data_names_the_host_the_field_and_the_fix(data, expected):
    with pytest.raises(FleetError) as caught:
        HostConfig.from_host_data("box", {"r1fleet": {}, **data})
    assert str(caught.value).startswith(expected) and "(fix: " in str(caught.value)


def test_model_download_prefers_mirror_in_rehearsal_and_needs_sha():
    gguf = GgufFile(url="https://hf/x.gguf", file="x.gguf", sha256="E" * 64)
    got = model_download("h", plan(gguf=gguf), HostConfig(name="h1", address="10.0.0.1", rehearsal=True, mirror="http://m:8088/"))
    assert got.url == "http://m:8088/models/x.gguf" and got.sha256 == "e" * 64
    assert model_download("h", plan(gguf=gguf), HostConfig(name="h1", address="10.0.0.1", mirror="http://m")).url == "https://hf/x.gguf"
    with pytest.raises(DeployError, match="catalog gguf.sha256"):
        model_download("h", plan(gguf=GgufFile(url="u", file="x.gguf", sha256="TODO")), HostConfig(name="h1", address="10.0.0.1"))


def test_cuda_architectures_and_target():
    assert cuda_architectures(["8.9", "8.6", "8.6", "bad"]) == "86;89"
    hw = Hardware(host="h", ram_total_mib=1, os=OsInfo(arch="aarch64", id="ubuntu"), tegra_release="# R36 (release), REVISION: 4.3")
    assert platform_from_hardware(hw) == Platform("arm64", "ubuntu", "", 36)
    with pytest.raises(DeployError, match="riscv64"):
        platform_from_hardware(Hardware(host="h", ram_total_mib=1, os=OsInfo(arch="riscv64")))


def test_a_host_without_room_for_the_model_is_refused_before_any_change():
    """20-43 GB downloads never fill a disk (audit M10); a model already on the disk needs no room."""
    from r1fleet.artifacts.disk import check_disks
    from r1fleet.hardware import parse_probe
    from r1fleet.plan.planner import plan_host

    probe = (Path(__file__).parents[1] / "fixtures" / "probes" / "dual-rtx3090.probe").read_text()
    hw = parse_probe(probe, "dual").model_copy(update={"disk_free_mib": 30000})
    p = plan_host(hw)
    models = "/var/lib/r1fleet/models"
    with pytest.raises(DeployError) as error:
        check_disks("dual", p, hw, models)
    message = str(error.value)
    assert "host dual" in message and "field model_dir" in message and "40,551 MiB" in message and "30,000 MiB" in message
    assert "the filesystem at / needs" in message and f"in {models}" in message
    present = hw.model_copy(update={"model_files": {p.gguf.file: p.gguf.size_bytes}})
    check_disks("dual", p, present, models)  # a re-run: nothing to download
    roomy = hw.model_copy(update={"disk_free_mib": 50000})
    check_disks("dual", p, roomy, models)


def test_unit_words_and_environment_reach_systemd_as_written():
    """A quote, a `%` or a `$` in a value stays inside its word or assignment (audit L3)."""
    import jinja2

    from r1fleet.render.systemd_unit import UnitSpecifier, environment_assignment, systemd_word

    assert systemd_word("/usr/bin/llama-server") == "/usr/bin/llama-server"
    assert systemd_word("/m/a b.gguf") == '"/m/a b.gguf"'
    assert systemd_word("50%$HOME") == '"50%%$$HOME"'
    assert systemd_word(UnitSpecifier("%d/api-key")) == "%d/api-key"
    hostile = 'GPU-a" "LD_PRELOAD=/tmp/evil.so'
    assignment = environment_assignment("CUDA_VISIBLE_DEVICES", hostile)
    assert assignment == 'CUDA_VISIBLE_DEVICES=GPU-a\\" \\"LD_PRELOAD=/tmp/evil.so'
    template = (Path(__file__).resolve().parents[2] / "r1fleet" / "operations" / "templates" / "r1fleet-service.j2").read_text()
    unit = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(template).render(svc={
        "description": "x", "user": "llama", "environment": [assignment], "exec_start": systemd_word("/m/a b"),
        "read_write_paths": ["/var/lib/llama"], "device_allow": [], "ip_allow": []})
    assert 'Environment="CUDA_VISIBLE_DEVICES=GPU-a\\" \\"LD_PRELOAD=/tmp/evil.so"\n' in unit
    assert 'ExecStart="/m/a b"\n' in unit


def test_ollama_keeps_its_own_flash_attention_choice_unless_the_plan_needs_it():
    """audit-ollama row 8: OLLAMA_FLASH_ATTENTION=1 bypassed Ollama's own check (off below compute
    capability 6.0 and on 7.2, ml/device.go); it is set only when the plan must force it."""
    from r1fleet.roles.ollama.decide import ollama_environment

    auto = ollama_environment(plan(kv_cache_type="f16", flash_attention=False), HostConfig(name="h1", address="10.0.0.1"), "/m")
    assert "OLLAMA_FLASH_ATTENTION" not in auto
    quantized = ollama_environment(plan(kv_cache_type="q8_0", flash_attention=True), HostConfig(name="h1", address="10.0.0.1"), "/m")
    assert quantized["OLLAMA_FLASH_ATTENTION"] == "1"  # a quantized KV cache needs it on


def test_an_ollama_import_needs_room_for_the_file_twice_a_registry_model_once():
    """`ollama create` keeps the GGUF and stores its rewrite; a model from a registry is stored once."""
    from r1fleet.hardware import parse_probe
    from r1fleet.plan.planner import plan_host
    from r1fleet.artifacts.pins import download_mib

    probe = (Path(__file__).parents[1] / "fixtures" / "probes" / "rtx4090.probe").read_text()
    hw = parse_probe(probe, "box")
    p = plan_host(hw)
    assert p.backend == "ollama"
    once = download_mib(p, hw)
    assert once == -(-p.gguf.size_bytes // 2**20) and download_mib(p, hw, imported=True) == 2 * once
    stored = hw.model_copy(update={"model_files": {"sha256-6150cb382311b69f09cc0f9a1b69fc029cbd742b66bb8ec531aa5ecf5c613e93": 1}})
    assert p.ollama_tag == "deepseek-r1:32b-qwen-distill-q4_K_M" and download_mib(p, stored) == 0


def test_a_pull_of_r1_0528s_8b_needs_room_for_ollamas_own_layer_not_the_gguf():
    """Ollama quantized R1-0528's 8B itself: its layer (5,225,373,760 bytes) is what a pull writes, not the GGUF."""
    from r1fleet.hardware import parse_probe
    from r1fleet.plan.planner import plan_host
    from r1fleet.artifacts.pins import download_mib

    probe = (Path(__file__).parents[1] / "fixtures" / "probes" / "rtx4090.probe").read_text()
    hw = parse_probe(probe, "box")
    p = plan_host(hw, model="8b-0528")
    assert p.backend == "ollama" and p.gguf.size_bytes == 5027785216
    assert download_mib(p, hw) == -(-5225373760 // 2**20)


def test_nvidia_gpus_without_uuids_are_chosen_by_index_in_pci_bus_order():
    """Issue 23 item 10: a multi-GPU plan from a probe without UUIDs names its GPUs by nvidia-smi's index, which is
    the PCI bus order only when CUDA is told so (its default order is fastest first)."""
    from r1fleet.roles.llama_cpp.decide import llama_environment

    split = plan(backend="llama.cpp", placement="multi-gpu", gpu_indices=[1, 0], tensor_split=[30, 18])
    env = llama_environment(split)
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert env["CUDA_VISIBLE_DEVICES"] == "1,0"  # the plan's order: CUDA numbers them CUDA0, CUDA1 in this order
    assert env["CUDA_SCALE_LAUNCH_QUEUES"] == "4x"
    by_uuid = llama_environment(split.model_copy(update={"gpu_uuids": ["GPU-b", "GPU-a"]}))
    assert by_uuid["CUDA_VISIBLE_DEVICES"] == "GPU-b,GPU-a" and "CUDA_DEVICE_ORDER" not in by_uuid


def test_the_start_check_counts_the_planned_gpus_without_uuids():
    from r1fleet.artifacts.llama_cpp_install import LlamaInstall
    from r1fleet.roles.llama_cpp.decide import llama_server_problems

    install = LlamaInstall(method="ollama-bundle", packages=(), binary="/opt/llama-server")
    split = plan(backend="llama.cpp", placement="multi-gpu", gpu_indices=[0, 1], tensor_split=[24, 24])
    assert llama_server_problems({"devices": ["CUDA0"]}, install, split) == [
        "/opt/llama-server --list-devices shows CUDA0, the plan needs 2: check the driver (nvidia-smi) and the backend library"]
    assert llama_server_problems({"devices": []}, install, split)[0].startswith("/opt/llama-server --list-devices shows no GPU")
    assert llama_server_problems({"devices": ["CUDA0", "CUDA1"]}, install, split) == []
