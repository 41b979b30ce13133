"""The gateway role (roles/gateway/role.py) at the operation level on a @fake host: Debian's HAProxy, the package's
own service kept stopped, the configuration root:haproxy, the client key root's and handed over as a credential, the
firewall loaded before the gateway binds the LAN, and a second run that changes nothing."""

from __future__ import annotations

import facts_for as ff
from deploy_harness import run_role

from r1fleet.fleet.config import GatewaySettings, HostConfig
from r1fleet.operations.stages import apply_roles
from r1fleet.roles.exposure.endpoint import Endpoint
from r1fleet.roles.gateway.decide import CLIENT_KEY_FILE, CONFIG_FILE, MODELS_FILE, RULES_FILE, gateway_plan
from r1fleet.roles.gateway.role import GatewayRole

UNIT = "/etc/systemd/system/r1fleet-gateway.service"
FIREWALL = "/etc/systemd/system/r1fleet-gateway-firewall.service"
M14 = "deepseek-r1:14b-qwen-distill-q4_K_M"
HOST = {"command -v apt-get": "/usr/bin/apt-get", "command -v nft": "/usr/sbin/nft"}


def gateway(listen="192.168.1.30", allow=("192.168.1.0/24",)):
    settings = GatewaySettings(host="h1", listen=listen, allow=list(allow))
    entry = HostConfig(name="h1", address="192.168.1.30")
    endpoints = [Endpoint("h1", "ollama", "127.0.0.1", 11434, M14),
                 Endpoint("h2", "llama.cpp", "192.168.1.31", 8080, M14, lan=True, allow=("192.168.1.0/24",),
                          key_needed=True)]
    return entry, gateway_plan(settings, entry, endpoints, {"h2": "h2-key-" + "x" * 34})


def gateway_role(entry, plan) -> None:
    apply_roles([GatewayRole(entry, plan)])


def deploy(monkeypatch, responses=None, **kwargs):
    return run_role(gateway_role, *gateway(**kwargs), responses={**HOST, **(responses or {})}, monkeypatch=monkeypatch)


def test_the_gateway_runs_debians_haproxy_under_r1fleets_hardened_unit(monkeypatch):
    run = deploy(monkeypatch)
    assert not run.failed
    assert run.installs("HAProxy (the distribution's package)") == {"haproxy", "nftables"}
    # masked before the package is installed, whose own start it would otherwise be
    assert run.ran("Mask haproxy.service", "ln -s /dev/null /etc/systemd/system/haproxy.service")
    assert run.op_names.index(run.op("Mask haproxy.service")) < run.op_names.index(run.op("HAProxy (the distribution's package)"))
    unit = run.uploads[UNIT]
    assert "ExecStart=/usr/sbin/haproxy -W -db -f /etc/r1fleet/gateway/haproxy.cfg" in unit
    assert "ExecStartPre=/usr/sbin/haproxy -c -q -f /etc/r1fleet/gateway/haproxy.cfg" in unit
    assert "User=haproxy" in unit and "NoNewPrivileges=yes" in unit and "PrivateDevices=yes" in unit
    # the client key stays root's; HAProxy reads its private copy
    assert f"LoadCredential=gateway-key:{CLIENT_KEY_FILE}" in unit
    assert run.ran("Gateway client key (generated on the host, once)", "head -c 32 /dev/urandom")
    config = run.uploads[CONFIG_FILE]
    assert '-m str -f "${CREDENTIALS_DIRECTORY}/gateway-key"' in config
    assert "server h1 127.0.0.1:11434 check" in config and "server h2 192.168.1.31:8080 check" in config
    assert json_ids(run.uploads[MODELS_FILE]) == [M14]
    # haproxy.cfg holds the hosts' keys: readable by HAProxy's group, nobody else
    assert run.ran("HAProxy configuration", "chmod 640 /etc/r1fleet/gateway/haproxy.cfg")
    assert run.ran("HAProxy configuration", "chown root:haproxy /etc/r1fleet/gateway/haproxy.cfg")


def json_ids(text: str) -> list[str]:
    import json

    return [m["id"] for m in json.loads(text)["data"]]


