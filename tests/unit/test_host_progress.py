"""Progress of long work on a host (r1fleet/operations/host_progress.py) and the stalled download that resumes
(roles/common.py resuming_curl): real pyinfra runs on the @local connector, real sh, curl and HTTP."""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import gevent
import pytest
from pyinfra.api import Config, Inventory, State, operation
from pyinfra.api.connect import connect_all
from pyinfra.api.operation import add_op

from r1fleet.progress import TerminalProgress
from r1fleet.operations import common
from r1fleet.operations.host_progress import (
    BuildTracker,
    ByteTracker,
    build_log_poll,
    build_step,
    file_poll,
    live_watchers,
    ollama_blobs_poll,
    parse_sizes,
    watching,
)

PYINFRA = Path(sys.executable).parent / "pyinfra"
UNITS = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def reporter(clock: Clock) -> tuple[TerminalProgress, io.StringIO]:
    stream = io.StringIO()
    return TerminalProgress(stream=stream, host="box", interval=0, clock=clock), stream


def sh(command: str) -> list[str]:
    return subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True).stdout.splitlines()


def as_bytes(text: str) -> float:
    number, unit = text.split()
    return float(number) * UNITS[unit]


# ---------------------------------------------------------------------------------------------
# Parsing and the trackers


def test_parse_sizes_reads_bytes_sizes_and_labels_and_skips_noise():
    lines = ["4096 - ", "12288 10000 6150cb382311", "7 - ollama-linux-amd64.tar.zst", "du: cannot access", ""]
    assert parse_sizes(lines) == {"": (4096, None), "6150cb382311": (10000, 10000),
                                  "ollama-linux-amd64.tar.zst": (7, None)}


def test_parse_sizes_takes_ascii_digits_only():
    # a host's poll answer is input: Unicode digits ('²', Arabic-Indic) and endless digits are noise, not counts
    lines = ["\u00b2 - a", "12 \u00b2 b", "\u0661\u0662 - c", "1" * 5000 + " - d", "5 \u0665 e", "3 7 ok"]
    assert parse_sizes(lines) == {"ok": (3, 7)}


def test_build_step_takes_ascii_digits_only():
    assert build_step(["[\u0664\u0665%] Building a.cu.o"]) is None
    assert build_step(["[\u0661/\u0662] Building a.cu.o"]) is None


def test_build_step_is_the_last_progress_line_of_make_or_ninja():
    assert build_step(["[ 12%] Built target ggml-base", "warning: x", "[ 45%] Building CUDA object a.cu.o", "note"]) \
        == "[ 45%] Building CUDA object a.cu.o"
    assert build_step(["[12/345] Building CXX object common/arg.cpp.o"]) == "[12/345] Building CXX object common/arg.cpp.o"
    assert build_step(["-- Configuring done"]) is None
    assert len(build_step(["[ 99%] " + "x" * 300]) or "") == 120


def test_byte_tracker_reports_resume_progress_stall_and_the_end():
    clock = Clock()
    progress, stream = reporter(clock)
    tracker = ByteTracker("70b.gguf", progress, total=4 * 1024**3, stall_after=60, resumable=True, clock=clock)
    tracker.update(["1073741824 - "])  # the baseline: an earlier run left 1 GiB
    clock.now += 10
    tracker.update(["1178599424 - "])  # +100 MiB in 10 s
    clock.now += 30
    tracker.update(["1178599424 - "])
    clock.now += 31
    tracker.update(["1178599424 - "])  # 61 s without a byte
    clock.now += 5
    tracker.update(["1178599424 - "])  # reported once
    clock.now += 5
    tracker.update(["1283457024 - "])
    tracker.stop(failed=False)
    assert stream.getvalue().splitlines() == [
        "[box] 70b.gguf: resuming at 1.0 GiB of 4.0 GiB",
        "[box] 70b.gguf: 1.1 GiB / 4.0 GiB (27%), 10.0 MiB/s, 4m 57s left",
        "[box] 70b.gguf: stalled: no new bytes for 1m 01s",
        "[box] 70b.gguf: moving again",
        "[box] 70b.gguf: 1.2 GiB / 4.0 GiB (29%), 2.5 MiB/s, 19m 23s left",
        "[box] 70b.gguf: 4.0 GiB done, 3.0 GiB fetched in 1m 21s",
    ]


