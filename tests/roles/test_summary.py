"""roles/summary.py: a planning step that fails, for any reason, fails that host only and says why."""

from __future__ import annotations

from dataclasses import dataclass

from roles import summary


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
