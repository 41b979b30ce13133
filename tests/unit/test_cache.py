"""The controller's artifact cache (r1fleet/cache/store.py), its LAN server (r1fleet/cache/server.py) and
`r1fleet cache status|prune|fill`, against a real HTTP server on 127.0.0.1 that can honour Range, ignore it,
cut or stall a transfer, or serve corrupted bytes, and that counts every body byte it sends."""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import socket
import stat
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from r1fleet.cache.store import ArtifactCache, cache_root, default_root
from r1fleet.cli.cache import locked_digests, registry_models, wanted_artifacts
from r1fleet.cache.server import byte_range, client_allowed, parse_allow, serve_cache
from r1fleet.cli.main import main
from r1fleet.errors import FleetError, R1FleetError
from r1fleet.fleet.file import load_fleet
from r1fleet.hardware import parse_probe
from r1fleet.lock.match import Lock, lock_entry, read_lock, write_lock
from r1fleet.lock.artifacts import OllamaAsset, OllamaArtifact
from r1fleet.plan.planner import plan_host
from r1fleet.progress import TerminalProgress

PROBES = Path(__file__).resolve().parents[1] / "fixtures" / "probes"
BODY = bytes(range(256)) * 1024  # 256 KiB: several 1 MiB-less reads, quick everywhere
SHA = hashlib.sha256(BODY).hexdigest()
STALL = 0.2  # seconds: the client's stall timeout in these tests


# ---------------------------------------------------------------- an origin server under the test's control


class Origin:
    """What the origin does: `ranges` honours Range; `cut_at`/`stall_at` end the FIRST response after that
    many bytes (closing, or going silent); `corrupt` flips a byte. `sent` counts body bytes, `asked` each
    request's Range header (None when absent)."""

    def __init__(self, body: bytes = BODY):
        self.body, self.ranges, self.corrupt = body, True, False
        self.cut_at: int | None = None
        self.stall_at: int | None = None
        self.always_stall = False
        self.sent, self.asked = 0, []
        self.lock = threading.Lock()


class _OriginHandler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        origin: Origin = self.server.origin
        if self.path.endswith("/missing"):
            self.send_error(404)
            return
        with origin.lock:
            first_request = not origin.asked
            origin.asked.append(self.headers.get("Range"))
        body = bytearray(origin.body)
        if origin.corrupt:
            body[len(body) // 2] ^= 0xFF
        start = 0
        if origin.ranges and self.headers.get("Range"):
            start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-"))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        stop = len(body)
        if first_request and origin.cut_at is not None:
            stop = origin.cut_at
        if (first_request or origin.always_stall) and origin.stall_at is not None:
            stop = max(origin.stall_at, start)
        with origin.lock:  # counted before the write, so the count is complete when the client has the bytes
            origin.sent += stop - start
        self.wfile.write(body[start:stop])
        self.wfile.flush()
        if stop < len(body) and (origin.stall_at is not None):
            time.sleep(STALL * 4)  # silent, connection open: the client must notice by its stall timeout


@contextmanager
def serving(origin: Origin):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _OriginHandler)
    server.daemon_threads = True
    server.origin = origin
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def origin():
    made = Origin()
    with serving(made) as url:
        made.url = f"{url}/files/artifact.bin"
        yield made


class Recorder:
    def __init__(self):
        self.events: list[tuple] = []

    def started(self, name, total, done):
        self.events.append(("started", total, done))

    def advanced(self, name, done):
        pass

    def noted(self, name, message):
        self.events.append(("noted", message))

    def finished(self, name, done):
        self.events.append(("finished", done))

    def notes(self) -> list[str]:
        return [e[1] for e in self.events if e[0] == "noted"]


def cache_at(tmp_path: Path, **kwargs) -> ArtifactCache:
    return ArtifactCache(tmp_path / "cache", stall_timeout=STALL, **kwargs)


# ---------------------------------------------------------------- fetching


def test_fetch_once_then_hit(tmp_path, origin):
    cache = cache_at(tmp_path)
    path = cache.fetch(origin.url, SHA, "artifact.bin")
    assert path == cache.dir / SHA and path.read_bytes() == BODY
    assert cache.fetch(origin.url, SHA.upper(), "artifact.bin") == path  # a hit: nothing more fetched
    assert origin.sent == len(BODY) and origin.asked == [None]
    meta = json.loads((cache.dir / f"{SHA}.json").read_text())
    assert meta["name"] == "artifact.bin" and meta["urls"] == [origin.url] and meta["size"] == len(BODY)
    assert meta["fetched_at"] and not list(cache.dir.glob("*.part"))


