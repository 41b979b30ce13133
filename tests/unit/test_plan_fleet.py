"""`r1fleet plan --fleet` host by host (issue 22, items 6 and 7): a host that cannot be probed gets its own row with the
reason and fix while the others are planned; a host is shown as the deploy serves it (the lock's plan when the lock
names it) and marked when the deploy will refuse it, with the deploy's own reason and fix. Real probes, real SSH
for the down host (nothing listens on port 1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from r1fleet.cli import probing
from r1fleet.cli.main import main
from r1fleet.hardware import parse_probe
from r1fleet.lock.match import Lock, lock_entry, write_lock
from r1fleet.plan.planner import plan_host
from r1fleet.plan.policy import Policy

PROBES = Path(__file__).resolve().parents[1] / "fixtures" / "probes"


def probe(name: str) -> str:
    return (PROBES / f"{name}.probe").read_text()


def fleet_file(path: Path, hosts: dict[str, dict]) -> Path:
    path.write_text(yaml.safe_dump({"hosts": hosts}))
    return path


def saved(tmp_path: Path, **probes: str) -> Path:
    folder = tmp_path / "probes"
    folder.mkdir(exist_ok=True)
    for host, name in probes.items():
        (folder / f"{host}.probe").write_text(probe(name))
    return folder


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def rows(out: str) -> dict[str, dict[str, str]]:
    """The table's rows by host, each cell by its column's heading (HOST, GPUS, MODEL, ...)."""
    header, *lines = out.partition("\n\n")[0].splitlines()
    names = header.replace("MEMORY MiB (planned/capacity)", "MEMORY").split()
    starts = [header.index(n if n != "MEMORY" else "MEMORY MiB") for n in names]
    bounds = list(zip(starts, [*starts[1:], None]))
    return {line.split()[0]: {n: line[a:b].strip() for n, (a, b) in zip(names, bounds)} for line in lines}


def test_a_down_host_gets_its_row_by_its_fleet_name_and_the_others_are_planned(tmp_path, monkeypatch, capsys):
    real = probing.probe_over_ssh
    monkeypatch.setattr(probing, "probe_over_ssh",
                        lambda address, **kw: probe("rtx4090") if address == "10.0.0.3" else real(address, **kw))
    fleet = fleet_file(tmp_path / "fleet.yml", {"desk": {"address": "127.0.0.1", "ssh_port": 1, "ssh_user": "admin"},
                                                "solo": {"address": "10.0.0.3"}})
    code, out, err = run(capsys, "plan", "--fleet", fleet)
    assert code == 1 and err == ""
    table = rows(out)
    assert (table["desk"]["GPUS"], table["desk"]["MODEL"], table["solo"]["MODEL"]) == ("?", "not planned", "32b")
    assert ("desk:\n  - not planned: field ssh: ssh failed with exit status 255: ssh: connect to host 127.0.0.1 port 1: "
            "Connection refused (fix: make `ssh -o BatchMode=yes -l admin -p 1 127.0.0.1 true` work") in out
    code, out, _ = run(capsys, "plan", "--fleet", fleet, "--json")
    doc = json.loads(out)
    assert code == 1 and [h["host"] for h in doc["hosts"]] == ["solo"]
    (error,) = doc["errors"]
    assert (error["host"], error["field"]) == ("desk", "ssh") and "Connection refused" in error["message"]
    assert error["fix"].startswith("make `ssh -o BatchMode=yes -l admin -p 1 127.0.0.1 true` work")


def test_a_missing_or_unreadable_saved_probe_gets_its_row(tmp_path, capsys):
    fleet = fleet_file(tmp_path / "fleet.yml", {"gpu-3060": {"address": "192.168.1.21"},
                                                "mini": {"address": "192.168.1.30"},
                                                "toaster": {"address": "192.168.1.40"}})
    folder = saved(tmp_path, **{"gpu-3060": "rtx3060-12g"})
    (folder / "toaster.probe").write_text("this is not a probe document\n")
    code, out, err = run(capsys, "plan", "--fleet", fleet, "--probe-dir", folder)
    assert code == 1 and err == ""
    table = rows(out)
    assert [table[h]["MODEL"] for h in ("gpu-3060", "mini", "toaster")] == ["14b", "not planned", "not planned"]
    assert (f"mini:\n  - not planned: {folder}/mini.probe: cannot read (No such file or directory) "
            f"(fix: save it with `r1fleet probe --fleet {fleet} mini > {folder}/mini.probe`)") in out
    assert "toaster:\n  - not planned: field " in out and "r1fleet probe" in out.partition("toaster:\n")[2]


def test_a_jetson_is_marked_refused_with_the_deploys_own_reason(tmp_path, capsys):
    """The plan fits, but versions.yaml pins no JetPack 6 add-on: the deploy's OllamaRole refuses the host."""
    fleet = fleet_file(tmp_path / "fleet.yml", {"orin": {"address": "192.168.1.50"}, "desk": {"address": "192.168.1.22"}})
    folder = saved(tmp_path, orin="jetson-orin-64g", desk="rtx4090")
    code, out, _ = run(capsys, "plan", "--fleet", fleet, "--probe-dir", folder)
    assert code == 1
    assert (rows(out)["orin"]["MODEL"], rows(out)["desk"]["MODEL"]) == ("32b (refused)", "32b")
    assert ("orin:\n  - the deploy refuses this host: field ollama.sha256: no sha256 is pinned for "
            "ollama-linux-arm64-jetpack6.tar.zst (Ollama 0.32.9) (fix: add its line") in out
    doc = json.loads(run(capsys, "plan", "--fleet", fleet, "--probe-dir", folder, "--json")[1])
    assert [(r["host"], r["field"]) for r in doc["refused"]] == [("orin", "ollama.sha256")]


