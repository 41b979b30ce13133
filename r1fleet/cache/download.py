"""A resumable HTTP download onto an open file, hashing as it writes (urllib only; r1fleet/cache/store.py uses it).

HTTP semantics relied on are RFC 9110's: a `Range: bytes=N-` request may be answered 206 with a
`Content-Range: bytes N-LAST/TOTAL` header (sections 14.2, 14.4, 15.3.7), or 200 with the whole
representation, since a server MAY ignore Range (14.2); 416 with `Content-Range: bytes */TOTAL` when the range
starts at or past the end (15.5.17). urllib keeps the Range header across redirects (urllib.request's
HTTPRedirectHandler copies every header but the content ones), and HuggingFace and GitHub release downloads
redirect to a CDN.

Everything a server says is bounded: the headers must arrive within a deadline (`Deadline`: a server that
drips them a byte at a time is cut off), the body at a floor rate (STALL_BYTES_PER_S over each stall window),
a length or a range is a plain decimal of at most 19 digits, and no more bytes are read than the artifact's
pinned size (UNSIZED_MAX_BYTES when it has none).
"""

from __future__ import annotations

import hashlib
import http.client
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from r1fleet.errors import R1FleetError
from r1fleet.progress import Progress, human_bytes

CHUNK = 1 << 20
USER_AGENT = "r1fleet-artifact-cache"
# The least a transfer must move in each stall window (the hosts' curl uses the same floor: roles/common.py).
STALL_BYTES_PER_S = 1024
# The most read for an artifact whose size is not pinned (an Ollama release archive: its sha256 only, about
# 2 GB for the largest, the CUDA add-on); a server sending more is not serving it.
UNSIZED_MAX_BYTES = 16 << 30
# A Content-Length or Content-Range number: bytes, at most 19 digits (an int64); more is no length.
NUMBER = "[0-9]{1,19}"
DISK_FIX = "free space there, or move the cache (fleet file cache.dir, or $R1FLEET_CACHE_DIR)"


@dataclass
class Download:
    """What the file holds: its length and the running sha256 of exactly those bytes; the total when known."""

    hasher: Any = field(default_factory=hashlib.sha256)
    done: int = 0
    total: int | None = None


def download(url: str, name: str, handle: BinaryIO, state: Download, progress: Progress, *,
             stall_timeout: float = 30.0, attempts: int = 5) -> None:
    """Fetch `url` onto the end of `handle` (which holds `state.done` bytes already) until whole, hashing as it
    writes; resumes after a stall (no byte for `stall_timeout` s) or a dropped connection, `attempts` times at
    most. R1FleetError when it gives up, the partial file kept for the next run."""
    reason = ""
    for attempt in range(1, attempts + 1):
        try:
            reason = _transfer(url, name, handle, state, progress, stall_timeout)
            if reason is None:
                return
        except TimeoutError:
            reason = f"stalled (no data for {stall_timeout:g} s)"
        except urllib.error.HTTPError as err:
            if err.code < 500:  # the URL is wrong or refused: trying again will not help
                raise R1FleetError(f"{url}: HTTP {err.code} {err.reason}", fix="check the URL") from None
            reason = f"HTTP {err.code} {err.reason}"
        except (http.client.HTTPException, OSError) as err:  # URLError is an OSError; disk errors are not here
            stalled = isinstance(getattr(err, "reason", None), TimeoutError)
            reason = f"stalled (no data for {stall_timeout:g} s)" if stalled else f"interrupted ({err})"
        if attempt < attempts:
            verb = "stalled, resuming" if reason.startswith("stalled") else f"{reason}, resuming"
            progress.noted(name, f"{verb} at {human_bytes(state.done)} (attempt {attempt + 1} of {attempts})")
    raise R1FleetError(f"{url}: the download of {name} failed {attempts} times, last: {reason}; "
                       f"{human_bytes(state.done)} kept in {handle.name}", fix="run it again: it resumes there")


