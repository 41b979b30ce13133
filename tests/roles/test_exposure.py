"""roles/exposure.py at the operation level (@fake connector), plus its validation."""

from __future__ import annotations


import logging
import os
import re
import shutil
import subprocess

import pytest
from facts_for import directory, file_content
from facts_for import running as ff_running

from deploy_harness import exposure_role, run_role
from r1fleet.fleet.config import HostConfig
from r1fleet.errors import FleetError
from r1fleet.records import HostPlan
from r1fleet.roles.exposure import role as exposure

OLLAMA = HostPlan(host="h1", model="r1-8b", backend="ollama")
LLAMA = HostPlan(host="h1", model="r1-70b", backend="llama.cpp")
HAS_NFT = {"command -v nft": "/usr/sbin/nft"}


def entry(listen=None, allow=(), port=None, **settings):
    """A host's config as the deploy builds it from pyinfra host data, through HostConfig's validators (the one
    place listen and allow are checked)."""
    fleet_entry = {"address": "10.77.0.11", "listen": listen, "allow": list(allow), "port": port, **settings}
    return HostConfig.from_host_data("h1", {"r1fleet": {k: v for k, v in fleet_entry.items() if v is not None}})


def test_listen_without_allow_is_refused_naming_host_and_field():
    with pytest.raises(FleetError) as error:
        entry("192.168.1.20")
    assert "host h1" in str(error.value) and "field allow" in str(error.value) and "0.0.0.0/0" in str(error.value)
    with pytest.raises(FleetError, match=r"host h1: field allow: 'not-a-net' is not a network.*\(fix: "):
        entry("192.168.1.20", ["10.0.0.0/8", "not-a-net"])
    with pytest.raises(FleetError, match=r"host h1: field listen: 'lan' is not an IP address.*\(fix: "):
        entry("lan", ["10.0.0.0/8"])
    opened = exposure.exposure_for(entry("0.0.0.0", ["0.0.0.0/0"]), LLAMA)  # keyed: open on purpose
    assert opened.allow4 == ("0.0.0.0/0",) and opened.port == 8080


def test_an_ollama_open_beyond_private_ranges_needs_an_explicit_opt_in():
    """Ollama has no authentication: pull/create/delete for the whole internet only when asked for (M7)."""
    with pytest.raises(FleetError) as error:
        exposure.exposure_for(entry("0.0.0.0", ["0.0.0.0/0"]), OLLAMA)
    assert "host h1" in str(error.value) and "field allow" in str(error.value) and "ollama_public: true" in str(error.value)
    wide = entry("0.0.0.0", ["0.0.0.0/0"], ollama_public=True)
    assert exposure.exposure_for(wide, OLLAMA).allow4 == ("0.0.0.0/0",)
    assert exposure.exposure_for(entry("192.168.1.20", ["192.168.1.0/24", "fd00::/8"]), OLLAMA).exposed
    # one rule for the plan and the deploy: it depends on the planned backend only
    assert entry("0.0.0.0", ["0.0.0.0/0"]).exposure_check("llama.cpp") is None
    assert "no authentication" in entry("192.168.1.20", ["192.168.1.0/24"]).exposure_check("ollama")
    assert wide.exposure_check("ollama") and entry().exposure_check("ollama") is None
    from r1fleet.fleet.config import ollama_exposure_warning

    assert "no authentication" in ollama_exposure_warning("192.168.1.20", ["192.168.1.0/24"])
    assert ollama_exposure_warning(None, []) is None