def test_byte_tracker_finishes_a_blob_renamed_into_place_and_follows_the_next():
    clock = Clock()
    progress, stream = reporter(clock)
    tracker = ByteTracker("deepseek-r1:7b", progress, clock=clock)
    tracker.update([])
    clock.now += 5
    tracker.update(["1000 5000 96c415656d37"])  # appears mid-download: no `resuming`
    clock.now += 5
    tracker.update(["6000 90000 a85fe2a2e58e"])  # the weights are complete (renamed); the next blob
    tracker.stop(failed=True)
    assert stream.getvalue().splitlines() == [
        "[box] deepseek-r1:7b 96c415656d37: 4.9 KiB done, 3.9 KiB fetched in 5s",
        "[box] deepseek-r1:7b a85fe2a2e58e: stopped at 5.9 KiB of 87.9 KiB",
    ]


def test_byte_tracker_starts_over_when_the_file_shrinks_and_no_stall_without_work():
    clock = Clock()
    progress, stream = reporter(clock)
    tracker = ByteTracker("x.tgz", progress, stall_after=10, clock=clock)
    tracker.update(["5000 - "])
    clock.now += 5
    tracker.update(["200 - "])  # a server that cannot resume: curl starts over
    clock.now += 5
    tracker.update(["300 - "])
    assert "resuming" not in stream.getvalue() and "[box] x.tgz: 300 B, 20 B/s" in stream.getvalue()
    quiet = ByteTracker("y", progress, stall_after=10, clock=clock)
    for _ in range(5):
        clock.now += 10
        quiet.update([])  # nothing to watch yet (a manifest being read): no stall
    assert "stalled" not in stream.getvalue()
    for _ in range(5):  # a file of unknown size that stops growing may be whole, being checked: no stall
        clock.now += 10
        tracker.update(["300 - "])
    assert "stalled" not in stream.getvalue()


def test_build_tracker_prints_each_new_step_and_the_end():
    clock = Clock()
    progress, stream = reporter(clock)
    tracker = BuildTracker("llama-server b6000 build", progress, clock=clock)
    clock.now += 65
    tracker.update(["[ 10%] Building C object ggml/src/ggml.c.o"])
    tracker.update(["[ 10%] Building C object ggml/src/ggml.c.o"])
    clock.now += 600
    tracker.update(["[ 98%] Linking CXX executable ../../bin/llama-server"])
    tracker.stop(failed=False)
    assert stream.getvalue().splitlines() == [
        "[box] llama-server b6000 build: [ 10%] Building C object ggml/src/ggml.c.o (1m 05s so far)",
        "[box] llama-server b6000 build: [ 98%] Linking CXX executable ../../bin/llama-server (11m 05s so far)",
        "[box] llama-server b6000 build: built in 11m 05s",
    ]


# ---------------------------------------------------------------------------------------------
# The poll commands, run by sh on real files


def test_file_poll_prints_the_files_that_exist(tmp_path):
    (tmp_path / "a.tgz").write_bytes(b"x" * 1234)
    poll = file_poll({"a.tgz": '"$d"/a.tgz', "b.tgz": '"$d"/b.tgz'}, setup=f"d={tmp_path}")
    assert parse_sizes(sh(poll)) == {"a.tgz": (1234, None)}


