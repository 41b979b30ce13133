"""Fleet file: strict validation with messages that name the host, the field and the fix."""

from __future__ import annotations

import base64
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from r1fleet.cli.main import main as cli_main
from r1fleet.errors import FleetError
from r1fleet.fleet.file import host_data, json_schema, load_fleet

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str, name: str = "fleet.yml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path: Path) -> str:
    with pytest.raises(FleetError) as caught:
        load_fleet(path)
    return str(caught.value)


def test_example_fleet_resolves_defaults_and_overrides():
    fleet = load_fleet(ROOT / "inventory/fleet.example.yml")
    assert set(fleet.hosts) == {"gpu-3060", "gpu-4090", "dual-3090", "studio", "mini"}
    studio, mini, dual = fleet.hosts["studio"], fleet.hosts["mini"], fleet.hosts["dual-3090"]
    assert studio.ssh_user == "me" and fleet.hosts["gpu-4090"].ssh_user == "admin"
    assert studio.policy.model == "deepseek-r1-distill-qwen-32b"
    assert mini.policy.cpu_bandwidth_gbps == 40 and mini.policy.min_context == 8192
    assert dual.listen == "192.168.1.23" and dual.allow == ["192.168.1.0/24"]
    assert fleet.hosts["gpu-3060"].bind_address == "127.0.0.1"
    assert fleet.hosts["gpu-3060"].ssh_key.endswith("/.ssh/id_ed25519") and "~" not in fleet.hosts["gpu-3060"].ssh_key