def test_a_cut_transfer_resumes_with_only_the_remaining_bytes(tmp_path, origin):
    origin.cut_at = 100_000
    progress = Recorder()
    path = cache_at(tmp_path).fetch(origin.url, SHA, "artifact.bin", progress=progress, size=len(BODY))
    assert path.read_bytes() == BODY
    assert origin.asked == [None, "bytes=100000-"] and origin.sent == len(BODY)  # each byte sent once
    assert any("closed early, resuming" in n for n in progress.notes())


def test_a_partial_file_from_an_earlier_run_is_continued(tmp_path, origin):
    cache = cache_at(tmp_path)
    cache.dir.mkdir(parents=True)
    (cache.dir / f"{SHA}.part").write_bytes(BODY[:70_000])
    progress = Recorder()
    assert cache.fetch(origin.url, SHA, "artifact.bin", progress=progress).read_bytes() == BODY
    assert origin.asked == ["bytes=70000-"] and origin.sent == len(BODY) - 70_000
    assert progress.events[0] == ("started", None, 70_000)


def test_a_server_that_ignores_range_starts_over_cleanly(tmp_path, origin):
    origin.ranges = False
    cache = cache_at(tmp_path)
    cache.dir.mkdir(parents=True)
    (cache.dir / f"{SHA}.part").write_bytes(b"stale bytes that are not the prefix" * 100)
    progress = Recorder()
    assert cache.fetch(origin.url, SHA, "artifact.bin", progress=progress).read_bytes() == BODY
    assert origin.sent == len(BODY) and any("cannot resume" in n for n in progress.notes())


def test_a_part_already_whole_is_finished_without_a_byte(tmp_path, origin):
    cache = cache_at(tmp_path)
    cache.dir.mkdir(parents=True)
    (cache.dir / f"{SHA}.part").write_bytes(BODY)  # the last run died between the download and the rename
    assert cache.fetch(origin.url, SHA, "artifact.bin").read_bytes() == BODY
    assert origin.sent == 0 and origin.asked == [f"bytes={len(BODY)}-"]  # answered 416


def test_a_corrupted_download_is_rejected_and_not_cached(tmp_path, origin):
    origin.corrupt = True
    cache = cache_at(tmp_path)
    with pytest.raises(R1FleetError) as caught:
        cache.fetch(origin.url, SHA, "artifact.bin")
    text = str(caught.value)
    assert origin.url in text and f"expected {SHA}" in text and "got " in text
    assert cache.path_for(SHA) is None and list(cache.dir.iterdir()) == [] and cache.status() == []


def test_a_wrong_size_is_refused_before_the_download(tmp_path, origin):
    with pytest.raises(R1FleetError, match="offers 262,144 bytes and the artifact has 5"):
        cache_at(tmp_path).fetch(origin.url, SHA, "artifact.bin", size=5)


