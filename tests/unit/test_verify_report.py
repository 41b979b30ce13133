"""The pure side of `r1fleet verify`: parsing host output, judging it against a plan, the table, the CLI line."""

from __future__ import annotations

import argparse
from pathlib import Path
import pytest

from r1fleet.plan.catalog import load_catalog
from r1fleet.plan.memory import kv_cache_mib
from r1fleet.records import DevicePlan, GgufFile, HostPlan
from r1fleet.cli.verify import pytest_argv, register
from r1fleet.render.systemd_unit import systemd_environment
from r1fleet.verify.readings import (
    Listener,
    exec_start_argv,
    flag_value,
    cgroup_unit,
    listener_problems,
    parse_ss_listeners,
)
from r1fleet.verify.judge import (
    ComputeApp,
    gpu_problems,
    memory_by_gpu,
    ollama_chat_body,
    ollama_chat_reply,
    openai_chat_reply,
    parse_compute_apps,
    parse_device_buffers,
    parse_gpu_query,
    speed_problem,
    split_problems,
)
from r1fleet.verify.table import HostResult, host_result, planned_gpu_mib, results_table

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"

# `ss -ltnpH` in a lab host running the Ollama stand-in with its llama-server runner (format as ss prints it)
SS_OLLAMA = """\
LISTEN 0      4096       127.0.0.1:11434      0.0.0.0:*    users:(("ollama",pid=812,fd=3))
LISTEN 0      512        127.0.0.1:40319      0.0.0.0:*    users:(("llama-server",pid=845,fd=7))
LISTEN 0      128          0.0.0.0:22         0.0.0.0:*    users:(("sshd",pid=53,fd=6))
LISTEN 0      128             [::]:22            [::]:*    users:(("sshd",pid=53,fd=7))
LISTEN 0      4096   127.0.0.53%lo:53         0.0.0.0:*    users:(("systemd-resolve",pid=60,fd=14))
"""


def rtx3090_plan(**changes) -> HostPlan:
    base = dict(
        host="box", model="deepseek-r1-distill-llama-70b", backend="llama.cpp", placement="multi-gpu", fits=True,
        context_length=8192, tensor_split=[41, 39], vendor="nvidia", est_tokens_per_second=17.3,
        gpu_uuids=["GPU-a", "GPU-b"],
        gpus=[{"index": 0, "name": "NVIDIA GeForce RTX 3090", "memory_total_mib": 24576, "memory_free_mib": 24575},
              {"index": 1, "name": "NVIDIA GeForce RTX 3090", "memory_total_mib": 24576, "memory_free_mib": 24575}],
        devices=[DevicePlan(device="GPU0 NVIDIA GeForce RTX 3090", capacity_mib=24575, planned_mib=23900, weights_mib=20000,
                            kv_cache_mib=1300, compute_mib=1000, overhead_mib=600),
                 DevicePlan(device="GPU1 NVIDIA GeForce RTX 3090", capacity_mib=24575, planned_mib=23500, weights_mib=19800,
                            kv_cache_mib=1200, compute_mib=900, overhead_mib=600)],
        gguf=GgufFile(url="", file="x.gguf", size_bytes=10, sha256="a" * 64),
    )
    base.update(changes)
    return HostPlan(**base)


# ---------------------------------------------------------------- listeners


def test_ss_output_is_parsed_with_addresses_ports_and_owners():
    listeners = parse_ss_listeners(SS_OLLAMA)
    assert Listener("127.0.0.1", 11434, (812,), "ollama") in listeners
    assert Listener("::", 22, (53,), "sshd") in listeners
    assert Listener("127.0.0.53", 53, (60,), "systemd-resolve") in listeners  # %lo stripped


def test_the_planned_loopback_service_with_a_loopback_runner_is_clean():
    assert listener_problems(parse_ss_listeners(SS_OLLAMA), {812, 845}, "127.0.0.1", 11434) == []


