"""A resumable HTTP download onto an open file, hashing as it writes (urllib only; r1fleet/cache/store.py uses it).

HTTP semantics relied on are RFC 9110's: a `Range: bytes=N-` request may be answered 206 with a
`Content-Range: bytes N-LAST/TOTAL` header (sections 14.2, 14.4, 15.3.7), or 200 with the whole
representation, since a server MAY ignore Range (14.2); 416 with `Content-Range: bytes */TOTAL` when the range
starts at or past the end (15.5.17). urllib keeps the Range header across redirects (urllib.request's
HTTPRedirectHandler copies every header but the content ones), and HuggingFace and GitHub release downloads
redirect to a CDN.
"""

from __future__ import annotations

import hashlib
import http.client
import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from r1fleet.errors import R1FleetError
from r1fleet.progress import Progress, human_bytes

CHUNK = 1 << 20
USER_AGENT = "r1fleet-artifact-cache"
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


def _transfer(url: str, name: str, handle: BinaryIO, state: Download, progress: Progress,
              stall_timeout: float) -> str | None:
    """One request. None when the file is whole (as far as the server says how long it is), else why not."""
    headers = {"User-Agent": USER_AGENT}
    if state.done:
        headers["Range"] = f"bytes={state.done}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=stall_timeout)  # noqa: S310 - pinned URLs
    except urllib.error.HTTPError as err:
        if err.code != 416 or not state.done:
            raise
        total = _range_total(err.headers.get("Content-Range", ""))
        err.close()
        if total == state.done:
            return None  # the part was already whole (the previous run died before renaming it)
        _restart(handle, state, name, progress, "the partial file is longer than the artifact")
        return "a range past the end"
    with response:
        start, total = _range_of(response)
        if start != state.done:  # 200 (Range ignored, RFC 9110 14.2) or another range
            _restart(handle, state, name, progress, "the server cannot resume this download")
            if start != 0:
                return "a range that was not asked for"  # ask again, without a range
        if total is not None and state.total is not None and total != state.total:
            raise R1FleetError(f"{url}: the server offers {total:,} bytes and the artifact has {state.total:,}",
                               fix="check that the URL serves the pinned artifact")
        state.total = total if total is not None else state.total
        while chunk := response.read1(CHUNK):  # read1: whatever arrived, so a stall loses nothing read
            _write(handle, chunk)
            state.hasher.update(chunk)
            state.done += len(chunk)
            progress.advanced(name, state.done)
    return None if state.total is None or state.done >= state.total else "the connection closed early"


def _write(handle: BinaryIO, chunk: bytes) -> None:
    try:
        handle.write(chunk)
        handle.flush()  # on disk before it counts as done: a resume starts from the file's length
    except OSError as err:  # a full disk is the user's to fix, not a network hiccup to retry
        raise R1FleetError(f"{handle.name}: cannot write ({err.strerror})", fix=DISK_FIX) from None


def _range_of(response: http.client.HTTPResponse) -> tuple[int, int | None]:
    """(first byte, total length) of a 200 or 206 answer; total None when the server does not say."""
    if response.status == 206:
        match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", "").strip())
        if match:
            return int(match[1]), int(match[2]) if match[2] != "*" else None
        return -1, None  # a 206 we cannot place: start over
    length = response.headers.get("Content-Length")
    return 0, int(length) if length and length.isdigit() else None


def _range_total(content_range: str) -> int | None:
    match = re.fullmatch(r"bytes \*/(\d+)", content_range.strip())
    return int(match[1]) if match else None


def _restart(handle: BinaryIO, state: Download, name: str, progress: Progress, why: str) -> None:
    handle.seek(0)
    handle.truncate(0)
    state.hasher, state.done = hashlib.sha256(), 0
    progress.noted(name, f"{why}: starting over")
    progress.started(name, state.total, 0)  # the reporter's rate and time left count from here
