"""Every template r1fleet writes on a host, rendered as pyinfra's files.template renders it, with a hostile value
in each field: either the value is refused (r1fleet/render/formats.py), or the file means what it meant with a
benign value — the same directives, checked by the format's own tool (`systemd-analyze verify`, `nft -c`) or
parser (plistlib for launchd's property lists)."""

from __future__ import annotations

import os
import plistlib
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from pyinfra.api.util import get_template

from r1fleet.fleet.config import HostConfig
from r1fleet.records import HostPlan
from r1fleet.render.formats import RenderError, nft_settings, plist_settings, unit_settings
from r1fleet.render.systemd_unit import unit_context
from r1fleet.roles.ollama.decide import preload_unit_context

ROOT = Path(__file__).resolve().parents[2] / "r1fleet"
SERVICE = ROOT / "operations/templates/r1fleet-service.j2"
FIREWALL_UNIT = ROOT / "operations/templates/r1fleet-firewall.service.j2"
EXPOSURE_NFT = ROOT / "roles/exposure/templates/nftables.conf.j2"
RPC_NFT = ROOT / "roles/rpc_worker/templates/nftables.conf.j2"
PRELOAD_UNIT = ROOT / "roles/ollama/templates/r1fleet-ollama-preload.service.j2"
PLISTS = sorted((ROOT / "roles/macos/templates").glob("*.plist.j2"))

INJECTIONS = [
    "x\n[Service]\nExecStartPre=+/bin/sh -c id",   # a new line, a new section, a root command
    "x\rExecStartPre=+/bin/sh",
    "x%n%H",                                      # systemd specifiers
    'x" ; drop ; #',                              # nft: a new statement, a comment
    "x</string><key>UserName</key><string>root",  # a plist key of its own
]


def render(template: Path, settings: dict, **context) -> str:
    return get_template(str(template), jinja_env_kwargs=dict(settings)).render(**context)


def directives(text: str) -> list[str]:
    """The unit's sections and directive names, in order (comments and values left out)."""
    return [line.split("=", 1)[0] for line in text.splitlines() if line and not line.startswith("#")]


def verify_unit(tmp_path: Path, text: str) -> None:
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed")
    unit = tmp_path / "r1fleet-test.service"
    unit.write_text(text)
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert result.returncode == 0 and "r1fleet-test.service" not in result.stderr, result.stderr


def service_context(**hostile) -> dict:
    plan = HostPlan(host="h1", model="deepseek-r1-distill-qwen-7b", backend="ollama", placement="cpu", fits=True,
                    context_length=8192)
    settings = HostConfig(name="h1", address="10.0.0.1")
    fields = {"description": "r1fleet Ollama (model)", "user": "ollama", "read_write_paths": ["/var/lib/ollama"],
              "credential": "api-key:/etc/r1fleet/api-key", "requires": ["r1fleet-firewall.service"],
              "wants": ["r1fleet-ollama-preload.service"],
              "exec_start": ["/bin/true", "serve"], "environment": {"OLLAMA_HOST": "127.0.0.1:11434"}}
    fields.update(hostile)
    return unit_context(plan, settings, restrict_ip=True, **fields)


@pytest.mark.parametrize("field", ["description", "user", "read_write_paths", "credential", "requires", "wants"])
@pytest.mark.parametrize("value", INJECTIONS)
def test_a_service_unit_field_never_adds_a_line(tmp_path, field, value):
    verify_unit(tmp_path, render(SERVICE, unit_settings(), svc=service_context(requires=[])))
    benign = render(SERVICE, unit_settings(), svc=service_context())
    hostile = {field: [value] if field in ("read_write_paths", "requires", "wants") else value}
    try:
        text = render(SERVICE, unit_settings(), svc=service_context(**hostile))
    except RenderError:
        assert any(ord(c) < 32 for c in value)  # refused only for what a unit line cannot hold
        return
    assert directives(text) == directives(benign)
    if field == "description":  # a specifier is doubled: systemd shows the text as written
        assert f"Description={value.replace('%', '%%')}" in text


@pytest.mark.parametrize("value", INJECTIONS)
def test_command_lines_and_environment_are_words_systemd_reads_back(tmp_path, value):
    """Exec and Environment lines are escaped word by word (r1fleet/render/systemd_unit.py), then kept as they are."""
    if any(ord(c) < 32 for c in value):
        value = value.replace("\n", " ").replace("\r", " ")
    text = render(SERVICE, unit_settings(),
                  svc=service_context(exec_start=["/bin/true", value], environment={"OLLAMA_X": value}, requires=[]))
    assert directives(text) == directives(render(SERVICE, unit_settings(), svc=service_context(requires=[])))
    verify_unit(tmp_path, text)