def test_ollama_blobs_poll_reads_allocated_bytes_of_the_sparse_partial(tmp_path):
    """As Ollama writes a blob: `-partial` truncated to the whole size, filled at part offsets; the JSON part
    files `-partial-N` and complete blobs are not read."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    digest = "6150cb382311" + "0" * 52
    partial = blobs / f"sha256-{digest}-partial"
    with partial.open("wb") as f:
        f.truncate(64 * 1024 * 1024)
        f.seek(8 * 1024 * 1024)
        f.write(os.urandom(4 * 1024 * 1024))  # random: a compressing filesystem cannot shrink it
    (blobs / f"sha256-{digest}-partial-0").write_text('{"N":0,"Offset":0,"Size":4194304,"Completed":0}\n')
    (blobs / f"sha256-{'a' * 64}").write_bytes(b"done")
    readings = parse_sizes(sh(ollama_blobs_poll(str(tmp_path))))
    assert list(readings) == ["6150cb382311"]
    done, total = readings["6150cb382311"]
    assert total == 64 * 1024 * 1024
    assert 4 * 1024 * 1024 <= done < 8 * 1024 * 1024  # the written part, not the apparent size


def test_build_log_poll_prints_the_last_progress_line(tmp_path):
    log = tmp_path / "build.log"
    log.write_text("-- Build files have been written\n[  3%] Built target build_info\n[ 45%] Building CUDA object x\n"
                   "/src/x.cu(12): warning: unused\n")
    assert sh(build_log_poll(str(log))) == ["[ 45%] Building CUDA object x"]
    assert sh(build_log_poll(str(tmp_path / "none.log"))) == []


# ---------------------------------------------------------------------------------------------
# pyinfra's two runs of an operation


@operation(is_idempotent=False)
def grow_watched(path: str, polls: str):
    with watching("grow.bin", f"echo poll >> {polls}; " + file_poll({"": path}), every=0.1):
        yield f"head -c 65536 /dev/zero >> {path}"


def test_preparing_an_operation_polls_nothing(tmp_path):
    """pyinfra runs the generator while preparing (checking for changes) and closes it at the yield."""
    state = State(inventory=Inventory((["@local"], {})), config=Config(), check_for_changes=True)
    connect_all(state)
    polls = tmp_path / "polls.log"
    meta = add_op(state, grow_watched, path=str(tmp_path / "grow.bin"), polls=str(polls))
    gevent.sleep(0.3)
    assert meta[state.inventory.get_host("@local")].will_change  # the body ran to its yield
    assert live_watchers() == 0 and not polls.exists()


# ---------------------------------------------------------------------------------------------
# A real pyinfra run on @local: the watched operation grows a file for about 4 s

DEPLOY = '''
from pathlib import Path
from pyinfra.api import operation
from pyinfra.operations import python, server
from r1fleet.operations.host_progress import file_poll, live_watchers, watching

HERE = Path(__file__).resolve().parent
PART, POLLS = HERE / "grow.bin", HERE / "polls.log"


@operation(is_idempotent=False)
def grow(path: str, fail: bool):
    poll = f"echo poll >> {POLLS}; " + file_poll({"": str(path)})  # counts the polls that ran
    with watching("grow.bin", poll, total=8 * 65536, every=0.3, stall_after=None):
        yield (f"for i in 1 2 3 4 5 6 7 8; do head -c 65536 /dev/zero >> {path}; sleep 0.5; done"
               + ("; exit 3" if fail else ""))


def check(label):
    polls = len(POLLS.read_text().splitlines())
    print(f"CHECK {label} live={live_watchers()} polls={polls}", flush=True)


grow(name="Grow", path=str(PART), fail=FAIL, _ignore_errors=True)
python.call(name="After", function=check, label="after")
server.shell(name="Wait", commands=["sleep 1"])
python.call(name="Later", function=check, label="later")
'''


def run_local_deploy(tmp_path: Path, fail: bool) -> str:
    deploy = tmp_path / "deploy.py"
    deploy.write_text(DEPLOY.replace("FAIL", repr(fail)))
    done = subprocess.run([str(PYINFRA), "@local", str(deploy), "-y"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


@pytest.mark.parametrize("fail", [False, True], ids=["succeeds", "fails"])
def test_a_pyinfra_run_shows_growing_bytes_while_the_command_runs_and_stops_watching_after(tmp_path, fail):
    output = run_local_deploy(tmp_path, fail)
    held = [as_bytes(m) for m in re.findall(r"^\[@local\] grow\.bin: ([\d.]+ \w+) / 512\.0 KiB", output, re.M)]
    assert len(held) >= 2 and held == sorted(held) and held[-1] > held[0], output
    assert output.rindex("[@local] grow.bin:") < output.index("Starting operation: After")
    if fail:
        assert "[@local] grow.bin: stopped at" in output and "Error (ignored)" in output
    else:
        assert "[@local] grow.bin: 512.0 KiB done" in output
    after = re.search(r"CHECK after live=(\d+) polls=(\d+)", output)
    later = re.search(r"CHECK later live=(\d+) polls=(\d+)", output)
    assert after and later, output
    assert after.group(1) == later.group(1) == "0"  # no watcher greenlet left
    assert after.group(2) == later.group(2)  # and no poll ran on the host after the operation


# ---------------------------------------------------------------------------------------------
# The stalled download resumes from its bytes

BODY = os.urandom(300_000)
SHA = hashlib.sha256(BODY).hexdigest()


class Stalling(BaseHTTPRequestHandler):
    """Serves BODY with ranges; the first GET sends 3,000 bytes and then nothing (a stalled link)."""

    requests: list[str] = []
    release = threading.Event()

    def do_GET(self):  # noqa: N802 (http.server's name)
        start = int(re.match(r"bytes=(\d+)-", self.headers.get("Range", "bytes=0-")).group(1))
        type(self).requests.append(f"{start}-")
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(BODY) - 1}/{len(BODY)}")
        self.send_header("Content-Length", str(len(BODY) - start))
        self.end_headers()
        if len(type(self).requests) == 1:
            self.wfile.write(BODY[:3000])
            self.wfile.flush()
            type(self).release.wait(30)  # until the test ends: curl has to give up on its own
            return
        self.wfile.write(BODY[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def stalling_server():
    Stalling.requests, Stalling.release = [], threading.Event()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Stalling)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/model.gguf"
    Stalling.release.set()
    server.shutdown()


def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not shutil.which("curl") or not shutil.which("sha256sum"), reason="needs curl and sha256sum")
def test_a_stalled_download_is_given_up_and_resumed_from_its_bytes(tmp_path, stalling_server, monkeypatch):
    monkeypatch.setattr(common, "STALL_S", 2)  # curl's --speed-time: seconds below --speed-limit
    monkeypatch.setattr(common, "RETRY_WINDOW_S", 1)
    part = tmp_path / "model.gguf.part"
    cache = f"http://127.0.0.1:{closed_port()}/sha256/{SHA}"  # the controller's cache does not answer
    steps = common.verified_fetch_steps(cache, str(part), SHA, len(BODY), resume=True, fallback=stalling_server)
    done = subprocess.run(["sh", "-c", "set -e; " + "; ".join(steps)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert part.read_bytes() == BODY
    assert Stalling.requests == ["0-", "3000-"]  # resumed where the stall left it, not started over
    assert "stalled or broke after adding bytes; resuming" in done.stderr


class Oversized(BaseHTTPRequestHandler):
    """Answers every GET with BODY, whatever was pinned (a hostile mirror, or the wrong file at the right URL)."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, *args):
        pass