def test_exposure_on_renders_rules_unit_and_keeps_key_out_of_everything(monkeypatch):
    run = run_role(exposure_role, entry("10.77.0.11", ["10.77.0.1/32", "fd00::/64"]), LLAMA,
                   responses=HAS_NFT, base_responses=False, monkeypatch=monkeypatch)
    assert not run.failed
    rules = run.uploads[exposure.RULES_FILE]
    assert "elements = { 10.77.0.1/32 }" in rules and "elements = { fd00::/64 }" in rules
    assert "ip saddr @allow4 tcp dport 8080 accept" in rules and "tcp dport 8080 counter drop" in rules
    assert rules.index("accept") < rules.index("drop")
    unit = run.uploads[exposure.FIREWALL_UNIT_PATH]
    assert "ExecStart=/usr/sbin/nft -f /etc/r1fleet/nftables.conf" in unit
    assert run.ran("Load the firewall rules", "systemctl enable r1fleet-firewall.service")
    assert run.ran("Load the firewall rules", "systemctl start r1fleet-firewall.service")
    # the key is made by the host's shell, root-only, and no command or upload carries a key value
    key_cmd = next(c for c in run.commands if "/dev/urandom" in c)
    assert "umask 077" in key_cmd and "chmod 0600" in key_cmd and "base64 > /etc/r1fleet/api-key.tmp" in key_cmd
    assert run.ran("API key root-only", "chmod 600 /etc/r1fleet/api-key")
    assert not any("--api-key " in c for c in run.commands)
    assert all("api-key" not in text for text in run.uploads.values())


SECRET = "sk-r1fleet-7d1c0a5e9b3f4e21a8c6d2f0b9e7a1c3"
OLD_SECRET = "sk-r1fleet-old-0000aaaa1111bbbb2222cccc3333"


def key_source(tmp_path, text: str = SECRET, mode: int = 0o600):
    path = tmp_path / "box.key"
    path.write_text(text + "\n")
    os.chmod(path, mode)
    return str(path)


def test_the_key_from_the_controller_travels_on_stdin_and_never_shows(monkeypatch, tmp_path, capsys, caplog):
    """api_key_source (audit M2): at any verbosity and with --diff the key is in no command, upload, operation
    name or output; it reaches a root shell on its stdin, which writes it through a 0600 mktemp file beside the
    key (never /tmp, never the SSH user's file), and renames it over the host's old key without reading it."""
    caplog.set_level(logging.DEBUG)
    settings = entry("10.77.0.11", ["10.77.0.1/32"], api_key_source=key_source(tmp_path))
    # the host holds an old key, which files.put's --diff used to print
    responses = {**HAS_NFT, **file_content("/etc/r1fleet/api-key", OLD_SECRET + "\n", "-rw-------"),
                 "cat /etc/r1fleet/api-key": OLD_SECRET}
    run = run_role(exposure_role, settings, LLAMA, responses=responses, base_responses=False,
                   config={"DIFF": True}, monkeypatch=monkeypatch)
    assert not run.failed
    out = capsys.readouterr()
    shown = [*run.commands, *run.uploads.values(), *run.op_names, out.out, out.err, caplog.text]
    for secret in (SECRET, OLD_SECRET):
        assert not any(secret in text or secret[-16:] in text for text in shown)
    (command,) = [c for c in run.op_commands("llama-server API key (from api_key_source on the controller)") if "mktemp" in c]
    assert run.stdin[command] == SECRET + "\n"
    assert command.startswith("umask 077 && ")
    assert 'tmp=$(mktemp /etc/r1fleet/.api-key.XXXXXX) && { { cat > "$tmp"' in command
    assert command.index('chmod 0600 "$tmp"') < command.index('mv -f "$tmp" /etc/r1fleet/api-key')
    assert "/tmp" not in command and run.never_ran("cat /etc/r1fleet/api-key")
    assert "/etc/r1fleet/api-key" not in run.uploads
    # the host holds this key already: nothing is written
    same = run_role(exposure_role, settings, LLAMA, base_responses=False, monkeypatch=monkeypatch,
                    responses={**HAS_NFT, **file_content("/etc/r1fleet/api-key", SECRET + "\n", "-rw-------")})
    assert same.never_ran("mktemp") and not same.stdin


def test_a_key_source_that_turned_bad_fails_the_host_with_the_reason(monkeypatch, tmp_path):
    """Read again when the operation runs: a key file that others can read by then fails this host alone."""
    source = key_source(tmp_path)
    settings = entry("10.77.0.11", ["10.77.0.1/32"], api_key_source=source)
    os.chmod(source, 0o644)
    run = run_role(exposure_role, settings, LLAMA, responses={**HAS_NFT, "exit 1": {"success": False}},
                   base_responses=False, monkeypatch=monkeypatch)
    assert run.failed and run.ran("llama-server API key (from api_key_source", "chmod 600")
    assert not run.stdin