@pytest.mark.parametrize("value", INJECTIONS)
def test_the_preload_unit_never_adds_a_line(tmp_path, value):
    """The model's tag is the one value from outside in the Ollama preload unit (in its request's body)."""
    def text(tag: str) -> str:
        plan = HostPlan(host="h1", model="deepseek-r1-distill-qwen-7b", ollama_tag=tag, backend="ollama",
                        placement="cpu", fits=True, context_length=8192)
        return render(PRELOAD_UNIT, unit_settings(), svc=preload_unit_context(plan, HostConfig(name="h1", address="10.0.0.1")))
    benign = text("deepseek-r1:7b")
    (tmp_path / "r1fleet-ollama.service").write_text("[Service]\nExecStart=/bin/true\n")  # the server it binds to
    verify_unit(tmp_path, benign)
    hostile = text(value.replace("\n", " ").replace("\r", " "))
    assert directives(hostile) == directives(benign)
    verify_unit(tmp_path, hostile)


@pytest.mark.parametrize("value", INJECTIONS)
def test_the_firewall_unit_never_adds_a_line(tmp_path, value):
    def context(admitted: str) -> dict:
        return {"port": 8080, "rules_path": "/etc/r1fleet/nftables.conf", "nft": "/usr/sbin/nft",
                "service_unit": "r1fleet-llama-server.service", "table": "r1fleet", "admitted": admitted}
    benign = render(FIREWALL_UNIT, unit_settings(whitespace=False), **context("the allow-list"))
    try:
        text = render(FIREWALL_UNIT, unit_settings(whitespace=False), **context(value))
    except RenderError:
        assert any(ord(c) < 32 for c in value)
        return
    assert directives(text) == directives(benign)


def nft_check(tmp_path: Path, text: str) -> None:
    if not shutil.which("nft") or os.geteuid() != 0:
        pytest.skip("nft -c needs the nft tool and root")
    rules = tmp_path / "rules.nft"
    rules.write_text(text)
    result = subprocess.run(["nft", "-c", "-f", str(rules)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_nftables_rules_are_valid_and_refuse_anything_but_addresses(tmp_path):
    exposure = {"port": 8080, "allow4": ["192.168.1.0/24", "10.0.0.5"], "allow6": ["fd00::/64"], "service": "llama.cpp",
                "fingerprint": "0123456789abcdef"}
    nft_check(tmp_path, render(EXPOSURE_NFT, nft_settings(whitespace=False), **exposure))
    rpc = {"table": "r1fleet_rpc", "pool": "big", "head": "192.168.1.31", "bind": "192.168.1.32", "port": 50052,
           "family": "ip", "fingerprint": "0123456789abcdef"}
    nft_check(tmp_path, render(RPC_NFT, nft_settings(), **rpc))
    for value in INJECTIONS:
        for field in ("allow4", "service", "fingerprint"):
            with pytest.raises(RenderError, match="nftables"):
                render(EXPOSURE_NFT, nft_settings(whitespace=False),
                       **{**exposure, field: [value] if field == "allow4" else value})
        for field in ("pool", "head", "bind", "table"):
            with pytest.raises(RenderError, match="nftables"):
                render(RPC_NFT, nft_settings(), **{**rpc, field: value})


@pytest.mark.parametrize("template", PLISTS, ids=lambda p: p.name)
@pytest.mark.parametrize("value", INJECTIONS)
def test_a_property_list_holds_a_hostile_value_as_text(template, value):
    fields = {"label": "com.r1fleet.x", "binary": "/usr/local/bin/ollama", "service_user": "_r1ollama",
              "home": "/var/lib/ollama", "log_file": "/var/log/r1.log", "script": "curl -fsS x",
              "environment": {"OLLAMA_HOST": "127.0.0.1:11434"}, "interval_s": 60, "wired_limit_mb": 100,
              "reserve_mb": 10, "total_mb": 110}
    benign = plistlib.loads(render(template, plist_settings(), **fields).encode())
    for field in ("label", "binary", "home", "log_file", "script"):
        try:
            text = render(template, plist_settings(), **{**fields, field: value})
        except RenderError:
            assert any(ord(c) < 32 for c in value)
            continue
        parsed = plistlib.loads(text.encode())
        assert sorted(parsed) == sorted(benign)  # no key of its own
        assert value in re.sub(r"\s+", " ", repr(parsed)) or value not in text  # the value is text, not markup