def test_host_policy_overrides_defaults_key_by_key(tmp_path):
    path = write(tmp_path, "defaults: {policy: {min_context: 4096, min_tokens_per_second: 9}}\nhosts:\n  a: {address: 10.0.0.1, policy: {min_context: 16384}}\n")
    policy = load_fleet(path).hosts["a"].policy
    assert (policy.min_context, policy.min_tokens_per_second) == (16384, 9)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("hosts:\n  a: {address: 10.0.0.1, ssh_usr: me}\n", ["host a", "field ssh_usr", "remove it or correct its spelling"]),
        ("hosts:\n  a: {address: 10.0.0.1, ssh_port: lots}\n", ["host a", "field ssh_port", "whole number"]),
        ("hosts:\n  a: {address: 10.0.0.1, policy: {min_context: 10}}\n", ["host a", "field policy.min_context", "raise the value"]),
        ("hosts:\n  a: {address: 10.0.0.1, policy: {min_context: 16384, max_context: 8192}}\n", ["host a", "max_context", "below min_context"]),
        ("hosts:\n  a: {address: 10.0.0.1, model: 13b}\n", ["host a", "field model", "unknown model '13b'", "32b"]),
        ("hosts:\n  a: {address: 10.0.0.1, model: 'deepseek-r1:8b'}\n", ["host a", "deepseek-r1:8b-llama-distill-q4_K_M"]),
        ("hosts:\n  a: {address: 10.0.0.1, listen: 10.0.0.1}\n", ["host a", "field allow", "0.0.0.0/0"]),
        ("hosts:\n  a: {address: 10.0.0.1, listen: everywhere, allow: [10.0.0.0/8]}\n", ["host a", "field listen", "not an IP address"]),
        ("hosts:\n  a: {address: 10.0.0.1, listen: 10.0.0.1, allow: [lan]}\n", ["host a", "field allow", "CIDR"]),
        ("hosts:\n  a: {ssh_user: me}\n", ["host a", "field address", "missing"]),
        ("hosts:\n  a: {address: 10.0.0.1}\n  a: {address: 10.0.0.2}\n", ["duplicate key 'a'"]),
        ("hosts:\n  'bad name!': {address: 10.0.0.1}\n", ["host name 'bad name!'"]),
        ("hosts: {}\n", ["field hosts", "add at least one entry"]),
        ("defaults: {policy: {prefer: fastest}}\nhosts:\n  a: {address: 10.0.0.1}\n", ["field defaults.policy.prefer", "allowed values"]),
        ("hosts: [a, b]\n", ["field hosts", "mapping"]),
        ("hosts:\n  a: {address: 10.0.0.1, model_dir: 'models here'}\n", ["host a", "field model_dir", "absolute path"]),
        ("hosts:\n  a: {address: 10.0.0.1\n", ["not valid YAML"]),
        # an address reaches ssh's argv on the controller: never an option (M1)
        ("hosts:\n  a: {address: '-oProxyCommand=touch /tmp/x'}\n", ["host a", "field address", "not an IP address or a host name"]),
        ("hosts:\n  a: {address: 'box; id'}\n", ["host a", "field address"]),
        # the deploy owns model_dir (root:root 0755): never a system, home or temporary directory (M4)
        ("hosts:\n  a: {address: 10.0.0.1, model_dir: /tmp}\n", ["host a", "field model_dir", "/var/lib/r1fleet/models"]),
        ("hosts:\n  a: {address: 10.0.0.1, model_dir: /home/alice}\n", ["host a", "field model_dir"]),
        ("hosts:\n  a: {address: 10.0.0.1, model_dir: /var/lib/../../root}\n", ["host a", "field model_dir"]),
        # group names become pyinfra groups: `all` would hide the other hosts (L5)
        ("hosts:\n  a: {address: 10.0.0.1, groups: [all]}\n", ["host a", "field groups", "not 'all'"]),
        # rehearsal needs a mirror for the stand-in model (M11)
        ("hosts:\n  a: {address: 10.0.0.1, rehearsal: true}\n", ["host a", "field rehearsal", "mirror"]),
        # simulated hardware plans for GPUs a real host lacks: lab fleets only
        ("hosts:\n  a: {address: 10.0.0.1, profile: rtx4090}\n", ["host a", "field profile", "lab fleets only", "lab:"]),
        ("defaults: {profile: rtx4090}\nhosts:\n  a: {address: 10.0.0.1}\n", ["host a", "field profile"]),
        # a lab host's Debian release: one of the lab's images, and a lab fleet's only (issue 24)
        ("lab: {}\nhosts:\n  a: {profile: cpu-16g, distro: buster}\n",
         ["host a", "field distro", "'bookworm', 'trixie' or 'forky'", "allowed values"]),
        ("hosts:\n  a: {address: 10.0.0.1, distro: bookworm}\n", ["host a", "field distro", "lab host", "lab:"]),
        # systemd reads % as a specifier (L4)
        ("hosts:\n  a: {address: 10.0.0.1, listen: 'fe80::1%eth0', allow: ['fe80::/64']}\n", ["host a", "field listen", "scope id"]),
        # a mirror is fetched by urllib here and curl there: an http(s) URL, never a bare name or file:// (M3)
        ("hosts:\n  a: {address: 10.0.0.1, mirror: mirror.lan}\n", ["host a", "field mirror", "http://mirror.lan:8088"]),
        ("hosts:\n  a: {address: 10.0.0.1, mirror: 'file:///etc'}\n", ["host a", "field mirror", "not an http(s) URL"]),
        ("hosts:\n  a: {address: 10.0.0.1, mirror: 'http://u:p@mirror.lan/'}\n", ["host a", "field mirror"]),
        # a registry's manifest is trusted but for its weights: https outside the lab (M1, M3)
        ("hosts:\n  a: {address: 10.0.0.1, ollama_registry: 'http://registry.lan'}\n",
         ["host a", "field ollama_registry", "plain http", "https://registry.lan"]),
        # the firewall for the service port would drop SSH from outside allow (L2)
        ("hosts:\n  a: {address: 10.0.0.1, listen: 10.0.0.1, allow: [10.8.0.0/24], port: 22}\n",
         ["host a", "field port", "port 22 is this host's ssh_port"]),
        ("hosts:\n  a: {address: 10.0.0.1, ssh_port: 2222, listen: 10.0.0.1, allow: [10.8.0.0/24], port: 2222}\n",
         ["host a", "field port", "port 2222 is this host's ssh_port"]),
        # host keys are the fleet's business, never a file's: no key turns checking off (L1)
        ("hosts:\n  a: {address: 10.0.0.1, ssh_known_hosts: /dev/null}\n", ["host a", "field ssh_known_hosts", "not permitted"]),
        ("lab: {}\nhosts:\n  lab-4090: {address: 192.168.1.9, profile: rtx4090}\n",
         ["host lab-4090", "field address", "the lab's host keys", "without `lab:`"]),
        # a name ends where the string ends: `$` alone also matches before a last newline (security review N8)
        ('hosts:\n  "box\\n": {address: 10.0.0.1}\n', ["box"]),
    ],
)
def test_each_class_of_mistake_is_named(tmp_path, text, expected):
    message = error_of(write(tmp_path, text))
    for fragment in expected:
        assert fragment in message, (fragment, message)


