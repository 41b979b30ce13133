"""Facts in one round trip: the read side of a whole deploy, fetched before its first change.

pyinfra 3.10 runs each fact as its own SSH command, at execute time, and keeps no cache: a converged
host still costs one round trip per file, unit and user the roles look at (about 35 per host). The
roles know before any operation runs which facts they will read (`needed_facts` in each role), so
`prefetch` runs all of them in one shell script and keeps the answers. The one seam with pyinfra: while
a deploy runs, the host's `get_fact` (a public method) is wrapped so that a fact read *before the
host's first executed command of this run* is served from that batch. Such an answer is exactly what
pyinfra would have read: the same command, the same processing, and nothing has changed the host yet.
From the first command that ran on the host onwards, and for anything not prefetched, pyinfra reads
live as usual. Pinned to pyinfra 3.10's `Host.get_fact(cls, *args, **kwargs)` and to facts failing
the host when their command fails (such answers are never served: pyinfra reads them again).

Example, in a deploy:

    prefetch([(File, {"path": "/etc/systemd/system/r1fleet-ollama.service"}), (Users, {})])
    files.template(...)  # its File and Sha1File facts come from the batch while nothing has run yet
"""

from __future__ import annotations

import os
import shlex
from inspect import getcallargs
from typing import Any, Iterable

from pyinfra import host, state
from pyinfra.api import FactBase
from pyinfra.api.command import StringCommand
from pyinfra.context import ctx_host
from pyinfra.facts.deb import DebPackages
from pyinfra.facts.files import Directory, File, Link, Sha1File
from pyinfra.facts.server import Which
from pyinfra.facts.systemd import SystemdEnabled, SystemdStatus

FactRequest = tuple[type[FactBase], dict[str, Any]]
MARK = "R1FLEET-FACT-BATCH-5b7e"  # delimits each fact's output; no fact prints it
MISSING = "R1FLEET-FACT-MISSING"
TRACE = os.environ.get("R1FLEET_FACT_TRACE") == "1"  # print each fact read live (a miss of the batch)


class FactBatch(FactBase):
    """Several facts' commands in one shell script: each in its own subshell, its output framed by
    `MARK <index>` and `MARK <index> rc=<status>` (a fact's `exit` ends only its own subshell)."""

    default = dict

    def command(self, commands: tuple[tuple[str, str], ...]) -> str:
        parts = []
        for index, (command, requires) in enumerate(commands):
            body = f"( {command} )" if not requires else (
                f"if command -v {shlex.quote(requires)} >/dev/null 2>&1; then ( {command} ); else echo {MISSING}; fi")
            # The newline ends a last line printed without one (curl's JSON); split_batch_output drops it.
            parts.append(f"echo '{MARK} {index}'; {body} </dev/null 2>/dev/null; printf '\\n{MARK} {index} rc=%s\\n' $?")
        return "\n".join(parts)

    def process(self, output: list[str]) -> dict[int, tuple[int, list[str]]]:
        return split_batch_output(output)


def split_batch_output(output: list[str]) -> dict[int, tuple[int, list[str]]]:
    """{index: (exit status, stdout lines)} for every fact whose frame closed (the empty line before each
    closing mark is the batch's own newline).

    >>> split_batch_output([f"{MARK} 0", "a", "", f"{MARK} 0 rc=0", f"{MARK} 1", "b", f"{MARK} 1 rc=1"])
    {0: (0, ['a']), 1: (1, ['b'])}
    """
    found: dict[int, tuple[int, list[str]]] = {}
    current: int | None = None
    lines: list[str] = []
    for line in output:
        words = line.split()
        if len(words) >= 2 and words[0] == MARK and words[1].isdecimal():
            index = int(words[1])
            if len(words) == 2:
                current, lines = index, []
            elif current == index and words[2].startswith("rc=") and words[2][3:].isdecimal():
                found[index] = (int(words[2][3:]), lines[:-1] if lines and lines[-1] == "" else lines)
                current = None
            continue
        if current is not None:
            lines.append(line)
    return found


def _command_text(command: Any) -> str:
    return command.get_raw_value() if isinstance(command, StringCommand) else str(command)


def fact_command(fact: FactBase, kwargs: dict[str, Any]) -> tuple[str, str]:
    """(the fact's shell command, the binary it requires or "") as pyinfra would run it for these arguments."""
    command = fact.command(**kwargs) if callable(fact.command) else fact.command
    requires = fact.requires_command(**kwargs) if callable(fact.requires_command) else fact.requires_command
    return _command_text(command), _command_text(requires) if requires else ""


