"""The fleet lock (r1fleet/lock/match.py): byte-stable files, locked plans that outlive policy changes, hardware
changes caught with the fix named, `plan --diff`, clear errors on malformed locks, and no secrets."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import yaml

from r1fleet.cli.main import main
from r1fleet.artifacts.pins import load_pins
from r1fleet.errors import R1FleetError
from r1fleet.fleet.config import HostConfig
from r1fleet.fleet.file import REPO_ROOT
from r1fleet.hardware import parse_probe
from r1fleet.lab.paths import LAB_FLEET_FILE
from r1fleet.lock.match import (
    Lock,
    LockMismatch,
    effective_plan,
    fleet_lock,
    fingerprint_differences,
    fingerprint_of,
    key_fingerprint,
    lock_entry,
    lock_path,
    lock_text,
    locked_plan,
    plan_diff,
    read_lock,
    write_lock,
)
from r1fleet.plan.planner import plan_host
from r1fleet.plan.policy import Policy

PROBES = Path(__file__).resolve().parents[1] / "fixtures" / "probes"
ALL_PROBES = sorted(PROBES.glob("*.probe"))
FLEET = {"dual-rtx3090": "192.168.1.23", "rtx4090": "192.168.1.22", "cpu-16g": "192.168.1.30"}


def probe(name: str) -> str:
    return (PROBES / f"{name}.probe").read_text()


def hardware(name: str, text: str | None = None):
    return parse_probe(text if text is not None else probe(name), name)


def entry_for(name: str, policy: Policy | None = None, **kwargs):
    hw = hardware(name)
    return lock_entry(name, hw, plan_host(hw, policy or Policy()), **kwargs)


@pytest.fixture
def fleet(tmp_path: Path) -> Path:
    """A fleet file of three fixture hosts, with their saved probes in tmp_path/probes."""
    probes = tmp_path / "probes"
    probes.mkdir()
    for name in FLEET:
        (probes / f"{name}.probe").write_text(probe(name))
    write_fleet(tmp_path / "fleet.yml")
    return tmp_path / "fleet.yml"


def write_fleet(path: Path, policy: dict | None = None) -> None:
    doc: dict = {"hosts": {name: {"address": address} for name, address in FLEET.items()}}
    if policy:
        doc["defaults"] = {"policy": policy}
    path.write_text(yaml.safe_dump(doc))


def r1fleet(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


# ---------------------------------------------------------------- the file


def test_lock_round_trips_byte_identically(tmp_path):
    lock = Lock(hosts={p.stem: entry_for(p.stem) for p in ALL_PROBES})
    first, second = tmp_path / "a.lock", tmp_path / "b.lock"
    write_lock(first, lock)
    again = read_lock(first)
    write_lock(second, again)
    assert first.read_bytes() == second.read_bytes()
    assert again == lock
    doc = yaml.safe_load(first.read_text())
    assert doc["version"] == 1 and list(doc["hosts"]) == sorted(doc["hosts"])  # one sorted key per host


def test_locked_plan_is_the_plan_exactly():
    entry = entry_for("dual-rtx3090")
    plan = locked_plan(entry, hardware("dual-rtx3090"))
    assert plan == plan_host(hardware("dual-rtx3090"))
    assert plan.tensor_split and plan.tensor_split_flag  # the computed flag comes back from the stored split


def test_artifacts_are_the_pinned_digests_only():
    """Every sha256 in a lock is one the repository pins: artifacts/versions.yaml, plan/catalog.yaml or plan/drivers.yaml."""
    pinned = "".join((REPO_ROOT / "r1fleet" / f).read_text() for f in ("artifacts/versions.yaml", "plan/catalog.yaml", "plan/drivers.yaml"))
    text = lock_text(Lock(hosts={p.stem: entry_for(p.stem) for p in ALL_PROBES}))
    digests = set(re.findall(r"\b[0-9a-f]{64}\b", text))
    assert digests and all(d in pinned for d in digests)
    dual = entry_for("dual-rtx3090").artifacts
    assert dual.llama_cpp.method == "ollama-bundle" and dual.llama_cpp.build == "b10353"
    assert dual.ollama.assets[0].name == "ollama-linux-amd64.tar.zst"
    assert dual.model.gguf_sha256 == "181a82a1d6d2fa24fe4db83a68eee030384986bdbdd4773ba76424e3a6eb9fd8"
    assert dual.driver.vendor == "nvidia" and dual.driver.branch
    mac = entry_for("mac-studio-64g").artifacts
    assert mac.ollama.assets[0].name == "ollama-darwin.tgz" and mac.driver is None and mac.llama_cpp is None


def test_a_host_the_deploy_refuses_keeps_its_notes_and_every_pinned_sha256():
    """A Jetson: versions.yaml pins the arm64 base archive but not the JetPack 6 add-on. The lock records the base
    archive's sha256, null for the add-on alone, and keeps the note saying the deploy refuses the host."""
    jetson = entry_for("jetson-orin-64g").artifacts
    pinned = load_pins().ollama.sha256
    assert {a.name: a.sha256 for a in jetson.ollama.assets} == {
        "ollama-linux-arm64.tar.zst": pinned["ollama-linux-arm64.tar.zst"], "ollama-linux-arm64-jetpack6.tar.zst": None}
    assert [n for n in jetson.notes if n.startswith("the deploy will refuse this host's Ollama archive")] == [
        "the deploy will refuse this host's Ollama archive: host jetson-orin-64g: field ollama.sha256: no sha256 is "
        "pinned for ollama-linux-arm64-jetpack6.tar.zst (Ollama 0.32.9) (fix: add its line from the release's "
        "sha256sum.txt to r1fleet/artifacts/versions.yaml or host data ollama_release.sha256)"]
    lab = lock_entry("rtx4090", hardware("rtx4090"), plan_host(hardware("rtx4090")),
                     HostConfig(name="rtx4090", address="10.77.0.12", profile="rtx4090")).artifacts
    assert any(n.startswith("lab host: the lab mirror serves its own stand-in") for n in lab.notes)