def test_missing_file_says_how_to_start(tmp_path):
    assert "fleet.example.yml" in error_of(tmp_path / "nope.yml")


def test_all_problems_are_reported_at_once(tmp_path):
    message = error_of(write(tmp_path, "hosts:\n  a: {address: 10.0.0.1, port: 0}\n  b: {address: 10.0.0.2, ssh_port: -1}\n"))
    assert "host a: field port" in message and "host b: field ssh_port" in message
    message = error_of(write(tmp_path, "hosts:\n  a: {listen: 10.0.0.1}\n  b: {ssh_user: x}\n"))
    assert "host a: field address" in message and "host b: field address" in message


def test_pyinfra_groups_carry_connection_and_settings(tmp_path):
    path = write(tmp_path, "defaults: {ssh_user: admin}\nhosts:\n  a: {address: 10.0.0.1, groups: [gpu-boxes], rehearsal: true, mirror: 'http://10.0.0.9:8088'}\n")
    groups = load_fleet(path).pyinfra_groups()
    (name, data), = groups["gpu_boxes"]
    assert name == "a" and groups["r1fleet"] == [(name, data)]
    assert data["ssh_hostname"] == "10.0.0.1" and data["ssh_user"] == "admin" and data["_sudo"] is True
    assert data["rehearsal"] is True and data["r1fleet"]["policy"]["min_context"] == 8192


def test_host_key_checking_is_never_off_and_a_lab_host_is_pinned_to_the_labs_keys(tmp_path):
    """Audit L1: a `lab:` section, a profile or --data cannot turn host-key checking off for any host; the lab's own
    hosts (at the addresses the lab gives them) are checked against the keys the lab made for them."""
    from r1fleet.fleet.config import HostConfig
    from r1fleet.lab.paths import KNOWN_HOSTS

    real = load_fleet(write(tmp_path, "hosts:\n  box: {address: 192.168.1.9}\n")).hosts["box"]
    lab = load_fleet(write(tmp_path, "lab: {}\nhosts:\n  lab-4090: {profile: rtx4090, listen: 10.77.0.11, "
                                     "allow: [10.77.0.1/32]}\n")).hosts["lab-4090"]
    assert real.ssh_known_hosts is None and lab.ssh_known_hosts == str(KNOWN_HOSTS)
    for entry in (real, lab):
        data = host_data(entry)
        assert data.get("ssh_strict_host_key_checking") in (None, "yes")
        assert data.get("ssh_known_hosts_file") in (None, str(KNOWN_HOSTS))
        assert "StrictHostKeyChecking=no" not in entry.ssh_args() and "/dev/null" not in " ".join(entry.ssh_args())
    assert host_data(lab)["ssh_strict_host_key_checking"] == "yes"
    assert ("-o", f"UserKnownHostsFile={KNOWN_HOSTS}") == lab.ssh_args()[-2:]
    assert "ssh_strict_host_key_checking" not in host_data(real)  # pyinfra's own default: accept-new
    overridden = HostConfig.from_host_data("box", {"r1fleet": real.model_dump(), "ssh_known_hosts": "/dev/null"})
    assert overridden.ssh_known_hosts is None  # --data sets no host-key file