def test_a_wildcard_rebind_is_named_as_too_open():
    text = SS_OLLAMA.replace("127.0.0.1:11434", "0.0.0.0:11434")
    problems = listener_problems(parse_ss_listeners(text), {812, 845}, "127.0.0.1", 11434)
    assert problems == ["0.0.0.0:11434 is open (process ollama): the plan allows 127.0.0.1:11434 only"]


def test_an_ipv6_wildcard_on_the_port_is_too_open_even_beside_the_planned_socket():
    text = SS_OLLAMA + 'LISTEN 0 4096 [::]:11434 [::]:* users:(("ollama",pid=812,fd=4))\n'
    problems = listener_problems(parse_ss_listeners(text), {812}, "127.0.0.1", 11434)
    assert len(problems) == 1 and problems[0].startswith("[::]:11434 is open")


def test_a_stopped_service_or_a_stranger_on_the_port_is_reported():
    stopped = "\n".join(line for line in SS_OLLAMA.splitlines() if "11434" not in line and "40319" not in line)
    assert listener_problems(parse_ss_listeners(stopped), set(), "127.0.0.1", 11434) == ["nothing listens on 127.0.0.1:11434"]
    problems = listener_problems(parse_ss_listeners(SS_OLLAMA), {999}, "127.0.0.1", 11434)
    assert problems == ["127.0.0.1:11434 is held by ollama (pid 812), not by the service"]


def test_a_foreign_ollama_on_the_port_is_named_with_its_unit_even_while_the_service_is_down():
    """Ollama's own ollama.service, started again by its install script, holds the port while r1fleet's unit
    cannot bind it (so the service has no process): named with its pid and unit."""
    problems = listener_problems(parse_ss_listeners(SS_OLLAMA), set(), "127.0.0.1", 11434, {812: "ollama.service"})
    assert problems == ["127.0.0.1:11434 is held by ollama (pid 812, ollama.service), not by the service"]


@pytest.mark.parametrize("text, unit", [
    ("0::/system.slice/ollama.service\n", "ollama.service"),  # cgroup v2
    ("12:pids:/system.slice/x.service\n1:name=systemd:/system.slice/ollama.service\n0::/system.slice/ollama.service\n", "ollama.service"),
    ("0::/user.slice/user-1000.slice/session-3.scope\n", "session-3.scope"),
    ("0::/\n", None), ("", None),
    # hybrid, as a lab host shows it: systemd's v1 line names no unit, the unified one does
    ("1:name=systemd:/\n0::/payload/system.slice/ollama.service\n", "ollama.service"),
    ("1:name=systemd:/system.slice/ollama.service\n", "ollama.service"),  # v1 only ("0::/system.slice/evil name\x1b.service\n", None),
])
def test_the_unit_of_a_process_from_its_cgroup(text, unit):
    assert cgroup_unit(text) == unit


def test_a_service_port_on_a_lan_address_beyond_the_plan_is_reported():
    text = SS_OLLAMA + 'LISTEN 0 512 192.168.1.23:40999 0.0.0.0:* users:(("llama-server",pid=845,fd=9))\n'
    problems = listener_problems(parse_ss_listeners(text), {812, 845}, "127.0.0.1", 11434)
    assert problems == ["the service also listens on 192.168.1.23:40999; only 127.0.0.1:11434 and loopback runner ports are expected"]


def test_an_exposed_plan_accepts_its_own_lan_address():
    text = 'LISTEN 0 512 192.168.1.23:8080 0.0.0.0:* users:(("llama-server",pid=5,fd=3))\n'
    assert listener_problems(parse_ss_listeners(text), {5}, "192.168.1.23", 8080) == []


# ---------------------------------------------------------------- GPUs


def test_real_nvidia_smi_query_output_is_read():
    # the same columns the suite asks for, cut from a real capture (index,name,...,uuid,driver_version)
    rows = [line.split(", ") for line in (FIXTURES / "nvidia-smi-query__linux-x86_64__nvidia-h200__590.48.01.csv").read_text().splitlines()
            if line and not line.startswith("#")]
    text = "\n".join(f"{r[0]}, {r[1]}, {r[6]}, {r[7]}" for r in rows)
    gpus = parse_gpu_query(text)
    assert gpus and gpus[0].index == 0 and gpus[0].name == "NVIDIA H200" and gpus[0].uuid.startswith("GPU-")
    assert gpus[0].driver_version == "590.48.01"


