"""Progress of long transfers (issue 13 item 6): a small callback protocol, and a reporter that prints plain
lines, at most one a second per artifact, so it reads the same on a terminal, in pyinfra's output and in a
CI log (no cursor movement, no curses).

    reporter = TerminalProgress(host="dual-3090")
    cache.fetch(url, sha256, "model.gguf", progress=reporter)
    # [dual-3090] model.gguf: 1.2 GiB / 19.8 GiB (6%), 48.3 MiB/s, 6m 35s left
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, TextIO


class Progress(Protocol):
    """What a transfer tells whoever watches it. `done` counts bytes of the artifact held so far, resumed
    bytes included; `total` is None when neither the caller nor the server knows the size."""

    def started(self, name: str, total: int | None, done: int) -> None: ...

    def advanced(self, name: str, done: int) -> None: ...

    def noted(self, name: str, message: str) -> None: ...

    def finished(self, name: str, done: int) -> None: ...


class NoProgress:
    """The silent reporter (the default)."""

    def started(self, name: str, total: int | None, done: int) -> None: ...

    def advanced(self, name: str, done: int) -> None: ...

    def noted(self, name: str, message: str) -> None: ...

    def finished(self, name: str, done: int) -> None: ...


def human_bytes(count: float) -> str:
    """Binary units, as `ls -h` and `du -h` print them: 1.2 GiB."""
    if count < 1024:
        return f"{count:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        count /= 1024
        if count < 1024:
            return f"{count:.1f} {unit}"
    return f"{count / 1024:.1f} TiB"


def human_seconds(seconds: float) -> str:
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m {seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


@dataclass
class _Transfer:
    total: int | None
    first_done: int  # bytes already held at the start: the rate counts only what this run fetched
    started_at: float
    printed_at: float = float("-inf")
    done: int = 0


@dataclass
class TerminalProgress:
    """Prints `[host] name: done / total (pct), rate, time left`, one line at most every `interval` seconds
    per artifact, plus each note (`stalled, resuming`) and the final line at once."""

    stream: TextIO = field(default_factory=lambda: sys.stderr)
    host: str | None = None
    interval: float = 1.0
    clock: Callable[[], float] = time.monotonic
    _transfers: dict[str, _Transfer] = field(default_factory=dict, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def started(self, name: str, total: int | None, done: int, *, resumed: bool = True) -> None:
        """`resumed=False`: the `done` bytes were fetched by this same transfer before anyone watched it (a
        watcher that joins a download under way), so no `resuming at` line; the rate still counts from here."""
        with self._lock:
            self._transfers[name] = _Transfer(total, done, self.clock(), done=done)
        if done and resumed:
            self._emit(name, f"resuming at {human_bytes(done)}" + (f" of {human_bytes(total)}" if total else ""))

    def advanced(self, name: str, done: int) -> None:
        transfer = self._transfers.get(name)
        if transfer is None:
            return
        transfer.done = done
        now = self.clock()
        if now - transfer.printed_at < self.interval:
            return
        transfer.printed_at = now
        self._emit(name, self._line(transfer, now))

    def noted(self, name: str, message: str) -> None:
        self._emit(name, message)

    def finished(self, name: str, done: int) -> None:
        transfer = self._transfers.pop(name, None)
        elapsed = self.clock() - transfer.started_at if transfer else 0.0
        fetched = done - (transfer.first_done if transfer else 0)
        self._emit(name, f"{human_bytes(done)} done, {human_bytes(fetched)} fetched in {human_seconds(elapsed)}")

    def _line(self, transfer: _Transfer, now: float) -> str:
        elapsed = max(now - transfer.started_at, 1e-6)
        rate = (transfer.done - transfer.first_done) / elapsed
        text = human_bytes(transfer.done)
        if transfer.total:
            text += f" / {human_bytes(transfer.total)} ({100 * transfer.done // transfer.total}%)"
        text += f", {human_bytes(rate)}/s"
        if transfer.total and rate > 0:
            text += f", {human_seconds((transfer.total - transfer.done) / rate)} left"
        return text

    def _emit(self, name: str, text: str) -> None:
        prefix = f"[{self.host}] " if self.host else ""
        with self._lock:  # whole lines only, when several transfers report from threads
            print(f"{prefix}{name}: {text}", file=self.stream, flush=True)