def test_lock_path_beside_the_fleet_file_and_the_lab_in_inventory(tmp_path):
    assert lock_path(tmp_path / "fleet.yml") == tmp_path / "fleet.yml.lock"
    assert lock_path(LAB_FLEET_FILE) == REPO_ROOT / "inventory" / "lab.yml.lock"
    assert lock_path(REPO_ROOT / "inventory" / "lab.yml") == REPO_ROOT / "inventory" / "lab.yml.lock"


def test_a_deploy_of_a_fleet_serves_by_its_lock_and_names_it_for_a_relock(tmp_path):
    """fleet_lock: what the deploy's host and pool paths and the Ollama registry role read for the run's fleet."""
    fleet = tmp_path / "fleet.yml"
    assert fleet_lock(None) == (None, None) and fleet_lock(str(fleet)) == (None, str(fleet))  # no lock written yet
    lock = Lock(hosts={"rtx4090": entry_for("rtx4090")})
    write_lock(lock_path(fleet), lock)
    assert fleet_lock(str(fleet)) == (read_lock(lock_path(fleet)), str(fleet)) and fleet_lock(str(fleet))[0] == lock
    assert fleet_lock(str(LAB_FLEET_FILE))[1] == "lab"  # the lab's fleet file is relocked as `--fleet lab`


# ---------------------------------------------------------------- the fingerprint


def test_fingerprint_ignores_jitter_and_foreign_gpu_use():
    text = probe("rtx4090")
    busy = text.replace("0, NVIDIA GeForce RTX 4090, 24564, 2, 23962,", "0, NVIDIA GeForce RTX 4090, 24564, 9002, 14962,")
    busy = busy.replace("MemTotal:       65579512 kB", "MemTotal:       65571320 kB")  # 8 MiB less: a new kernel
    assert busy != text
    entry = entry_for("rtx4090")
    live = hardware("rtx4090", busy)
    assert fingerprint_differences(entry.fingerprint, fingerprint_of(live)) == []
    assert locked_plan(entry, live) == entry.plan  # today's planner would choose less; the lock holds
    assert plan_host(live) != entry.plan