class Deadline:
    """Bounds a request's wall-clock time, which per-read timeouts cannot: a server that sends a byte just
    before each timeout would hold a read for ever. Every connection opened through `open` is shut down when
    `seconds` have passed since the Deadline was entered (a blocked read then returns), unless `cancel` came
    first.

        with Deadline(20) as deadline, deadline.open(request, timeout=20) as response:
            data = response.read(limit)
        if deadline.expired: ...
    """

    def __init__(self, seconds: float):
        self.seconds, self.expired = seconds, False
        self._sockets: list[socket.socket] = []  # a dup of each connection's socket: urllib drops its own
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._cut)
        self._timer.daemon = True

    def __enter__(self) -> "Deadline":
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.cancel()
        with self._lock:
            for sock in self._sockets:
                sock.close()
            self._sockets.clear()

    def cancel(self) -> None:
        self._timer.cancel()

    def _cut(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shut(sock)

    def _watch(self, sock: socket.socket) -> None:
        # shutdown() acts on the connection through any descriptor of it: a dup still reaches it after urllib
        # closes its own socket object (the response keeps the connection), and before TLS wraps it
        with self._lock:
            if self.expired:
                _shut(sock)
            else:
                self._sockets.append(sock.dup())

    def _connection(self, kind):
        def make(*args, **kwargs):
            connection = kind(*args, **kwargs)
            create = connection._create_connection  # socket.create_connection, which connect() calls

            def create_and_watch(*a, **kw):
                sock = create(*a, **kw)
                self._watch(sock)
                return sock

            connection._create_connection = create_and_watch
            return connection
        return make

    def open(self, request: urllib.request.Request, timeout: float) -> http.client.HTTPResponse:
        """urlopen, with every connection (the redirects' too) under this deadline."""
        deadline = self

        class Http(urllib.request.HTTPHandler):
            def http_open(self, req):
                return self.do_open(deadline._connection(http.client.HTTPConnection), req)

        class Https(urllib.request.HTTPSHandler):
            def https_open(self, req):
                return self.do_open(deadline._connection(http.client.HTTPSConnection), req, context=self._context)

        return urllib.request.build_opener(Http, Https).open(request, timeout=timeout)  # noqa: S310 - pinned URLs


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # closed already


def _transfer(url: str, name: str, handle: BinaryIO, state: Download, progress: Progress,
              stall_timeout: float) -> str | None:
    """One request. None when the file is whole (as far as the server says how long it is), else why not."""
    headers = {"User-Agent": USER_AGENT}
    if state.done:
        headers["Range"] = f"bytes={state.done}-"
    request = urllib.request.Request(url, headers=headers)
    # The connection, the redirects and every header line within twice the stall timeout; the body is
    # bounded by _body's floor rate instead (a 43 GB file takes its time).
    with Deadline(2 * stall_timeout) as deadline:
        try:
            response = deadline.open(request, timeout=stall_timeout)
        except (http.client.HTTPException, OSError) as err:
            if deadline.expired:
                raise TimeoutError from None
            if not isinstance(err, urllib.error.HTTPError):
                raise
            return _refused(err, name, handle, state, progress)
        deadline.cancel()
    if deadline.expired:  # cut in the headers, which http.client then takes as ended
        response.close()
        raise TimeoutError
    with response:
        start, total = _range_of(response)
        if start != state.done:  # 200 (Range ignored, RFC 9110 14.2) or another range
            _restart(handle, state, name, progress, "the server cannot resume this download")
            if start != 0:
                return "a range that was not asked for"  # ask again, without a range
        if total is not None and state.total is not None and total != state.total:
            raise R1FleetError(f"{url}: the server offers {total:,} bytes and the artifact has {state.total:,}",
                               fix="check that the URL serves the pinned artifact")
        if total is not None and state.total is None and total > UNSIZED_MAX_BYTES:
            raise R1FleetError(f"{url}: the server offers {total:,} bytes, more than any artifact r1fleet fetches "
                               f"without a pinned size ({UNSIZED_MAX_BYTES:,})",
                               fix="check that the URL serves the pinned artifact")
        state.total = total if total is not None else state.total
        _body(response, handle, state, name, progress, stall_timeout)
        if state.total is None and state.done >= UNSIZED_MAX_BYTES:
            raise R1FleetError(f"{url}: more than {UNSIZED_MAX_BYTES:,} bytes, more than any artifact r1fleet fetches "
                               "without a pinned size", fix="check that the URL serves the pinned artifact")
    return None if state.total is None or state.done >= state.total else "the connection closed early"


def _refused(err: urllib.error.HTTPError, name: str, handle: BinaryIO, state: Download,
             progress: Progress) -> str | None:
    """A 416 to a resume: None when the part was whole already, else why it starts over; any other error raised."""
    if err.code != 416 or not state.done:
        raise err
    total = _range_total(err.headers.get("Content-Range", ""))
    err.close()
    if total == state.done:
        return None  # the part was already whole (the previous run died before renaming it)
    _restart(handle, state, name, progress, "the partial file is longer than the artifact")
    return "a range past the end"


def _body(response: http.client.HTTPResponse, handle: BinaryIO, state: Download, name: str, progress: Progress,
          stall_timeout: float) -> None:
    """The body onto the file, never past the pinned size (the server's word about its length does not count);
    TimeoutError when a stall window moves less than STALL_BYTES_PER_S a second."""
    limit = state.total if state.total is not None else UNSIZED_MAX_BYTES
    window_start, window_done = time.monotonic(), state.done
    while state.done < limit:
        chunk = response.read1(min(CHUNK, limit - state.done))  # read1: whatever arrived, so a stall loses nothing read
        if not chunk:
            break
        _write(handle, chunk)
        state.hasher.update(chunk)
        state.done += len(chunk)
        progress.advanced(name, state.done)
        now = time.monotonic()
        if now - window_start >= stall_timeout:
            if state.done - window_done < min(STALL_BYTES_PER_S * stall_timeout, limit - window_done):
                raise TimeoutError  # a trickle: as good as silent
            window_start, window_done = now, state.done


def _write(handle: BinaryIO, chunk: bytes) -> None:
    try:
        handle.write(chunk)
        handle.flush()  # on disk before it counts as done: a resume starts from the file's length
    except OSError as err:  # a full disk is the user's to fix, not a network hiccup to retry
        raise R1FleetError(f"{handle.name}: cannot write ({err.strerror})", fix=DISK_FIX) from None


def _range_of(response: http.client.HTTPResponse) -> tuple[int, int | None]:
    """(first byte, total length) of a 200 or 206 answer; total None when the server does not say."""
    if response.status == 206:
        match = re.fullmatch(rf"bytes ({NUMBER})-{NUMBER}/({NUMBER}|\*)", response.headers.get("Content-Range", "").strip())
        if match:
            return int(match[1]), int(match[2]) if match[2] != "*" else None
        return -1, None  # a 206 we cannot place: start over
    # ASCII digits only: str.isdigit() admits '²', which int() refuses, and 5000 digits make int() refuse too
    length = re.fullmatch(NUMBER, (response.headers.get("Content-Length") or "").strip())
    return 0, int(length[0]) if length else None


def _range_total(content_range: str) -> int | None:
    match = re.fullmatch(rf"bytes \*/({NUMBER})", content_range.strip())
    return int(match[1]) if match else None


def _restart(handle: BinaryIO, state: Download, name: str, progress: Progress, why: str) -> None:
    handle.seek(0)
    handle.truncate(0)
    state.hasher, state.done = hashlib.sha256(), 0
    progress.noted(name, f"{why}: starting over")
    progress.started(name, state.total, 0)  # the reporter's rate and time left count from here