def test_schema_covers_hosts_and_policy():
    schema = json_schema()
    text = json.dumps(schema)
    assert schema["title"] == "r1fleet fleet file"
    assert "min_tokens_per_second" in text and "listen" in text and "additionalProperties" in text


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "r1fleet", *args], capture_output=True, text=True, cwd=ROOT, env=env)


def test_validate_command_ok_and_bad(tmp_path):
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("a private key\n")  # the example's ssh_key: ~/.ssh/id_ed25519
    ok = run_cli("validate", "inventory/fleet.example.yml", env={**os.environ, "HOME": str(home)})
    assert ok.returncode == 0 and "5 hosts OK" in ok.stdout, ok.stderr
    bad = run_cli("validate", str(write(tmp_path, "hosts:\n  a: {address: 10.0.0.1, ssh_port: 0}\n")))
    assert bad.returncode == 2 and "host a: field ssh_port" in bad.stderr and "Traceback" not in bad.stderr


def test_validate_refuses_an_ssh_key_that_is_not_there(tmp_path):
    """pyinfra would stop on it with tracebacks; validate (and the inventory) name the host and the fix."""
    fleet = write(tmp_path, f"hosts:\n  a: {{address: 10.0.0.1, ssh_key: {tmp_path}/missing}}\n  b: {{address: 10.0.0.2}}\n")
    out = run_cli("validate", str(fleet))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"host a: field ssh_key: {tmp_path}/missing does not exist" in out.stderr and "(fix: point ssh_key" in out.stderr
    (tmp_path / "missing").mkdir()
    assert "is not a file" in run_cli("validate", str(fleet)).stderr


def test_every_subcommand_says_what_it_does_and_the_version_is_known(capsys):
    top = run_cli("--help").stdout  # the installed entry point; the subcommands' help in this process (same parser)
    assert "r1fleet " in run_cli("--version").stdout
    for command in ("plan", "probe", "validate", "schema", "verify", "lock", "cache", "lab", "cache fill", "lab up"):
        with pytest.raises(SystemExit):
            cli_main([*command.split(), "--help"])
        text = capsys.readouterr().out
        description = text.split("\n\n")[1].strip()  # after the usage lines
        assert description and not description.startswith(("positional", "options")), (command, text)
    assert all(name in top for name in ("plan", "validate", "lock", "cache", "lab"))


def test_schema_command_prints_json():
    out = run_cli("schema")
    assert out.returncode == 0 and json.loads(out.stdout)["title"] == "r1fleet fleet file"


def test_probe_ssh_never_reads_the_destination_as_an_option(monkeypatch):
    from r1fleet.probe import facts

    seen = {}

    def fake_run(argv, **kwargs):
        seen["argv"] = argv
        return subprocess.CompletedProcess(argv, 0, "#### r1fleet:uname\nLinux\n", "")

    monkeypatch.setattr(facts.subprocess, "run", fake_run)
    facts.probe_over_ssh("gpu-box.lan", extra_args=("-l", "admin"))
    argv = seen["argv"]
    assert argv[argv.index("--") + 1] == "gpu-box.lan" and argv.index("-l") < argv.index("--")


# ---------------------------------------------------------------- the API key on the controller (audit M2)

KEY = "sk-r1fleet-7d1c0a5e9b3f4e21a8c6d2f0b9e7a1c3"