def test_a_corrupted_entry_is_found_by_verify_and_fetched_again(tmp_path, origin):
    cache = cache_at(tmp_path)
    path = cache.fetch(origin.url, SHA, "artifact.bin")
    st = path.stat()
    with open(path, "r+b") as handle:  # flip one byte, keeping size and mtime: the stamp cannot see it
        handle.seek(1234)
        byte = handle.read(1)
        handle.seek(1234)
        handle.write(bytes([byte[0] ^ 1]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cache.verify(SHA) is False and cache.path_for(SHA) is None and not path.exists()
    assert cache.fetch(origin.url, SHA, "artifact.bin").read_bytes() == BODY
    assert origin.sent == 2 * len(BODY)


def test_an_entry_changed_on_disk_is_rehashed_before_use(tmp_path, origin):
    cache = cache_at(tmp_path)
    path = cache.fetch(origin.url, SHA, "artifact.bin")
    data = bytearray(BODY)
    data[5] ^= 1
    path.write_bytes(bytes(data))  # new mtime: the stamp no longer holds, so path_for hashes it in full
    assert cache.path_for(SHA) is None and not path.exists()
    os.utime(cache.fetch(origin.url, SHA, "artifact.bin"))  # a touched but intact entry: rehashed, kept
    assert cache.path_for(SHA) is not None and origin.sent == 2 * len(BODY)


def test_a_stall_is_reported_and_resumed(tmp_path, origin):
    origin.stall_at = 50_000
    progress = Recorder()
    started = time.monotonic()
    path = cache_at(tmp_path).fetch(origin.url, SHA, "artifact.bin", progress=progress)
    assert path.read_bytes() == BODY and time.monotonic() - started < STALL * 4
    assert origin.asked == [None, "bytes=50000-"] and origin.sent == len(BODY)
    assert progress.notes() == ["stalled, resuming at 48.8 KiB (attempt 2 of 5)"]


def test_stalling_every_time_gives_up_and_keeps_the_part(tmp_path, origin):
    origin.stall_at, origin.always_stall = 10_000, True
    cache = cache_at(tmp_path, attempts=2)
    with pytest.raises(R1FleetError, match=r"failed 2 times, last: stalled.*kept in .*\.part.*resumes there"):
        cache.fetch(origin.url, SHA, "artifact.bin")
    assert (cache.dir / f"{SHA}.part").stat().st_size == 10_000
    assert [(e.name, e.complete) for e in cache.status()] == [("artifact.bin", False)]


def test_http_errors_name_the_url(tmp_path):
    with serving(Origin()) as url, pytest.raises(R1FleetError, match=r"/missing: HTTP 404 .*fix: check the URL"):
        cache_at(tmp_path).fetch(f"{url}/missing", SHA, "x")
    with pytest.raises(R1FleetError, match="not a sha256"):
        cache_at(tmp_path).fetch("http://127.0.0.1:9/x", "abc", "x")


# ---------------------------------------------------------------- a hostile server (audit M3)


@contextmanager
def raw_server(answer):
    """A TCP server on 127.0.0.1 that runs `answer(connection)` for each client, in its own thread: a server
    that breaks HTTP in ways http.server will not."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.05)
    done = threading.Event()

    def one(conn):
        with conn:
            try:
                conn.recv(65536)  # the request
                answer(conn, done)
            except OSError:
                pass  # the client hung up: what these tests want of it

    def accept():
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            threading.Thread(target=one, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/artifact.bin"
    finally:
        done.set()
        thread.join()
        listener.close()


class Furthest(Recorder):
    """A progress that keeps the most bytes the download ever held."""

    def __init__(self):
        super().__init__()
        self.most = 0

    def advanced(self, name, done):
        self.most = max(self.most, done)


def test_never_more_than_the_pinned_size_is_read(tmp_path):
    """A server that streams for ever (no length, or a false one) for a pinned 2-byte artifact: the controller
    reads 2 bytes and stops; the sha256 then refuses them."""
    def endless(conn, done):
        conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
        for _ in range(256):  # 16 MiB, then it closes: a client that reads them all fails below, not hangs
            conn.sendall(b"x" * 65536)

    progress = Furthest()
    with raw_server(endless) as url, pytest.raises(R1FleetError, match="sha256 mismatch"):
        cache_at(tmp_path).fetch(url, hashlib.sha256(b"ok").hexdigest(), "tiny", progress=progress, size=2)
    assert progress.most == 2 and not list((tmp_path / "cache" / "sha256").glob("*.part"))


@pytest.mark.parametrize("header", [
    "Content-Length: \xb2",  # '²': isdigit() but not int()
    "Content-Length: " + "9" * 5000,  # past int()'s 4300 digits
    "Content-Length: -5",
])
def test_a_length_that_is_no_number_is_no_length(tmp_path, header):
    def odd(conn, done):
        conn.sendall(f"HTTP/1.1 200 OK\r\n{header}\r\nConnection: close\r\n\r\n".encode("latin-1") + BODY)

    with raw_server(odd) as url:
        assert cache_at(tmp_path).fetch(url, SHA, "artifact.bin", size=len(BODY)).read_bytes() == BODY


def test_a_range_of_5000_digits_is_a_range_that_cannot_be_placed(tmp_path):
    cache = cache_at(tmp_path, attempts=2)
    cache.dir.mkdir(parents=True)
    (cache.dir / f"{SHA}.part").write_bytes(BODY[:1000])

    def odd(conn, done):
        conn.sendall(f"HTTP/1.1 206 Partial\r\nContent-Range: bytes 1000-{'9' * 5000}/{'9' * 5000}\r\n"
                     "Connection: close\r\n\r\n".encode())

    with raw_server(odd) as url, pytest.raises(R1FleetError, match="failed 2 times, last: a range that was not asked"):
        cache.fetch(url, SHA, "artifact.bin", size=len(BODY))


def test_headers_dripped_a_byte_at_a_time_are_cut_off(tmp_path):
    """Each byte comes before the read timeout, so only the deadline on the whole head ends it."""
    def drip(conn, done):
        conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        until = time.monotonic() + 3  # then it closes: a client without the deadline fails below, not hangs
        while not done.is_set() and time.monotonic() < until:
            conn.sendall(b"a")
            time.sleep(STALL / 4)

    started = time.monotonic()
    with raw_server(drip) as url, pytest.raises(R1FleetError, match="failed 2 times, last: stalled"):
        cache_at(tmp_path, attempts=2).fetch(url, SHA, "artifact.bin", size=len(BODY))
    assert time.monotonic() - started < 2 * (2 * STALL) + 1


def test_a_body_that_trickles_is_a_stall(tmp_path):
    def trickle(conn, done):
        conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {len(BODY)}\r\n\r\n".encode())
        until = time.monotonic() + 3
        for byte in BODY:
            if done.is_set() or time.monotonic() > until:
                return
            conn.sendall(bytes([byte]))
            time.sleep(STALL / 4)

    started = time.monotonic()
    with raw_server(trickle) as url, pytest.raises(R1FleetError, match="failed 2 times, last: stalled"):
        cache_at(tmp_path, attempts=2).fetch(url, SHA, "artifact.bin", size=len(BODY))
    assert time.monotonic() - started < 2 * (2 * STALL) + 1


# ---------------------------------------------------------------- status, prune, location


def put(cache: ArtifactCache, data: bytes, name: str, days_ago: float = 0) -> str:
    """An entry as a fetch leaves it (stamped metadata), last used `days_ago`."""
    sha = hashlib.sha256(data).hexdigest()
    cache.dir.mkdir(parents=True, exist_ok=True)
    (cache.dir / sha).write_bytes(data)
    assert cache.verify(sha)
    meta_path = cache.dir / f"{sha}.json"
    meta = json.loads(meta_path.read_text())
    used = datetime.now(timezone.utc) - timedelta(days=days_ago)
    meta.update(name=name, last_used=used.isoformat(timespec="seconds"))
    meta_path.write_text(json.dumps(meta))
    return sha


def test_status_and_prune(tmp_path):
    cache = cache_at(tmp_path)
    old = put(cache, b"old" * 100, "old.bin", days_ago=40)
    new = put(cache, b"new" * 10, "new.bin")
    assert [(e.name, e.size) for e in cache.status()] == [("new.bin", 30), ("old.bin", 300)]
    assert cache.prune(older_than_days=30) == 300 and [e.sha256 for e in cache.status()] == [new]
    put(cache, b"old" * 100, "old.bin", days_ago=40)
    assert cache.prune(keep={old}) == 30 and [e.sha256 for e in cache.status()] == [old]
    assert cache.prune() == 300 and cache.status() == [] and list(cache.dir.iterdir()) == []


def test_cache_location(tmp_path, monkeypatch):
    home = str(Path.home())
    assert default_root({"XDG_CACHE_HOME": "/x/cache"}) == Path("/x/cache/r1fleet/artifacts")
    assert default_root({"XDG_CACHE_HOME": "relative"}) == Path(home) / ".cache/r1fleet/artifacts"  # invalid: ignored
    assert cache_root("/fleet/dir", {}) == Path("/fleet/dir")
    assert cache_root("/fleet/dir", {"R1FLEET_CACHE_DIR": "/env/dir"}) == Path("/env/dir")
    (tmp_path / "fleet.yml").write_text("hosts: {a: {address: 10.0.0.1}}\ncache: {dir: artifacts}\n")
    assert load_fleet(tmp_path / "fleet.yml").cache_dir == str(tmp_path / "artifacts")  # beside the fleet file
    (tmp_path / "fleet.yml").write_text("hosts: {a: {address: 10.0.0.1}}\ncache: {dir: ~/c}\n")
    assert load_fleet(tmp_path / "fleet.yml").cache_dir == f"{home}/c"


@pytest.mark.parametrize("cache, expected", [
    ("{dir: ''}", "field cache.dir: '' is not a directory path"),
    ("{path: /x}", "field cache.path: Extra inputs are not permitted"),
    ("{}", "field cache.dir: Field required (fix: add it)"),
    ("/x", "field cache: Input should be a valid dictionary"),
])
def test_a_bad_cache_setting_is_named(tmp_path, cache, expected):
    (tmp_path / "fleet.yml").write_text(f"hosts: {{a: {{address: 10.0.0.1}}}}\ncache: {cache}\n")
    with pytest.raises(FleetError) as caught:
        load_fleet(tmp_path / "fleet.yml")
    assert expected in str(caught.value)


def test_terminal_progress_prints_a_line_a_second_at_most():
    now = [100.0]
    out = io.StringIO()
    report = TerminalProgress(stream=out, host="dual-3090", clock=lambda: now[0])
    report.started("m.gguf", 100 * 2**20, 0)
    for step in range(1, 5):  # four updates within 0.4 s: one line
        now[0] += 0.1
        report.advanced("m.gguf", step * 2**20)
    now[0] += 1.6  # 2 s in, 20 MiB: 10 MiB/s, 80 MiB to go
    report.advanced("m.gguf", 20 * 2**20)
    report.noted("m.gguf", "stalled, resuming at 20.0 MiB (attempt 2 of 5)")
    report.finished("m.gguf", 100 * 2**20)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[dual-3090] m.gguf: 1.0 MiB / 100.0 MiB (1%), ")
    assert lines[1] == "[dual-3090] m.gguf: 20.0 MiB / 100.0 MiB (20%), 10.0 MiB/s, 8s left"
    assert lines[2] == "[dual-3090] m.gguf: stalled, resuming at 20.0 MiB (attempt 2 of 5)"
    assert lines[3] == "[dual-3090] m.gguf: 100.0 MiB done, 100.0 MiB fetched in 2s" and len(lines) == 4


# ---------------------------------------------------------------- the LAN server


def wait_for(check, timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.01)
    return check()


def get(base_url: str, path: str, headers: dict | None = None, source: str | None = None,
        method: str = "GET") -> tuple[int, dict, bytes]:
    host, port = base_url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=5,
                                      source_address=(source, 0) if source else None)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.headers), response.read()
    finally:
        conn.close()


def test_server_serves_entries_with_ranges_and_counts_exactly(tmp_path):
    cache = cache_at(tmp_path)
    sha = put(cache, BODY, "artifact.bin")
    server = serve_cache(cache, "127.0.0.1", ["127.0.0.1"])
    with server as base:
        status, headers, body = get(base, f"/sha256/{sha}")
        assert status == 200 and body == BODY and headers["Accept-Ranges"] == "bytes"
        status, headers, body = get(base, f"/sha256/{sha}", {"Range": "bytes=1000-1999"})
        assert status == 206 and body == BODY[1000:2000] and headers["Content-Range"] == f"bytes 1000-1999/{len(BODY)}"
        status, _, body = get(base, f"/sha256/{sha}", {"Range": "bytes=200000-"})  # what curl -C - sends
        assert status == 206 and body == BODY[200000:]
        status, headers, _ = get(base, f"/sha256/{sha}", {"Range": f"bytes={len(BODY)}-"})
        assert status == 416 and headers["Content-Range"] == f"bytes */{len(BODY)}"
        status, headers, body = get(base, f"/sha256/{sha}", method="HEAD")
        assert status == 200 and body == b"" and headers["Content-Length"] == str(len(BODY))
        expected = len(BODY) + 1000 + len(BODY) - 200000
        assert wait_for(lambda: server.served.get(sha) == expected)
    assert server.served == {sha: expected}  # nothing for HEAD, the 416 or anything else


@pytest.mark.parametrize("path", [
    f"/sha256/{'0' * 64}",  # a digest the cache lacks
    f"/sha256/../sha256/{SHA}", f"/sha256/{SHA}/../{SHA}", f"/sha256/%2e%2e/{SHA}", f"/sha256/{SHA}.json",
    f"/sha256/{SHA}?x=1", "/sha256/", "/", "/etc/passwd", f"/sha256/{SHA.upper()}",
])
def test_server_answers_404_to_anything_but_an_entry(tmp_path, path):
    cache = cache_at(tmp_path)
    put(cache, BODY, "artifact.bin")
    server = serve_cache(cache, "127.0.0.1", ["127.0.0.0/8"])
    with server as base:
        status, _, body = get(base, path)
    assert status == 404 and body == b"" and server.served == {}


def test_server_refuses_clients_outside_the_allow_list(tmp_path):
    probe = socket.socket()
    try:
        probe.bind(("127.0.0.2", 0))  # Linux routes all of 127/8 locally; elsewhere the decision test below stands
    except OSError:
        pytest.skip("cannot connect from 127.0.0.2 here; client_allowed is tested on its own")
    finally:
        probe.close()
    cache = cache_at(tmp_path)
    sha = put(cache, BODY, "artifact.bin")
    server = serve_cache(cache, "127.0.0.1", ["127.0.0.1/32"])
    with server as base:
        assert get(base, f"/sha256/{sha}", source="127.0.0.2")[0] == 403
        assert get(base, f"/sha256/{sha}", source="127.0.0.1")[0] == 200
    assert server.served == {sha: len(BODY)}


def test_two_deploys_at_once_download_an_entry_once_and_share_it(tmp_path):
    """Two r1fleet runs on this machine need the same artifact (audit L1): the second waits while the first's
    part grows, then takes the entry the first stamped; the origin is asked once."""
    asked = []

    def slow(conn, done):
        asked.append(1)
        conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {len(BODY)}\r\n\r\n".encode())
        for start in range(0, len(BODY), 16384):
            conn.sendall(BODY[start:start + 16384])
            time.sleep(0.02)

    with raw_server(slow) as url:
        got, progress = {}, Recorder()
        first = threading.Thread(target=lambda: got.update(first=cache_at(tmp_path).fetch(url, SHA, "artifact.bin")))
        first.start()
        assert wait_for(lambda: (tmp_path / "cache" / "sha256" / f"{SHA}.part").exists())
        got["second"] = cache_at(tmp_path).fetch(url, SHA, "artifact.bin", progress=progress)  # another process's cache
        first.join()
    assert got["first"] == got["second"] and got["second"].read_bytes() == BODY and asked == [1]
    assert progress.notes() == ["another r1fleet is downloading it into this cache: waiting for it"]
    assert sorted(p.name for p in (tmp_path / "cache" / "sha256").iterdir()) == [SHA, f"{SHA}.json"]


def can_bind(address: str) -> bool:
    probe = socket.socket()
    try:
        probe.bind((address, 0))  # Linux routes all of 127/8 locally
        return True
    except OSError:
        return False
    finally:
        probe.close()


def test_the_server_serves_no_link_only_its_own_verified_files(tmp_path):
    """Someone who can write into the cache directory links an entry's name to a file of the controller's user
    (a private key) and forges the stamp to match it (audit L1): neither a symbolic nor a hard link is served."""
    cache = cache_at(tmp_path)
    secret = tmp_path / "id_ed25519"
    secret.write_bytes(b"-----BEGIN OPENSSH PRIVATE KEY-----\n")
    sha = hashlib.sha256(secret.read_bytes()).hexdigest()
    cache.dir.mkdir(parents=True)

    def forge(link):
        st = os.stat(link)  # the stamp of the file the link names: what a stamp check through the link sees
        (cache.dir / f"{sha}.json").write_text(json.dumps({"sha256": sha, "name": "x", "size": st.st_size,
                                                          "stamp": [sha, st.st_size, st.st_mtime_ns, st.st_ino]}))
    (cache.dir / sha).symlink_to(secret)
    forge(cache.dir / sha)
    server = serve_cache(cache, "127.0.0.1", ["127.0.0.1"])
    with server as base:
        assert get(base, f"/sha256/{sha}")[0] == 404
        assert cache.path_for(sha) is None and cache.open_entry(sha) is None
        assert secret.exists() and not (cache.dir / sha).is_symlink()  # the link dropped, never its target
        os.link(secret, cache.dir / sha)
        forge(cache.dir / sha)
        assert get(base, f"/sha256/{sha}")[0] == 404 and cache.open_entry(sha) is None
    assert server.served == {}


def test_the_cache_directories_r1fleet_creates_are_private(tmp_path, origin):
    cache = cache_at(tmp_path)
    cache.fetch(origin.url, SHA, "artifact.bin")
    cache.remember("a name", SHA)
    for directory in (cache.root, cache.dir, cache.root / "names"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
    part = cache.dir / f"{'0' * 64}.part"
    part.symlink_to(tmp_path / "elsewhere")  # a part planted as a link: never written through
    with pytest.raises(R1FleetError, match="cannot write"):
        cache.fetch(origin.url, "0" * 64, "other")
    assert not (tmp_path / "elsewhere").exists()


def test_refused_clients_are_answered_as_they_connect_and_hold_no_thread(tmp_path):
    """300 idle connections from outside the allow-list (audit L1): each gets its 403 at once, and the server
    keeps no thread for any of them."""
    if not can_bind("127.0.0.2"):
        pytest.skip("cannot connect from 127.0.0.2 here")
    cache = cache_at(tmp_path)
    sha = put(cache, BODY, "artifact.bin")
    server = serve_cache(cache, "127.0.0.1", ["127.0.0.1/32"])
    with server as base:
        port = int(base.rsplit(":", 1)[1])
        threads = threading.active_count()
        idle, answers = [], set()
        for _ in range(300):  # each left open, idle, once answered
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=5, source_address=("127.0.0.2", 0)))
            answers.add(idle[-1].recv(100).split(b"\r\n")[0])
        assert answers == {b"HTTP/1.1 403 Forbidden"}
        assert threading.active_count() <= threads + 1
        assert get(base, f"/sha256/{sha}")[0] == 200  # the fleet's hosts are served all along
        for conn in idle:
            conn.close()


def test_an_allowed_client_holds_a_few_connections_and_a_slow_head_is_cut(tmp_path, monkeypatch):
    """A host of the fleet gets MAX_PER_CLIENT connections at once; more are answered 503 and closed. A request
    head still unfinished after HEAD_S is cut, whatever pace it keeps."""
    from r1fleet.cache import server as cache_server

    monkeypatch.setattr(cache_server, "HEAD_S", 0.3)
    cache = cache_at(tmp_path)
    sha = put(cache, BODY, "artifact.bin")
    with serve_cache(cache, "127.0.0.1", ["127.0.0.1/32"]) as base:
        port = int(base.rsplit(":", 1)[1])
        held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(cache_server.MAX_PER_CLIENT)]
        for conn in held:
            conn.sendall(b"GET /sha256/")  # a head begun, never finished
        extra = socket.create_connection(("127.0.0.1", port), timeout=5)
        assert extra.recv(100).startswith(b"HTTP/1.1 503 ")
        started = time.monotonic()
        for conn in held:  # each is cut within HEAD_S of its start
            assert conn.recv(100) == b"" and time.monotonic() - started < 2
            conn.close()
        assert wait_for(lambda: get(base, f"/sha256/{sha}")[0] == 200)


def test_allow_list_decisions_and_ranges():
    networks = parse_allow(["192.168.1.0/24", "10.0.0.5", "fd00::/8"])
    assert client_allowed("192.168.1.77", networks) and client_allowed("::ffff:10.0.0.5", networks)
    assert client_allowed("fd00::1", networks)
    assert not client_allowed("192.168.2.1", networks) and not client_allowed("10.0.0.6", networks)
    assert not client_allowed("garbage", networks)
    with pytest.raises(R1FleetError, match="not an IP address or network"):
        parse_allow(["everyone"])
    with pytest.raises(R1FleetError, match="needs an allow-list"):
        serve_cache(ArtifactCache("/nonexistent"), "127.0.0.1", [])
    assert byte_range("bytes=0-9", 100) == (0, 9) and byte_range("bytes=90-", 100) == (90, 99)
    assert byte_range("bytes=-10", 100) == (90, 99) and byte_range("bytes=50-500", 100) == (50, 99)
    assert byte_range("bytes=0-1,5-6", 100) is None and byte_range(None, 100) is None
    assert byte_range("bytes=100-", 100) == "unsatisfiable" and byte_range("bytes=9-3", 100) == "unsatisfiable"


# ---------------------------------------------------------------- the commands


def r1fleet(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def locked_fleet(tmp_path: Path, asset_sha: str, gguf_sha: str | None = None, registry: str | None = None) -> Path:
    """A fleet of two fixture hosts and its lock; rtx4090's Ollama archive is `asset_sha`, its model from
    `registry` (registry.ollama.ai when None)."""
    fleet = tmp_path / "fleet.yml"
    ollama_host = {"address": "192.168.1.22", **({"ollama_registry": registry} if registry else {})}
    fleet.write_text(yaml.safe_dump({"hosts": {"rtx4090": ollama_host, "dual-rtx3090": {"address": "192.168.1.23"}}}))
    hosts = {}
    for name in ("rtx4090", "dual-rtx3090"):
        hw = parse_probe((PROBES / f"{name}.probe").read_text(), name)
        hosts[name] = lock_entry(name, hw, plan_host(hw))
    a = hosts["rtx4090"].artifacts
    ollama = OllamaArtifact(version="9.9.9", assets=[OllamaAsset(name="ollama-test.tar.zst", sha256=asset_sha)])
    hosts["rtx4090"] = hosts["rtx4090"].model_copy(update={"artifacts": a.model_copy(update={"ollama": ollama})})
    if gguf_sha:
        d = hosts["dual-rtx3090"].artifacts
        hosts["dual-rtx3090"] = hosts["dual-rtx3090"].model_copy(update={"artifacts": d.model_copy(update={
            "model": d.model.model_copy(update={"gguf_sha256": gguf_sha})})})
    write_lock(tmp_path / "fleet.yml.lock", Lock(hosts=hosts))
    return fleet


def test_status_and_prune_commands(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("R1FLEET_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("R1FLEET_FLEET", raising=False)
    monkeypatch.chdir(tmp_path)  # no inventory/fleet.yml here: status reads no fleet
    code, out, _ = r1fleet(capsys, "cache", "status")
    assert code == 0 and out == f"(empty)\n0 entries, 0 B in {tmp_path / 'cache'}\n"
    cache = ArtifactCache(tmp_path / "cache")
    kept = put(cache, BODY, "kept.bin")
    put(cache, b"x" * 2048, "stale.bin", days_ago=10)
    code, out, _ = r1fleet(capsys, "cache", "status")
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "SHA256", "SIZE", "LAST", "USED"]
    assert lines[1].startswith("kept.bin   " + kept[:12]) and "256.0 KiB" in lines[1]
    assert lines[-1] == f"2 entries, 258.0 KiB in {tmp_path / 'cache'}"
    code, out, _ = r1fleet(capsys, "cache", "status", "--json")
    doc = json.loads(out)
    assert doc["total_bytes"] == len(BODY) + 2048 and {e["name"] for e in doc["entries"]} == {"kept.bin", "stale.bin"}

    code, out, _ = r1fleet(capsys, "cache", "prune", "--older-than", "7")
    assert code == 0 and out == f"freed 2.0 KiB (1 entry) in {tmp_path / 'cache'}\n"
    fleet = locked_fleet(tmp_path, asset_sha=kept)
    put(cache, b"y" * 4096, "unlocked.bin")
    code, out, _ = r1fleet(capsys, "cache", "prune", "--fleet", str(fleet), "--unused-by-lock")
    assert code == 0 and out.startswith("freed 4.0 KiB (1 entry)") and [e.sha256 for e in cache.status()] == [kept]
    code, out, _ = r1fleet(capsys, "cache", "prune", "--all")
    assert code == 0 and out.startswith("freed 256.0 KiB (1 entry)") and cache.status() == []


@pytest.mark.parametrize("args, expected", [
    (["cache", "prune"], "say what to prune"),
    (["cache", "prune", "--all", "--older-than", "3"], "--all deletes every entry"),
    (["cache", "prune", "--older-than", "-1"], "field --older-than"),
    (["cache", "prune", "--fleet", "FLEET", "--unused-by-lock"], "no lock, so no artifact is pinned"),
    (["cache", "fill", "--fleet", "FLEET"], "no lock, so no artifact is pinned"),
])
def test_command_errors_are_clear(tmp_path, capsys, monkeypatch, args, expected):
    monkeypatch.setenv("R1FLEET_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "fleet.yml").write_text("hosts: {a: {address: 10.0.0.1}}\n")
    code, _, err = r1fleet(capsys, *[a.replace("FLEET", str(tmp_path / "fleet.yml")) for a in args])
    assert code == 2 and expected in err and "Traceback" not in err


def test_wanted_artifacts_once_each_with_pinned_urls_only(tmp_path):
    fleet = load_fleet(locked_fleet(tmp_path, asset_sha="a" * 64))
    lock = read_lock(tmp_path / "fleet.yml.lock")
    wanted = {w.name: w for w in wanted_artifacts(lock, fleet)}
    gguf = wanted["DeepSeek-R1-Distill-Llama-70B-Q4_K_M.gguf"]  # the llama.cpp host needs the GGUF
    assert gguf.hosts == ["dual-rtx3090"] and gguf.size == 42520395936
    assert gguf.url.startswith("https://huggingface.co/bartowski/DeepSeek-R1-Distill-Llama-70B-GGUF/resolve/1842c5f")
    assert wanted["ollama-linux-amd64.tar.zst"].url.endswith("/v0.32.9/ollama-linux-amd64.tar.zst")
    assert not any("deepseek-r1" in name for name in wanted)  # the Ollama host's model comes by registry:
    assert registry_models(lock, fleet) == {("https://registry.ollama.ai", "deepseek-r1:32b-qwen-distill-q4_K_M"): (
        "6150cb382311b69f09cc0f9a1b69fc029cbd742b66bb8ec531aa5ecf5c613e93", None, ["rtx4090"])}
    assert wanted["ollama-test.tar.zst"].url is None and "no URL is pinned" in wanted["ollama-test.tar.zst"].unknown
    assert "a" * 64 in locked_digests(lock) and gguf.sha256 in locked_digests(lock)


def test_fill_fetches_each_pinned_artifact_once(tmp_path, capsys, monkeypatch, origin):
    import r1fleet.cli.cache as cache_commands

    pins = cache_commands.load_pins()
    ollama = pins.ollama.model_copy(update={"version": "9.9.9", "base_url": origin.url.rsplit("/", 2)[0] + "/v{version}",
                                            "sha256": {"ollama-test.tar.zst": SHA}})
    monkeypatch.setattr(cache_commands, "load_pins", lambda: pins.model_copy(update={"ollama": ollama}))
    monkeypatch.setenv("R1FLEET_CACHE_DIR", str(tmp_path / "cache"))
    # Two hosts need the same bytes (by digest): one download. Anything without a pinned URL is reported.
    with socket.socket() as closed:  # a registry nothing answers at
        closed.bind(("127.0.0.1", 0))
        registry = f"https://127.0.0.1:{closed.getsockname()[1]}/registry"
    fleet = locked_fleet(tmp_path, asset_sha=SHA, gguf_sha=SHA, registry=registry)
    code, out, err = r1fleet(capsys, "cache", "fill", "--fleet", str(fleet))
    label = f"DeepSeek-R1-Distill-Llama-70B-Q4_K_M.gguf ({SHA[:12]}) for dual-rtx3090,rtx4090"
    assert code == 1 and f"  fetched: {label}\n" in out
    assert "  not fetched: ollama-linux-amd64.tar.zst (5d747a43369f) for dual-rtx3090: no URL is pinned" in out
    assert f"  failed: deepseek-r1:32b-qwen-distill-q4_K_M from {registry} for rtx4090: " in out  # reported
    assert out.endswith(f"{tmp_path / 'cache'}: 2 not cached\n")
    assert "[dual-rtx3090,rtx4090] DeepSeek-R1-Distill-Llama-70B-Q4_K_M.gguf: 256.0 KiB done, 256.0 KiB fetched" in err
    assert origin.asked == [None] and origin.sent == len(BODY)
    code, out, _ = r1fleet(capsys, "cache", "fill", "--fleet", str(fleet))
    assert f"  cached: {label}\n" in out and origin.sent == len(BODY)
