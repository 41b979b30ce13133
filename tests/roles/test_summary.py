"""roles/summary.py: a planning step that fails, for any reason, fails that host only and says why."""

from __future__ import annotations

from dataclasses import dataclass

from r1fleet.deploy import summary


@dataclass(frozen=True)
class FakeHost:
    name: str


class FakeState:
    def __init__(self):
        self.failed = set()

    def fail_hosts(self, hosts):
        self.failed |= {h.name for h in hosts}


def test_an_unexpected_error_fails_only_its_host_without_a_traceback(capsys):
    """A probe value that overflows (memory.total = inf) is not a user error the parser names, yet it must
    fail its host alone, not end the deploy for every host (audit M3)."""
    state, odd, fine = FakeState(), FakeHost("odd"), FakeHost("fine")
    with summary.step(state, odd, "plan"):
        int(float("inf"))
    with summary.step(state, fine, "plan"):
        pass
    assert state.failed == {"odd"}
    step, why = summary._failures["odd"]
    assert step == "plan" and why.startswith("unexpected OverflowError") and "r1fleet probe odd" in why
    assert "Traceback" not in capsys.readouterr().err
    summary._failures.clear()


def test_the_one_seam_into_pyinfra_is_where_the_pinned_pyinfra_has_it(monkeypatch):
    """roles/summary.py wraps pyinfra's private `_run_host_op` (pyinfra pinned to 3.10.x in pyproject.toml)
    so that one host's crashing operation fails that host only. The seam must exist with this signature and
    be called through the module, or the guard would silently do nothing after a pyinfra upgrade."""
    import inspect
    from types import SimpleNamespace

    from pyinfra.api import operations as pyinfra_operations

    assert list(inspect.signature(pyinfra_operations._run_host_op).parameters) == ["state", "host", "op_hash"]
    assert "return _run_host_op(state, host, op_hash)" in inspect.getsource(pyinfra_operations.run_host_op)

    def crashing(state, host, op_hash):
        raise TypeError("'NoneType' object is not subscriptable")

    monkeypatch.setattr(pyinfra_operations, "_run_host_op", crashing)
    summary._contain_host_crashes()
    state = SimpleNamespace(get_op_meta=lambda op_hash: SimpleNamespace(names={"Ollama | System user ollama"}))
    assert pyinfra_operations._run_host_op(state, FakeHost("gone"), "h") is False
    assert summary._failures.pop("gone")[0] == "Ollama | System user ollama"


# ---------------------------------------------------------------- a whole deploy, two hosts


def deploy_two(monkeypatch, odd_answers: dict) -> tuple[set[str], set[str]]:
    """serve_r1 prepared on two @fake hosts with a real probe, `odd_answers` scripted on the first only; the names
    of the hosts that failed and of those whose operations were prepared."""
    from pathlib import Path

    from deploy_harness import BASE_RESPONSES
    from pyinfra.api import Config, Inventory, State
    from pyinfra.api.connect import connect_all
    from pyinfra.api.deploy import add_deploy

    from r1fleet.deploy.serve import serve_r1

    monkeypatch.setattr(summary.atexit, "register", lambda *args: None)  # no summary printed at this test's exit
    probe = (Path(__file__).resolve().parents[1] / "fixtures" / "probes" / "rtx3060-12g.probe").read_text().splitlines()

    def data(answers: dict) -> dict:
        return {"fake_responses": {"r1fleet-probe": probe, **answers, **BASE_RESPONSES}, "r1fleet": {"address": "10.0.0.1"}}
    inventory = Inventory(([("@fake/odd", data(odd_answers)), ("@fake/fine", data({}))],
                           {"fake_delay": 0, "fake_delay_jitter": 0}))
    state = State(inventory=inventory, config=Config())
    state.cwd = str(Path(__file__).resolve().parents[2])
    connect_all(state)
    add_deploy(state, serve_r1)
    prepared = {host.name for host in inventory if state.ops.get(host)}
    return {host.name for host in state.failed_hosts}, prepared


def test_a_hosts_odd_answer_while_its_roles_are_prepared_fails_that_host_alone(monkeypatch, capsys):
    """The role stages are prepared inside a summary step (audit M3): whatever trips there ends that host's deploy
    with the reason in the summary, and the other hosts go on."""
    from r1fleet.roles.ollama.role import OllamaRole

    install = OllamaRole.install

    def odd_on_one_host(self):
        if self.settings.name == "@fake/odd":
            raise OverflowError("cannot convert float infinity to integer")
        install(self)
    monkeypatch.setattr(OllamaRole, "install", odd_on_one_host)
    failed, prepared = deploy_two(monkeypatch, {})
    assert failed == {"@fake/odd"} and "@fake/fine" in prepared
    step, why = summary._failures.pop("@fake/odd")
    assert step == "prepare" and why.startswith("unexpected OverflowError: cannot convert float infinity")
    summary._failures.clear()


def test_an_ollama_that_answers_json_nested_without_end_is_no_answer(monkeypatch):
    """The host's own service is a network input too: /api/tags as `[[[[...` reads as "no answer", not a
    RecursionError that would end the run for every host."""
    failed, prepared = deploy_two(monkeypatch, {"/api/tags": "[" * 100_000 + "]" * 100_000})
    assert failed == set() and prepared == {"@fake/odd", "@fake/fine"}
    summary._failures.clear()


def test_the_summary_ends_with_each_converged_hosts_endpoint():
    from types import SimpleNamespace

    from r1fleet.fleet.config import HostConfig
    from r1fleet.records import HostPlan
    from r1fleet.roles.exposure.endpoint import endpoint_of

    plan = HostPlan(host="a", model="deepseek-r1-distill-qwen-14b", ollama_tag="deepseek-r1:14b", backend="ollama", fits=True)
    for name in ("a", "b"):
        summary.serves(endpoint_of(HostConfig(name=name, address="10.0.0.1"), plan.model_copy(update={"host": name})))
    summary.serves(None)  # a pool worker: its head serves
    state = SimpleNamespace(inventory=[FakeHost("b"), FakeHost("a")], failed_hosts={FakeHost("b")})
    assert summary.endpoint_lines(state) == ["  a: http://127.0.0.1:11434/v1  model deepseek-r1:14b  on the host only; "
                                             "from here: ssh -N -L 11434:127.0.0.1:11434 root@10.0.0.1"]
    summary._endpoints.clear()


def test_a_run_with_no_failure_says_what_its_hosts_did(capsys):
    """A deploy's hosts converged; a removal's were removed (deploy/remove.py)."""
    from types import SimpleNamespace

    from pyinfra.api.state import StateStage

    state = SimpleNamespace(inventory=[FakeHost("a")], failed_hosts=set(), activated_hosts=[FakeHost("a")],
                            current_stage=StateStage.Execute)
    for done in ("converged", "removed"):
        summary._print(state, done)
        assert f"r1fleet: all 1 host(s) {done}" in capsys.readouterr().err
