"""Progress of long work that runs on a host inside one pyinfra operation (a download by curl or by Ollama, a
source build), printed on the controller's terminal while it runs instead of a silent hour:

    @operation()
    def fetch(url: str, part: str):
        with watching("70b.gguf", file_poll({"": part}), total=42_520_395_584, resumable=True):
            yield f"curl -fSL -C - -o {part} {url}"
    # [dual-3090] 70b.gguf: 1.2 GiB / 39.6 GiB (3%), 48.3 MiB/s, 13m 35s left

How (pyinfra 3.10, api/operation.py `command_generator`, api/operations.py `run_host_op`, `_run_host_op`): an
operation's generator runs once while preparing, closed at its first yield, and again when the runner executes
it, running each yielded command and then resuming the generator, or dropping (closing) it when the command
failed. So a with-block around the yield lasts as long as the command, on every path. Only in that second run,
`watching` starts a greenlet that runs a small read-only poll command on the same host, with the operation's
connector arguments (sudo), as the command starts and then every few seconds (the SSH connector opens a channel
per command, so it runs beside the long one; the local connector starts another process), and stops it when the
with-block exits.

A poll prints one line per artifact, `<bytes held> <whole size or -> <label>`; `watching_build` reads the last
progress line of a build log instead.
"""

from __future__ import annotations

import re
import shlex
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping, Protocol

import gevent
from gevent.event import Event
from pyinfra.api import StringCommand
from pyinfra.api.arguments import CONNECTOR_ARGUMENT_KEYS
from pyinfra.context import ctx_host, ctx_state

from r1fleet.progress import TerminalProgress, human_bytes, human_seconds

EVERY_S = 5.0  # one poll (an SSH channel, a few hundred bytes) every few seconds per watched operation
STALL_S = 30.0  # fetch_verified reports at half curl's --speed-time (operations/common.py), before curl gives up
POLL_TIMEOUT_S = 30
# The runner's own controls of the long command, not of the poll (api/operations.py _run_host_op).
_NOT_FOR_POLLS = {"_timeout", "_stdin", "_success_exit_codes", "_get_pty", "_retries", "_retry_delay",
                  "_retry_until", "_chdir"}

Reading = tuple[int, int | None]  # bytes held, and the whole size when known
_live: set[gevent.Greenlet] = set()


def live_watchers() -> int:
    """How many watchers run now (none outlives its operation)."""
    return len(_live)


# ---------------------------------------------------------------------------------------------
# Poll commands (POSIX sh: Linux and macOS)


def file_size(path: str) -> str:
    """Shell: the size in bytes of `path` (a shell word), by GNU stat then BSD stat; nothing when it is absent."""
    return f"{{ stat -c %s {path} || stat -f %z {path}; }} 2>/dev/null"


def newest(pattern: str) -> str:
    """Shell: the newest path matching `pattern` (a glob, unquoted), e.g. the mktemp directory of the run
    being watched, as a quoted word.

    >>> newest("/opt/x/.tmp.*")
    '"$(ls -dt /opt/x/.tmp.* 2>/dev/null | head -n 1)"'
    """
    return f'"$(ls -dt {pattern} 2>/dev/null | head -n 1)"'


def _size(path: str) -> str:
    return f"$( {file_size(path)} )"


def file_poll(paths: Mapping[str, str], setup: str = "", sizes: Mapping[str, int] | None = None) -> str:
    """A poll of growing files (label -> shell word of its path), e.g. what curl writes with -o; `sizes`: the
    whole size of some, by label.

    >>> file_poll({"": "/m/x.part"})
    'if [ -f /m/x.part ]; then echo "$( { stat -c %s /m/x.part || stat -f %z /m/x.part; } 2>/dev/null )" - \\'\\'; fi; true'
    """
    sizes = sizes or {}
    checks = [f'if [ -f {path} ]; then echo "{_size(path)}" {sizes.get(label, "-")} {shlex.quote(label)}; fi'
              for label, path in paths.items()]
    return "; ".join([*([setup] if setup else []), *checks, "true"])