def test_ram_rounding_tolerates_a_half_gib_boundary_but_not_a_dimm():
    hw = hardware("rtx4090")
    locked = fingerprint_of(hw.model_copy(update={"ram_total_mib": 64000}))  # 62.5 GiB: rounds up
    near = fingerprint_of(hw.model_copy(update={"ram_total_mib": 63990}))  # rounds down
    assert locked.ram_mib - near.ram_mib == 1024 and fingerprint_differences(locked, near) == []
    fewer = fingerprint_of(hw.model_copy(update={"ram_total_mib": 64000 - 8192}))
    assert fingerprint_differences(locked, fewer) == ["RAM: 64512 MiB -> 56320 MiB"]


def test_changed_gpu_memory_stops_the_host_with_the_fix(fleet):
    entry = entry_for("dual-rtx3090")
    text = probe("dual-rtx3090").replace("1, NVIDIA GeForce RTX 3090, 24576,", "1, NVIDIA GeForce RTX 3090, 16384,")
    with pytest.raises(LockMismatch) as err:
        locked_plan(entry, hardware("dual-rtx3090", text), fleet=str(fleet))
    message = str(err.value)
    assert "host dual-rtx3090" in message
    assert "GPU 1: NVIDIA GeForce RTX 3090 24576 MiB -> NVIDIA GeForce RTX 3090 16384 MiB" in message
    assert f"r1fleet lock --fleet {fleet} dual-rtx3090" in message
    assert isinstance(err.value, R1FleetError) and err.value.differences


def test_a_missing_gpu_is_named():
    entry = entry_for("dual-rtx3090")
    hw = hardware("dual-rtx3090")
    one = hw.model_copy(update={"gpus": hw.gpus[:1]})
    assert fingerprint_differences(entry.fingerprint, fingerprint_of(one)) == [
        "GPU 1: NVIDIA GeForce RTX 3090 24576 MiB -> absent"]
    with pytest.raises(LockMismatch, match=r"r1fleet lock dual-rtx3090"):
        effective_plan(one, Policy(), Lock(hosts={"dual-rtx3090": entry}))


def test_locked_before_the_driver_matches_after_it_and_gains_the_uuids():
    """lspci alone gives no UUID and the GPU table's memory: the driver's readings still match that lock."""
    before = hardware("gpu-no-driver")
    entry = lock_entry("gpu-no-driver", before, plan_host(before))
    assert entry.fingerprint.gpus[0].measured is False and entry.plan.gpu_uuids == []
    gpu = before.gpus[0].model_copy(update={"source": "nvidia-smi-query", "uuid": "GPU-1234", "memory_total_mib": 24576,
                                            "driver_version": "580.95.05"})
    after = before.model_copy(update={"gpus": [gpu]})
    plan = locked_plan(entry, after)
    assert plan.gpu_uuids == ["GPU-1234"] and plan.model == entry.plan.model


def test_policy_change_does_not_move_a_locked_host():
    hw = hardware("rtx4090")
    lock = Lock(hosts={"rtx4090": entry_for("rtx4090")})
    stricter = Policy(max_context=8192, model="14b")
    assert plan_host(hw, stricter).model != lock.hosts["rtx4090"].plan.model
    assert effective_plan(hw, stricter, lock) == lock.hosts["rtx4090"].plan
    assert effective_plan(hw, stricter, None) == plan_host(hw, stricter)  # no lock: as before


def test_plan_diff_names_each_change_and_why():
    locked = plan_host(hardware("rtx4090"))
    fresh = plan_host(hardware("rtx4090"), Policy(max_context=8192, kv_types=["q8_0"]))
    lines = plan_diff(locked, fresh)
    assert f"context: {locked.context_length} -> 8192" in lines and "KV cache: f16 -> q8_0" in lines
    assert any(line.startswith("why: ") for line in lines)
    assert plan_diff(locked, locked) == []


# ---------------------------------------------------------------- the commands