def test_the_firewall_admits_the_allow_list_and_is_up_before_the_gateway(monkeypatch):
    run = deploy(monkeypatch)
    rules = run.uploads[RULES_FILE]
    assert "table inet r1fleet-gateway {" in rules and "table inet r1fleet {" not in rules
    assert "elements = { 192.168.1.0/24 }" in rules and "tcp dport 8000 counter drop" in rules
    assert "Requires=r1fleet-gateway-firewall.service" in run.uploads[UNIT]
    assert "ExecStop=/usr/sbin/nft delete table inet r1fleet-gateway" in run.uploads[FIREWALL]
    firewall_up = run.commands.index(next(c for c in run.commands if "systemctl start r1fleet-gateway-firewall" in c))
    gateway_up = run.commands.index(next(c for c in run.commands if "systemctl start r1fleet-gateway.service" in c))
    assert firewall_up < gateway_up
    assert run.ran("Health of r1fleet-gateway.service", "http://192.168.1.30:8000/health")


def test_a_gateway_on_loopback_has_no_firewall(monkeypatch):
    run = deploy(monkeypatch, listen=None, allow=())
    assert RULES_FILE not in run.uploads and FIREWALL not in run.uploads
    assert "Requires=" not in run.uploads[UNIT] and run.installs("HAProxy (the distribution's package)") == {"haproxy"}
    assert run.ran("Health of r1fleet-gateway.service", "http://127.0.0.1:8000/health")


def test_a_host_without_apt_is_refused_naming_the_field(monkeypatch):
    run = deploy(monkeypatch, responses={"command -v apt-get": "", "exit 1": {"success": False}})
    assert run.failed and any("field gateway.host" in c and "Debian and Ubuntu only" in c for c in run.commands)


def haproxys(path: str, text: str) -> dict:
    """A file of the gateway as the deploy leaves it: root:haproxy 0640, with this content."""
    return {**ff.file_content(path, text), **ff.file_exists(path, group="haproxy", mode="-rw-r-----")}


def loaded(rules: str) -> list[str]:
    """`nft list table inet r1fleet-gateway` once `rules` (the rendered rules file) are loaded: the table's block."""
    block = rules[rules.rindex("table inet r1fleet-gateway {"):]
    return [line.replace("counter drop", "counter packets 0 bytes 0 drop") for line in block.splitlines()]


def converged(first) -> dict:
    return {
        **HOST,
        **ff.directory("/etc/r1fleet/gateway", "root", "haproxy", "drwxr-x---"),
        **ff.directory("/etc/systemd/system", "root", "root", "drwxr-xr-x"),
        **{k: v for path, text in first.uploads.items() for k, v in ff.file_content(path, text).items()},
        **haproxys(CONFIG_FILE, first.uploads[CONFIG_FILE]),
        **haproxys(MODELS_FILE, first.uploads[MODELS_FILE]),
        **ff.file_content(RULES_FILE, first.uploads[RULES_FILE], mode="-rw-------"),
        **ff.file_exists(CLIENT_KEY_FILE, mode="-rw-------"),
        **ff.running("r1fleet-gateway-firewall.service"),
        **ff.running("r1fleet-gateway.service"),
        "nft list table inet r1fleet-gateway": loaded(first.uploads[RULES_FILE]),
        **ff.link("/etc/systemd/system/haproxy.service", "/dev/null"),
        "dpkg -l": ff.dpkg_installed("haproxy", "nftables"),
    }


def test_a_second_run_on_a_converged_gateway_changes_nothing(monkeypatch):
    first = deploy(monkeypatch)
    again = deploy(monkeypatch, responses=converged(first))
    assert not again.failed and again.changed == [], again.changed
    assert again.never_ran("systemctl restart") and again.never_ran("systemctl reload")


def test_a_gateway_table_gone_or_from_other_rules_is_loaded_again(monkeypatch):
    first = deploy(monkeypatch)
    for table in ("", loaded(first.uploads[RULES_FILE].replace("r1fleet-rules ", "r1fleet-rules 0"))):
        again = deploy(monkeypatch, responses={**converged(first), "nft list table inet r1fleet-gateway": table})
        assert again.ran("Reload the gateway firewall unless it holds the planned rules",
                         "systemctl reload r1fleet-gateway-firewall.service"), repr(table)[:80]
