"""Run an r1fleet @deploy against pyinfra's @fake connector (a stand-in host) and record what it did.

@fake succeeds silently for every command unless `fake_responses` scripts an answer (substring ->
output; research/pyinfra.md section 4). Uploads are captured here because the connector does not
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

ROOT = Path(__file__).resolve().parents[2]
HOST = "@fake/h1"

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

    def ran(self, text: str) -> bool:
        return any(text in command for command in self.commands)

    def script(self, text: str) -> str:
        matches = [c for c in self.commands if text in c]
        assert matches, f"no command contains {text!r}"
        return matches[0]


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
             base_responses: bool = True, monkeypatch) -> Run:
    """Prepare and execute `role(*args)` on one @fake host; return its commands, uploads and operations.

    responses: scripted answers (substring or compiled regex -> output); data: extra host data
    (e.g. role settings read from host.data); base_responses: add BASE_RESPONSES (a plain Linux host).
    """
    uploads = record_uploads(monkeypatch)
    host_data = {"fake_responses": fake_responses(responses, base_responses), **(data or {})}
    inventory = Inventory(([(HOST, host_data)], {"fake_delay": 0, "fake_delay_jitter": 0}))
    state = State(inventory=inventory, config=Config())
    state.cwd = str(ROOT)
    connect_all(state)
    add_deploy(state, role, *args)
    host = inventory.get_host(HOST)
    order = state.get_op_order()
    op_names = [op_name(state, h) for h in order]
    try:
        run_ops(state)
    except PyinfraError:
        pass  # raised when every host failed; `failed` below says so
    ops = state.ops[host]
    changed = [op_name(state, h) for h in order
               if h in ops and ops[h].operation_meta.is_complete() and ops[h].operation_meta.did_change()]
    return Run(commands=list(host.connector.executed_commands), uploads=uploads, op_names=op_names,
               changed=changed, failed=host in state.failed_hosts)