def test_lock_command_writes_beside_the_fleet_and_relocks_only_named_hosts(fleet, capsys):
    probes = str(fleet.parent / "probes")
    code, out, _ = r1fleet(capsys, "lock", "--fleet", str(fleet), "--probe-dir", probes)
    assert code == 0 and "3 of 3 hosts locked" in out
    path = fleet.parent / "fleet.yml.lock"
    before = read_lock(path)
    write_fleet(fleet, {"max_context": 8192})
    code, out, _ = r1fleet(capsys, "lock", "--fleet", str(fleet), "--probe-dir", probes, "rtx4090")
    assert code == 0 and "1 of 3 hosts locked" in out and "changed: context: 16384 -> 8192" in out
    after = read_lock(path)
    assert after.hosts["rtx4090"].plan.context_length == 8192
    assert after.hosts["dual-rtx3090"] == before.hosts["dual-rtx3090"]
    assert after.hosts["cpu-16g"] == before.hosts["cpu-16g"]


def test_plan_diff_command(fleet, capsys):
    probes = str(fleet.parent / "probes")
    r1fleet(capsys, "lock", "--fleet", str(fleet), "--probe-dir", probes)
    locked = (fleet.parent / "fleet.yml.lock").read_bytes()
    code, out, _ = r1fleet(capsys, "plan", "--fleet", str(fleet), "--probe-dir", probes, "--diff")
    assert code == 0 and out.count("matches the lock") == 3

    write_fleet(fleet, {"max_context": 8192})
    (fleet.parent / "probes" / "dual-rtx3090.probe").write_text(
        probe("dual-rtx3090").replace("1, NVIDIA GeForce RTX 3090, 24576,", "1, NVIDIA GeForce RTX 3090, 12288,"))
    code, out, _ = r1fleet(capsys, "plan", "--fleet", str(fleet), "--probe-dir", probes, "--diff")
    assert code == 1
    assert "rtx4090: a relock would change:\n  - context: 16384 -> 8192\n  - why: largest that fits: 32b" in out
    assert "dual-rtx3090: the hardware differs from the lock" in out
    assert "GPU 1: NVIDIA GeForce RTX 3090 24576 MiB -> NVIDIA GeForce RTX 3090 12288 MiB" in out
    assert f"r1fleet lock --fleet {fleet} dual-rtx3090" in out

    code, out, _ = r1fleet(capsys, "plan", "--fleet", str(fleet), "--probe-dir", probes, "--diff", "--json")
    hosts = {h["host"]: h for h in json.loads(out)["hosts"]}
    assert hosts["rtx4090"]["status"] == "changes" and hosts["dual-rtx3090"]["status"] == "hardware"
    assert hosts["cpu-16g"]["changes"][0] == "context: 32768 -> 8192"
    assert (fleet.parent / "fleet.yml.lock").read_bytes() == locked  # only `r1fleet lock` writes the lock

    (fleet.parent / "probes" / "cpu-16g.probe").unlink()  # one host that cannot be probed: the others compared
    code, out, _ = r1fleet(capsys, "plan", "--fleet", str(fleet), "--probe-dir", probes, "--diff")
    assert code == 1 and "rtx4090: a relock would change:" in out
    assert (f"cpu-16g: not compared: it could not be probed\n  - {probes}/cpu-16g.probe: cannot read (No such file or "
            f"directory) (fix: save it with `r1fleet probe --fleet {fleet} cpu-16g > {probes}/cpu-16g.probe`)") in out


@pytest.mark.parametrize("args,expected", [
    (["plan", str(PROBES / "rtx4090.probe"), "--diff"], "--diff works on a fleet"),
    (["plan", "--fleet", "FLEET", "--diff", "--model", "32b"], "takes no --model"),
    (["plan", "--fleet", "FLEET", "--diff"], "no lock to compare with"),
    (["lock", "--fleet", "FLEET", "--probe-dir", "PROBES", "no-such-host"], "host no-such-host: not in"),
    (["lock", "--fleet", "FLEET", "--probe-dir", "/nonexistent"], "field --probe-dir: /nonexistent is not a directory"),
    (["plan", "--fleet", "FLEET", "--probe-dir", "/nonexistent"], "field --probe-dir: /nonexistent is not a directory"),
    (["lock", "--fleet", "FLEET", "--probe-dir", "PROBES", "--api-key", "rtx4090"], "is not HOST=FILE"),
])
def test_usage_errors_are_clear(fleet, capsys, args, expected):
    args = [a.replace("FLEET", str(fleet)).replace("PROBES", str(fleet.parent / "probes")) for a in args]
    code, _, err = r1fleet(capsys, *args)
    assert code == 2 and expected in err and "Traceback" not in err