def test_existing_key_is_never_regenerated(monkeypatch):
    responses = {**HAS_NFT, "/etc/r1fleet/api-key": {"stdout": ["user=root group=root mode=-rw------- atime=1 mtime=1 ctime=1 size=45 '/etc/r1fleet/api-key'"]}}
    run = run_role(exposure_role, entry("10.77.0.11", ["10.77.0.1/32"]), LLAMA, responses=responses,
                   base_responses=False, monkeypatch=monkeypatch)
    assert run.never_ran("/dev/urandom")


def test_ollama_exposed_gets_rules_but_no_api_key(monkeypatch):
    run = run_role(exposure_role, entry("10.77.0.11", ["10.77.0.0/24"]), OLLAMA, responses=HAS_NFT,
                   base_responses=False, monkeypatch=monkeypatch)
    assert "tcp dport 11434 counter drop" in run.uploads[exposure.RULES_FILE]
    assert run.never_ran("/dev/urandom")


# `ufw status numbered` as ufw 0.36.2 prints it (captured from Debian 12's ufw in tests/lab/test_ufw.py)
UFW_OURS_FIRST = """2
[ 1] 11434/tcp                  ALLOW IN    10.77.0.1/32               # r1fleet
[ 2] 11434/tcp                  DENY IN     Anywhere                   # r1fleet
[ 3] 11434                      ALLOW IN    Anywhere
[ 4] 11434/tcp (v6)             DENY IN     Anywhere (v6)              # r1fleet
[ 5] 11434 (v6)                 ALLOW IN    Anywhere (v6)
"""
UFW_OURS_BELOW = """2
[ 1] 11434                      ALLOW IN    Anywhere
[ 2] 11434/tcp                  ALLOW IN    10.77.0.1/32               # r1fleet
[ 3] 11434/tcp                  DENY IN     Anywhere                   # r1fleet
[ 4] 11434/tcp (v6)             DENY IN     Anywhere (v6)              # r1fleet
"""
# `ufw show added` of the same rules (ufw 0.36.2 lists each as the command that adds it, comment quoted)
UFW_ADDED = ["ufw deny proto tcp to 10.77.0.11 port 11434 comment 'r1fleet'",
             "ufw allow from 10.77.0.1/32 to 10.77.0.11 port 11434 proto tcp comment 'r1fleet'"]
# The UfwRules fact's command, and nothing else (the count, the applied record, `show added`, `status numbered`)
UFW_FACT = re.compile(r"ufw show added 2>/dev/null \| grep -c .*cmp -s /etc/r1fleet/ufw-rules /etc/r1fleet/ufw-rules\.applied")


def ufw_answer(numbered: str, applied: bool = True, added: list[str] = UFW_ADDED) -> list[str]:
    """What the UfwRules fact prints on a host whose ufw holds `numbered` (first line: r1fleet's count)."""
    count, *rules = numbered.splitlines()
    return [count, "applied" if applied else "pending", *(f"added {line}" for line in added), *rules]


def test_ufw_rule_families_and_order():
    assert exposure.ufw_rules_come_first(UFW_OURS_FIRST.splitlines()[1:])
    assert not exposure.ufw_rules_come_first(UFW_OURS_BELOW.splitlines()[1:])
    # a v4 port range is not IPv6; an explicit v6 source is
    assert exposure.ufw_rules_come_first(["[ 1] 11434/tcp ALLOW IN fd00::/8 # r1fleet", "[ 2] 6000:6007/tcp ALLOW IN Anywhere",
                                          "[ 3] 11434/tcp DENY IN Anywhere # r1fleet"]) is False
    assert exposure.ufw_rules_come_first(["[ 1] 6000:6007/tcp ALLOW IN Anywhere", "[ 2] 11434/tcp ALLOW IN fd00::/8 # r1fleet"])
    # an IPv4 listen address admits IPv4 networks only; "::" admits both
    v4 = exposure.ufw_commands(exposure.Exposure("10.0.0.5", 8080, ("10.0.0.0/24",), ("fd00::/8",)))
    assert not any("fd00" in c for c in v4)
    both = exposure.ufw_commands(exposure.Exposure("::", 8080, ("10.0.0.0/24",), ("fd00::/8",)))
    assert both[0] == "ufw prepend deny 8080/tcp comment r1fleet" and len(both) == 3