def test_planned_gpus_visible_by_uuid_and_name():
    visible = parse_gpu_query("0, NVIDIA GeForce RTX 3090, GPU-a, 580.95.05\n1, NVIDIA GeForce RTX 3090, GPU-b, 580.95.05\n")
    assert gpu_problems(rtx3090_plan(), visible) == []


def test_a_missing_or_different_gpu_is_named():
    visible = parse_gpu_query("0, NVIDIA GeForce RTX 3080, GPU-a, 580.95.05\n")
    problems = gpu_problems(rtx3090_plan(), visible)
    assert "planned GPU GPU-b is not visible (visible: GPU-a)" in problems
    assert "GPU0 is NVIDIA GeForce RTX 3080, the plan has NVIDIA GeForce RTX 3090" in problems
    assert "GPU1 NVIDIA GeForce RTX 3090 is not visible" in problems
    assert gpu_problems(rtx3090_plan(), []) == ["nvidia-smi shows no GPU: the driver is not loaded or the GPUs are gone"]


def test_compute_apps_give_memory_per_planned_gpu():
    apps = parse_compute_apps("GPU-a, 845, /usr/bin/llama-server, 21000\nGPU-b, 845, /usr/bin/llama-server, 20000\nGPU-b, 99, python3, 500\n")
    assert apps[0] == ComputeApp("GPU-a", 845, "/usr/bin/llama-server", 21000)
    assert memory_by_gpu(apps, {845}, ["GPU-a", "GPU-b"]) == [21000, 20000]
    assert memory_by_gpu(apps[:1], {845}, ["GPU-a", "GPU-b"]) == [21000, 0]


RPC_LOG = (FIXTURES / "llama-server-load-log__rpc-2dev__b11669.txt").read_text()


def test_device_buffers_from_a_real_load_log():
    """llama-server b11669 loading the stand-in over two RPC devices with --tensor-split 15,16."""
    buffers = parse_device_buffers(RPC_LOG)
    assert [b.device for b in buffers] == ["RPC0[127.0.0.1:50100]", "RPC0[127.0.0.1:50101]"]
    assert [(b.model_mib, b.kv_mib, b.compute_mib) for b in buffers] == [(31.71, 90.0, 59.05), (60.40, 90.0, 48.91)]


def test_cuda_buffer_lines_and_dry_run_zeros():
    log = (  # the line formats of a CUDA build (src/llama-model.cpp, llama-kv-cache.cpp); the fit pre-pass prints 0.00 first
        "load_tensors:        CUDA0 model buffer size =     0.00 MiB\n"
        "load_tensors:   CPU_Mapped model buffer size =   563.62 MiB\n"
        "load_tensors:        CUDA0 model buffer size = 20038.81 MiB\n"
        "load_tensors:        CUDA1 model buffer size = 19940.67 MiB\n"
        "llama_kv_cache:      CUDA0 KV buffer size =  3116.00 MiB\n"
        "llama_kv_cache:      CUDA1 KV buffer size =  2964.00 MiB\n"
        "sched_reserve:   CUDA_Host compute buffer size =   236.07 MiB\n"
    )
    buffers = parse_device_buffers(log)
    assert [(b.device, b.model_mib, b.kv_mib) for b in buffers] == [("CUDA0", 20038.81, 3116.0), ("CUDA1", 19940.67, 2964.0)]