def test_the_lock_not_todays_plan_is_shown_when_the_deploy_serves_it(tmp_path, capsys):
    """A model pinned after locking: the deploy serves the locked 32b, and the plan says so (with the relock command)
    instead of promising the 14b; a host whose hardware changed since is refused as the deploy refuses it."""
    fleet = fleet_file(tmp_path / "fleet.yml", {"desk": {"address": "192.168.1.22", "model": "14b"},
                                                "gpu-3060": {"address": "192.168.1.21"}})
    folder = saved(tmp_path, desk="rtx4090", **{"gpu-3060": "rtx3060-12g"})
    desk = parse_probe(probe("rtx4090"), "desk")
    before = parse_probe(probe("rtx4090"), "gpu-3060")  # the 3060 box held a 4090 when it was locked
    write_lock(Path(f"{fleet}.lock"), Lock(hosts={"desk": lock_entry("desk", desk, plan_host(desk, Policy())),
                                                  "gpu-3060": lock_entry("gpu-3060", before, plan_host(before))}))
    code, out, _ = run(capsys, "plan", "--fleet", fleet, "--probe-dir", folder)
    assert code == 1
    assert rows(out)["desk"]["MODEL"] == "32b (locked)"
    assert ("desk:\n  - served from the fleet lock, not today's plan, which would change model: "
            "deepseek-r1-distill-qwen-32b -> deepseek-r1-distill-qwen-14b;") in out
    assert f"(to serve today's plan: `r1fleet lock --fleet {fleet} desk`)" in out
    assert rows(out)["gpu-3060"]["MODEL"] == "14b (refused)"
    refused = out.partition("gpu-3060:\n")[2].splitlines()[0]
    assert refused.startswith("  - the deploy refuses this host: the hardware differs from the lock: RAM: 64512 MiB -> ")
    assert "GPU 0: NVIDIA GeForce RTX 4090 24564 MiB (GPU-" in refused
    assert refused.endswith(f"(fix: if the change is meant, relock this host with `r1fleet lock --fleet {fleet} gpu-3060` "
                            "and commit the lock)")
    # a what-if run plans today's choice under the forced settings, lock aside
    code, out, _ = run(capsys, "plan", "--fleet", fleet, "--probe-dir", folder, "--kv-type", "f16")
    assert rows(out)["desk"]["MODEL"] == "14b" and "(locked)" not in out


@pytest.mark.parametrize("what_if", [[], ["--context", "8192"]])
def test_hosts_from_probe_files_plan_as_before(capsys, what_if):
    code, out, _ = run(capsys, "plan", PROBES / "rtx4090.probe", PROBES / "cpu-16g.probe", *what_if)
    assert code == 0 and "refused" not in out and "locked" not in out


def test_a_pool_served_from_the_lock_says_what_todays_plan_would_change(tmp_path, capsys):
    from test_pools import BOX_A, BOX_B, on_sid

    folder = tmp_path / "probes"
    folder.mkdir()
    (folder / "box-a.probe").write_text(on_sid(BOX_A))
    (folder / "box-b.probe").write_text(on_sid(BOX_B))
    doc = {"hosts": {"box-a": {"address": "192.168.1.31"}, "box-b": {"address": "192.168.1.32"}},
           "pools": {"big": {"hosts": ["box-a", "box-b"], "head": "box-a"}}}
    fleet = tmp_path / "fleet.yml"
    fleet.write_text(yaml.safe_dump(doc))
    assert run(capsys, "lock", "--fleet", fleet, "--probe-dir", folder)[0] == 0
    code, out, _ = run(capsys, "plan", "--fleet", fleet, "--probe-dir", folder)
    assert code == 0 and "(locked)" not in out and "70b" in rows(out)["pool"]["MODEL"]
    doc["hosts"]["box-a"]["policy"] = {"max_context": 8192}  # the head's policy, which the pool follows, changed since
    fleet.write_text(yaml.safe_dump(doc))
    code, out, _ = run(capsys, "plan", "--fleet", fleet, "--probe-dir", folder)
    assert code == 0 and rows(out)["pool"]["MODEL"] == "70b (locked)"
    assert ("pool big (head box-a; workers box-b):\n  - served from the fleet lock, not today's plan, which would change "
            "context: 14336 -> 8192") in out
    assert f"(to serve today's plan: `r1fleet lock --fleet {fleet} box-a box-b`)" in out


def test_plan_alone_plans_this_machine_or_the_default_fleet_and_says_which(tmp_path, monkeypatch, capsys):
    """With nothing to plan: this machine, probed here as a host would be (as llmfit does), when there is no fleet
    file; else the fleet of $R1FLEET_FLEET. Either way stderr says which."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("R1FLEET_FLEET", raising=False)
    code, out, err = run(capsys, "plan", "--json")
    assert "planning this machine" in err and code in (0, 1)
    (host,) = json.loads(out)["hosts"]
    assert host["host"] in err and host["model"]  # this machine's RAM holds at least the 1.5B
    fleet = fleet_file(tmp_path / "mine.yml", {"box": {"address": "127.0.0.1", "ssh_port": 1, "ssh_user": "admin"}})
    monkeypatch.setenv("R1FLEET_FLEET", str(fleet))
    code, out, err = run(capsys, "plan")
    assert f"planning the fleet in {fleet} ($R1FLEET_FLEET" in err and code == 1
    assert rows(out)["box"]["MODEL"] == "not planned"