def ollama_blobs_poll(models_dir: str) -> str:
    """A poll of the blobs Ollama is pulling into `models_dir` (its OLLAMA_MODELS), labelled by 12 hex digits.

    Ollama v0.32.9 server/download.go: run() opens `<blob>-partial` (line 222) and truncates it to the blob's
    whole size (line 229: `file.Truncate(b.Total)`), then up to 16 parts write into it at their offsets (line
    288: io.NewOffsetWriter) and it is renamed to the blob when complete (line 326). So its size is the total
    and its allocated blocks (`du`) are the bytes held. The part files' `Completed` (`-partial-N`) are written
    only when a part's transfer ends (line 359, writePart after io.CopyN), up to 1000 MB late per part.

    >>> "sha256-*-partial;" in ollama_blobs_poll("/var/lib/r1fleet/models/ollama")
    True
    """
    blobs, size = shlex.quote(f"{models_dir.rstrip('/')}/blobs"), _size('"$f"')
    return (f'for f in {blobs}/sha256-*-partial; do [ -f "$f" ] || continue; k=$(du -k "$f" | cut -f1); '
            f'h=${{f##*/sha256-}}; echo "$((k * 1024))" "{size}" "$(printf %.12s "$h")"; done; true')


def build_log_poll(log: str) -> str:
    """A poll of a build log (a shell word): its last progress line, cmake's `[ 45%] ...` or Ninja's `[12/345] ...`."""
    return f"tail -n 200 {log} 2>/dev/null | grep -E '^\\[ *[0-9]+(%|/[0-9]+)\\]' | tail -n 1; true"


# A byte count as a host's poll prints it: ASCII digits only (str.isdigit() takes '²', which int() refuses, and
# re's \d takes other scripts' digits), at most 19 (int() refuses thousands of digits; 19 hold any file size).
_COUNT = re.compile("[0-9]{1,19}")


def parse_sizes(lines: Iterable[str]) -> dict[str, Reading]:
    """A poll's lines `<bytes> <size or -> [label]` by label; bytes never above the size (a last block).

    >>> parse_sizes(["1024 - ", "12288 10000 6150cb382311", "stat: cannot stat"])
    {'': (1024, None), '6150cb382311': (10000, 10000)}
    """
    found: dict[str, Reading] = {}
    for line in lines:
        words = line.strip().split(" ", 2)
        if len(words) < 2 or not _COUNT.fullmatch(words[0]) or not (_COUNT.fullmatch(words[1]) or words[1] == "-"):
            continue
        total = int(words[1]) if words[1] != "-" and int(words[1]) > 0 else None
        done = int(words[0])
        found[words[2] if len(words) > 2 else ""] = (min(done, total) if total else done, total)
    return found


BUILD_STEP = re.compile(r"^\[ *([0-9]+)%\]|^\[([0-9]+)/([0-9]+)\]")


def build_step(lines: Iterable[str]) -> str | None:
    """The last progress line of a build, shortened.

    >>> build_step(["[ 45%] Building CUDA object ggml/src/ggml-cuda/CMakeFiles/ggml-cuda.dir/fattn.cu.o"])
    '[ 45%] Building CUDA object ggml/src/ggml-cuda/CMakeFiles/ggml-cuda.dir/fattn.cu.o'
    """
    steps = [line.strip() for line in lines if BUILD_STEP.match(line.strip())]
    if not steps:
        return None
    return steps[-1] if len(steps[-1]) <= 120 else steps[-1][:117] + "..."


# ---------------------------------------------------------------------------------------------
# What a watcher makes of its polls


class Tracker(Protocol):
    def update(self, lines: list[str]) -> None: ...

    def stop(self, failed: bool) -> None: ...


