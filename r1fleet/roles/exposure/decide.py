"""The exposure role's decisions, made without a host: the ports, the allow-list and the firewall's names, the
ufw rules r1fleet adds and how to tell them first."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import shlex
from dataclasses import dataclass
from r1fleet.fleet.config import HostConfig
from r1fleet.errors import FleetError
from r1fleet.records import CONFIG_DIR, HostPlan
from r1fleet.net import is_loopback
from r1fleet.render.systemd_unit import LLAMA_UNIT, OLLAMA_UNIT, UNIT_DIR

KEY_DIR = CONFIG_DIR
RULES_FILE = f"{KEY_DIR}/nftables.conf"
FIREWALL_UNIT = "r1fleet-firewall.service"
FIREWALL_UNIT_PATH = f"/etc/systemd/system/{FIREWALL_UNIT}"
SERVICE_UNITS = {"ollama": OLLAMA_UNIT, "llama.cpp": LLAMA_UNIT}
FIREWALL_DROP_IN = "r1fleet-firewall.conf"
UFW_RULES_FILE = f"{KEY_DIR}/ufw-rules"
# A copy of the rules file, written only once ufw holds all of them: a run cut while applying leaves none.
UFW_APPLIED_FILE = f"{UFW_RULES_FILE}.applied"
# The comment on the drop rule of every ruleset r1fleet renders for nftables, before its fingerprint.
RULES_MARK = "r1fleet-rules"
# The comment of the deny ufw holds while r1fleet's rules are replaced (ufw_apply_commands).
UFW_HOLD = "r1fleet-hold"


@dataclass(frozen=True)
class Exposure:
    """The validated exposure settings of one host."""

    listen: str | None
    port: int
    allow4: tuple[str, ...] = ()
    allow6: tuple[str, ...] = ()
    backend: str = "ollama"

    @property
    def exposed(self) -> bool:
        return not is_loopback(self.listen)

    @property
    def needs_api_key(self) -> bool:
        return self.exposed and self.backend == "llama.cpp"


def exposure_for(entry: HostConfig, plan: HostPlan, host_name: str | None = None, darwin: bool = False) -> Exposure:
    """The host's exposure under its plan: the planned backend's port and the allow-list as HostConfig validated
    and merged it (r1fleet/fleet/config.py), after the rules that depend on the plan (HostConfig.exposure_check) and on
    the platform (no LAN exposure on macOS); FleetError names host, field and fix.

    deploy.py calls it in the plan step, so a refused exposure fails before any change."""
    name = host_name or entry.name
    backend = plan.backend or "ollama"
    port = entry.port_for(backend)
    if entry.listen is None:
        return Exposure(None, port, backend=backend)
    if darwin and not entry.local_only:
        raise FleetError("serving a Mac to the LAN is not supported: r1fleet has no macOS firewall role yet",
                         host=name, field="listen", fix="leave listen unset (127.0.0.1) on macOS hosts")
    entry.exposure_check(backend, name)
    return Exposure(entry.listen, port, entry.allow4, entry.allow6, backend)


def ufw_rules_come_first(numbered: list[str]) -> bool:
    """Whether, in each address family, no other rule precedes one of r1fleet's (ufw stops at the first match).

    >>> ufw_rules_come_first(["[ 1] 11434/tcp DENY IN Anywhere # r1fleet", "[ 2] 22 ALLOW IN Anywhere"])
    True
    """
    for family in (False, True):
        rules = [line.rstrip().endswith("# r1fleet") for line in numbered if _ufw_rule_is_v6(line) == family]
        if rules != sorted(rules, reverse=True):
            return False
    return True


def _ufw_rule_is_v6(line: str) -> bool:
    """A `ufw status numbered` line is IPv6 when marked `(v6)` or when it names an IPv6 address
    (a ':' alone is not enough: port ranges read `6000:6007/tcp`)."""
    fields = line.split("]", 1)[-1].split("#", 1)[0]
    if "(v6)" in fields:
        return True
    for token in fields.split():
        try:
            if ipaddress.ip_network(token, strict=False).version == 6:
                return True
        except ValueError:
            continue
    return False


def firewall_drop_in(backend: str) -> str:
    return f"{UNIT_DIR}/{SERVICE_UNITS[backend]}.d/{FIREWALL_DROP_IN}"


# Deletes every ufw rule r1fleet added (comment "r1fleet"), highest number first so numbers stay valid.
UFW_DELETE_OURS = (
    "for n in $(LC_ALL=C ufw status numbered | sed -n 's/^\\[ *\\([0-9]*\\)\\].*# r1fleet$/\\1/p' | sort -rn); "
    "do ufw --force delete \"$n\"; done"
)


# Removes every ufw rule r1fleet added, whether ufw is active or not (`ufw status` lists no rule while it is not):
# `ufw show added` lists each added rule as the command that added it, and `ufw delete` takes that rule back.
# Only r1fleet's (comment "r1fleet") are taken, and only in the words r1fleet's rules are made of.
# How many of r1fleet's rules ufw holds: `ufw show added` lists each added rule once, active or not.
UFW_COUNT_OURS = "LC_ALL=C ufw show added 2>/dev/null | grep -c \"comment 'r1fleet'$\" || true"


def ufw_all_applied(expected: int) -> str:
    """Shell: fail, naming why, unless ufw holds all `expected` of r1fleet's rules after they were applied (ufw
    answers "Skipping inserting existing rule", with success, when one of the host's own rules matches ours but
    for its action: the port would stay open).

    >>> "exit 1" in ufw_all_applied(3)
    True
    """
    why = (f"ufw holds fewer than r1fleet's {expected} rules: it skips a rule that one of the host's own matches "
           "but for its action (see `ufw show added`); delete that rule of yours, then deploy again")
    return f"n=$({UFW_COUNT_OURS}); [ \"$n\" = {expected} ] || {{ echo {shlex.quote(why)} >&2; exit 1; }}"


UFW_REMOVE_OURS = (
    "LC_ALL=C ufw show added | sed -n \"s/^ufw \\([A-Za-z0-9 ./:_-]*\\) comment 'r1fleet\\(-hold\\)\\{0,1\\}'$/\\1/p\" | "
    "while read -r rule; do ufw --force delete $rule || exit 1; done"
)


def ufw_commands(settings: Exposure) -> list[str]:
    """The ufw commands that admit the allow-list to the port and deny the rest, ahead of the host's own rules.

    ufw stops at the first matching rule, so r1fleet's rules are prepended (an earlier, broader `ufw allow`
    for the port must not win); each prepend lands on top, so the deny goes first (a run that fails midway
    leaves the port closed) and the allows follow in reverse. `prepend` works on an empty ruleset, where
    `insert 1` fails, and keeps IPv6 rules in their own list (ufw 0.36, Debian 11, Ubuntu 20.04).
    Only the listen address's family is admitted: another family cannot reach it.

    >>> ufw_commands(Exposure("10.0.0.5", 11434, ("10.0.0.0/24",)))
    ['ufw prepend deny proto tcp to 10.0.0.5 port 11434 comment r1fleet', 'ufw prepend allow from 10.0.0.0/24 to 10.0.0.5 port 11434 proto tcp comment r1fleet']
    """
    family = ipaddress.ip_address(settings.listen).version if settings.listen else 4
    wildcard = settings.listen in ("::", "0.0.0.0")
    allow = [cidr for cidr in (*settings.allow4, *settings.allow6)
             if wildcard or ipaddress.ip_network(cidr).version == family]
    # To the listen address itself: ufw skips inserting a rule that an existing one matches but for its action
    # (backend_iptables.py set_rule, "Skipping inserting existing rule"), so a host's own `ufw allow 11434/tcp`
    # would silently keep the port open to everyone; a rule to one address is not that rule.
    to = "any" if wildcard or not settings.listen else shlex.quote(settings.listen)
    allows = [f"ufw prepend allow from {shlex.quote(cidr)} to {to} port {settings.port} proto tcp comment r1fleet"
              for cidr in allow]
    deny = (f"ufw prepend deny {settings.port}/tcp comment r1fleet" if to == "any"
            else f"ufw prepend deny proto tcp to {to} port {settings.port} comment r1fleet")
    return [deny, *reversed(allows)]


# ---------------------------------------------------------------- which rules are loaded (audit M9)


def rules_fingerprint(template: str, context: dict) -> str:
    """What a ruleset rendered from `template` with `context` carries in its drop rule's comment: 16 hex digits of
    the sha256 of both. The deploy reloads a table unless it carries this very fingerprint, so a table loaded from
    other rules (an earlier allow-list or port, a run cut between writing the file and loading it) never passes
    for the planned one, whichever run wrote the file.

    >>> len(rules_fingerprint("tcp dport {{ port }} drop", {"port": 11434}))
    16
    """
    canonical = json.dumps(context, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{template}\0{canonical}".encode()).hexdigest()[:16]


@dataclass(frozen=True)
class LoadedRules:
    """One of r1fleet's tables as nftables holds it now: whether it is there, the fingerprint it carries (None
    from a ruleset without one) and the ports it filters."""

    present: bool = False
    fingerprint: str | None = None
    ports: tuple[int, ...] = ()


def loaded_rules(listing: list[str]) -> LoadedRules:
    """`nft list table inet <table>` read (nothing when the table is absent).

    >>> loaded_rules(['table inet r1fleet {', '  tcp dport 11434 counter packets 0 bytes 0 drop comment "r1fleet-rules 0123456789abcdef"', '}'])
    LoadedRules(present=True, fingerprint='0123456789abcdef', ports=(11434,))
    """
    if not any(line.strip().startswith("table inet ") for line in listing):
        return LoadedRules()
    marks = [m.group(1) for line in listing if (m := re.search(rf'comment "{RULES_MARK} ([0-9a-f]{{16}})"', line))]
    ports = sorted({int(m.group(1)) for line in listing
                    if (m := re.search(r"\btcp dport ([0-9]{1,5}) counter\b.* (drop|reject)\b", line))})
    return LoadedRules(True, marks[0] if len(marks) == 1 else None, tuple(ports))


def port_leaves_the_filter(loaded_ports: tuple[int, ...], port: int | None) -> bool:
    """Whether loading the planned rules (for `port`; None: no rules at all) stops filtering a port the loaded
    ones filter: a service still listening there would be open until it restarts, so it is stopped first.

    >>> port_leaves_the_filter((11434,), 8080), port_leaves_the_filter((11434,), 11434), port_leaves_the_filter((), None)
    (True, False, False)
    """
    return any(loaded != port for loaded in loaded_ports)


def ufw_hold_command(port: int) -> str:
    """The deny that keeps the port closed to everyone while r1fleet's ufw rules are replaced (a run cut there
    leaves it, so the port stays closed until a later run applies the rules in full). Every source port, written
    out: ufw skips inserting a rule that an existing one matches but for its action, and a plain `deny 11434/tcp`
    matches a host's own `allow 11434/tcp` (and r1fleet's own deny) that way; this one matches neither."""
    return f"ufw prepend deny proto tcp from any port 1:65535 to any port {port} comment {UFW_HOLD}"


# Deletes the holds (comment "r1fleet-hold"), highest number first so numbers stay valid.
UFW_DELETE_HOLD = (
    "for n in $(LC_ALL=C ufw status numbered | sed -n 's/^\\[ *\\([0-9]*\\)\\].*# r1fleet-hold$/\\1/p' | sort -rn); "
    "do ufw --force delete \"$n\"; done"
)


def ufw_apply_commands(settings: Exposure) -> list[str]:
    """Replace r1fleet's ufw rules by the rules file, failing closed: the hold first, then the old rules out and
    the file's in, then the count checked; only then the hold taken out and the file recorded as applied
    (UFW_APPLIED_FILE). Each command stops the rest when it fails (pyinfra's server.shell).

    >>> ufw_apply_commands(Exposure("10.0.0.5", 11434, ("10.0.0.0/24",)))[0]
    'rm -f /etc/r1fleet/ufw-rules.applied'
    """
    return [f"rm -f {UFW_APPLIED_FILE}", ufw_hold_command(settings.port), UFW_DELETE_OURS, f"sh -e {UFW_RULES_FILE}",
            ufw_all_applied(len(ufw_commands(settings))), UFW_DELETE_HOLD, f"cp {UFW_RULES_FILE} {UFW_APPLIED_FILE}"]


def ufw_ports(added: list[str]) -> tuple[int, ...]:
    """The ports of r1fleet's rules (holds included) in `ufw show added`.

    >>> ufw_ports(["ufw deny proto tcp to 10.0.0.5 port 11434 comment 'r1fleet'", "ufw deny 8080/tcp comment 'r1fleet'",
    ...            "ufw prepend deny proto tcp from any port 1:65535 to any port 9000 comment 'r1fleet-hold'", "ufw allow 22"])
    (8080, 9000, 11434)
    """
    ports = set()
    for line in added:
        if re.search(r"comment '(r1fleet|r1fleet-hold)'$", line.strip()):
            # a port, not one end of a range (the hold's source ports 1:65535)
            ports.update(int(m.group(1) or m.group(2)) for m in re.finditer(
                r"\bport ([0-9]{1,5})(?![0-9:])|(?<![0-9:])([0-9]{1,5})/tcp\b", line))
    return tuple(sorted(ports))
