"""The r1fleet command on bad input: a clear message naming what is wrong, exit status 2, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROBES = ROOT / "tests" / "fixtures" / "probes"


def r1fleet(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "r1fleet", *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_plan_json_follows_the_contract():
    out = r1fleet("plan", str(PROBES / "dual-rtx3090.probe"), str(PROBES / "cpu-16g.probe"), "--json")
    assert out.returncode == 0, out.stderr
    hosts = {h["host"]: h for h in json.loads(out.stdout)["hosts"]}
    dual = hosts["dual-rtx3090"]
    for key in ("model", "ollama_tag", "backend", "context_length", "kv_cache_type", "tensor_split", "gpus",
                "unified_memory_mib", "devices", "est_tokens_per_second", "reasons"):
        assert key in dual
    assert dual["backend"] == "llama.cpp" and sum(dual["tensor_split"]) == 80
    assert {"device", "capacity_mib", "planned_mib", "weights_mib", "kv_cache_mib", "compute_mib", "overhead_mib"} <= set(dual["devices"][0])
    assert hosts["cpu-16g"]["model"] == "deepseek-r1-distill-qwen-1.5b" and hosts["cpu-16g"]["tensor_split"] is None


def test_plan_table_explains_each_host():
    out = r1fleet("plan", str(PROBES / "rtx3060-12g.probe"))
    assert out.returncode == 0
    assert "14b" in out.stdout and "rtx3060-12g:" in out.stdout and "not 32b" in out.stdout


def test_what_if_flash_attention_and_kv_type():
    """Plan a configuration on purpose: without flash attention the attention scores cost context; q8_0 buys it."""
    dual = str(PROBES / "dual-rtx3090.probe")
    default = json.loads(r1fleet("plan", dual, "--json").stdout)["hosts"][0]
    off = json.loads(r1fleet("plan", dual, "--json", "--flash-attention", "off").stdout)["hosts"][0]
    q8 = json.loads(r1fleet("plan", dual, "--json", "--kv-type", "q8_0").stdout)["hosts"][0]
    assert default["flash_attention"] and not default["flash_attention_forced"]
    assert not off["flash_attention"] and off["flash_attention_forced"] and off["kv_cache_type"] == "f16"
    assert off["model"] == default["model"] and off["context_length"] < default["context_length"]
    assert q8["model"] == default["model"] and q8["kv_cache_type"] == "q8_0" and q8["context_length"] > default["context_length"]


def test_forced_model_that_does_not_fit_exits_1_with_figures():
    out = r1fleet("plan", str(PROBES / "rtx3060-12g.probe"), "--model", "70b", "--json")
    assert out.returncode == 1
    (host,) = json.loads(out.stdout)["hosts"]
    assert host["fits"] is False and host["devices"][0]["planned_mib"] > host["devices"][0]["capacity_mib"]


@pytest.mark.parametrize(
    "args,expected",
    [
        (["plan", "no-such.probe"], "no-such.probe: cannot read"),
        (["plan", str(PROBES / "rtx4090.probe"), "--model", "13b"], "unknown model '13b'"),
        (["plan", str(PROBES / "rtx4090.probe"), "--context", "10"], "--context 10 is too small"),
        (["plan", "--fleet", "no-such-fleet.yml"], "no-such-fleet.yml: no such file"),
        (["probe", "x", "--fleet", "inventory/fleet.example.yml"], "host x: not in"),
        (["plan", str(PROBES / "rtx4090.probe"), "--flash-attention", "off", "--kv-type", "q8_0"], "needs flash attention"),
    ],
)
def test_bad_input_is_a_clear_error(args, expected):
    out = r1fleet(*args)
    assert out.returncode == 2, out
    assert expected in out.stderr and "Traceback" not in out.stderr


def test_garbage_probe_document_names_the_host(tmp_path):
    bad = tmp_path / "toaster.probe"
    bad.write_text("this is not a probe document\n")
    out = r1fleet("plan", str(bad))
    assert out.returncode == 2 and "host toaster" in out.stderr and "r1fleet probe" in out.stderr
    assert "Traceback" not in out.stderr


def test_unreachable_host_probe_fails_with_the_host_named():
    out = r1fleet("probe", "root@127.0.0.1:1")
    assert out.returncode == 2 and "127.0.0.1" in out.stderr and "Traceback" not in out.stderr


def test_vagrantfile_is_valid_ruby():
    import shutil

    if not shutil.which("ruby"):
        pytest.skip("ruby is not installed (scripts/setup.sh installs it as root)")
    out = subprocess.run(["ruby", "-c", str(ROOT / "Vagrantfile")], capture_output=True, text=True)
    assert out.returncode == 0 and "Syntax OK" in out.stdout


def test_a_probe_file_with_bytes_that_are_not_utf8_is_a_clear_error(tmp_path):
    probe = tmp_path / "odd.probe"
    probe.write_bytes(b"#### r1fleet:uname\nLinux 6.1 x86_64\n#### r1fleet:meminfo\nMemTotal: \xff\xfe 100 kB\n")
    out = r1fleet("plan", str(probe))
    assert out.returncode == 2 and "host odd: field meminfo" in out.stderr and "Traceback" not in out.stderr


def test_a_gpu_named_with_terminal_commands_reaches_the_terminal_as_text(tmp_path):
    """A host's GPU name is its own to print (audit L4): escape sequences in it (retitle, clear the screen, ring
    the bell) are dropped where the probe document is read, so `r1fleet plan` prints only text."""
    hostile = "NVIDIA GeForce RTX 4090\x1b]0;owned\x07\x1b[2J\x9b31m"
    text = (PROBES / "rtx4090.probe").read_text().replace("NVIDIA GeForce RTX 4090,", hostile + ",", 1)
    assert hostile in text
    (tmp_path / "odd.probe").write_text(text)
    for args in (["plan"], ["plan", "--json"]):
        out = r1fleet(*args, str(tmp_path / "odd.probe"))
        assert out.returncode == 0, out.stderr
        shown = out.stdout + out.stderr
        assert not any(ch in shown for ch in "\x1b\x07\x9b") and "RTX 4090]0;owned[2J31m" in shown