def test_an_api_key_file_is_a_private_regular_file_of_a_real_key(tmp_path):
    from r1fleet.fleet.config import read_api_key

    key = tmp_path / "box.key"
    key.write_text(KEY + "\n")
    key.chmod(0o600)
    assert read_api_key(str(key), "box", "api_key_source") == KEY.encode() + b"\n"
    key.chmod(0o400)
    assert read_api_key(str(key), "box", "api_key_source") == KEY.encode() + b"\n"
    link = tmp_path / "secrets.key"
    link.symlink_to(key)  # a secret store's link to the file: the file is judged
    assert read_api_key(str(link), "box", "api_key_source") == KEY.encode() + b"\n"
    for mode in (0o644, 0o640, 0o604, 0o700):
        key.chmod(mode)
        with pytest.raises(FleetError, match=rf"host box: field api_key_source: .*mode {mode:04o}; an API key file must be 0600 or stricter.*chmod 600"):
            read_api_key(str(key), "box", "api_key_source")
    key.chmod(0o600)
    key.write_text("hunter2-but-only-31-characters!\n")  # 31: a guess against the lock's fingerprint
    with pytest.raises(FleetError, match=r"not an API key \(one line of 32 to 4096 printable characters\).*umask 077"):
        read_api_key(str(key), "box", "api_key_source")
    key.write_text(KEY[:32] + "\n")
    assert read_api_key(str(key), "box", "api_key_source") == KEY[:32].encode() + b"\n"


@pytest.mark.parametrize("weak, why", [
    ("x" * 40, "only 1 distinct characters"),
    ("ab" * 20, "only 2 distinct characters"),
    ("0123456789abcdef" * 3, "a string of 16 characters repeated"),
    ("password" + "!" * 24 + "0123456789", "one character makes up 24 of its 42"),
])
def test_an_api_key_with_obviously_no_entropy_is_refused_with_the_fix(tmp_path, weak, why):
    from r1fleet.fleet.config import read_api_key

    key = tmp_path / "box.key"
    key.write_text(weak + "\n")
    key.chmod(0o600)
    with pytest.raises(FleetError) as refused:
        read_api_key(str(key), "box", "api_key_source")
    message = str(refused.value)
    assert f"host box: field api_key_source: {key}: not a random API key ({why})" in message
    assert f"openssl rand -hex 32 > {key}" in message and weak not in message


def test_random_keys_of_every_usual_shape_pass_the_entropy_screen(tmp_path):
    from r1fleet.fleet.config import read_api_key

    key = tmp_path / "box.key"
    rng = random.Random(21)
    for _ in range(300):  # openssl rand -hex 32, and the host's own base64 of 32 bytes
        for text in (rng.randbytes(32).hex(), base64.b64encode(rng.randbytes(32)).decode()):
            key.write_text(text + "\n")
            key.chmod(0o600)
            assert read_api_key(str(key), "box", "api_key_source") == text.encode() + b"\n"


def test_an_api_key_that_is_a_fifo_or_a_directory_is_refused_without_waiting(tmp_path):
    from r1fleet.fleet.config import read_api_key

    fifo = tmp_path / "fifo.key"
    os.mkfifo(fifo, 0o600)  # nobody writes to it: reading it would hang the whole run
    with pytest.raises(FleetError, match="not a regular file"):
        read_api_key(str(fifo), "box", "api_key_source")
    (tmp_path / "dir.key").mkdir(mode=0o700)
    with pytest.raises(FleetError, match="not a regular file"):
        read_api_key(str(tmp_path / "dir.key"), "box", "api_key_source")
    with pytest.raises(FleetError, match="cannot read the API key"):
        read_api_key(str(tmp_path / "absent.key"), "box", "api_key_source")


# ---------------------------------------------------------------- the service port and SSH (audit L2)


def test_the_service_port_of_an_opened_host_is_never_its_ssh_port():
    from r1fleet.fleet.config import HostConfig

    assert HostConfig(name="a", address="10.0.0.1", port=22).port == 22  # not opened: nothing filters port 22
    # the backend's default port, when the host's SSH listens there, is found once the backend is planned
    opened = HostConfig(name="a", address="10.0.0.1", ssh_port=8080, listen="10.0.0.1", allow=["10.8.0.0/24"])
    with pytest.raises(FleetError, match=r"host a: field port: port 8080 is this host's ssh_port.*fix: set port: to another"):
        opened.exposure_check("llama.cpp")
    assert opened.exposure_check("ollama") is not None  # 11434: Ollama's usual warning, nothing refused


# ---------------------------------------------------------------- host data overrides (--data, audit L3)


