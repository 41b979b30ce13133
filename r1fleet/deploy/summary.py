"""The end-of-run summary: which host failed, at which step, and why; then where each converged host serves.

pyinfra keeps going when one host fails (unreachable, a command error); it does not say at the
end which host failed where. deploy.py installs this once per run: a state callback records
failed operations, deploy.py records planning failures and each host's endpoint, and an exit hook
prints the summary, ending with each converged host's endpoint and model name.
"""

from __future__ import annotations

import atexit
import sys
from contextlib import contextmanager
from typing import Iterator

from pyinfra.api import operations as pyinfra_operations
from pyinfra.api.state import BaseStateCallback, State, StateStage

from r1fleet.errors import R1FleetError
from r1fleet.roles.exposure.endpoint import Endpoint

_failures: dict[str, tuple[str, str]] = {}
_endpoints: dict[str, Endpoint] = {}
_installed: list[State] = []


def record(host_name: str, step: str, why: str) -> None:
    _failures.setdefault(host_name, (step, why))


def serves(endpoint: Endpoint | None) -> None:
    """Where the host serves once it converges (None: a pool worker, which serves its head)."""
    if endpoint is not None:
        _endpoints[endpoint.host] = endpoint


class _Recorder(BaseStateCallback):
    @staticmethod
    def operation_host_error(state: State, host, op_hash, retry_count: int = 0, max_retries: int = 0):
        names = ", ".join(sorted(state.get_op_meta(op_hash).names)) or "an operation"
        # The output is attached after this callback; keep the op hash and read it at exit.
        _failures.setdefault(host.name, (names, f"op:{op_hash}"))


def _why(state: State, host, why: str) -> str:
    if not why.startswith("op:"):
        return why
    try:
        meta = state.get_op_data_for_host(host, why[3:]).operation_meta
        lines = [line for line in meta.stderr_lines if line.strip()] or [
            line for line in meta.stdout_lines if line.strip()
        ]
    except Exception:  # the op may never have produced output (connection lost)
        lines = []
    return lines[-1].strip() if lines else "the command failed without output (connection lost?)"


def lines(state: State) -> list[str]:
    hosts = {h.name: h for h in state.inventory}
    failed = {h.name for h in state.failed_hosts} | set(_failures)
    out = []
    for name in sorted(failed):
        step, why = _failures.get(name, ("connect", "could not connect over SSH (host down or unreachable?)"))
        out.append(f"  {name}: failed at {step}: {_why(state, hosts.get(name), why)}")
    return out


def endpoint_lines(state: State) -> list[str]:
    """Each converged host's endpoint and model name, in inventory order."""
    failed = {h.name for h in state.failed_hosts} | set(_failures)
    order = [h.name for h in state.inventory]
    return [f"  {_endpoints[name].describe()}" for name in order if name in _endpoints and name not in failed]


def _print(state: State, done: str = "converged") -> None:
    failed = lines(state)
    total = len(state.activated_hosts) or len(list(state.inventory))  # --limit narrows the run
    if failed:
        print(f"\nr1fleet: {len(failed)} of {total} host(s) failed:", file=sys.stderr)
        print("\n".join(failed), file=sys.stderr)
    elif state.current_stage >= StateStage.Execute:
        print(f"\nr1fleet: all {total} host(s) {done}", file=sys.stderr)
    served = endpoint_lines(state) if state.current_stage >= StateStage.Execute else []
    if served:
        print("r1fleet: endpoints (`r1fleet endpoints --format openwebui|litellm|env` writes them for your tools):",
              file=sys.stderr)
        print("\n".join(served), file=sys.stderr)


def _contain_host_crashes() -> None:
    """Make an exception inside one host's operation fail that host only.

    pyinfra 3.10's own operations can raise on a host that went away mid-run (server.user reads a
    fact that came back None: TypeError), and the exception ends the whole run, every other host
    included. Turned into a failed operation, pyinfra drops that host and carries on with the rest.
    """
    original = pyinfra_operations._run_host_op
    if getattr(original, "r1fleet_guarded", False):
        return

    def guarded(state: State, host, op_hash: str) -> bool:
        try:
            return original(state, host, op_hash)
        except Exception as error:  # noqa: BLE001 - any crash of one host's op fails that host
            names = ", ".join(sorted(state.get_op_meta(op_hash).names)) or "an operation"
            record(host.name, names, f"{type(error).__name__}: {error} (connection lost?)")
            return False

    guarded.r1fleet_guarded = True
    pyinfra_operations._run_host_op = guarded


def install(state: State, done: str = "converged") -> None:
    """Record this run's failures and print the summary at exit; `done`: what a host that did not fail did
    ("converged", "removed")."""
    if any(s is state for s in _installed):
        return
    _installed.append(state)
    state.add_callback_handler(_Recorder())
    _contain_host_crashes()
    atexit.register(_print, state, done)


@contextmanager
def step(state: State, host, name: str) -> Iterator[None]:
    """Run a planning step; on a user-facing error, record it and fail only this host."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 - one host's odd input must not end the run for every host
        message = str(error)
        if not isinstance(error, (R1FleetError, OSError, ValueError)):
            message = f"unexpected {type(error).__name__}: {error} (please report it with this host's probe: r1fleet probe {host.name})"
        print(f"[{host.name}] {name} failed: {message}", file=sys.stderr)
        record(host.name, name, message)
        # the Host itself, not pyinfra's context proxy: the summary reads failed_hosts after the context is gone
        state.fail_hosts({host._get_module() if hasattr(host, "_get_module") else host})


def ok(host) -> bool:
    return host.name not in _failures
