"""Run an r1fleet role against pyinfra's @fake connector (a stand-in host) and record what it did.

@fake succeeds silently for every command unless `fake_responses` scripts an answer (substring ->
output); uploads are captured here because the connector does not record them.
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
    changed: list[str]
    failed: bool

    def ran(self, text: str) -> bool:
        return any(text in command for command in self.commands)

    def script(self, text: str) -> str:
        matches = [c for c in self.commands if text in c]
        assert matches, f"no command contains {text!r}"
        return matches[0]


def run_role(role: Callable[..., Any], *args: Any, responses: dict | None = None, monkeypatch) -> Run:
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
    responses = dict(responses or {})
    # Test answers first: @fake takes the first matching key, and the test's are more specific.
    data = {"fake_responses": {**responses, **{k: v for k, v in BASE_RESPONSES.items() if k not in responses}}}
    inventory = Inventory(([("@fake/h1", data)], {"fake_delay": 0, "fake_delay_jitter": 0}))
    state = State(inventory=inventory, config=Config())
    state.cwd = str(ROOT)
    connect_all(state)
    add_deploy(state, role, *args)
    host = inventory.get_host("@fake/h1")
    order = state.get_op_order()
    try:
        run_ops(state)
    except PyinfraError:
        pass
    changed = [
        sorted(state.op_meta[h].names)[0]
        for h in order
        if h in state.ops[host] and state.ops[host][h].operation_meta.is_complete()
        and state.ops[host][h].operation_meta.did_change()
    ]
    return Run(list(host.connector.executed_commands), uploads, changed, host in state.failed_hosts)