@dataclass
class ByteTracker:
    """Polls of byte counts -> progress lines per artifact: a new one starts, a vanished one (renamed into place)
    finishes, a smaller one started over; `stalled` when nothing unfinished grew for `stall_after` seconds."""

    name: str
    progress: TerminalProgress
    total: int | None = None  # the caller's size of the artifact, over what the poll says
    stall_after: float | None = STALL_S
    # What the first poll finds was kept from an earlier run: `resuming at`. That poll runs as the command starts
    # (the greenlet's first turn), so on a fast LAN a few MB the new transfer wrote may count as kept.
    resumable: bool = False
    clock: Callable[[], float] = time.monotonic
    held: dict[str, Reading] = field(default_factory=dict)
    polls: int = 0
    grew_at: float = 0.0
    stalled: bool = False

    def title(self, label: str) -> str:
        return " ".join(part for part in (self.name, label) if part)

    def update(self, lines: list[str]) -> None:
        readings, now, first = parse_sizes(lines), self.clock(), self.polls == 0
        self.polls += 1
        for label in [label for label in self.held if label not in readings]:
            done, total = self.held.pop(label)
            self.progress.finished(self.title(label), total or done)
        # new, or smaller: started over (a server that cannot resume)
        new = [label for label, (done, _) in readings.items() if label not in self.held or done < self.held[label][0]]
        grown = [label for label, (done, _) in readings.items() if label in self.held and done > self.held[label][0]]
        self._judge_stall(now, first or bool(new or grown))
        for label in new:
            done, total = readings[label]
            self.progress.started(self.title(label), self.total or total, done, resumed=self.resumable and first)
        for label in grown:
            self.progress.advanced(self.title(label), readings[label][0])
        self.held.update({label: (done, self.total or total) for label, (done, total) in readings.items()})

    def _judge_stall(self, now: float, grew: bool) -> None:
        if grew:
            self.grew_at = now
            if self.stalled:
                self.stalled = False
                for label in self._unfinished():
                    self.progress.noted(self.title(label), "moving again")
            return
        if self.stall_after is None or self.stalled or now - self.grew_at < self.stall_after:
            return
        for label in self._unfinished():
            self.stalled = True
            self.progress.noted(self.title(label), f"stalled: no new bytes for {human_seconds(now - self.grew_at)}")

    def _unfinished(self) -> list[str]:
        """What may stall: a file short of its known size. One of unknown size may be whole and waiting for
        its checksum or unpacking, which is no stall (curl itself still gives up and resumes a stalled one)."""
        return [label for label, (done, total) in self.held.items() if total is not None and done < total]

    def stop(self, failed: bool) -> None:
        for label, (done, total) in self.held.items():
            if failed:
                self.progress.noted(self.title(label), f"stopped at {human_bytes(done)}"
                                    + (f" of {human_bytes(total)}" if total else ""))
            elif total:  # verified complete by the command itself; without a size, the last poll is only a floor
                self.progress.finished(self.title(label), total)
        self.held.clear()


@dataclass
class BuildTracker:
    """Polls of a build log -> its progress line each time it changes, with the time so far."""

    name: str
    progress: TerminalProgress
    clock: Callable[[], float] = time.monotonic
    shown: str | None = None

    def __post_init__(self) -> None:
        self.started_at = self.clock()

    def update(self, lines: list[str]) -> None:
        step = build_step(lines)
        if step and step != self.shown:
            self.shown = step
            self.progress.noted(self.name, f"{step} ({human_seconds(self.clock() - self.started_at)} so far)")

    def stop(self, failed: bool) -> None:
        if self.shown:
            elapsed = human_seconds(self.clock() - self.started_at)
            self.progress.noted(self.name, f"stopped at {self.shown} after {elapsed}" if failed else f"built in {elapsed}")


# ---------------------------------------------------------------------------------------------
# The watcher