def test_ufw_active_gets_ufw_rules_instead(monkeypatch):
    responses = {"ufw status": "Status: active", **HAS_NFT}
    run = run_role(exposure_role, entry("10.77.0.11", ["10.77.0.1/32"]), OLLAMA, responses=responses,
                   base_responses=False, monkeypatch=monkeypatch)
    rules = run.uploads[exposure.UFW_RULES_FILE].splitlines()
    # prepended, deny first: the allow ends above the deny and above the host's own rules (L6)
    assert rules == ["ufw prepend deny proto tcp to 10.77.0.11 port 11434 comment r1fleet",
                     "ufw prepend allow from 10.77.0.1/32 to 10.77.0.11 port 11434 proto tcp comment r1fleet"]
    assert exposure.RULES_FILE not in run.uploads
    # failing closed (audit M9): a deny for the port to everyone first, then our old rules out and the file's in,
    # the count checked, and only then the hold out and the file recorded as applied
    apply = "Apply the ufw rules unless ufw holds them in full"
    order = [exposure.UFW_APPLIED_FILE, "ufw prepend deny proto tcp from any port 1:65535 to any port 11434 comment r1fleet-hold", exposure.UFW_DELETE_OURS,
             f"sh -e {exposure.UFW_RULES_FILE}", "ufw holds fewer than r1fleet", exposure.UFW_DELETE_HOLD,
             f"cp {exposure.UFW_RULES_FILE} {exposure.UFW_APPLIED_FILE}"]
    commands = [c for c in run.op_commands(apply) if not UFW_FACT.search(c)]  # its commands, not the fact it read
    assert [next(i for i, c in enumerate(commands) if text in c) for text in order] == list(range(len(order)))
    # unchanged rules on a second run: nothing applied again
    converged = {**file_content(exposure.UFW_RULES_FILE, "\n".join(rules) + "\n", "-rw-------"),
                 **directory(exposure.KEY_DIR, "root", "root", "drwx------")}
    again = run_role(exposure_role, entry("10.77.0.11", ["10.77.0.1/32"]), OLLAMA, base_responses=False,
                     monkeypatch=monkeypatch, responses={UFW_FACT: ufw_answer(UFW_OURS_FIRST), **responses, **converged})
    assert again.never_ran("ufw --force delete") and again.never_ran("sh -e") and again.never_ran("r1fleet-hold")
    # a rule the user inserted above ours later: ours are put back on top
    below = run_role(exposure_role, entry("10.77.0.11", ["10.77.0.1/32"]), OLLAMA, base_responses=False,
                     monkeypatch=monkeypatch, responses={UFW_FACT: ufw_answer(UFW_OURS_BELOW), **responses, **converged})
    assert below.ran(apply, f"sh -e {exposure.UFW_RULES_FILE}")
    # the same file, but ufw lost our rules (a `ufw reset`): applied again (audit M9)
    lost = run_role(exposure_role, entry("10.77.0.11", ["10.77.0.1/32"]), OLLAMA, base_responses=False,
                    monkeypatch=monkeypatch, responses={UFW_FACT: ["0", "applied"], **responses, **converged})
    assert lost.ran(apply, f"sh -e {exposure.UFW_RULES_FILE}")
    # every rule there and first, but the file was never recorded applied (a run cut after writing it, or while
    # applying it): the file is what ufw must hold, so it is applied (audit M9)
    cut = run_role(exposure_role, entry("10.77.0.11", ["10.77.0.1/32"]), OLLAMA, base_responses=False,
                   monkeypatch=monkeypatch, responses={UFW_FACT: ufw_answer(UFW_OURS_FIRST, applied=False),
                                                       **responses, **converged})
    assert cut.ran(apply, f"sh -e {exposure.UFW_RULES_FILE}")
    # a hold left by a run cut while applying comes before our rules: applied again, the hold taken out
    held = UFW_OURS_FIRST.replace("2\n", "2\n[ 0] 11434/tcp                  DENY IN     1:65535/tcp                # r1fleet-hold\n", 1)
    again_held = run_role(exposure_role, entry("10.77.0.11", ["10.77.0.1/32"]), OLLAMA, base_responses=False,
                          monkeypatch=monkeypatch, responses={UFW_FACT: ufw_answer(held), **responses, **converged})
    assert again_held.ran(apply, exposure.UFW_DELETE_HOLD)