def test_split_problems_read_blocks_from_the_kv_buffers():
    stand_in = load_catalog().stand_ins[0]
    per_layer = kv_cache_mib(stand_in, 1, 8192, "f16")
    assert per_layer == 6.0
    plan = rtx3090_plan().model_copy(update={"rehearsal": True, "tensor_split": [15, 15], "model": stand_in.id})
    buffers = parse_device_buffers(RPC_LOG)
    assert split_problems(plan, buffers, per_layer) == []
    edited = plan.model_copy(update={"tensor_split": [16, 14]})
    [problem] = split_problems(edited, buffers, per_layer)
    assert "holds blocks [15, 15]" in problem and "the plan's are [16, 14]" in problem and "--tensor-split 16,15" in problem
    [one] = split_problems(plan, buffers[:1], per_layer)
    assert "loaded onto 1 device(s)" in one


# ---------------------------------------------------------------- API replies


def test_ollama_chat_reply_gives_text_thinking_and_decode_rate():
    reply = ollama_chat_reply({"message": {"role": "assistant", "content": "12", "thinking": "7 plus 5"},
                               "done": True, "eval_count": 100, "eval_duration": 2_000_000_000})
    assert (reply.content, reply.reasoning, reply.tokens_per_second) == ("12", "7 plus 5", 50.0)


def test_inline_think_tags_count_as_reasoning():
    reply = ollama_chat_reply({"message": {"content": "<think>add them</think>\n\n12"}, "eval_count": 0, "eval_duration": 0})
    assert (reply.content, reply.reasoning, reply.tokens_per_second) == ("12", "add them", None)


def test_llama_server_chat_reply_reads_reasoning_content_and_timings():
    reply = openai_chat_reply({"choices": [{"message": {"content": "12", "reasoning_content": "7+5"}}],
                               "timings": {"predicted_per_second": 48.2}})
    assert (reply.content, reply.reasoning, reply.tokens_per_second) == ("12", "7+5", 48.2)
    assert openai_chat_reply({"choices": []}).content == ""


def test_ollama_reasoning_reaches_verify_whether_or_not_the_template_thinks():
    """An R1 tag whose template can think gets `think: true` and answers `thinking`; one whose template cannot
    would answer that with a 400, so it is asked without, and its reasoning is read inline."""
    messages = [{"role": "user", "content": "7+5?"}]
    assert ollama_chat_body("r1:7b", messages, 1024, True, ["completion", "thinking"])["think"] is True
    for capabilities in (["completion"], None, "thinking"):
        assert "think" not in ollama_chat_body("r1:7b", messages, 1024, True, capabilities), capabilities
    assert "think" not in ollama_chat_body("smollm", messages, 64, False, ["completion", "thinking"])
    inline = ollama_chat_reply({"message": {"content": "<think>7 plus 5</think>12"}})
    assert (inline.content, inline.reasoning) == ("12", "7 plus 5")


def test_openai_replies_carry_reasoning_under_either_name():
    """llama-server's `reasoning_content`, Ollama's /v1 `reasoning` (openai/openai.go of v0.32.9)."""
    ollama = openai_chat_reply({"choices": [{"message": {"content": "12", "reasoning": "7+5"}}]})
    assert (ollama.content, ollama.reasoning) == ("12", "7+5")


def test_speed_judgement():
    assert speed_problem(20.0, 30.0, 0.5) is None
    assert speed_problem(10.0, 30.0, 0.5) == "10.0 tokens/s is below 0.5 x the plan's estimate of 30 tokens/s"
    assert speed_problem(1.0, 30.0, 0.0) is None  # rehearsal: reported, never failed
    assert speed_problem(None, 30.0, 0.0).startswith("no decode rate")


def test_systemd_show_values():
    env = systemd_environment('OLLAMA_HOST=127.0.0.1:11434 "OLLAMA_MODELS=/var/lib/r1fleet/models/ollama" OLLAMA_CONTEXT_LENGTH=4096')
    assert env["OLLAMA_MODELS"] == "/var/lib/r1fleet/models/ollama" and env["OLLAMA_CONTEXT_LENGTH"] == "4096"
    shown = ("{ path=/usr/bin/llama-server ; argv[]=/usr/bin/llama-server -m /m/x.gguf -c 8192 --host 127.0.0.1 ; "
             "ignore_errors=no ; start_time=[n/a] ; stop_time=[n/a] ; pid=0 ; code=(null) ; status=0/0 }")
    argv = exec_start_argv(shown)
    assert flag_value(argv, "-c", "--ctx-size") == "8192" and flag_value(argv, "-m") == "/m/x.gguf"
    assert flag_value(["--ctx-size=4096"], "-c", "--ctx-size") == "4096" and flag_value(argv, "--port") is None


