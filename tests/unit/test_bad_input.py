"""Any input gives a plan or a clear error, never a traceback: seeded fuzzing of probe documents and fleet files.

Each document is a real one (the shipped probes, the example fleet) with a few lines mutated: values replaced
by infinities, 400-digit numbers, Unicode digits, JSON of the wrong shape or depth; lines deleted, repeated,
cut or shuffled. The result must be a plan (or a driver decision), or an R1FleetError naming the host.
Seeded, bounded: a few hundred documents of each kind, a second or two.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from r1fleet.plan.drivers import decide_driver
from r1fleet.errors import R1FleetError
from r1fleet.fleet.file import load_fleet
from r1fleet.hardware import parse_probe
from r1fleet.plan.planner import plan_host

ROOT = Path(__file__).resolve().parents[2]
PROBES = sorted((ROOT / "tests" / "fixtures" / "probes").glob("*.probe")) + sorted((ROOT / "tests" / "fixtures" / "device").glob("*.probe"))
FLEETS = [ROOT / "inventory" / "fleet.example.yml", ROOT / "inventory" / "lab.yml"]
ODD_VALUES = ["inf", "-inf", "nan", "9" * 400, "-1", "0", "²", "٣", "[N/A]", "", "{", "}", "[", '"', "null", "1e309",
              "🙂", "[]", "{}", '{"card0": "x"}', '{"SPDisplaysDataType": {"a": 1}}', "[" * 2000, "- -oProxyCommand=id",
              "{{ lookup('pipe','id') }}", "'", ": :", "&anchor", "*alias", "!!python/object:os.system"]


def mutate(text: str, rnd: random.Random) -> str:
    lines = text.splitlines()
    for _ in range(rnd.randint(1, 6)):
        if not lines:
            break
        i, op = rnd.randrange(len(lines)), rnd.random()
        if op < 0.35:
            words = lines[i].replace(",", " , ").split(" ")
            words[rnd.randrange(len(words))] = rnd.choice(ODD_VALUES)
            lines[i] = " ".join(words).replace(" , ", ",")
        elif op < 0.5:
            del lines[i]
        elif op < 0.65:
            lines.insert(i, rnd.choice(lines))
        elif op < 0.8:
            lines[i] = lines[i][: rnd.randrange(len(lines[i]) + 1)]
        elif op < 0.9:
            lines.insert(i, rnd.choice(ODD_VALUES))
        else:
            lines[i] = "".join(rnd.sample(lines[i], len(lines[i])))
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("seed", range(4))
def test_mutated_probes_give_a_plan_or_a_clear_error(seed):
    rnd = random.Random(seed)
    for n in range(150):
        text = mutate(rnd.choice(PROBES).read_text(), rnd)
        try:
            hw = parse_probe(text, f"fuzz-{seed}-{n}")
            plan = plan_host(hw)
            decide_driver(hw, plan)
        except R1FleetError as error:
            assert f"fuzz-{seed}-{n}" in str(error)


@pytest.mark.parametrize("seed", range(2))
def test_mutated_fleet_files_load_or_say_what_is_wrong(tmp_path, seed):
    rnd = random.Random(seed)
    for n in range(150):
        path = tmp_path / f"fleet-{n}.yml"
        path.write_text(mutate(rnd.choice(FLEETS).read_text(), rnd))
        try:
            load_fleet(str(path), lab_state=False)
        except R1FleetError as error:
            assert str(path) in str(error) or "host" in str(error) or "lab" in str(error)


ANSIBLE = ROOT / "inventory" / "ansible"


@pytest.mark.parametrize("seed", range(4))
def test_mutated_ansible_inventories_load_or_say_what_is_wrong(tmp_path, seed):
    """The lab's Ansible inventory (with its group_vars and host_vars) and the INI example, one file mutated."""
    import shutil

    rnd = random.Random(seed)
    for n in range(60):
        copy = tmp_path / f"inventory-{n}"
        shutil.copytree(ANSIBLE, copy)
        target = rnd.choice(sorted(p for p in copy.rglob("*") if p.is_file()))
        target.write_text(mutate(target.read_text(), rnd))
        inventory = copy / ("example-hosts.ini" if rnd.random() < 0.3 else "lab-hosts.yml")
        try:
            load_fleet(str(inventory), lab_state=False)
        except R1FleetError as error:
            assert str(copy) in str(error) or "host" in str(error), str(error)