def test_a_ufw_port_change_stops_the_service_before_its_old_port_leaves_the_rules(monkeypatch):
    """Audit M9: ufw's rules move from port 11434 to 11500 while the service still listens on 11434; it is stopped
    first (the backend's activate starts it on the new port), so the old port is never open without its rules."""
    responses = {UFW_FACT: ufw_answer(UFW_OURS_FIRST), "ufw status": "Status: active", **HAS_NFT,
                 **ff_running("r1fleet-ollama.service")}
    moved = run_role(exposure_role, entry("10.77.0.11", ["10.77.0.1/32"], port=11500), OLLAMA, responses=responses,
                     base_responses=False, monkeypatch=monkeypatch)
    stop = "Stop r1fleet-ollama.service while its filter changes (port 11500 replaces it in the ufw rules)"
    assert moved.ran(stop, "systemctl stop r1fleet-ollama.service")
    assert moved.op_names.index(f"Exposure | {stop}") < moved.op_names.index(
        "Exposure | Apply the ufw rules unless ufw holds them in full")
    same = run_role(exposure_role, entry("10.77.0.11", ["10.77.0.1/32", "10.77.0.2/32"]), OLLAMA, responses=responses,
                    base_responses=False, monkeypatch=monkeypatch)
    assert same.never_ran("systemctl stop")  # another allow-list, the same port: the rules replace, no stop


def test_exposure_off_opens_nothing_and_removes_an_old_table(monkeypatch):
    responses = {"nft list table inet r1fleet": "present", **HAS_NFT}
    run = run_role(exposure_role, entry(), OLLAMA, responses=responses, base_responses=False, monkeypatch=monkeypatch)
    assert run.ran("Remove the r1fleet nftables table", "nft delete table inet r1fleet")
    assert run.uploads == {} and run.never_ran("/dev/urandom")
    clean = run_role(exposure_role, entry(), OLLAMA, responses=HAS_NFT, base_responses=False, monkeypatch=monkeypatch)
    assert clean.never_ran("nft delete") and clean.uploads == {}


def test_invalid_settings_fail_only_that_host_with_the_message(monkeypatch):
    # valid settings, refused under this plan: an Ollama open to every network
    run = run_role(exposure_role, entry("0.0.0.0", ["0.0.0.0/0"]), OLLAMA, responses={"exit 1": {"success": False}},
                   base_responses=False, monkeypatch=monkeypatch)
    assert run.failed and run.ran("Refuse exposure settings", "field allow")


def test_overlapping_allow_entries_are_merged():
    """nftables refuses overlapping intervals in a set; the list reaching it is merged first (H2)."""
    nested = exposure.exposure_for(entry("192.168.1.20", ["192.168.1.0/24", "192.168.1.7", "10.1.0.0/16", "10.0.0.0/8"]), OLLAMA)
    assert nested.allow4 == ("10.0.0.0/8", "192.168.1.0/24")
    adjacent = exposure.exposure_for(entry("192.168.1.20", ["192.168.0.0/24", "192.168.1.0/24", "fd00::1", "fd00::/64"]), OLLAMA)
    assert adjacent.allow4 == ("192.168.0.0/23",) and adjacent.allow6 == ("fd00::/64",)