def _key(cls: type[FactBase], kwargs: dict[str, Any]) -> tuple:
    return cls, tuple(sorted((name, _hashable(value)) for name, value in kwargs.items()))


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _fact_kwargs(cls: type[FactBase], args: tuple, kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """The fact's own arguments as pyinfra binds them, or None when global arguments (_sudo...) are given."""
    if any(name.startswith("_") for name in kwargs):
        return None
    if not args and not kwargs:
        return {}
    bound = getcallargs(cls().command, *args, **kwargs)
    bound.pop("self", None)
    return bound


def _as_pyinfra_reads(fact: FactBase, status: int, lines: list[str]) -> tuple[bool, Any]:
    """(servable, value) as pyinfra's own read would give: a failed command or a missing binary is not
    servable (pyinfra would fail the host or warn), empty output is the fact's default. `fact` is the
    instance whose command ran (some facts keep their arguments from command() for process())."""
    if status != 0 or lines == [MISSING]:
        return False, None
    return True, (fact.process(lines) if lines else fact.default())


class _Batch:
    def __init__(self, answers: dict[tuple, Any], connector_args: tuple) -> None:
        self.answers = answers
        self.connector_args = connector_args


def _connector_args(real_host) -> tuple:
    """The current operation's sudo/su/doas arguments: a batch read under other ones is not served."""
    current = real_host.current_op_global_arguments or {}
    return tuple(sorted((k, repr(v)) for k, v in current.items()
                        if v and k.startswith(("_sudo", "_su_", "_doas", "_use_su"))))  # unset ones are falsy


def _host_has_run_commands(real_host) -> bool:
    for op_hash in state.ops.get(real_host, {}):
        meta = state.get_op_data_for_host(real_host, op_hash).operation_meta
        if meta.executed or (meta.is_complete() and not meta.did_succeed()):
            return True
    return False


def prefetch(requests: Iterable[FactRequest]) -> int:
    """Read every requested fact of the current host in one round trip and serve them to this run's
    operations until the host's first command runs. Returns how many facts the batch answered."""
    real_host = ctx_host.get()
    unique: dict[tuple, FactRequest] = {}
    for cls, kwargs in requests:
        unique.setdefault(_key(cls, kwargs), (cls, kwargs))
    requests = list(unique.values())
    facts = [cls() for cls, _ in requests]
    commands = [fact_command(fact, kwargs) for fact, (_, kwargs) in zip(facts, requests)]
    output = host.get_fact(FactBatch, commands=tuple(commands)) if commands else {}
    answers: dict[tuple, Any] = {}
    for index, (cls, kwargs) in enumerate(requests):
        if index in output:
            servable, value = _as_pyinfra_reads(facts[index], *output[index])
            if servable:
                answers[_key(cls, kwargs)] = value
    _install(real_host, _Batch(answers, _connector_args(real_host)))
    return len(answers)


def _install(real_host, batch: _Batch) -> None:
    live = type(real_host).get_fact.__get__(real_host)

    def get_fact(cls, *args, **kwargs):
        bound = _fact_kwargs(cls, args, kwargs) if isinstance(cls, type) and issubclass(cls, FactBase) else None
        if bound is not None and _connector_args(real_host) == batch.connector_args:
            try:
                key = _key(cls, bound)
                hit = key in batch.answers
            except TypeError:  # an unhashable argument: not something we prefetched
                hit = False
            if hit and not _host_has_run_commands(real_host):
                return batch.answers[key]
        if TRACE:
            print(f"[{real_host.name}] fact read live: {getattr(cls, '__name__', cls)} {args} {kwargs}")
        return live(cls, *args, **kwargs)

    real_host.get_fact = get_fact


# ------------------------------------------------------------------ what pyinfra's operations read
# (pyinfra 3.10's files, server and systemd operations; a read missing here is only slower, never wrong)


def directory_reads(path: str) -> list[FactRequest]:
    """files.directory(path=...)."""
    return [(Directory, {"path": path})]


def file_reads(path: str) -> list[FactRequest]:
    """files.put / files.template / files.file to `path`: the file, its directory, its content's sha1."""
    parent = path.rsplit("/", 1)[0] or "/"
    return [(File, {"path": path}), (Directory, {"path": parent}), (Directory, {"path": path}),
            (Sha1File, {"path": path})]


def link_reads(path: str) -> list[FactRequest]:
    """files.link(path=...)."""
    return [(Link, {"path": path})]


def package_reads() -> list[FactRequest]:
    """server.packages on Debian and Ubuntu (other distributions read their own package facts live)."""
    return [(Which, {"command": "zypper"}), (Which, {"command": "apk"}), (Which, {"command": "apt"}),
            (DebPackages, {})]


def service_reads(unit: str) -> list[FactRequest]:
    """systemd.service(service=unit, ...)."""
    common = {"user_mode": False, "machine": None, "user_name": None, "services": [unit]}
    return [(SystemdStatus, dict(common)), (SystemdEnabled, dict(common))]