# ---------------------------------------------------------------- the table


def test_table_shows_measured_against_planned_and_names_failures():
    results = [
        HostResult(host="lab-4090", model="m", backend="ollama", context=8192, measured_tps=51.23, est_tps=39.4,
                   gpu_used_mib=120, gpu_planned_mib=24541, passed=["service_active", "chat_answers"]),
        HostResult(host="lab-3060", model="m", backend="ollama", context=8192, rehearsal=True, target_model="r1-14b",
                   est_tps=30.8, passed=["api_healthy"], failed=["service_active", "listens_only_on_plan"]),
        HostResult(host="gone", error="cannot connect over SSH to root@10.0.0.9:22: timed out"),
    ]
    table = results_table(results)
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["HOST", "MODEL", "BACKEND"]
    assert [line.split()[0] for line in lines[1:4]] == ["gone", "lab-3060", "lab-4090"]  # sorted by host
    row_4090 = lines[3]
    assert "51.2/39.4" in row_4090 and "120/24,541" in row_4090 and row_4090.endswith("PASS")
    assert "m (rehearsal for r1-14b)" in lines[2] and lines[2].endswith("FAIL: service_active, listens_only_on_plan")
    assert "-/30.8" in lines[2]
    assert "FAIL: cannot connect over SSH" in lines[1]
    assert "1/3 hosts pass" in table


def test_a_host_with_no_passing_check_is_not_a_pass():
    assert HostResult(host="h", skipped=["gpus_visible"]).result == "FAIL"
    assert HostResult(host="h", passed=["a"], skipped=["b"]).result == "PASS"


def test_a_host_row_carries_its_plan_measurements_and_outcomes():
    plan = rtx3090_plan()
    row = host_result("lab-3090", {"service_active": "passed", "decode_speed": "failed", "key_required": "skipped"},
                      plan, {"tokens_per_second": 21.5, "gpu_used_mib": 40000})
    assert (row.model, row.backend, row.est_tps, row.gpu_planned_mib) == (plan.model, plan.backend, plan.est_tokens_per_second, 47400)
    assert (row.measured_tps, row.gpu_used_mib) == (21.5, 40000)
    assert (row.passed, row.failed, row.skipped, row.result) == (["service_active"], ["decode_speed"], ["key_required"], "FAIL")
    unreachable = host_result("gone", {"service_active": "failed"}, error="cannot connect over SSH")
    assert unreachable.failed == [] and unreachable.model is None and unreachable.result == "FAIL"  # the reason, once


def test_planned_gpu_memory_sums_gpu_devices_only():
    assert planned_gpu_mib(rtx3090_plan()) == 47400
    assert planned_gpu_mib(rtx3090_plan(placement="cpu")) is None


# ---------------------------------------------------------------- CLI


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_verify_options_become_a_pytest_command_line(tmp_path):
    args = parse(["verify", "--fleet", "lab", "--junit", "out.xml", "-k", "lab-4090", "--report", "t.txt",
                  "--min-speed-fraction", "0.3", "--hash-models", "--", "-x"])
    argv = pytest_argv(args, tmp_path)
    assert argv[1:4] == ["-m", "pytest", str(tmp_path)]
    joined = " ".join(argv)
    for part in ("--fleet lab", "--junit-xml out.xml", "-k lab-4090", "--verify-report t.txt", "--min-speed-fraction 0.3", "--hash-models"):
        assert part in joined
    assert argv[-1] == "-x"
    bare = pytest_argv(parse(["verify"]), tmp_path)
    assert "--fleet" not in bare and "-k" not in bare