def test_service_requires_the_firewall_and_a_removed_table_is_restored(monkeypatch):
    """The service unit requires the firewall unit (L7); a table another `flush ruleset` removed is
    reloaded from the host's live state, not from what changed in this run (H4)."""
    run = run_role(exposure_role, entry("10.77.0.11", ["10.77.0.1/32"]), OLLAMA, responses=HAS_NFT,
                   base_responses=False, monkeypatch=monkeypatch)
    drop_in = run.uploads[exposure.firewall_drop_in("ollama")]
    assert "Requires=r1fleet-firewall.service" in drop_in and "After=r1fleet-firewall.service" in drop_in
    unit = run.uploads[exposure.FIREWALL_UNIT_PATH]
    assert "After=local-fs.target nftables.service" in unit and "ReloadPropagatedFrom=nftables.service" in unit
    assert "PartOf=nftables.service" in unit
    load = "Reload the firewall unless it holds the planned rules"
    assert run.ran(load, "systemctl reload r1fleet-firewall.service")  # no table on the host yet
    # A converged host: same files, and nftables holds the table those rules make; reloaded only when it does not.
    converged = {**HAS_NFT, **{k: v for path, text in run.uploads.items() for k, v in file_content(path, text).items()}}
    rules = run.uploads[exposure.RULES_FILE]
    intact = run_role(exposure_role, entry("10.77.0.11", ["10.77.0.1/32"]), OLLAMA,
                      responses={NFT_RULES: nft_listing(rules), **converged}, base_responses=False,
                      monkeypatch=monkeypatch)
    assert intact.never_ran("systemctl reload") and intact.never_ran("systemctl stop")
    flushed = run_role(exposure_role, entry("10.77.0.11", ["10.77.0.1/32"]), OLLAMA, responses=converged,
                       base_responses=False, monkeypatch=monkeypatch)
    assert flushed.ran(load, "systemctl reload r1fleet-firewall.service")
    # Audit M9: the file is the planned one (an earlier run wrote it and was cut before its reload), but the table
    # nftables holds was loaded from another allow-list: reloaded, though nothing changed in this run.
    wider = run_role(exposure_role, entry("10.77.0.11", ["10.77.0.0/16"]), OLLAMA, responses=HAS_NFT,
                     base_responses=False, monkeypatch=monkeypatch).uploads[exposure.RULES_FILE]
    stale = run_role(exposure_role, entry("10.77.0.11", ["10.77.0.1/32"]), OLLAMA,
                     responses={NFT_RULES: nft_listing(wider), **converged}, base_responses=False, monkeypatch=monkeypatch)
    assert stale.ran(load, "systemctl reload r1fleet-firewall.service") and stale.never_ran("systemctl stop")


NFT_RULES = re.compile(r"nft list table inet r1fleet 2>/dev/null \|\| true")  # the NftRules fact, not NftTable's


def nft_listing(rules: str) -> list[str]:
    """What `nft list table inet r1fleet` prints once `rules` (a rendered rules file) are loaded: the table's block,
    its drop rule with nft's counter values and the comment."""
    block = rules[rules.index("table inet r1fleet {"):]
    return [line.replace("counter drop", "counter packets 0 bytes 0 drop") for line in block.splitlines()]


def test_a_port_change_stops_the_service_before_the_old_port_leaves_the_table(monkeypatch):
    """Audit M9: the table moves from port 11434 to 11500 while the service still listens on 11434 (it restarts
    in the backend's activate, after this); it is stopped first, so the old port is never open unfiltered."""
    old = run_role(exposure_role, entry("10.77.0.11", ["10.77.0.1/32"]), OLLAMA, responses=HAS_NFT,
                   base_responses=False, monkeypatch=monkeypatch).uploads[exposure.RULES_FILE]
    responses = {NFT_RULES: nft_listing(old), **HAS_NFT, **ff_running("r1fleet-ollama.service")}
    moved = run_role(exposure_role, entry("10.77.0.11", ["10.77.0.1/32"], port=11500), OLLAMA, responses=responses,
                     base_responses=False, monkeypatch=monkeypatch)
    stop = "Stop r1fleet-ollama.service while its filter changes (port 11500 replaces it in the firewall)"
    assert moved.ran(stop, "systemctl stop r1fleet-ollama.service")
    reload = next(i for i, c in enumerate(moved.commands) if "systemctl reload r1fleet-firewall.service" in c)
    assert moved.commands.index(next(c for c in moved.commands if "systemctl stop r1fleet-ollama" in c)) < reload
    # nothing exposed any more: the service, still on the LAN until its own restart, stops before the table goes
    closed = run_role(exposure_role, entry(), OLLAMA, responses=responses, base_responses=False, monkeypatch=monkeypatch)
    stop_all = "Stop r1fleet-ollama.service while its filter changes (no longer exposed)"
    assert closed.ran(stop_all, "systemctl stop r1fleet-ollama.service")
    assert closed.op_names.index(f"Exposure | {stop_all}") < closed.op_names.index("Exposure | Remove the r1fleet nftables table")


