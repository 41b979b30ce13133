"""Any input gives a plan or a clear error, never a traceback: seeded fuzzing of probe documents, fleet files,
Ansible inventories, status answers, locks, registry manifests and HTTP answers.

Each document is a real one (the shipped probes, the example fleet) with a few lines mutated: values replaced
by infinities, 400-digit numbers, Unicode digits, JSON of the wrong shape or depth; lines deleted, repeated,
cut or shuffled. The result must be a plan (or a driver decision), or an R1FleetError naming the host.
Seeded, bounded: a few hundred documents of each kind, a second or two.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import random
import re
import threading
from pathlib import Path

import pytest
import yaml

from r1fleet.deploy.refusals import deploy_refusal
from r1fleet.fleet.config import HostConfig
from r1fleet.lock.served import Served
from r1fleet.plan.drivers import decide_driver
from r1fleet.errors import R1FleetError
from r1fleet.fleet.file import load_fleet
from r1fleet.hardware import parse_probe
from r1fleet.cache.registry import read_manifest
from r1fleet.cache.store import ArtifactCache
from r1fleet.lab import registry as lab_registry
from r1fleet.lock.file import Lock, lock_text, read_lock
from r1fleet.lock.match import lock_entry
from r1fleet.plan.catalog import load_catalog
from r1fleet.plan.planner import plan_host
from r1fleet.plan.policy import Policy

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


def outcome(load) -> R1FleetError | None:
    """None when `load()` accepted the document, the R1FleetError when it refused it; any other exception
    (a traceback for the user) fails the test, naming its type."""
    try:
        load()
    except R1FleetError as error:
        return error
    except Exception as error:  # noqa: BLE001 - the point: nothing but R1FleetError may escape
        pytest.fail(f"{type(error).__name__} instead of an R1FleetError: {error}")
    return None


def both_ways(refusals: list, total: int) -> None:
    """A fuzz run that never refused (validation gone) or never accepted (the mutations are all fatal) tests
    only one side: each seed must see both."""
    assert 0 < len(refusals) < total, f"{len(refusals)} of {total} mutated documents refused"


@pytest.mark.parametrize("seed", range(4))
def test_mutated_probes_give_a_plan_or_a_clear_error(seed):
    rnd = random.Random(seed)
    refusals = []
    for n in range(150):
        text = mutate(rnd.choice(PROBES).read_text(), rnd)

        def load(text=text, name=f"fuzz-{seed}-{n}"):
            hw = parse_probe(text, name)
            plan = plan_host(hw)
            decide_driver(hw, plan)
            # what `r1fleet plan` and `r1fleet lock` ask of the deploy's decisions: an answer, never a traceback
            refusal = deploy_refusal(Served(name, plan), HostConfig(name=name, address="localhost"), hw)
            assert refusal is None or f"host {name}: " in str(refusal), str(refusal)
        error = outcome(load)
        if error is not None:
            assert f"host fuzz-{seed}-{n}: field " in str(error), str(error)
            refusals.append(error)
    both_ways(refusals, 100)


PROBE = ROOT / "tests" / "fixtures" / "probes" / "dual-rtx3090.probe"


@pytest.mark.parametrize("value", ["inf", "nan", "9" * 400, "-1", "²", "٣", "١٦٠٠٠٠٠٠", "1e309", "[N/A]", "", "{", "[" * 2000])
def test_a_hostile_memtotal_is_refused_naming_host_and_section(value):
    text = PROBE.read_text()
    hostile = re.sub(r"^MemTotal:\s+\d+", lambda _: f"MemTotal:       {value}", text, count=1, flags=re.M)
    assert hostile != text
    error = outcome(lambda: plan_host(parse_probe(hostile, "box")))
    assert error is not None, f"MemTotal {value[:20]!r} was accepted"
    assert "host box: field meminfo:" in str(error) and "(fix: " in str(error)
    assert outcome(lambda: plan_host(parse_probe(text, "box"))) is None  # the document itself loads


@pytest.mark.parametrize("seed", range(2))
def test_mutated_fleet_files_load_or_say_what_is_wrong(tmp_path, seed):
    rnd = random.Random(seed)
    refusals = []
    for n in range(150):
        path = tmp_path / f"fleet-{n}.yml"
        path.write_text(mutate(rnd.choice(FLEETS).read_text(), rnd))
        error = outcome(lambda: load_fleet(str(path), lab_state=False))
        if error is not None:
            assert str(path) in str(error), str(error)
            refusals.append(error)
    both_ways(refusals, 150)


FLEET = ROOT / "inventory" / "fleet.example.yml"
HOSTILE_FIELDS = [
    ("address", "- -oProxyCommand=id"), ("address", "{{ lookup('pipe','id') }}"), ("address", ""),
    ("ssh_user", "- -oProxyCommand=id"), ("ssh_user", "-oProxyCommand=id"), ("ssh_user", "me@evil"), ("ssh_user", "a b"),
    ("ssh_port", 0), ("ssh_port", 70000), ("ssh_port", "inf"), ("port", "nan"), ("port", -1),
    ("listen", "lan"), ("allow", ["not-a-net"]), ("model", "no-such-model"), ("groups", "{"),
    ("model_dir", "/tmp/models"), ("model_dir", "/var/lib"), ("model_dir", "/home/me"), ("model_dir", "/srv/../etc"),
    ("model_dir", "relative/dir"), ("model_dir", "/srv/a b"), ("model_dir", "/srv/$(id)"), ("model_dir", "/srv"),
    ("model_dir", "/opt/r1fleet/models"), ("model_dir", "/etc/r1fleet/models"),
    # the deploy owns it and a removal deletes in it by name: no system tree, other service or hidden folder (M4, N3)
    ("model_dir", "/root/.ssh"), ("model_dir", "/etc/ssh"), ("model_dir", "/usr/local/lib"), ("model_dir", "/boot/efi"),
    ("model_dir", "/var/lib/docker"), ("model_dir", "/var/spool/cron"), ("model_dir", "/home/alice/.ssh"),
    ("policy", {"min_context": "9" * 400}), ("policy", {"min_tokens_per_second": "inf"}), ("nonsense_field", 1),
]


@pytest.mark.parametrize("field, value", HOSTILE_FIELDS, ids=[f"{f}={str(v)[:20]}" for f, v in HOSTILE_FIELDS])
def test_a_hostile_fleet_field_is_refused_naming_file_host_and_field(tmp_path, field, value):
    document = yaml.safe_load(FLEET.read_text())
    path = tmp_path / "fleet.yml"
    path.write_text(yaml.safe_dump(document))
    assert outcome(lambda: load_fleet(str(path), lab_state=False)) is None  # the example itself loads
    document["hosts"]["gpu-3060"][field] = value
    path.write_text(yaml.safe_dump(document))
    error = outcome(lambda: load_fleet(str(path), lab_state=False))
    assert error is not None, f"{field}: {value!r} was accepted"
    assert f"{path}: host gpu-3060: field {field}" in str(error) and "(fix: " in str(error), str(error)


HOSTILE_GATEWAY = [
    ("host", "no-such-host"), ("host", "- -oProxyCommand=id"), ("host", ["gpu-3060"]), ("port", 0), ("port", 70000),
    ("port", "inf"), ("port", 22), ("port", 11434), ("listen", "lan"), ("listen", "fe80::1%eth0"),
    ("allow", ["not-a-net"]), ("allow", "{"), ("api_key_source", "relative/key"), ("max_request_kib", "9" * 400),
    ("max_request_kib", 0), ("nonsense_field", 1),
]


@pytest.mark.parametrize("field, value", HOSTILE_GATEWAY, ids=[f"{f}={str(v)[:20]}" for f, v in HOSTILE_GATEWAY])
def test_a_hostile_gateway_field_is_refused_naming_file_and_field(tmp_path, field, value):
    document = yaml.safe_load(FLEET.read_text())
    document["gateway"] = {"host": "gpu-3060", "listen": "192.168.1.21", "allow": ["192.168.1.0/24"]}
    path = tmp_path / "fleet.yml"
    path.write_text(yaml.safe_dump(document))
    assert outcome(lambda: load_fleet(str(path), lab_state=False)) is None  # a good gateway section loads
    document["gateway"][field] = value
    path.write_text(yaml.safe_dump(document))
    error = outcome(lambda: load_fleet(str(path), lab_state=False))
    assert error is not None, f"gateway.{field}: {value!r} was accepted"
    assert re.search(rf"{re.escape(str(path))}: (gateway: )?field (gateway\.)?{field}", str(error)), str(error)
    assert "(fix: " in str(error), str(error)


@pytest.mark.parametrize("seed", range(2))
def test_a_mutated_haproxy_section_gives_a_plan_or_a_clear_error(seed):
    rnd = random.Random(seed)
    policy = (ROOT / "tests" / "fixtures" / "apt-cache-policy-haproxy__debian-12-bookworm__installed.txt").read_text()
    for path in PROBES[:6]:
        text = path.read_text() + "#### r1fleet:haproxy\n" + mutate(policy, rnd)
        result = outcome(lambda: parse_probe(text, path.stem))
        assert result is None or "host" in str(result) or path.stem in str(result), str(result)
        if result is None:
            versions = parse_probe(text, path.stem).haproxy
            for version in (versions.installed, versions.candidate) if versions else ():
                assert version is None or re.fullmatch(r"[0-9][A-Za-z0-9.+~:-]*", version), version


ANSIBLE = ROOT / "inventory" / "ansible"


@pytest.mark.parametrize("seed", range(4))
def test_mutated_ansible_inventories_load_or_say_what_is_wrong(tmp_path, seed):
    """The lab's Ansible inventory (with its group_vars and host_vars) and the INI example, one file mutated."""
    import shutil

    rnd = random.Random(seed)
    refusals = []
    for n in range(60):
        copy = tmp_path / f"inventory-{n}"
        shutil.copytree(ANSIBLE, copy)
        target = rnd.choice(sorted(p for p in copy.rglob("*") if p.is_file()))
        target.write_text(mutate(target.read_text(), rnd))
        inventory = copy / ("example-hosts.ini" if rnd.random() < 0.3 else "lab-hosts.yml")
        error = outcome(lambda: load_fleet(str(inventory), lab_state=False))
        if error is not None:
            assert str(copy) in str(error), str(error)
            refusals.append(error)
    both_ways(refusals, 60)


