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