def _reporter() -> TerminalProgress:
    current = ctx_host.get()
    return TerminalProgress(stream=sys.stderr, host=current.name if current is not None else None)


@contextmanager
def watching(name: str, poll: str, total: int | None = None, *, resumable: bool = False,
             every: float = EVERY_S, stall_after: float | None = STALL_S) -> Iterator[None]:
    """Around the yield of a long command: its bytes, rate and time left per artifact while it runs.

    `poll` prints `<bytes> <size or -> [label]` lines (file_poll, ollama_blobs_poll); `total` is the artifact's
    size when the caller knows it; `resumable`: bytes found at the start were kept from an earlier run."""
    tracker = ByteTracker(name, _reporter(), total, stall_after, resumable)
    with _polling(poll, tracker, every):
        yield


@contextmanager
def watching_build(name: str, log: str, every: float = EVERY_S) -> Iterator[None]:
    """Around the yield of a build whose output goes to `log` (a shell word): its last `[ NN%]` line as it changes."""
    with _polling(build_log_poll(log), BuildTracker(name, _reporter()), every):
        yield


@contextmanager
def _polling(poll: str, tracker: Tracker, every: float) -> Iterator[None]:
    """Polls as the command starts and then every `every` seconds, until the with-block exits."""
    target, state = ctx_host.get(), ctx_state.get()
    if not _runs_now(target, state):
        yield
        return
    arguments = {key: value for key, value in (target.current_op_global_arguments or {}).items()
                 if key in CONNECTOR_ARGUMENT_KEYS and key not in _NOT_FOR_POLLS}
    stop = Event()
    watcher = gevent.spawn(_watch, target, StringCommand(poll), arguments, tracker, every, stop)
    _live.add(watcher)
    failed = True
    try:
        yield
        failed = False
    finally:  # the command ended, failed, or the operation was dropped: no poll after this
        stop.set()
        in_hub = gevent.getcurrent() is gevent.get_hub()  # closed by the garbage collector there: cannot wait
        if not in_hub:
            watcher.join(timeout=2)  # let a poll in flight finish (its channel closed), then kill what is left
        watcher.kill(block=not in_hub)
        _live.discard(watcher)
        tracker.stop(failed)


def _runs_now(target, state) -> bool:
    """Whether the runner executes this operation's commands now (pyinfra 3.10 api/operations.py run_host_op
    sets executing_op_hash; command_generator sets current_op_hash): not while preparing, nor while pyinfra
    only checks an operation called during the run for changes."""
    if target is None or state is None or not state.is_executing or target.current_op_hash is None:
        return False
    return target.current_op_hash in (target.executing_op_hash, target.nested_executing_op_hash)


def _watch(target, poll: StringCommand, arguments: dict, tracker: Tracker, every: float, stop: Event) -> None:
    while not stop.is_set():
        lines = _poll(target, poll, arguments)
        if lines is not None and not stop.is_set():
            tracker.update(lines)
        stop.wait(every)


def read_on_host(target, command: str) -> list[str] | None:
    """A read-only command's stdout lines, run now on `target` with the running operation's connector arguments
    (its sudo), or None when it could not run or failed; for an operation's callback (pyinfra's FunctionCommand)."""
    arguments = {key: value for key, value in (target.current_op_global_arguments or {}).items()
                 if key in CONNECTOR_ARGUMENT_KEYS and key not in _NOT_FOR_POLLS}
    return _poll(target, StringCommand(command), arguments)


def _poll(target, poll: StringCommand, arguments: dict) -> list[str] | None:
    """The poll's stdout lines, or None when it could not run: progress never fails a deploy."""
    try:
        with ctx_host.use(target):
            ok, output = target.run_shell_command(poll, print_output=False, print_input=False,
                                                  _timeout=POLL_TIMEOUT_S, **arguments)
    except Exception:  # noqa: BLE001 (a lost connection, a timeout: the next poll tries again)
        return None
    return list(output.stdout_lines) if ok else None
