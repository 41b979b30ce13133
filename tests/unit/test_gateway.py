"""The gateway (roles/gateway/decide.py and its HAProxy template): the fleet file's `gateway:` section refused with
field and fix, the models and hosts it routes, and the rendered configuration run by the real HAProxy of this
machine's distribution (Debian's `haproxy`, as a gateway host installs it): routing on the body's `model`, the
gateway's own key, 413 over the buffer, `/v1/models`, each host's key, and failover.

TEST DOUBLES: the model servers behind HAProxy are small Python HTTP servers (`FakeModelServer`) that answer
`/v1/models` and `/v1/chat/completions` with their host's name; this machine runs no Ollama or llama-server. They
check the key as llama-server does (`Authorization: Bearer <key>`, 401 otherwise) and stream as both backends do
(`text/event-stream` chunks, then `data: [DONE]`)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from pyinfra.api.util import get_template

from r1fleet.errors import FleetError
from r1fleet.fleet.config import GatewaySettings, HostConfig
from r1fleet.fleet.file import fleet_from_dict
from r1fleet.render.formats import RenderError, haproxy_settings
from r1fleet.roles.exposure.endpoint import Endpoint
from r1fleet.roles.gateway.decide import gateway_plan, models_document, template_context

TEMPLATE = Path(__file__).resolve().parents[2] / "r1fleet/roles/gateway/templates/haproxy.cfg.j2"
M14 = "deepseek-r1:14b-qwen-distill-q4_K_M"
M70 = "deepseek-r1:70b-llama-distill-q4_K_M"
GATEWAY_KEY = "gateway-client-key-0123456789abcdef0123"


def fleet(gateway: dict, **hosts: dict):
    hosts = hosts or {"a": {"address": "10.0.0.1"}, "b": {"address": "10.0.0.2", "port": 9000}}
    return fleet_from_dict({"hosts": hosts, "gateway": gateway}, "fleet.yml")


# --- the fleet file ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gateway,message", [
    ({"host": "c"}, "fleet.yml: gateway: field host: 'c' is not a host of this fleet (fix: name one of a, b"),
    ({"host": "b", "port": 9000}, "fleet.yml: gateway: field port: port 9000 is host b's model port (fix: "),
    ({"host": "a", "port": 8080}, "field port: port 8080 is a model server's default port (Ollama 11434, llama.cpp "
                                  "8080), which host a may bind (fix: "),
    ({"host": "a", "port": 22}, "fleet.yml: gateway: field port: port 22 is host a's ssh_port (fix: "),
    ({"host": "a", "listen": "10.0.0.1"}, "fleet.yml: field gateway.allow: listen is set but allow is empty"),
    ({"host": "a", "listen": "lan", "allow": ["10.0.0.0/24"]}, "field gateway.listen: 'lan' is not an IP address"),
    ({"host": "a", "max_request_kib": 1}, "field gateway.max_request_kib:"),
    ({"host": "a", "upstream": "x"}, "field gateway.upstream:"),
])
def test_a_bad_gateway_section_is_refused_with_field_and_fix(gateway, message):
    with pytest.raises(FleetError) as error:
        fleet(gateway)
    assert message in str(error.value) and "(fix: " in str(error.value)


def test_a_gateway_section_is_read_with_its_defaults():
    loaded = fleet({"host": "a", "listen": "10.0.0.1", "allow": ["10.0.0.0/24"]})
    assert loaded.gateway.host == "a" and loaded.gateway.port == 8000 and loaded.gateway.max_request_kib == 1024
    assert fleet({"host": "b", "port": 11434}).gateway.port == 11434  # b's model port is 9000: 11434 is free there
    assert fleet_from_dict({"hosts": {"a": {"address": "10.0.0.1"}}}, "f.yml").gateway is None


# --- what it routes ----------------------------------------------------------------------------------------------


def endpoint(host, model, address, *, lan=True, allow=("10.0.0.0/24",), key_needed=False, port=8080):
    return Endpoint(host, "llama.cpp" if key_needed else "ollama", address, port, model, lan=lan, allow=allow,
                    key_needed=key_needed)


GATEWAY = GatewaySettings(host="a", listen="10.0.0.1", allow=["10.0.0.0/24"])
GATEWAY_HOST = HostConfig(name="a", address="10.0.0.1")


def test_each_model_once_with_every_host_serving_it_and_the_unreachable_hosts_named():
    plan = gateway_plan(GATEWAY, GATEWAY_HOST, [
        endpoint("a", M14, "127.0.0.1", lan=False, port=11434),  # the gateway's own host, on loopback
        endpoint("b", M14, "10.0.0.2", key_needed=True),
        endpoint("c", M70, "10.0.0.3", key_needed=True),
        endpoint("d", M70, "127.0.0.1", lan=False),              # host-only elsewhere: unreachable
        endpoint("e", M70, "10.9.0.5", allow=("10.9.0.0/24",)),  # its firewall drops the gateway
        endpoint("f", M70, "10.0.0.6", key_needed=True),         # its key never left the host
    ], {"b": "b" * 40, "c": "c" * 40})
    assert [(m.name, [s.host for s in m.servers]) for m in plan.models] == [(M14, ["a", "b"]), (M70, ["c"])]
    assert plan.models[0].servers[0].target == "127.0.0.1:11434" and plan.models[0].servers[0].key is None
    assert plan.models[0].servers[1].authorization == "Bearer " + "b" * 40
    skipped = "\n".join(plan.skipped)
    assert "host d: it serves on 127.0.0.1 only" in skipped and "(field listen; fix: set listen and allow 10.0.0.1)" in skipped
    assert "host e: its allow (10.9.0.0/24) does not admit the gateway's address 10.0.0.1 (field allow" in skipped
    assert "host f: its llama-server key is generated on the host" in skipped and "field api_key_source" in skipped
    listed = json.loads(models_document(plan))
    assert [m["id"] for m in listed["data"]] == [M14, M70] and listed["object"] == "list"


def test_a_percent_in_a_host_key_stays_a_percent_in_haproxys_log_format():
    plan = gateway_plan(GATEWAY, GATEWAY_HOST, [endpoint("b", M14, "10.0.0.2", key_needed=True)], {"b": "a%[src]b" * 5})
    assert plan.models[0].servers[0].authorization == "Bearer " + "a%%[src]b" * 5


# --- the rendered configuration ----------------------------------------------------------------------------------


def render(plan, tmp_path: Path) -> Path:
    context = template_context(plan)
    key, models = tmp_path / "api-key", tmp_path / "models.json"
    key.write_text(GATEWAY_KEY + "\n")  # as the role writes it: one line
    models.write_text(models_document(plan))
    context.update(client_key_file=str(key), models_file=str(models))
    path = tmp_path / "haproxy.cfg"
    path.write_text(get_template(str(TEMPLATE), jinja_env_kwargs=haproxy_settings()).render(**context))
    return path


HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
needs_haproxy = pytest.mark.skipif(not Path(HAPROXY).exists(), reason="haproxy is not installed (scripts/setup.sh installs it)")


@needs_haproxy
@pytest.mark.parametrize("key", ["k" * 40, 'k"ey $HOME #not-a-comment \\ ; x' + "y" * 20, "k%[src]ey" + "z" * 30])
def test_the_rendered_configuration_is_valid_whatever_the_key_holds(tmp_path, key):
    plan = gateway_plan(GATEWAY, GATEWAY_HOST, [endpoint("b", M14, "10.0.0.2", key_needed=True),
                                                endpoint("c", M70, "fd00::3", allow=("fd00::/8", "10.0.0.0/24"))], {"b": key})
    path = render(plan, tmp_path)
    check = subprocess.run([HAPROXY, "-c", "-f", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    text = path.read_text()
    # the key is one single-quoted word of two lines (the request's header and the health check's), nothing else
    assert text.count("'Bearer " + key.replace("%", "%%") + "'") == 2
    assert "server c '[fd00::3]:8080' check" in text


def test_a_key_haproxy_cannot_hold_as_one_word_is_refused(tmp_path):
    plan = gateway_plan(GATEWAY, GATEWAY_HOST, [endpoint("b", M14, "10.0.0.2", key_needed=True)], {"b": "it's" + "k" * 40})
    with pytest.raises(RenderError, match="single quote"):
        render(plan, tmp_path)


# --- the real HAProxy in front of stand-in model servers ------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class FakeModelServer:
    """TEST DOUBLE of a model server (see the module's header): its host's name in every answer."""

    def __init__(self, host: str, key: str | None = None):
        self.host, self.key, self.port = host, key, free_port()
        self.seen_authorization: list[str | None] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _authorized(self) -> bool:
                given = self.headers.get("authorization")
                outer.seen_authorization.append(given)
                if outer.key and given != f"Bearer {outer.key}":
                    self.send_response(401)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return False
                return True

            def do_GET(self):
                if self._authorized():
                    body = json.dumps({"data": [{"id": outer.host}]}).encode()
                    self.send_response(200)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers["content-length"])))
                if not self._authorized():
                    return
                if request.get("stream"):
                    self.send_response(200)
                    self.send_header("content-type", "text/event-stream")
                    self.end_headers()
                    for word in (outer.host, "done"):
                        self.wfile.write(f"data: {json.dumps({'content': word})}\n\n".encode())
                        self.wfile.flush()
                    self.wfile.write(b"data: [DONE]\n\n")
                    return
                body = json.dumps({"host": outer.host, "model": request["model"]}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def call(port: int, path: str, body: bytes | None = None, key: str | None = GATEWAY_KEY) -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method="POST" if body else "GET")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    request.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def chat(port: int, model: str, **extra) -> tuple[int, bytes]:
    return call(port, "/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"}], "model": model,
                                                          **extra}).encode())


@pytest.fixture
def gateway(tmp_path):
    """HAProxy on a free port in front of three stand-ins: b and c serve the 14B (b and d need a key), d the 70B."""
    servers = {"b": FakeModelServer("b", "b-key-" + "1" * 34), "c": FakeModelServer("c"),
               "d": FakeModelServer("d", "d-key-%" + "2" * 33)}
    port = free_port()
    settings = GatewaySettings(host="a", port=port, max_request_kib=64)
    endpoints = [Endpoint(h, "ollama", "127.0.0.1", s.port, M70 if h == "d" else M14, lan=True, allow=("127.0.0.0/8",),
                          key_needed=s.key is not None) for h, s in servers.items()]
    plan = gateway_plan(settings, HostConfig(name="a", address="127.0.0.1"), endpoints,
                        {h: s.key for h, s in servers.items() if s.key})
    process = subprocess.Popen([HAPROXY, "-db", "-f", str(render(plan, tmp_path))], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(100):
            if process.poll() is not None:
                pytest.fail(process.stdout.read())
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        yield port, servers
    finally:
        process.terminate()
        process.wait(timeout=10)
        for server in servers.values():
            server.stop()


@needs_haproxy
def test_the_gateway_routes_by_model_with_each_hosts_key_and_its_own(gateway):
    port, servers = gateway
    status, body = call(port, "/v1/models")
    assert status == 200 and [m["id"] for m in json.loads(body)["data"]] == [M14, M70]
    assert call(port, "/v1/models", key=None)[0] == 401
    assert call(port, "/health", key=None) == (200, b'{"status":"ok"}')  # the deploy's wait for the gateway itself
    assert call(port, "/v1/models", key="wrong")[0] == 401
    assert call(port, "/v1/models", key=GATEWAY_KEY + "x")[0] == 401
    status, body = chat(port, M70)
    assert status == 200 and json.loads(body) == {"host": "d", "model": M70}
    hosts = {json.loads(chat(port, M14)[1])["host"] for _ in range(6)}
    assert hosts == {"b", "c"}  # both hosts of the 14B take requests
    status, body = chat(port, "deepseek-r1:671b")
    assert status == 404 and b"model_not_found" in body
    # each host saw its own key on requests (and none, for the keyless one): never the gateway's
    assert set(servers["d"].seen_authorization) == {"Bearer d-key-%" + "2" * 33}
    assert set(servers["c"].seen_authorization) == {None}
    assert all(GATEWAY_KEY not in (seen or "") for s in servers.values() for seen in s.seen_authorization)


@needs_haproxy
def test_a_long_chat_over_the_buffer_gets_413_not_a_wrong_route(gateway):
    port, _ = gateway
    long_chat = {"messages": [{"role": "user", "content": "x" * 70 * 1024}], "model": M70}
    status, body = call(port, "/v1/chat/completions", json.dumps(long_chat).encode())
    assert status == 413 and b"max_request_kib" in body
    status, _ = chat(port, M70, padding="y" * 50 * 1024)  # under the limit: routed
    assert status == 200


@needs_haproxy
def test_a_stopped_host_fails_over_and_streams_pass_through(gateway):
    port, servers = gateway
    servers["b"].stop()
    answers = [chat(port, M14) for _ in range(6)]
    assert all(status == 200 for status, _ in answers)
    assert {json.loads(body)["host"] for _, body in answers} == {"c"}
    status, body = chat(port, M14, stream=True)
    assert status == 200 and body.endswith(b"data: [DONE]\n\n") and b'"content": "c"' in body


# --- the HAProxy version in the lock ---------------------------------------------------------------------------------

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
PROBES = FIXTURES / "probes"


def test_apt_policy_gives_haproxys_installed_and_candidate_versions():
    from r1fleet.hardware.system import parse_apt_policy

    installed = (FIXTURES / "apt-cache-policy-haproxy__debian-12-bookworm__installed.txt").read_text().splitlines()
    fresh = (FIXTURES / "apt-cache-policy-haproxy__debian-12-bookworm__not-installed.txt").read_text().splitlines()
    assert parse_apt_policy(installed).model_dump() == {"installed": "2.6.12-1+deb12u4", "candidate": "2.6.12-1+deb12u4"}
    assert parse_apt_policy(fresh).model_dump() == {"installed": None, "candidate": "2.6.12-1+deb12u4"}
    assert parse_apt_policy([]) is None  # no apt, or no such package
    assert parse_apt_policy(["haproxy:", "  Installed: $(reboot)", "  Candidate: 2.8.5-1"]).installed is None  # not a version


def test_the_lock_records_the_gateway_hosts_haproxy_and_no_other_hosts(tmp_path, capsys):
    import yaml

    from r1fleet.cli.main import main
    from r1fleet.lock.file import read_lock

    probes = tmp_path / "probes"
    probes.mkdir()
    policy = (FIXTURES / "apt-cache-policy-haproxy__debian-12-bookworm__not-installed.txt").read_text()
    for name in ("rtx4090", "cpu-16g"):
        text = (PROBES / f"{name}.probe").read_text()
        (probes / f"{name}.probe").write_text(text + ("#### r1fleet:haproxy\n" + policy if name == "rtx4090" else ""))
    fleet_file = tmp_path / "fleet.yml"
    fleet_file.write_text(yaml.safe_dump({"hosts": {"rtx4090": {"address": "192.168.1.22"},
                                                    "cpu-16g": {"address": "192.168.1.30"}},
                                          "gateway": {"host": "rtx4090"}}))
    assert main(["lock", "--fleet", str(fleet_file), "--probe-dir", str(probes)]) == 0
    lock = read_lock(tmp_path / "fleet.yml.lock")
    gateway = lock.hosts["rtx4090"].artifacts.gateway
    assert gateway.model_dump() == {"package": "haproxy", "installed": None, "candidate": "2.6.12-1+deb12u4"}
    assert lock.hosts["cpu-16g"].artifacts.gateway is None
    # the gateway on a host whose apt said nothing: recorded empty, with a note
    fleet_file.write_text(yaml.safe_dump({"hosts": {"rtx4090": {"address": "192.168.1.22"},
                                                    "cpu-16g": {"address": "192.168.1.30"}},
                                          "gateway": {"host": "cpu-16g"}}))
    main(["lock", "--fleet", str(fleet_file), "--probe-dir", str(probes)])
    entry = read_lock(tmp_path / "fleet.yml.lock").hosts["cpu-16g"]
    assert entry.artifacts.gateway.installed is None and entry.artifacts.gateway.candidate is None
    assert any("haproxy package" in note for note in entry.artifacts.notes)
    capsys.readouterr()