# ---------------------------------------------------------------- malformed locks


def _good_lock(tmp_path: Path) -> tuple[Path, dict]:
    path = tmp_path / "fleet.yml.lock"
    write_lock(path, Lock(hosts={"rtx4090": entry_for("rtx4090")}))
    return path, yaml.safe_load(path.read_text())


@pytest.mark.parametrize("change,expected", [
    (lambda d: d["hosts"]["rtx4090"]["plan"].update(context_length="lots"),
     "host rtx4090: field plan.context_length: Input should be a valid integer"),
    (lambda d: d["hosts"]["rtx4090"]["fingerprint"].pop("ram_mib"), "host rtx4090: field fingerprint.ram_mib: Field required"),
    (lambda d: d["hosts"]["rtx4090"]["plan"].update(model="llama-9000"), "host rtx4090: field plan.model: 'llama-9000' is not"),
    (lambda d: d["hosts"]["rtx4090"]["plan"].update(host="other"), "host rtx4090: field plan.host: is 'other'"),
    (lambda d: d["hosts"]["rtx4090"].update(api_key_fingerprint="hunter2"), "host rtx4090: field api_key_fingerprint"),
    (lambda d: d.update(version=2), "field version: lock format 2"),
    # a lock is read as untrusted (audit-security-2 H: it was executed): nothing in it chooses a path or a URL
    (lambda d: d["hosts"]["rtx4090"]["plan"]["gguf"].update(file="../../../../etc/profile.d/zz.sh"),
     "host rtx4090: field plan.gguf: is not the GGUF the catalog pins"),
    (lambda d: d["hosts"]["rtx4090"]["plan"]["gguf"].update(url="https://evil.example/m.gguf", sha256="e" * 64),
     "host rtx4090: field plan.gguf: is not the GGUF the catalog pins"),
    (lambda d: d["hosts"]["rtx4090"]["plan"].update(ollama_tag="evil/r1:latest"), "field plan.ollama_tag: 'evil/r1:latest'"),
    (lambda d: d["hosts"]["rtx4090"]["plan"].update(gpu_uuids=["GPU-x\nExecStartPre=+/bin/sh -c id"]),
     "field plan.gpu_uuids:"),
    (lambda d: d["hosts"].update({"evil\nname": d["hosts"].pop("rtx4090")}), "is not a name a fleet file allows"),
    (lambda d: d["hosts"].update({"rtx4090\n": d["hosts"].pop("rtx4090")}), "is not a name a fleet file allows"),

    (lambda d: d.pop("hosts"), "not a fleet lock"),
])
def test_malformed_lock_names_file_host_and_field(tmp_path, change, expected):
    path, doc = _good_lock(tmp_path)
    change(doc)
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(R1FleetError) as err:
        read_lock(path)
    assert str(path) in str(err.value) and expected in str(err.value)


def test_lock_that_is_not_yaml_or_repeats_a_host(tmp_path, fleet, capsys):
    path, _ = _good_lock(tmp_path)
    path.write_text("version: 1\nhosts: [unclosed\n")
    with pytest.raises(R1FleetError, match="not valid YAML"):
        read_lock(path)
    path.write_text("version: 1\nhosts:\n  a: {}\n  a: {}\n")
    with pytest.raises(R1FleetError, match="duplicate key 'a'"):
        read_lock(path)
    assert read_lock(tmp_path / "absent.lock") is None
    (fleet.parent / "fleet.yml.lock").write_text("version: 1\nhosts: {rtx4090: {plan: 3}}\n")
    code, _, err = r1fleet(capsys, "plan", "--fleet", str(fleet), "--probe-dir", str(fleet.parent / "probes"), "--diff")
    assert code == 2 and "fleet.yml.lock: host rtx4090: field" in err and "Traceback" not in err


# ---------------------------------------------------------------- no secrets


def test_key_fingerprint_is_a_short_sha256_prefix():
    assert key_fingerprint("k") == "sha256:" + "8254c329a92850f6"  # sha256sum of the single byte "k", 16 hex
    assert key_fingerprint(b"k") == key_fingerprint("k") and key_fingerprint("k\n") != key_fingerprint("k")


