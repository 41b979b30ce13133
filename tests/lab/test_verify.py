"""Lab: `r1fleet verify` passes on the converged lab, and each injected fault fails it, naming host and check.

Needs root and the lab (tests/lab/conftest.py). The module converges the lab once with the real deploy
(idempotent), then in rounds: inject one fault into each of two lab hosts, run verify limited to them, read
which checks failed from its JUnit report, undo the faults and re-converge the hosts.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import xml.etree.ElementTree as ET
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
OLLAMA_HOST = "lab-4090"  # rtx4090 profile: one GPU, Ollama
LLAMA_HOST = "lab-dual3090"  # two RTX 3090: llama-server with --tensor-split
OLLAMA_UNIT = "r1fleet-ollama.service"
LLAMA_UNIT = "r1fleet-llama-server.service"
LLAMA_MODEL = "/var/lib/r1fleet/models/llama.cpp/SmolLM2-135M-Instruct.Q4_1.gguf"
DROP_IN = "zz-r1fleet-verify-fault.conf"


def deploy(*limit: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "pyinfra", "-y", "inventory.py", "deploy.py"]
    for host in limit:
        argv += ["--limit", host]
    env = {**os.environ, "R1FLEET_FLEET": "lab"}
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)


def converge(*limit: str) -> None:
    result = deploy(*limit)
    if result.returncode != 0:
        pytest.fail(f"the deploy did not converge the lab (exit {result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-2000:]}")


@pytest.fixture(scope="module")
def converged_lab(lab):
    """The lab after `R1FLEET_FLEET=lab pyinfra -y inventory.py deploy.py` (idempotent, so safe to repeat)."""
    converge()
    return lab


def verify(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "r1fleet", "verify", "--fleet", "lab", *args]
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def failed_checks(junit: Path) -> set[str]:
    """Test names (`test_<check>[<host>]`) with a failure or an error in a JUnit XML report."""
    names = set()
    for case in ET.parse(junit).getroot().iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            names.add(case.get("name"))
    return names


def table_line(output: str, host: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith(host + " ")]
    assert lines, f"no table row for {host} in:\n{output}"
    return lines[-1]


def test_verify_passes_on_the_converged_lab(converged_lab, tmp_path):
    report = tmp_path / "table.txt"
    result = verify("--junit", str(tmp_path / "junit.xml"), "--report", str(report))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "r1fleet verify: per host" in result.stdout
    for name in converged_lab:
        assert table_line(result.stdout, name).endswith("PASS"), output
    assert report.read_text().splitlines()[0].startswith("HOST")
    assert not failed_checks(tmp_path / "junit.xml")


def test_verify_through_the_ansible_inventory_of_the_lab(converged_lab):
    """An Ansible user's inventory drives the same suite through testinfra's Ansible backend: on an Ollama host and
    a llama.cpp host (every host is verified through the fleet file above; two show the backend works for both)."""
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "r1fleet/verify/suite",
            "--ansible-inventory", "inventory/ansible/lab-hosts.yml", "-k", "lab-cpu or lab-dual3090"]
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "2/2 hosts pass" in result.stdout, result.stdout[-2000:]


@contextmanager
def faults(ssh, injected: dict[str, tuple[str, str]]):
    """Inject one fault into each named lab host; always undo them and re-converge those hosts afterwards."""
    undone = []
    try:
        for host, (inject, undo) in injected.items():
            undone.append((host, undo))
            done = ssh(host, inject)
            assert done.returncode == 0, f"could not inject the fault on {host}: {done.stderr}"
        yield
    finally:
        for host, undo in undone:
            ssh(host, undo)
        converge(*injected)


def restart(unit: str) -> str:
    """Restart even after several quick restarts (the unit's StartLimitBurst would refuse)."""
    return f"systemctl reset-failed {unit}; systemctl restart {unit}"


def drop_in(unit: str, body: str) -> tuple[str, str]:
    """Commands that add (and remove) a drop-in for `unit` and restart it."""
    directory = f"/etc/systemd/system/{unit}.d"
    text = shlex.quote(f"[Service]\n{body}\n")
    inject = f"mkdir -p {directory} && printf '%s' {text} > {directory}/{DROP_IN} && systemctl daemon-reload && {restart(unit)}"
    undo = f"rm -f {directory}/{DROP_IN}; systemctl daemon-reload; {restart(unit)}"
    return inject, undo


def _llama_flag_drop_in(ssh, flag: str, value: str) -> tuple[str, str]:
    """A drop-in replacing llama-server's ExecStart with the same argv but `flag value`."""
    shown = ssh(LLAMA_HOST, f"systemctl show -p ExecStart --value {LLAMA_UNIT}").stdout
    from r1fleet.verify.readings import exec_start_argv

    argv = exec_start_argv(shown)
    assert flag in argv, f"no {flag} in {LLAMA_UNIT}'s ExecStart: {shown}"
    argv[argv.index(flag) + 1] = value
    return drop_in(LLAMA_UNIT, "ExecStart=\nExecStart=" + " ".join(argv))


FAULTS = {
    # name: (host, expected failing check, how to build (inject, undo))
    "service-stopped": (OLLAMA_HOST, "service_active",
                        lambda ssh: (f"systemctl stop {OLLAMA_UNIT}", restart(OLLAMA_UNIT))),
    "open-on-all-addresses": (OLLAMA_HOST, "listens_only_on_plan",
                              lambda ssh: drop_in(OLLAMA_UNIT, "Environment=OLLAMA_HOST=0.0.0.0:11434")),
    "model-file-swapped": (LLAMA_HOST, "model_present", lambda ssh: (
        # another file in its place: the same weights with 1 MiB appended (llama-server still loads it)
        f"cp -p {LLAMA_MODEL} {LLAMA_MODEL}.orig && head -c 1048576 /dev/zero >> {LLAMA_MODEL} && {restart(LLAMA_UNIT)}",
        f"mv -f {LLAMA_MODEL}.orig {LLAMA_MODEL}; {restart(LLAMA_UNIT)}")),
    # the GPU hidden from Ollama by hand: the model lands on the CPU (size_vram 0)
    "ollama-gpus-hidden": (OLLAMA_HOST, "model_on_gpu",
                           lambda ssh: drop_in(OLLAMA_UNIT, "Environment=CUDA_VISIBLE_DEVICES=")),
    "ollama-context-changed": (OLLAMA_HOST, "context_matches_plan",
                               lambda ssh: drop_in(OLLAMA_UNIT, "Environment=OLLAMA_CONTEXT_LENGTH=4096")),
    "llama-context-changed": (LLAMA_HOST, "context_matches_plan", lambda ssh: _llama_flag_drop_in(ssh, "-c", "4096")),
    # the split edited by hand: llama.cpp then places 20 | 10 + output, not the plan's 15 | 15 + output
    "llama-split-edited": (LLAMA_HOST, "layers_per_gpu", lambda ssh: _llama_flag_drop_in(ssh, "--tensor-split", "20,11")),
}


# Each round breaks the Ollama host and the llama.cpp host at once, one fault each (a host's checks are its own), so
# one verify run and one re-converge serve two faults.
ROUNDS = [("service-stopped", "model-file-swapped"), ("open-on-all-addresses", "llama-context-changed"),
          ("ollama-gpus-hidden", "llama-split-edited"), ("ollama-context-changed",)]


def test_the_rounds_hold_every_fault_once_and_each_host_once_a_round():
    assert sorted(name for names in ROUNDS for name in names) == sorted(FAULTS)
    assert all(len({FAULTS[name][0] for name in names}) == len(names) for names in ROUNDS)


@pytest.mark.parametrize("names", ROUNDS, ids="+".join)
def test_verify_names_host_and_check_for_each_fault(converged_lab, ssh, tmp_path, names):
    junit = tmp_path / "junit.xml"
    with faults(ssh, {FAULTS[name][0]: FAULTS[name][2](ssh) for name in names}):
        result = verify("-k", " or ".join(FAULTS[name][0] for name in names), "--junit", str(junit))
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    for name in names:
        host, check, _ = FAULTS[name]
        assert f"test_{check}[{host}]" in failed_checks(junit), (name, output)
        row = table_line(result.stdout, host)
        assert "FAIL" in row and check in row, (name, row)
        # the failure message names the host as well as the check
        assert f"{host}: " in output, name


def test_verify_of_the_lab_passes_again_after_the_faults(converged_lab):
    result = verify("-k", f"{OLLAMA_HOST} or {LLAMA_HOST}")
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_dead_host_fails_fast(converged_lab, tmp_path):
    """An address nothing answers on: the run fails within the SSH connect timeout, naming the host."""
    fleet = tmp_path / "dead.yml"
    # 10.77.0.254 is inside the lab subnet but no lab host has it: a host of one's own that is down, so a fleet file
    # without `lab:` (a lab fleet serves the lab's hosts at the lab's addresses only, fleet-file.md)
    fleet.write_text("hosts:\n  dead-box: {address: 10.77.0.254, ssh_user: root}\n")
    argv = [sys.executable, "-m", "r1fleet", "verify", "--fleet", str(fleet), "-k", "service_active"]
    import time

    started = time.monotonic()
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stdout + result.stderr
    assert "dead-box" in table_line(result.stdout, "dead-box") and "connecting over SSH to root@10.77.0.254" in result.stdout
    assert elapsed < 60, f"a dead host took {elapsed:.0f} s to fail"