@pytest.mark.parametrize("data, field, words", [
    ({"api_key_file": "/etc/r1fleet/key\n[Service]\nExecStartPre=/bin/id"}, "api_key_file", "absolute path"),
    ({"api_key_file": "etc/r1fleet/api-key"}, "api_key_file", "absolute path"),
    ({"api_key_file": "/etc/r1fleet/../shadow"}, "api_key_file", "no '..'"),
    ({"api_key_file": "/etc/r1fleet/api key"}, "api_key_file", "absolute path"),
    ({"api_key_file": "/etc/shadow"}, "api_key_file", "is not in /etc/r1fleet"),  # security review N7
    ({"ollama_release": {"version": "../../../etc"}}, "ollama_release.version", "not a release version"),
    ({"ollama_release": {"version": "0.32.9/../../x"}}, "ollama_release.version", "0.32.15-standin"),
    ({"ollama_release": {"base_url": "file:///etc"}}, "ollama_release.base_url", "not an http(s) URL"),
    ({"ollama_release": {"base_url": "http://m/{version.__class__}"}}, "ollama_release.base_url", "not an http(s) URL"),
    ({"ollama_release": {"sha256": {"../x": "a" * 64}}}, "ollama_release.sha256", "not an archive's file name"),
    ({"ollama_release": {"sha256": {"ollama-linux-amd64.tgz": "abc"}}}, "ollama_release.sha256", "64 hex digits"),
    ({"mirror": "mirror.lan"}, "mirror", "not an http(s) URL"),
    ({"listen": "10.0.0.1; id"}, "listen", "not an IP address"),
])
def test_host_data_overrides_meet_the_fleet_files_rules(data, field, words):
    """`--data` and an inventory's host data override the fleet entry through the same validators: every value
    that reaches a unit line, a path the deploy removes or a URL is refused naming the host and the field."""
    from r1fleet.fleet.config import HostConfig

    with pytest.raises(FleetError) as refused:
        HostConfig.from_host_data("box", {"r1fleet": {"address": "10.0.0.1", "listen": "10.0.0.1",
                                                     "allow": ["10.0.0.0/24"]}, **data})
    assert f"host box: field {field}: " in str(refused.value) and words in str(refused.value)


def test_good_host_data_overrides_pass():
    from r1fleet.fleet.config import HostConfig

    config = HostConfig.from_host_data("box", {"r1fleet": {"address": "10.0.0.1"}, "api_key_file": "/etc/r1fleet/box.key",
                                               "mirror": "http://10.77.0.1:8088", "ollama_release": {
                                                   "version": "0.32.15-standin", "base_url": "http://m/ollama/v{version}",
                                                   "sha256": {"ollama-linux-amd64.tar.zst": "A" * 64}}})
    assert config.ollama_release.version == "0.32.15-standin" and config.api_key_file == "/etc/r1fleet/box.key"


@pytest.mark.parametrize("value, wanted", [(True, True), ("true", True), ("Yes", True), ("1", True), (False, False),
                                           ("false", False), ("no", False), (None, False)])
def test_remove_models_is_a_plain_yes_or_no(value, wanted):
    from r1fleet.fleet.config import HostConfig

    data = {"r1fleet": {"address": "10.0.0.9"}, **({} if value is None else {"remove_models": value})}
    assert HostConfig.from_host_data("box", data).remove_models is wanted


@pytest.mark.parametrize("value", ["maybe", "ture", "", "2", 2, ["true"]])
def test_a_remove_models_that_is_neither_is_refused_naming_host_field_and_fix(value):
    """A typo never deletes the models, nor silently keeps what the user meant to free."""
    from r1fleet.fleet.config import HostConfig

    with pytest.raises(FleetError) as error:
        HostConfig.from_host_data("box", {"r1fleet": {"address": "10.0.0.9"}, "remove_models": value})
    assert "host box: field remove_models: " in str(error.value) and "is not true or false" in str(error.value)
    assert "(fix: " in str(error.value)
