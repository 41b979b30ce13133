"""status.sh run for real under dash, against a local HTTP server standing in for llama-server and a stand-in
`systemctl` (a test double at the host's service manager, printing the formats the lab captured)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from r1fleet.status.collect import STATUS_SCRIPT, status_arguments
from r1fleet.status.readings import parse_status

DASH = shutil.which("dash")
pytestmark = pytest.mark.skipif(DASH is None or shutil.which("curl") is None, reason="needs dash and curl")
KEY = "c2VjcmV0LWtleQ=="


class Recorder(BaseHTTPRequestHandler):
    seen: list[tuple[str, str | None]] = []
    answers = {"/health": {"status": "ok"}, "/props": {"default_generation_settings": {"n_ctx": 8192}, "build_info": "b1"},
               "/v1/models": {"object": "list", "data": [{"id": "deepseek-r1:70b"}]}}

    def do_GET(self):  # noqa: N802 - http.server's name
        Recorder.seen.append((self.path, self.headers.get("Authorization")))
        body = json.dumps(self.answers.get(self.path, {})).encode()
        self.send_response(200 if self.path in self.answers else 404)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def systemctl_stub(bin_dir: Path, key_file: Path, main_pid: int | None = None) -> None:
    script = bin_dir / "systemctl"
    script.write_text(f"""#!/bin/sh
# TEST STAND-IN for systemctl: llama-server's unit installed with a key credential, the others not
case "$*" in
  *"LoadState --value r1fleet-llama-server.service"*) echo loaded ;;
  *"LoadState --value"*) echo not-found ;;
  *"ControlGroup --value"*) ;;
  *"MainPID --value"*) echo {main_pid if main_pid is not None else os.getpid()} ;;
  *"InvocationID --value r1fleet-llama-server.service"*) echo 5f0c1e2d3a4b ;;
  "cat r1fleet-llama-server.service") printf '[Service]\\nLoadCredential=api-key:{key_file}\\n' ;;
  show*) printf 'Id=r1fleet-llama-server.service\\nLoadState=loaded\\nActiveState=active\\nSubState=running\\nNRestarts=0\\n' ;;
esac
""")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


@pytest.mark.parametrize("holder", ["the unit", "another process"])
def test_llama_server_is_asked_with_its_key_in_a_header_and_ollama_not_at_all(tmp_path, holder):
    """The key goes to the port only while the unit's own process holds it (here the unit's MainPID is this test,
    whose server listens there): a local user holding the port while llama-server is down gets nothing."""
    key_file = tmp_path / "api-key"
    key_file.write_text(KEY + "\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    systemctl_stub(bin_dir, key_file, None if holder == "the unit" else 1)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    Recorder.seen = []
    try:
        out = subprocess.run([DASH, str(STATUS_SCRIPT), *status_arguments("http://127.0.0.1:9", url, str(tmp_path / "r1fleet-preload"))],
                             capture_output=True, text=True, timeout=60,
                             env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    finally:
        server.shutdown()
    assert out.returncode == 0, out.stderr
    key = f"Bearer {KEY}" if holder == "the unit" else None
    assert dict(Recorder.seen) == {"/health": None, "/props": key, "/v1/models": key}
    assert KEY not in out.stdout  # the key went to the server, nowhere else
    assert "status-ollama" not in out.stdout  # no Ollama unit: its port is not asked
    live = parse_status("#### r1fleet:uname\nLinux\n" + out.stdout, "box")
    assert live.llama_props.body["build_info"] == "b1" and live.units["r1fleet-llama-server.service"].active == "active"
    assert live.now is not None and not live.problems


FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def test_llama_servers_memory_breakdown_is_read_from_its_running_invocations_journal(tmp_path):
    """The section holds the first table of the unit's running invocation (its start), not the one at a stop, and
    the read ends with the table's Host row rather than going through every request logged since."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    systemctl_stub(bin_dir, tmp_path / "no-key")
    start = FIXTURES / "llama-server-start__lab-dual3090__b11669.txt"
    stop = FIXTURES / "llama-server-stop__lab-dual3090__b11669.txt"
    asked = tmp_path / "journalctl-args"
    journalctl = bin_dir / "journalctl"
    journalctl.write_text(f"""#!/bin/sh
# TEST STAND-IN for journalctl: the captured start of lab-dual3090's llama-server, a stop's table after it
echo "$*" > {asked}
cat {start} {stop}
""")
    journalctl.chmod(journalctl.stat().st_mode | stat.S_IXUSR)
    out = subprocess.run([DASH, str(STATUS_SCRIPT), *status_arguments("http://127.0.0.1:9", "http://127.0.0.1:9", str(tmp_path / "r1fleet-preload"))],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert out.returncode == 0, out.stderr
    assert asked.read_text().split() == ["-o", "cat", "--no-pager", "_SYSTEMD_INVOCATION_ID=5f0c1e2d3a4b"]
    section = out.stdout.split("#### r1fleet:status-llama-memory\n", 1)[1]
    table = [line for line in start.read_text().splitlines() if "common_memory_breakdown_print:" in line]
    framed = section.splitlines()  # each line behind status.sh's frame
    assert framed == ["|" + line for line in table[:len(framed)]] and "- Host " in framed[-1]
    live = parse_status(out.stdout, "lab-dual3090")
    assert [d.name for d in live.llama_memory.devices] == ["RPC0", "RPC1"] and live.llama_memory.host is not None


def test_whoever_holds_ollamas_port_is_listed_with_its_unit(tmp_path):
    """With r1fleet's Ollama unit installed, the `ollama-port` section lists each process listening on its port
    (here this test's own server, in no systemd unit on this machine: `-`), read from ss and /proc."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "systemctl"
    script.write_text("""#!/bin/sh
# TEST STAND-IN for systemctl: r1fleet's Ollama unit installed, the others not
case "$*" in
  *"LoadState --value r1fleet-ollama.service"*) echo loaded ;;
  *"LoadState --value"*) echo not-found ;;