def test_lock_records_the_key_fingerprint_never_the_key(fleet, capsys, tmp_path):
    secret = "sk-r1fleet-7d1c0a5e9b3f4e21a8c6d2f0b9e7a1c3"
    key = tmp_path / "dual.key"
    key.write_text(secret + "\n")
    key.chmod(0o600)
    probes = str(fleet.parent / "probes")
    code, _, err = r1fleet(capsys, "lock", "--fleet", str(fleet), "--probe-dir", probes, "--api-key", f"dual-rtx3090={key}")
    assert code == 0, err
    text = (fleet.parent / "fleet.yml.lock").read_text()
    assert secret not in text and secret[:12] not in text
    assert f"api_key_fingerprint: {key_fingerprint(secret + chr(10))}" in text
    r1fleet(capsys, "lock", "--fleet", str(fleet), "--probe-dir", probes, "dual-rtx3090")  # not given again: kept
    assert read_lock(fleet.parent / "fleet.yml.lock").hosts["dual-rtx3090"].api_key_fingerprint == key_fingerprint(secret + "\n")


def test_a_pool_is_locked_and_served_as_locked_until_a_member_changes(tmp_path, capsys):
    """Two single-3090 boxes pooled: the lock holds the pool's plan, locked_pool returns it while both members
    are as locked, and names the member whose GPU changed."""
    from test_pools import BOX_A, BOX_B, on_sid

    from r1fleet.lock.match import locked_pool

    BOX_A, BOX_B = on_sid(BOX_A), on_sid(BOX_B)  # Debian's packages give the pool llama.cpp's RPC pieces
    probes = tmp_path / "probes"
    probes.mkdir()
    (probes / "box-a.probe").write_text(BOX_A)
    (probes / "box-b.probe").write_text(BOX_B)
    fleet = tmp_path / "fleet.yml"
    fleet.write_text(yaml.safe_dump({
        "hosts": {"box-a": {"address": "192.168.1.31"}, "box-b": {"address": "192.168.1.32"}},
        "pools": {"big": {"hosts": ["box-a", "box-b"], "head": "box-a"}},
    }))
    code, out, _ = r1fleet(capsys, "lock", "--fleet", str(fleet), "--probe-dir", str(probes))
    assert code == 0, out
    path = fleet.parent / "fleet.yml.lock"
    lock = read_lock(path)
    assert lock.pools["big"].pooled and lock.pools["big"].model == "deepseek-r1-distill-llama-70b"
    assert read_lock(path) == lock and "pools:" in path.read_text()  # it reads back as written
    for hostile, expected in ((("big", "pool"), "big\nExecStartPre=+/bin/sh"), (("big", "gguf", "file"), "../../x.gguf"),
                              (("big", "rpc_port"), 0), (("big", "network_gbps"), 0), (("big", "context_length"), -5)):
        doc = yaml.safe_load(path.read_text())
        target = doc["pools"]
        for key in hostile[:-1]:
            target = target[key]
        target[hostile[-1]] = expected
        if hostile[-1] == "pool":
            doc["pools"] = {expected: doc["pools"]["big"]}
        bad = tmp_path / "hostile.lock"
        bad.write_text(yaml.safe_dump(doc))
        with pytest.raises(R1FleetError, match="pool .*: field (\\(name\\)|gguf|rpc_port|network_gbps|context_length)"):
            read_lock(bad)
    members = {"box-a": parse_probe(BOX_A, "box-a"), "box-b": parse_probe(BOX_B, "box-b")}
    assert locked_pool(lock, "big", members) == lock.pools["big"]
    assert locked_pool(lock, "other", members) is None  # not locked: planned live
    swapped = BOX_B.replace("24576", "12288")  # box-b's card swapped for a 12 GB one
    with pytest.raises(LockMismatch) as err:
        locked_pool(lock, "big", {**members, "box-b": parse_probe(swapped, "box-b")}, str(fleet))
    assert err.value.host == "box-b" and f"r1fleet lock --fleet {fleet} box-b" in str(err.value)


