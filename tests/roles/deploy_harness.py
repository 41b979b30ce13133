"""Run an r1fleet @deploy against pyinfra's @fake connector (a stand-in host) and record what it did.

@fake succeeds silently for every command unless `fake_responses` scripts an answer (substring ->
output; docs/research/pyinfra.md section 4). Uploads are captured here because the connector does not
record them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pyinfra.api import Config, Inventory, State
from pyinfra.api.connect import connect_all
from pyinfra.api.deploy import add_deploy
from pyinfra.api.exceptions import PyinfraError
from pyinfra.api.operations import run_ops
from pyinfra.connectors.fake import FakeConnector

from r1fleet.errors import R1FleetError
from r1fleet.operations.common import refuse
from r1fleet.operations.stages import apply_roles
from r1fleet.roles.exposure.role import ExposureRole
from r1fleet.roles.llama_cpp.role import LlamaCppRole
from r1fleet.roles.macos.role import MacOllamaRole
from r1fleet.roles.ollama.role import OllamaRole
from r1fleet.roles.rpc_worker.decide import rpc_worker
from r1fleet.roles.rpc_worker.role import RpcWorkerRole

ROOT = Path(__file__).resolve().parents[2]
HOST = "@fake/h1"
_RUN_SHELL_COMMAND = FakeConnector.run_shell_command

# What every Linux host answers; tests add the facts that matter to them.
BASE_RESPONSES: dict[str, Any] = {
    "uname -s": "Linux",
    re.compile(r"^command -v apt "): "/usr/bin/apt",
    re.compile(r"^command -v useradd "): "/usr/sbin/useradd",
    re.compile(r"^command -v curl "): "/usr/bin/curl",
    "cat /etc/group": ["root:x:0:", "video:x:44:", "render:x:993:"],
}


@dataclass
class Run:
    commands: list[str]
    uploads: dict[str, str]
    op_names: list[str]   # every operation the deploy prepared, in order
    changed: list[str]    # the operations that completed and reported a change
    failed: bool
    by_op: list[tuple[str, str]]   # (operation name, command) for each command an operation ran, in order
    stdin: dict[str, str]   # command -> what pyinfra wrote to its stdin (`_stdin`), for the commands given one
    sudo: set[str]   # the operations that ran a command through sudo

    def op(self, name: str) -> str:
        """The one prepared operation called `name` (its full name, or a part that names only one)."""
        names = list(dict.fromkeys(self.op_names))
        exact = [n for n in names if n == name or n.rsplit(" | ", 1)[-1] == name]
        named = exact or [n for n in names if name in n]
        assert len(named) == 1, f"{name!r} names {len(named)} operations, not one: {list(dict.fromkeys(self.op_names))}"
        return named[0]

    def op_commands(self, name: str) -> list[str]:
        """The commands the one operation called `name` ran on the host (none when it had nothing to do)."""
        op = self.op(name)
        return [command for op_name, command in self.by_op if op_name == op]

    def ran(self, name: str, text: str = "") -> bool:
        """Whether the one operation called `name` ran a command containing `text` (any command if empty).

        An operation that was never prepared fails the test (it is not "did not run")."""
        return any(text in command for command in self.op_commands(name))

    def never_ran(self, text: str) -> bool:
        """Whether no command at all (of any operation, or a fact) contains `text`."""
        return not any(text in command for command in self.commands)

    def installs(self, name: str) -> set[str]:
        """The packages the one operation called `name` installed (the words after `install` in its apt-get,
        dnf or brew commands), so that a test can ask for one package by its whole name."""
        packages: set[str] = set()
        for command in self.op_commands(name):
            match = re.search(r"\b(?:apt-get|dnf|brew)\b.*?\binstall\b(.*)$", command)
            if match:
                packages |= {word for word in match.group(1).split() if not word.startswith("-")}
        return packages

    def has_op(self, name: str) -> bool:
        """Whether an operation whose name contains `name` was prepared."""
        return any(name in n for n in self.op_names)

    def script(self, text: str) -> str:
        matches = [c for c in self.commands if text in c]
        assert matches, f"no command contains {text!r}"
        return matches[0]


def record_commands(monkeypatch, state_box: list) -> tuple[list[tuple[str, str]], set[str], dict[str, str]]:
    """Make @fake's run_shell_command also note which operation (by name) ran each command, which ran one
    through sudo, and what each was given on stdin."""
    by_op: list[tuple[str, str]] = []
    sudo: set[str] = set()
    stdin: dict[str, str] = {}
    original = _RUN_SHELL_COMMAND  # @fake's own, not a wrapper an earlier run in the same test installed

    def run_and_note(self, command, *args, **kwargs):
        op_hash = self.host.executing_op_hash
        text = command if isinstance(command, str) else command.get_masked_value()
        if op_hash is not None and state_box:
            by_op.append((op_name(state_box[0], op_hash), text))
            if kwargs.get("_sudo"):
                sudo.add(op_name(state_box[0], op_hash))
        if kwargs.get("_stdin") is not None:
            given = kwargs["_stdin"]
            stdin[text] = given if isinstance(given, str) else "".join(given)
        return original(self, command, *args, **kwargs)

    monkeypatch.setattr(FakeConnector, "run_shell_command", run_and_note)
    return by_op, sudo, stdin


def record_uploads(monkeypatch) -> dict[str, str]:
    """Make @fake's put_file store each upload's text (by remote path) in the returned dict."""
    uploads: dict[str, str] = {}

    def record_put(self, filename_or_io, remote_filename, remote_temp_filename=None, **kwargs):
        if isinstance(filename_or_io, (str, Path)):
            text = Path(filename_or_io).read_text()
        else:
            filename_or_io.seek(0)
            raw = filename_or_io.read()
            text = raw.decode() if isinstance(raw, bytes) else raw
        uploads[remote_filename] = text
        return True

    monkeypatch.setattr(FakeConnector, "put_file", record_put)
    return uploads


def fake_responses(responses: dict | None, base_responses: bool) -> dict:
    """The test's answers, then (unless turned off) the BASE_RESPONSES the test did not override.

    Test answers come first: @fake takes the first matching key, and the test's are more specific.
    """
    answers = dict(responses or {})
    if not base_responses:
        return answers
    return {**answers, **{k: v for k, v in BASE_RESPONSES.items() if k not in answers}}


def op_name(state: State, op_hash: str) -> str:
    return sorted(state.op_meta[op_hash].names)[0]


def run_role(role: Callable[..., Any], *args: Any, responses: dict | None = None, data: dict | None = None,
             base_responses: bool = True, execute: bool = True, config: dict | None = None, monkeypatch) -> Run:
    """Prepare and execute `role(*args)` on one @fake host; return its commands, uploads and operations.

    responses: scripted answers (substring or compiled regex -> output); data: extra host data
    (e.g. role settings read from host.data); base_responses: add BASE_RESPONSES (a plain Linux host);
    execute=False: prepare only, as `pyinfra --dry` does (the commands are then the facts read); config:
    pyinfra settings, e.g. {"DIFF": True} as `--diff` sets it.
    """
    uploads = record_uploads(monkeypatch)
    state_box: list[State] = []
    by_op, sudo, stdin = record_commands(monkeypatch, state_box)
    host_data = {"fake_responses": fake_responses(responses, base_responses), **(data or {})}
    inventory = Inventory(([(HOST, host_data)], {"fake_delay": 0, "fake_delay_jitter": 0}))
    state = State(inventory=inventory, config=Config(**(config or {})))
    state_box.append(state)
    state.cwd = str(ROOT)
    connect_all(state)
    try:
        add_deploy(state, role, *args)
    except PyinfraError:
        pass  # the host failed while its operations were prepared (a refusal before any change); `failed` says so
    host = inventory.get_host(HOST)
    order = state.get_op_order()
    op_names = [op_name(state, h) for h in order]
    try:
        if execute:
            run_ops(state)
    except PyinfraError:
        pass  # raised when every host failed; `failed` below says so
    ops = state.ops[host]
    changed = [op_name(state, h) for h in order
               if h in ops and ops[h].operation_meta.is_complete() and ops[h].operation_meta.did_change()]
    return Run(commands=list(host.connector.executed_commands), uploads=uploads, op_names=op_names,
               changed=changed, failed=host in state.failed_hosts, by_op=by_op, sudo=sudo, stdin=stdin)


# ---------------------------------------------------------------- one role on its own
# A role's stages with no other role, built from its constructor's arguments (the deploy prepares every role from
# one HostContext: r1fleet/deploy/serve.py). Test helpers only; the product has no such entry points.


def ollama_role(*args: Any, **kwargs: Any) -> None:
    apply_roles([OllamaRole(*args, **kwargs)])


def llama_cpp_role(*args: Any, **kwargs: Any) -> None:
    apply_roles([LlamaCppRole(*args, **kwargs)])


def exposure_role(*args: Any, **kwargs: Any) -> None:
    apply_roles([ExposureRole(*args, **kwargs)])


def mac_role(*args: Any, **kwargs: Any) -> None:
    apply_roles([MacOllamaRole(*args, **kwargs)])


def rpc_worker_role(pool, settings, head, hardware, install) -> None:
    """A worker decided and deployed on its own; a refused setting fails this host with its reason."""
    try:
        worker = rpc_worker(pool, settings, head, hardware)
    except R1FleetError as error:
        refuse(name=f"Refuse pool {pool.pool} settings", message=str(error))
        return
    apply_roles([RpcWorkerRole(worker, settings, install)])