def test_verify_suite_options_exist_in_its_conftest():
    """Every option the CLI passes is one the suite's conftest declares (they cannot drift apart)."""
    conftest = (Path(__file__).resolve().parents[2] / "r1fleet" / "verify" / "suite" / "conftest.py").read_text()
    for option in ("--fleet", "--verify-report", "--min-speed-fraction", "--hash-models", "--rehearsal"):
        assert f'"{option}"' in conftest


def test_bad_fleet_stops_verify_with_a_usage_error(tmp_path):
    """An invalid fleet file ends the run with pytest's usage status and the fleet message, not a traceback."""
    import subprocess
    import sys

    bad = tmp_path / "fleet.yml"
    bad.write_text("hosts:\n  box: {adress: 10.0.0.1}\n")
    suite = Path(__file__).resolve().parents[2] / "r1fleet" / "verify" / "suite"
    result = subprocess.run([sys.executable, "-m", "pytest", str(suite), "-p", "no:cacheprovider", "--rootdir", str(suite),
                             "--fleet", str(bad), "-q"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 4, result.stdout + result.stderr
    assert "host box: field adress" in result.stderr
    assert "Traceback" not in result.stderr


# `launchctl print system/<label>` of a running LaunchDaemon, in the layout launchd prints (tab-indented
# `key = value` lines, nested blocks); the fields read are the ones public projects parse alike.
LAUNCHCTL_PRINT = """system/com.r1fleet.ollama = {
\tactive count = 1
\tpath = /Library/LaunchDaemons/com.r1fleet.ollama.plist
\ttype = LaunchDaemon
\tstate = running

\tprogram = /usr/local/lib/r1fleet/ollama-0.32.9/ollama
\targuments = {
\t\t/usr/local/lib/r1fleet/ollama-0.32.9/ollama
\t\tserve
\t}

\tenvironment = {
\t\tOLLAMA_HOST => 127.0.0.1:11434
\t\tOLLAMA_MODELS => /var/lib/r1fleet/models/ollama
\t\tOLLAMA_CONTEXT_LENGTH => 16384
\t}

\truns = 1
\tpid = 812
\tlast exit code = (never exited)
\tendpoints = {
\t\tstate = active
\t}
}
"""


def test_launchd_job_state_pid_and_environment():
    from r1fleet.verify.readings import launchd_disabled, parse_launchctl_print

    job = parse_launchctl_print(LAUNCHCTL_PRINT)
    assert job["state"] == "running" and job["pid"] == 812  # not the nested endpoint state
    assert job["path"] == "/Library/LaunchDaemons/com.r1fleet.ollama.plist"
    assert job["environment"]["OLLAMA_MODELS"] == "/var/lib/r1fleet/models/ollama"
    assert job["environment"]["OLLAMA_CONTEXT_LENGTH"] == "16384"
    stopped = parse_launchctl_print("system/x = {\n\tstate = not running\n\tendpoints = {\n\t\tstate = active\n\t}\n}\n")
    assert stopped["state"] == "not running" and stopped["pid"] is None
    assert launchd_disabled('disabled services = {\n\t"com.r1fleet.ollama" => disabled\n}', "com.r1fleet.ollama")
    assert launchd_disabled('\t"com.r1fleet.ollama" => true', "com.r1fleet.ollama")  # older macOS
    assert not launchd_disabled('\t"com.r1fleet.ollama" => enabled\n\t"other" => disabled', "com.r1fleet.ollama")


def test_lsof_listeners():
    from r1fleet.verify.readings import parse_lsof_listeners

    text = "p812\ncollama\nn127.0.0.1:11434\np900\ncllama-server\nn127.0.0.1:53001\np77\ncsshd\nn*:22\nn[::1]:22\n"
    listeners = parse_lsof_listeners(text)
    assert [(l.address, l.port, l.pids, l.process) for l in listeners] == [
        ("127.0.0.1", 11434, (812,), "ollama"), ("127.0.0.1", 53001, (900,), "llama-server"),
        ("0.0.0.0", 22, (77,), "sshd"), ("::1", 22, (77,), "sshd")]