def test_lock_marks_the_hosts_the_deploy_will_refuse_and_says_each_reason_once(tmp_path, capsys):
    """A Jetson (no pinned JetPack archive): its entry is written, with the deploy's reason in its notes once, the
    lock says so, and exits 1. A pool on Ubuntu (no rpc-server there) is locked kept separate, saying why (issue 23
    item 7: the lock holds only what the deploy builds), and its members alone."""
    from test_pools import BOX_A, BOX_B

    probes = tmp_path / "probes"
    probes.mkdir()
    (probes / "box-a.probe").write_text(BOX_A)
    (probes / "box-b.probe").write_text(BOX_B)
    (probes / "orin.probe").write_text(probe("jetson-orin-64g"))
    fleet = tmp_path / "fleet.yml"
    fleet.write_text(yaml.safe_dump({
        "hosts": {"box-a": {"address": "192.168.1.31"}, "box-b": {"address": "192.168.1.32"},
                  "orin": {"address": "192.168.1.50"}},
        "pools": {"big": {"hosts": ["box-a", "box-b"], "head": "box-a"}},
    }))
    code, out, _ = r1fleet(capsys, "lock", "--fleet", str(fleet), "--probe-dir", str(probes))
    assert code == 1
    assert "  orin: deepseek-r1-distill-qwen-32b on ollama, context 32768, f16 KV (new)\n    the deploy will refuse it: " \
           "field ollama.sha256: no sha256 is pinned for ollama-linux-arm64-jetpack6.tar.zst" in out
    lock = read_lock(fleet.parent / "fleet.yml.lock")
    assert set(lock.hosts) == {"box-a", "box-b", "orin"} and not lock.pools["big"].pooled
    assert "but the deploy cannot build it: box-a runs ubuntu jammy" in lock.pools["big"].reasons[0]
    assert [n for n in lock.hosts["orin"].artifacts.notes if "jetpack6" in n] == [
        n for n in lock.hosts["orin"].artifacts.notes if n.startswith("the deploy will refuse this host's Ollama archive")]
    for member in ("box-a", "box-b"):
        assert not [n for n in lock.hosts[member].artifacts.notes if n.startswith("the deploy will refuse this host")]
        assert "the deploy will refuse it" not in out.partition(f"  {member}: ")[2].partition("\n  ")[0]


def test_lock_records_the_ollama_manifest_the_cache_took(fleet, capsys, monkeypatch, tmp_path):
    """An Ollama host's lock names the manifest the controller's cache took for its tag (the digest the host
    serves), and keeps it on a relock when the cache no longer holds it."""
    from r1fleet.cache.store import ArtifactCache
    from r1fleet.cache.registry import DEFAULT_REGISTRY, manifest_key

    monkeypatch.setenv("R1FLEET_CACHE_DIR", str(tmp_path / "cache"))
    probes = str(fleet.parent / "probes")
    r1fleet(capsys, "lock", "--fleet", str(fleet), "--probe-dir", probes)
    path = fleet.parent / "fleet.yml.lock"
    ollama_hosts = {h: e for h, e in read_lock(path).hosts.items() if e.plan.backend == "ollama"}
    assert ollama_hosts and all(e.artifacts.model.ollama_manifest is None for e in ollama_hosts.values())

    host, entry = next(iter(ollama_hosts.items()))
    cache = ArtifactCache(tmp_path / "cache")
    manifest = b'{"schemaVersion":2,"layers":[]}'
    cache.remember(manifest_key(DEFAULT_REGISTRY, entry.plan.ollama_tag), cache.put(manifest, "manifest"))
    code, _, _ = r1fleet(capsys, "lock", "--fleet", str(fleet), "--probe-dir", probes)
    locked = read_lock(path).hosts[host].artifacts.model.ollama_manifest
    assert code == 0 and locked.sha256 == hashlib.sha256(manifest).hexdigest() and locked.tag == entry.plan.ollama_tag
    assert f"sha256: {locked.sha256}" in path.read_text()

    cache.prune()
    r1fleet(capsys, "lock", "--fleet", str(fleet), "--probe-dir", probes, host)
    assert read_lock(path).hosts[host].artifacts.model.ollama_manifest == locked