@pytest.mark.skipif(not shutil.which("nft"), reason="nft not installed (apt-get install nftables)")
@pytest.mark.parametrize("allow", [["10.77.0.1/32", "fd00::/64"], ["192.168.1.0/24", "192.168.1.7", "10.0.0.0/8", "10.1.0.0/16"]])
def test_rendered_rules_parse_with_nft(tmp_path, monkeypatch, allow):
    run = run_role(exposure_role, entry("10.77.0.11", allow), LLAMA,
                   responses=HAS_NFT, base_responses=False, monkeypatch=monkeypatch)
    rules = tmp_path / "rules.nft"
    rules.write_text(run.uploads[exposure.RULES_FILE])
    result = subprocess.run(["nft", "-c", "-f", str(rules)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_a_mac_cannot_be_opened_to_the_lan_yet():
    with pytest.raises(FleetError, match="host mac: field listen"):
        exposure.exposure_for(entry("192.168.1.40", ["192.168.1.0/24"]), OLLAMA, "mac", darwin=True)
    assert not exposure.exposure_for(entry(None, []), OLLAMA, "mac", darwin=True).exposed


@pytest.mark.parametrize("manager", ["apt-get", "dnf"])
def test_a_host_without_nft_gets_nftables_before_the_firewall_loads(monkeypatch, manager):
    """The firewall unit runs nft: an exposed host without it gets the nftables package first (apt or dnf)."""
    responses = {"command -v apt-get": "/usr/bin/apt-get"} if manager == "apt-get" else {"command -v dnf": "/usr/bin/dnf"}
    run = run_role(exposure_role, entry("10.77.0.11", ["10.77.0.1/32"]), OLLAMA, responses=responses,
                   base_responses=False, monkeypatch=monkeypatch)
    assert not run.failed
    assert "nft -f" in run.uploads[exposure.FIREWALL_UNIT_PATH]
    assert "nftables" in run.installs("nftables")
    assert any(manager in command for command in run.op_commands("nftables"))
    assert run.op_names.index(run.op("nftables")) < run.op_names.index(run.op("Load the firewall rules"))
    present = run_role(exposure_role, entry("10.77.0.11", ["10.77.0.1/32"]), OLLAMA,
                       responses={**responses, **HAS_NFT}, base_responses=False, monkeypatch=monkeypatch)
    assert "Exposure | nftables" not in present.op_names and not present.failed   # nft is there: nothing installed


def unit_settings(text: str) -> dict[str, list[str]]:
    """The [Unit] section of a systemd unit or drop-in: key -> every word of every line with that key."""
    settings: dict[str, list[str]] = {}
    section = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Unit]" and "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).extend(value.split())
    return settings


@pytest.mark.parametrize("plan", [OLLAMA, LLAMA], ids=["ollama", "llama.cpp"])
def test_the_firewall_is_ordered_before_the_network_and_the_service(monkeypatch, plan):
    """Fail-closed at boot: the rules load before the network comes up and before the service starts, and the
    service starts only with them (Requires + After in its drop-in)."""
    run = run_role(exposure_role, entry("10.77.0.11", ["10.77.0.1/32"]), plan, responses=HAS_NFT,
                   base_responses=False, monkeypatch=monkeypatch)
    service = exposure.SERVICE_UNITS[plan.backend]
    firewall = unit_settings(run.uploads[exposure.FIREWALL_UNIT_PATH])
    assert {"network-pre.target", service} <= set(firewall["Before"])
    assert "network-pre.target" in firewall["Wants"]
    # default dependencies would order it after sysinit/basic.target, hence after network-pre.target: a cycle
    assert firewall["DefaultDependencies"] == ["no"]
    assert not {"network.target", "network-online.target", service} & set(firewall.get("After", []))
    drop_in = unit_settings(run.uploads[exposure.firewall_drop_in(plan.backend)])
    assert exposure.FIREWALL_UNIT in drop_in["Requires"] and exposure.FIREWALL_UNIT in drop_in["After"]