STATUS_DOCUMENTS = sorted((ROOT / "tests" / "fixtures" / "status").glob("*.txt"))


@pytest.mark.parametrize("seed", range(3))
def test_mutated_status_documents_give_a_status_never_a_traceback(seed):
    """`r1fleet status` reads what a host printed: whatever it printed, each host gets a status (or the probe's
    clear error), and the table and JSON are written."""
    import json

    from r1fleet.status.readings import parse_status
    from r1fleet.status.report import host_status
    from r1fleet.status.table import status_table

    rnd = random.Random(seed)
    problems = 0
    for n in range(120):
        text = mutate(rnd.choice(STATUS_DOCUMENTS).read_text(), rnd)
        name = f"fuzz-{seed}-{n}"

        def load(text=text, name=name):
            live = parse_status(text, name)
            try:
                hardware = parse_probe(text, name)
                plan = plan_host(hardware)
            except R1FleetError:
                hardware, plan = None, None
            status = host_status(name, live, plan, hardware=hardware)
            json.dumps(status.document())
            status_table([status])
            return live

        error = outcome(load)
        assert error is None or f"host {name}" in str(error), str(error)
        problems += error is None and bool(parse_status(text, name).problems)
    assert problems, "no mutation ever reached a status section's reader"


LLAMA_LOGS = [ROOT / "tests" / "fixtures" / name for name in (
    "llama-server-start__lab-dual3090__b11669.txt", "llama-server-stop__lab-dual3090__b11669.txt",
    "llama-server-load-log__rpc-2dev__b11669.txt")]