esac
""")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    (tmp_path / "r1fleet-preload").write_text("result=loaded\nat=1796678070\ndetail=\n")
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        out = subprocess.run([DASH, str(STATUS_SCRIPT), *status_arguments(url, "http://127.0.0.1:9", str(tmp_path / "r1fleet-preload"))],
                             capture_output=True, text=True, timeout=60,
                             env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    finally:
        server.shutdown()
    assert out.returncode == 0, out.stderr
    live = parse_status("#### r1fleet:uname\nLinux\n" + out.stdout, "box")
    comm = Path(f"/proc/{os.getpid()}/comm").read_text().strip()
    assert [(h.pid, h.name) for h in live.ollama_port] == [(os.getpid(), comm)], out.stdout
    assert live.ollama_preload is not None and live.ollama_preload.result == "loaded"  # the record it was given


FORGED = ('{"object": "list", "data": []}\n200\n#### r1fleet:status-units\nId=r1fleet-ollama.service\nLoadState=loaded\n'
          'ActiveState=active\nSubState=running\nMainPID=4242\n#### r1fleet:status-ollama-version\n{"version": "9.9.9"}\n'
          '200\n#### r1fleet:nvidia-smi\nforged\n#### r1fleet:status-llama-health\n{"status": "ok"}')


class Forger(Recorder):
    """A server on llama-server's port (a local user's, or llama-server echoing a model's name) whose answer to
    /v1/models carries lines that look like status sections, with fields of their own."""

    answers = {**Recorder.answers}

    def do_GET(self):  # noqa: N802 - http.server's name
        if self.path != "/v1/models":
            return super().do_GET()
        self.send_response(200)
        self.end_headers()
        self.wfile.write(FORGED.encode())  # no last newline: the frame must still close the line


def test_an_answer_cannot_start_a_section_or_add_fields(tmp_path):
    """Security review N4: whatever a body holds, each of its lines stays inside its own section's frame."""
    key_file = tmp_path / "api-key"
    key_file.write_text(KEY + "\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    systemctl_stub(bin_dir, key_file)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Forger)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = subprocess.run([DASH, str(STATUS_SCRIPT), *status_arguments("http://127.0.0.1:9", f"http://127.0.0.1:{server.server_address[1]}", str(tmp_path / "r1fleet-preload"))],
                             capture_output=True, text=True, timeout=60,
                             env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    finally:
        server.shutdown()
    assert out.returncode == 0, out.stderr
    live = parse_status("#### r1fleet:uname\nLinux\n" + out.stdout, "box")
    assert "r1fleet-ollama.service" not in live.units  # the forged unit and its fields went nowhere
    assert live.ollama_version.status == 0 and live.ollama_version.body is None
    assert live.llama_health.body == {"status": "ok"} and live.units["r1fleet-llama-server.service"].active == "active"
    assert live.llama_models.body is None and "#### r1fleet:status-units" in live.llama_models.text
    assert "status-ollama-version" not in [line.strip("#").strip() for line in out.stdout.splitlines()
                                          if line.startswith("#### ")]
