"""r1fleet's ufw rules against the real ufw (Debian's package), in a private network and mount namespace.

The host's own /etc/ufw and netfilter are never touched: `unshare -mn` gives the run its own network
stack, and /etc/ufw is a bind-mounted copy. Root only (namespaces), like the rest of tests/lab.
"""
from __future__ import annotations

import shutil
import subprocess

import pytest

from r1fleet.roles.exposure import role as exposure
from r1fleet.roles.exposure.decide import UFW_REMOVE_OURS, ufw_all_applied

SETTINGS = exposure.Exposure("10.0.0.5", 11434, ("10.0.0.0/24", "192.168.7.7/32"), ("fd00::/8",))
LISTEN_V6 = exposure.Exposure("::", 11434, ("10.0.0.0/24",), ("fd00::/8",))
MARK = "=== "


def run_in_namespace(steps: list[str]) -> dict[str, str]:
    """Run shell steps in a fresh ufw; return each step's output by its first line's label."""
    if not shutil.which("ufw") and not shutil.which("/usr/sbin/ufw"):
        pytest.fail("ufw is not installed (scripts/setup.sh installs it as root)")
    script = ["set -e", 'copy=$(mktemp -d)', 'cp -a /etc/ufw/. "$copy"/', 'mount --bind "$copy" /etc/ufw',
              "ufw --force reset >/dev/null", "ufw --force enable >/dev/null"]
    for index, step in enumerate(steps):
        script += [f"echo '{MARK}{index}'", step]
    done = subprocess.run(["unshare", "-mn", "bash", "-c", "\n".join(script)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    outputs: dict[str, str] = {}
    for chunk in done.stdout.split(MARK)[1:]:
        label, _, body = chunk.partition("\n")
        outputs[label] = body
    return outputs


def apply(settings: exposure.Exposure, check: bool = True) -> str:
    """What the role does: write the rules file, delete r1fleet's old rules, apply the file, check that ufw took
    every rule."""
    rules = "\n".join(exposure.ufw_commands(settings))
    checked = f"\n{ufw_all_applied(len(exposure.ufw_commands(settings)))}" if check else ""
    return (f"cat > /tmp/r1fleet-ufw-rules <<'EOF'\n{rules}\nEOF\n{exposure.UFW_DELETE_OURS}\n"
            f"sh -e /tmp/r1fleet-ufw-rules >/dev/null{checked}")


def state(outputs: dict[str, str], label: str) -> dict:
    """The UfwRules fact's count and order (the applied record and the ports: test_an_apply_cut_short_...)."""
    read = exposure.UfwRules().process(outputs[label].splitlines())
    return {"count": read["count"], "first": read["first"]}


RULES_FILE = "/tmp/r1fleet-ufw-rules"  # the namespace shares /tmp, never the host's /etc/r1fleet


def role_apply(settings: exposure.Exposure, rules: str | None = None) -> str:
    """The role's own apply (decide.ufw_apply_commands, each command stopping the rest when it fails, as pyinfra's
    server.shell does), with the rules file in /tmp; `rules`: that file's text instead of the settings' rules."""
    text = rules if rules is not None else "\n".join(exposure.ufw_commands(settings))
    commands = [c.replace(exposure.UFW_RULES_FILE, RULES_FILE) for c in exposure.ufw_apply_commands(settings)]
    return f"cat > {RULES_FILE} <<'EOF'\n{text}\nEOF\n( set -e\n" + "\n".join(commands) + "\n) >/dev/null 2>&1 || echo CUT"


def test_an_apply_cut_short_leaves_the_port_closed_and_the_next_completes_it():
    """Audit M9: the hold (a deny of the port to everyone, first) stays when an apply stops halfway, here at the
    rules file's second line; the fact then finds the rules neither recorded applied nor first, and the next
    apply puts them all in and takes the hold out."""
    fact_command = exposure.UfwRules().command().replace(exposure.UFW_RULES_FILE, RULES_FILE)
    rules = exposure.ufw_commands(SETTINGS)
    outputs = run_in_namespace([
        "ufw allow 11434/tcp >/dev/null",                                        # the host's own rule for the port
        role_apply(SETTINGS, "\n".join([rules[0], "false", *rules[1:]])),         # cut after the deny
        "iptables -S ufw-user-input",
        fact_command,
        role_apply(SETTINGS),                                                    # the next run
        fact_command,
        "iptables -S ufw-user-input",
        "LC_ALL=C ufw status numbered",
    ])
    assert "CUT" in outputs["1"]
    chain = [line for line in outputs["2"].splitlines() if line.startswith("-A ")]
    hold = next(i for i, rule in enumerate(chain) if "--sports 1:65535" in rule and rule.endswith("-j DROP"))
    theirs = next(i for i, rule in enumerate(chain) if rule.endswith("--dport 11434 -j ACCEPT"))
    assert hold < theirs and "-d " not in chain[hold], chain  # the port, every address, dropped before their allow
    cut = exposure.UfwRules().process(outputs["3"].splitlines())
    assert not cut["applied"] and cut["ports"] == (11434,), outputs["3"]
    assert "CUT" not in outputs["4"], outputs["4"]
    done = exposure.UfwRules().process(outputs["5"].splitlines())
    assert done == {"count": 3, "first": True, "applied": True, "ports": (11434,)}, outputs["5"]
    assert "r1fleet-hold" not in outputs["7"], outputs["7"]
    chain = [line for line in outputs["6"].splitlines() if line.startswith("-A ")]
    assert [rule.split("-j ")[-1].split()[0] for rule in chain[:4]] == ["ACCEPT", "ACCEPT", "DROP", "ACCEPT"], chain


def test_rules_come_before_broader_rules_the_host_already_has():
    fact_command = exposure.UfwRules().command()
    outputs = run_in_namespace([
        "ufw allow 11434 >/dev/null; ufw allow from 10.0.0.0/8 >/dev/null",   # the user's own, broader rules
        apply(SETTINGS),
        fact_command,
        "iptables -S ufw-user-input",
        apply(SETTINGS),                                                        # a second run: the same rules
        fact_command,
        "ufw insert 1 allow from 172.16.0.0/12 >/dev/null",                     # a rule added above ours later
        fact_command,
    ])
    expected = len(exposure.ufw_commands(SETTINGS))
    assert expected == 3  # deny + two IPv4 allows; the IPv6 network cannot reach an IPv4 listen address
    assert state(outputs, "2") == {"count": expected, "first": True}, outputs["2"]
    chain = [line for line in outputs["3"].splitlines() if line.startswith("-A ")]
    # real netfilter order: r1fleet's allows, then its drop, then the user's broader rules
    assert ["10.0.0.0/24" in chain[0], "192.168.7.7" in chain[1]] == [True, True], chain
    assert [rule.split("-j ")[-1].split()[0] for rule in chain[:3]] == ["ACCEPT", "ACCEPT", "DROP"], chain
    assert "--dport 11434" in chain[2] and "-s " not in chain[2], chain
    assert state(outputs, "5") == state(outputs, "2")
    assert state(outputs, "7") == {"count": expected, "first": False}, outputs["7"]


def test_a_hosts_own_rule_for_the_same_port_does_not_keep_it_open():
    """ufw skips inserting a rule that an existing one matches but for its action: r1fleet's deny, were it
    `deny 11434/tcp`, would be skipped after the host's own `allow 11434/tcp`, leaving the port open to all."""
    outputs = run_in_namespace(["ufw allow 11434/tcp >/dev/null", apply(SETTINGS), exposure.UfwRules().command(),
                                "iptables -S ufw-user-input"])
    assert state(outputs, "2") == {"count": 3, "first": True}, outputs["2"]
    chain = [line for line in outputs["3"].splitlines() if line.startswith("-A ")]
    assert [rule.split("-j ")[-1].split()[0] for rule in chain[:4]] == ["ACCEPT", "ACCEPT", "DROP", "ACCEPT"], chain


def test_a_hosts_rule_that_ufw_lets_win_fails_the_host_with_the_reason():
    """Listening on every address, r1fleet's rules are to `any`: after the host's own `allow 11434/tcp`, ufw skips
    r1fleet's deny (with success); the deploy's check then fails the host, naming why, instead of leaving it open."""
    outputs = run_in_namespace(["ufw allow 11434/tcp >/dev/null", apply(LISTEN_V6, check=False),
                                f"( {ufw_all_applied(len(exposure.ufw_commands(LISTEN_V6)))} ) 2>&1 || echo FAILED"])
    assert "ufw holds fewer than r1fleet's 3 rules" in outputs["2"] and "FAILED" in outputs["2"], outputs["2"]


def test_rules_apply_to_an_empty_ruleset_and_keep_ipv6_apart():
    outputs = run_in_namespace([apply(LISTEN_V6), exposure.UfwRules().command(), "LC_ALL=C ufw status numbered"])
    assert state(outputs, "1") == {"count": 3, "first": True}, outputs["1"]
    numbered = outputs["2"]
    assert "fd00::/8" in numbered and "(v6)" in numbered


def test_a_removal_takes_r1fleet_s_rules_back_active_or_not_and_keeps_the_host_s_own():
    """The removal's ufw step (roles/exposure/remove.py) against the real ufw: ufw lists no rule while it is off,
    so the rules are read from `ufw show added`, and only those marked r1fleet go."""
    fact_command = exposure.UfwRules().command()
    outputs = run_in_namespace([
        "ufw allow 22 >/dev/null; ufw allow from 10.0.0.0/8 to any port 8080 >/dev/null",   # the host's own rules
        apply(SETTINGS),
        fact_command,
        UFW_REMOVE_OURS,
        "LC_ALL=C ufw show added",
        apply(LISTEN_V6),
        "ufw --force disable >/dev/null",
        UFW_REMOVE_OURS,
        "LC_ALL=C ufw show added",
        fact_command,
    ])
    assert state(outputs, "2")["count"] == 3, outputs["2"]
    for label in ("4", "8"):
        added = [line for line in outputs[label].splitlines() if line.startswith("ufw ")]
        assert added == ["ufw allow 22", "ufw allow from 10.0.0.0/8 to any port 8080"], outputs[label]
    assert state(outputs, "9")["count"] == 0