@pytest.mark.parametrize("seed", range(2))
def test_mutated_llama_server_logs_give_a_breakdown_or_none_never_a_traceback(seed):
    """verify and status read llama-server's memory breakdown from its journal: whatever it holds, a breakdown (its
    unreadable rows named) or none, and a judgement against the plan."""
    from r1fleet.verify.judge import memory_problems, memory_summary
    from r1fleet.verify.readings import parse_memory_breakdown

    plan = plan_host(parse_probe(PROBE.read_text(), "lab-dual3090"))
    rnd = random.Random(seed)
    named = 0
    for _ in range(200):
        text = mutate(rnd.choice(LLAMA_LOGS).read_text(), rnd)
        breakdown = parse_memory_breakdown(text)
        if breakdown is not None:
            problems = memory_problems(plan, breakdown)
            memory_summary(plan, breakdown)
            named += bool(breakdown.problems) and bool(problems)
    assert named, "no mutation ever reached a row of the table"


LOCKED = ["dual-rtx3090", "cpu-16g", "mac-studio-64g"]


@pytest.mark.parametrize("seed", range(2))
def test_mutated_locks_are_read_or_refused_naming_file_and_field(tmp_path, seed):
    """A lock is a file people commit and copy (audit-security-2 H1): a real one, written by r1fleet for the
    shipped probes, with a few lines mutated, is read as a Lock whose models and GGUFs are still the catalog's
    pins, or refused with the file named."""
    entries = {}
    for name in LOCKED:
        hw = parse_probe((ROOT / "tests" / "fixtures" / "probes" / f"{name}.probe").read_text(), name)
        entries[name] = lock_entry(name, hw, plan_host(hw, Policy()))
    text = lock_text(Lock(hosts=entries))
    catalog = load_catalog()
    rnd = random.Random(seed)
    refusals = []
    for n in range(100):
        path = tmp_path / f"fleet-{n}.yml.lock"
        path.write_text(mutate(text, rnd))
        error = outcome(lambda: read_lock(path))
        if error is not None:
            assert str(path) in str(error), str(error)
            refusals.append(error)
            continue
        for entry in read_lock(path).hosts.values():  # accepted: every download is still a pinned one
            if entry.plan.model is not None and entry.plan.gguf is not None:
                assert entry.plan.gguf == catalog.find(entry.plan.model).pinned_gguf()
    both_ways(refusals, 100)


