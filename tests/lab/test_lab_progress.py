"""Lab: the progress of a host's download, read on the host over real SSH while it runs (issue 13 item 6,
r1fleet/operations/host_progress.py), and a stalled transfer resumed. r1fleet's own fetch_verified operation
downloads on a lab host from a slow HTTP server on the controller's lab address: the controller's terminal
shows the bytes growing while curl runs, and nothing watches after the operation. Root + lab only."""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from test_deploy import PYINFRA, ROOT

from r1fleet.lab import state

HOST = "lab-cpu"
CHUNK, CHUNKS = 32 * 1024, 24  # 24 s: the watcher polls every 5 s
BODY = os.urandom(CHUNK * CHUNKS)
DEST = "/var/tmp/r1fleet-progress/slow.bin"

DEPLOY = '''
from r1fleet.operations import common
from r1fleet.artifacts.pins import Download
from r1fleet.operations.common import fetch_verified
from r1fleet.operations.host_progress import live_watchers
from pyinfra.operations import python

# A stall given up after 12 s instead of 60 (reported at 6 s): the same code path, a minute sooner.
common.STALL_S, common.RETRY_WINDOW_S = 12, 8

fetch_verified(name="Slow download", download=Download(name="slow.bin", url=URL, sha256=SHA, size=SIZE), dest=DEST,
               user="root", group="root")
python.call(name="After", function=lambda: print(f"CHECK live={live_watchers()}", flush=True))
'''


class Slow(BaseHTTPRequestHandler):
    """One chunk a second; with `stall`, the first answer stops after half the body and goes silent."""

    stall = False
    ranges: list[str | None] = []

    def do_GET(self):
        asked = self.headers.get("Range")
        Slow.ranges.append(asked)
        start = int(asked.removeprefix("bytes=").rstrip("-")) if asked else 0
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(BODY) - 1}/{len(BODY)}")
        self.send_header("Content-Length", str(len(BODY) - start))
        self.end_headers()
        for offset in range(start, len(BODY), CHUNK):
            if Slow.stall and len(Slow.ranges) == 1 and offset >= len(BODY) // 2:
                time.sleep(3600)  # silent: curl gives up (--speed-time) and resumes
            self.wfile.write(BODY[offset:offset + CHUNK])
            self.wfile.flush()
            time.sleep(1.0 if len(Slow.ranges) == 1 else 0.5)  # the resumed half faster: watched, but sooner done

    def log_message(self, *args):
        pass


@pytest.fixture
def slow_server(lab):
    Slow.ranges, Slow.stall = [], False
    server = ThreadingHTTPServer((state.controller_address(), 0), Slow)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://{state.controller_address()}:{server.server_port}/slow.bin"
    server.shutdown()


def download(tmp_path, ssh, url: str) -> str:
    ssh(HOST, f"rm -rf {os.path.dirname(DEST)}")
    deploy = tmp_path / "slow_deploy.py"
    deploy.write_text(DEPLOY.replace("URL", repr(url)).replace("DEST", repr(DEST))
                      .replace("SHA", repr(hashlib.sha256(BODY).hexdigest())).replace("SIZE", str(len(BODY))))
    run = subprocess.run([PYINFRA, "-y", "inventory.py", str(deploy), "--limit", HOST], cwd=ROOT,
                         env={**os.environ, "R1FLEET_FLEET": "lab", "R1FLEET_CACHE": "off"},  # the host's own download
                         capture_output=True, text=True, timeout=600)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    assert ssh(HOST, f"sha256sum {DEST}").stdout.split()[0] == hashlib.sha256(BODY).hexdigest()
    assert "CHECK live=0" in output  # no watcher outlives the operation
    return output


def held(output: str) -> list[str]:
    return re.findall(rf"^\[{HOST}\] slow\.bin: ([\d.]+ \w+) / 768\.0 KiB", output, re.M)


def test_a_hosts_download_shows_its_bytes_while_it_runs_and_a_stall_is_reported_and_resumed(lab, ssh, slow_server, tmp_path):
    """One download shows both (each takes the better part of a minute): the bytes growing while curl runs, then a
    server gone silent halfway, reported and resumed from the bytes the host has."""
    Slow.stall = True
    output = download(tmp_path, ssh, slow_server)
    assert len(set(held(output))) >= 2, output[-3000:]  # polled over SSH while curl ran: the bytes grew
    assert f"[{HOST}] slow.bin: 768.0 KiB done" in output
    assert Slow.ranges[0] is None and Slow.ranges[1] == f"bytes={len(BODY) // 2}-", Slow.ranges  # resumed
    # reported at half curl's --speed-time without a byte, before curl gives up and resumes
    assert f"[{HOST}] slow.bin: stalled: no new bytes for" in output and f"[{HOST}] slow.bin: moving again" in output