@pytest.mark.skipif(not shutil.which("curl") or not shutil.which("sha256sum"), reason="needs curl and sha256sum")
@pytest.mark.parametrize("resume", [False, True])
def test_a_host_never_downloads_more_than_the_pinned_size(tmp_path, resume):
    """Issue 21: curl on the host stops at the artifact's pinned size (--max-filesize), from the cache or a mirror."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Oversized)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        part = tmp_path / "small.part"
        url = f"http://127.0.0.1:{server.server_port}/small"
        pinned = hashlib.sha256(b"x" * 1000).hexdigest()
        steps = common.verified_fetch_steps(url, str(part), pinned, 1000, resume=resume)
        done = subprocess.run(["sh", "-c", "set -e; " + "; ".join(steps)], capture_output=True, text=True, timeout=60)
    finally:
        server.shutdown()
    assert done.returncode != 0
    assert not part.exists() or part.stat().st_size <= 1000  # nothing past the pin reached the disk
    assert "Maximum file size exceeded" in done.stderr


@pytest.mark.skipif(not shutil.which("curl"), reason="needs curl")
def test_a_download_that_adds_nothing_is_not_retried_for_ever(tmp_path):
    part = tmp_path / "x.part"
    url = f"http://127.0.0.1:{closed_port()}/x"
    done = subprocess.run(["sh", "-c", common.resuming_curl(url, str(part), "--retry 2 --connect-timeout 5")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "resuming" not in done.stderr
