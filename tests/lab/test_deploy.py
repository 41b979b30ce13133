"""Lab integration: `R1FLEET_FLEET=lab pyinfra -y inventory.py deploy.py` converges every lab host.

Real SSH, real systemd, real units and the real llama-server from the distro package; only the GPUs
(profiles) and the Ollama binary (r1fleet/lab/standins/ollama) are stand-ins. The lab is always rehearsal.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from r1fleet.plan.catalog import load_catalog
from r1fleet.lab import state
from r1fleet.plan.memory import kv_cache_mib
from r1fleet.records import HostPlan
from r1fleet.plan.planner import rehearse
from r1fleet.tensor_split import placed_blocks
from r1fleet.verify.readings import exec_start_argv, flag_value
from r1fleet.verify.judge import parse_device_buffers

ROOT = Path(__file__).resolve().parents[2]
PYINFRA = str(Path(sys.executable).with_name("pyinfra"))
UNITS = ("r1fleet-ollama.service", "r1fleet-llama-server.service")
MAX_EXPOSURE = 2.5


def deploy(*extra: str, fleet: str | Path = "lab", timeout: int = 1800, trace_facts: bool = False,
           ) -> subprocess.CompletedProcess:
    """`pyinfra -y inventory.py deploy.py` on a lab fleet (the lab's own, or another lab file or a copy of it)."""
    env = {**os.environ, "R1FLEET_FLEET": str(fleet), **({"R1FLEET_FACT_TRACE": "1"} if trace_facts else {})}
    return subprocess.run([PYINFRA, "-y", "inventory.py", "deploy.py", *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def changed_count(output: str) -> int:
    """The 'Success' (= changed) column of pyinfra's Grand total row; '-' means none."""
    row = next(line for line in output.splitlines() if line.strip().startswith("Grand total"))
    cells = row.split()[2:]  # hosts, success (changed), error, no change
    return 0 if cells[1] == "-" else int(cells[1])


def unit_of(ssh, host: str) -> str:
    for unit in UNITS:
        if ssh(host, f"test -f /etc/systemd/system/{unit}").returncode == 0:
            return unit
    pytest.fail(f"{host}: no r1fleet unit written")


def unit_state(ssh, host: str, unit: str) -> dict[str, str]:
    out = ssh(host, f"systemctl show -p ActiveState -p UnitFileState -p ExecMainStartTimestampMonotonic {unit}; "
                    f"stat -c 'Mtime=%Y' /etc/systemd/system/{unit}").stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def controller_files() -> set[Path]:
    return {path for path in Path(os.environ["R1FLEET_CACHE_DIR"]).rglob("*")}


@pytest.fixture(scope="module")
def dry_run(lab):
    """`--dry` before the first deploy: what the mirror served and what the controller's cache holds, before
    and after."""
    from r1fleet.lab import mirror

    before = (sum(mirror.served_bytes().values()), controller_files())
    # without -y: pyinfra detects the changes and lists them (with -y it skips that)
    dry = subprocess.run([PYINFRA, "inventory.py", "deploy.py", "--dry"], cwd=ROOT, stdin=subprocess.DEVNULL,
                         env={**os.environ, "R1FLEET_FLEET": "lab"}, capture_output=True, text=True, timeout=600)
    return dry, before, (sum(mirror.served_bytes().values()), controller_files())


@pytest.fixture(scope="module")
def converged(lab, dry_run):
    first = deploy()
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    return first


def test_a_dry_run_downloads_nothing_and_lists_what_a_run_would(dry_run, ssh):
    """pyinfra users read `--dry` as "nothing is applied, anywhere": no byte from the mirror (the lab's
    internet), nothing in the controller's cache, no cache server; the downloads are listed with their sizes."""
    dry, (served_before, files_before), (served_after, files_after) = dry_run
    assert dry.returncode == 0, dry.stdout[-4000:] + dry.stderr[-4000:]
    assert served_after == served_before and files_after == files_before
    assert re.search(r"(Model|Stand-in) \S+\.gguf \([0-9.]+ MiB\)", dry.stdout + dry.stderr), dry.stderr[-4000:]


def test_every_lab_host_serves_its_plan(converged, lab, ssh):
    for host in lab:
        unit = unit_of(ssh, host)
        status = unit_state(ssh, host, unit)
        assert status["ActiveState"] == "active" and status["UnitFileState"] == "enabled", (host, status)
        port = 11434 if unit == UNITS[0] else 8080
        listening = ssh(host, "ss -Hltn").stdout.split("\n")
        ours = [line.split()[3] for line in listening if line.split() and line.split()[3].endswith(f":{port}")]
        assert ours == [f"127.0.0.1:{port}"], (host, ours)
        if unit == UNITS[0]:
            body = json.dumps({"model": "r1fleet/smollm2:135m-instruct-q4_1", "stream": False,
                               "messages": [{"role": "user", "content": "Say hello."}]})
            url = f"http://127.0.0.1:{port}/api/chat"
        else:
            body = json.dumps({"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16})
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
        answer = ssh(host, f"curl -fsS --max-time 120 -H 'Content-Type: application/json' -d @- {url}", stdin=body)
        assert answer.returncode == 0, (host, answer.stderr)
        reply = json.loads(answer.stdout)
        text = reply["message"]["content"] if "message" in reply else reply["choices"][0]["message"]["content"]
        assert text.strip(), (host, reply)


def test_units_score_at_most_2_5(converged, lab, ssh):
    for host in lab:
        units = [unit_of(ssh, host)]
        if units[0] == "r1fleet-ollama.service":  # and the unit that loads its model after every start
            units.append("r1fleet-ollama-preload.service")
        for unit in units:
            out = ssh(host, f"systemd-analyze security --no-pager {unit}").stdout
            score = float(re.search(r"Overall exposure level for \S+: ([0-9.]+)", out).group(1))
            assert score <= MAX_EXPOSURE, (host, unit, score)


def test_llama_cpp_places_the_planned_blocks_on_each_gpu(converged, lab, ssh):
    """The real llama-server, on the lab's GPU stand-ins (one llama.cpp RPC device per simulated GPU), puts
    exactly the plan's blocks on each device: its load log's KV buffers say so, and they agree with
    r1fleet's replay of llama.cpp's rule for the flag the unit passes."""
    split_hosts = [h for h in lab if unit_of(ssh, h) == UNITS[1]]
    assert split_hosts, "the lab has a multi-GPU profile planned onto llama.cpp"
    plans = {p["host"]: p for p in json.loads(subprocess.run(
        [sys.executable, "-m", "r1fleet", "plan", "--fleet", "lab", "--json"], cwd=ROOT, capture_output=True,
        text=True, timeout=300).stdout)["hosts"]}
    for host in split_hosts:
        argv = exec_start_argv(ssh(host, "systemctl show -p ExecStart --value r1fleet-llama-server").stdout)
        flag = [int(v) for v in flag_value(argv, "--tensor-split").split(",")]
        assert flag_value(argv, "--rpc").count(",") == len(flag) - 1  # one device per planned GPU
        invocation = ssh(host, "systemctl show -p InvocationID --value r1fleet-llama-server").stdout.strip()
        log = ssh(host, f"journalctl -o cat --no-pager _SYSTEMD_INVOCATION_ID={invocation}").stdout
        buffers = parse_device_buffers(log)
        stand_in = load_catalog().stand_ins[0]
        per_layer = kv_cache_mib(stand_in, 1, int(flag_value(argv, "-c")), "f16")
        reported = [round(b.kv_mib / per_layer) for b in buffers]
        planned = rehearse(HostPlan.model_validate({k: v for k, v in plans[host].items() if k != "tensor_split_flag"}))
        assert reported == placed_blocks(flag, stand_in.arch.layers) == planned.tensor_split, (host, reported, flag)
        assert buffers[-1].model_mib > buffers[0].model_mib  # the output layer sits on the last device
        # level 4 logs buffers and timings, never a prompt: the verify chat's text is not in the journal
        assert "Reply with the number only" not in log


def test_each_artifact_is_fetched_once_per_fleet(converged, lab):
    """Four hosts, one GGUF (imported by two hosts, the weights of the lab registry's model for one, the
    llama.cpp model of another) and one Ollama release: the lab mirror (its internet) serves each once, to the
    controller's cache, which serves the hosts (r1fleet/operations/fleet_cache.py)."""
    from r1fleet.lab import mirror, paths

    served = {path: sent for path, sent in mirror.served_bytes().items()
              if path.startswith(("/models/", "/registry/")) or path.endswith(".tar.zst")}
    if not served:
        pytest.skip("the lab was deployed before this session: nothing was downloaded")
    # distinct by content: the GGUF is on the mirror twice, as a file and as the lab registry's weights blob
    contents = {mirror.cached_sha256(paths.MIRROR_DIR / path.lstrip("/")): (paths.MIRROR_DIR / path.lstrip("/"))
                for path in served}
    distinct = sum(file.stat().st_size for file in contents.values())
    assert distinct <= sum(served.values()) <= 1.05 * distinct, served


def test_second_run_changes_nothing(converged, lab, ssh):
    before = {h: unit_state(ssh, h, unit_of(ssh, h)) for h in lab}
    again = deploy("-vv", trace_facts=True)
    output = again.stdout + again.stderr
    assert again.returncode == 0, again.stderr[-4000:]
    assert changed_count(output) == 0
    after = {h: unit_state(ssh, h, unit_of(ssh, h)) for h in lab}
    assert after == before  # same unit mtime (not rewritten), same start time (not restarted)
    # Few round trips: every fact the roles read came from the one batch (r1fleet/operations/fact_batch.py).
    assert "fact read live" not in output, [line for line in output.splitlines() if "fact read live" in line]
    for name in lab:
        commands = [line for line in output.splitlines() if line.startswith(f"[{name}]") and ">>>" in line]
        assert len(commands) <= 3, (name, commands)  # the probe, the batch, and llama.cpp's apt candidates


def test_the_ansible_inventory_of_the_lab_deploys_it_too(converged, lab, ssh):
    """An Ansible user's inventory (inventory/ansible/lab-hosts.yml) reaches the same hosts with the
    same plans: on the converged lab it changes nothing."""
    env = {**os.environ, "R1FLEET_FLEET": str(ROOT / "inventory/ansible/lab-hosts.yml")}
    run = subprocess.run([PYINFRA, "-y", "inventory.py", "deploy.py"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert changed_count(run.stdout + run.stderr) == 0
    assert "all 4 host(s) converged" in run.stderr


def test_a_host_stopped_mid_run_fails_alone(converged, lab, ssh):
    # The llama.cpp host: the lab's hosts share one cgroup tree (docs/research/lab-notes.md), so a host shutting down
    # kills every process of its units' names on the others too; its r1fleet-llama-server.service is its own.
    victim = "lab-dual3090"
    # Force work on every host so the run is still going when the victim disappears.
    for host in lab:
        ssh(host, f"rm -f /etc/systemd/system/{unit_of(ssh, host)}")
    env = {**os.environ, "R1FLEET_FLEET": "lab"}
    run = subprocess.Popen([PYINFRA, "-y", "inventory.py", "deploy.py"], cwd=ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in run.stdout:
            lines.append(line)
            if "Starting operation" in line or "--> Beginning operation run" in line:
                break
        os.kill(state.load_state()["hosts"][victim]["pid"], signal.SIGTERM)
        lines.extend(run.stdout)
        run.wait(timeout=1800)
        output = "".join(lines)
        assert run.returncode != 0, output[-4000:]
        assert "r1fleet: 1 of" in output, output[-4000:]
        # the failures, up to the converged hosts' endpoints that follow them
        summary = output[output.index("r1fleet: 1 of"):].split("r1fleet: endpoints")[0]
        assert f"{victim}: failed at" in summary
        for other in set(lab) - {victim}:
            assert other not in summary, summary
            unit = unit_of(ssh, other)
            assert unit_state(ssh, other, unit)["ActiveState"] == "active", output[-4000:]
    finally:
        if run.poll() is None:
            run.kill()
        subprocess.run([sys.executable, "-m", "r1fleet.lab", "up"], capture_output=True, timeout=900)  # restore
        deploy("--limit", victim)