def test_mutated_manifests_are_the_pinned_weights_or_refused(tmp_path):
    """A registry's manifest (the lab registry's, as Ollama's registry shapes it), mutated line by line: the model
    it describes has exactly the pinned weights, or it is refused naming the tag (audit-security-2 M1, M3)."""
    gguf = tmp_path / "model.Q4_1.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)))
    sha = hashlib.sha256(gguf.read_bytes()).hexdigest()
    tag = "r1fleet/smollm2:135m-instruct-q4_1"
    document = json.loads(lab_registry.publish(tmp_path / "mirror", tag, gguf, sha, "llama", "Q4_1").read_bytes())
    text = json.dumps(document, indent=1)
    rnd = random.Random(7)
    refusals = []
    for _ in range(400):
        error = outcome(lambda: read_manifest(mutate(text, rnd).encode(), tag, sha))
        if error is not None:
            assert tag in str(error), str(error)
            refusals.append(error)
    both_ways(refusals, 400)
    for _ in range(50):  # accepted ones: the weights are the pinned ones, and the only model layer
        data = mutate(text, rnd).encode()
        try:
            model = read_manifest(data, tag, sha)
        except R1FleetError:
            continue
        assert [blob.sha256 for blob in model.blobs if blob.size > 1 << 20] in ([], [sha])


HEADERS = ["Content-Length", "Content-Length", "Content-Range", "Content-Range", "Transfer-Encoding", "Location"]
# What a header can carry (HTTP headers are ISO-8859-1): digits Python's int() takes or refuses, too many of them
HEADER_VALUES = ["²", "³¹", "9" * 5000, "-1", "inf", "nan", "1e309", "", "0x10", " 42 ", "bytes 0-3/256",
                 "bytes */256", "bytes 9-1/2", "bytes 0-" + "9" * 30 + "/*", "chunked", "gzip, chunked", "[", "null"]


@pytest.mark.parametrize("seed", range(2))
def test_hostile_http_answers_end_in_the_file_or_a_clear_error(tmp_path, seed):
    """An upstream answering odd status lines and headers (a length of '²' or 5,000 digits, a range that is not
    one, a chunked body that is not): the controller's cache gets the pinned bytes or a clear error, never a
    traceback, and never more than the pinned size on disk (audit-security-2 M3)."""
    body = b"GGUF" * 64
    sha = hashlib.sha256(body).hexdigest()
    rnd = random.Random(seed)
    answers: list[bytes] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.wfile.write(answers.pop(0) if answers else b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")

        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    refusals = []
    try:
        for n in range(80):
            head, status, sent = {"Content-Length": str(len(body))}, "200 OK", body
            if rnd.random() < 0.6:  # else a plain answer: the run must see both outcomes
                for _ in range(rnd.randint(1, 3)):
                    head[rnd.choice(HEADERS)] = rnd.choice(HEADER_VALUES)
                status = rnd.choice(["200 OK", "206 Partial Content", "200 OK", "302 Found", "416 x", "200"])
                sent = body[: rnd.randrange(len(body) + 1)] + b"\n" * rnd.randrange(3)
            answers[:] = [(f"HTTP/1.1 {status}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in head.items())).encode("latin-1")
                          + b"\r\n" + sent] * 6
            cache = ArtifactCache(tmp_path / f"cache-{n}")
            url = f"http://127.0.0.1:{server.server_address[1]}/m.gguf"
            error = outcome(lambda: cache.fetch(url, sha, "m.gguf", size=len(body)))
            if error is not None:
                refusals.append(error)
            else:
                assert cache.path_for(sha).read_bytes() == body
            assert all(path.stat().st_size <= len(body) for path in (tmp_path / f"cache-{n}").rglob("*") if path.is_file()
                       and not path.name.endswith(".json"))
    finally:
        server.shutdown()
        server.server_close()
    both_ways(refusals, 80)