def test_each_identity_of_the_machine_is_compared():
    """Another OS, architecture, distribution or unified-memory device, a swapped card (other UUID) or another
    card in the slot: each one is a difference the lock refuses, named with before and after."""
    locked = entry_for("dual-rtx3090").fingerprint
    gpu = locked.gpus[1]
    changes = {
        "OS": {"system": "Darwin"},
        "architecture": {"arch": "aarch64" if locked.arch != "aarch64" else "x86_64"},
        "distribution": {"distro_version": locked.distro_version + "9"},
        "unified memory": {"unified": "metal Apple M2 Ultra"},
        "GPU 1": {"gpus": [locked.gpus[0], gpu.model_copy(update={"uuid": "GPU-ffffffff-0000"})]},
    }
    for label, change in changes.items():
        differences = fingerprint_differences(locked, locked.model_copy(update=change))
        assert len(differences) == 1 and differences[0].startswith(f"{label}: "), (label, differences)
    other_card = locked.model_copy(update={"gpus": [locked.gpus[0], gpu.model_copy(update={"name": "NVIDIA RTX A5000"})]})
    assert fingerprint_differences(locked, other_card) == [
        f"GPU 1: {gpu.name} {gpu.memory_mib} MiB -> NVIDIA RTX A5000 {gpu.memory_mib} MiB"]
    # the vendor word some drivers drop is not another card
    bare = locked.model_copy(update={"gpus": [locked.gpus[0], gpu.model_copy(update={"name": gpu.name.removeprefix("NVIDIA ")})]})
    assert gpu.name.startswith("NVIDIA ") and fingerprint_differences(locked, bare) == []
    with pytest.raises(LockMismatch, match="OS: Linux -> Darwin"):
        locked_plan(entry_for("dual-rtx3090"), hardware("dual-rtx3090").model_copy(
            update={"os": hardware("dual-rtx3090").os.model_copy(update={"system": "Darwin"})}))


def test_a_pool_is_locked_on_the_llama_cpp_versions_its_members_have_installed(tmp_path, capsys):
    """Issue 23 item 6: `r1fleet lock` records the versions a deployed pool's members run (their probes' dpkg
    section) when they agree; the deploy then installs and checks exactly those. A version that is no Debian
    version is refused when the lock is read (it goes into apt's command line and the units)."""
    from test_pools import BOX_A, BOX_B, on_forky

    def installed(text: str, rpc: str) -> str:
        policy = "".join(f"{p}:\n  Installed: {v}\n  Candidate: {v}\n" for p, v in (
            ("llama.cpp-tools", "1:0.7.0+dfsg-2"), ("llama.cpp-tools-extra", "1:0.7.0+dfsg-2"),
            ("libggml0-backend-rpc", rpc), ("libggml0-backend-cuda", "0.27.0-1")))
        return text.replace("#### r1fleet:secureboot", f"#### r1fleet:llama-cpp-packages\nlists: present\n{policy}"
                            "#### r1fleet:secureboot")

    probes = tmp_path / "probes"
    probes.mkdir()
    fleet = tmp_path / "fleet.yml"
    fleet.write_text(yaml.safe_dump({
        "hosts": {"box-a": {"address": "192.168.1.31"}, "box-b": {"address": "192.168.1.32"}},
        "pools": {"big": {"hosts": ["box-a", "box-b"], "head": "box-a"}},
    }))
    path = fleet.parent / "fleet.yml.lock"
    for rpc_b, recorded in (("0.9.4-1", {"ggml": "0.9.4-1", "llama.cpp": "1:0.7.0+dfsg-2"}), ("0.9.5-1", {})):
        (probes / "box-a.probe").write_text(installed(on_forky(BOX_A), "0.9.4-1"))
        (probes / "box-b.probe").write_text(installed(on_forky(BOX_B), rpc_b))
        r1fleet(capsys, "lock", "--fleet", str(fleet), "--probe-dir", str(probes))
        assert read_lock(path).pools["big"].llama_cpp_versions == recorded  # members that disagree: nothing recorded
    doc = yaml.safe_load(path.read_text())
    doc["pools"]["big"]["llama_cpp_versions"] = {"ggml": "0.9.4-1 libevil"}
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(R1FleetError, match="field pools.big.llama_cpp_versions.*is not a Debian package version"):
        read_lock(path)
