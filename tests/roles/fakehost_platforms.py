"""Run an r1fleet @deploy against pyinfra's @fake connector and record what it would do.

A stand-in for a real host: the @fake connector answers commands from scripted responses
(`fake_responses`) and succeeds silently otherwise (research/pyinfra.md section 4). Uploaded files
are captured here because the connector does not record them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from io import IOBase
from pathlib import Path
from typing import Any, Callable

from pyinfra.api import Config, Inventory, State
from pyinfra.api.connect import connect_all
from pyinfra.api.deploy import add_deploy
from pyinfra.api.exceptions import PyinfraError
from pyinfra.api.operations import run_ops
from pyinfra.connectors.fake import FakeConnector

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class FakeRun:
    commands: list[str]
    uploads: dict[str, str]
    op_names: list[str]
    failed: bool
    changed_ops: list[str] = field(default_factory=list)

    def ran(self, text: str) -> bool:
        return any(text in command for command in self.commands)


def run_fake_deploy(deploy_fn: Callable[..., Any], *args: Any, responses: dict | None = None,
                    data: dict | None = None, monkeypatch=None) -> FakeRun:
    """Prepare and execute `deploy_fn(*args)` on one @fake host; return commands, uploads and ops."""
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

    assert monkeypatch is not None, "pass pytest's monkeypatch fixture"
    monkeypatch.setattr(FakeConnector, "put_file", record_put)
    host_data = {"fake_responses": responses or {}, **(data or {})}
    inventory = Inventory(([("@fake/h1", host_data)], {"fake_delay": 0, "fake_delay_jitter": 0}))
    state = State(inventory=inventory, config=Config())
    state.cwd = str(ROOT)
    connect_all(state)
    add_deploy(state, deploy_fn, *args)
    fake_host = inventory.get_host("@fake/h1")
    op_order = state.get_op_order()
    op_names = [sorted(state.op_meta[op_hash].names)[0] for op_hash in op_order]
    try:
        run_ops(state)
    except PyinfraError:
        pass  # raised when every host failed; `failed` below says so
    changed = [sorted(state.op_meta[h].names)[0] for h in op_order
               if h in state.ops[fake_host] and state.ops[fake_host][h].operation_meta.is_complete()
               and state.ops[fake_host][h].operation_meta.did_change()]
    failed = fake_host in state.failed_hosts
    return FakeRun(commands=list(fake_host.connector.executed_commands), uploads=uploads, op_names=op_names,
                   failed=failed, changed_ops=changed)
