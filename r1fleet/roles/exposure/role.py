"""LAN exposure role: admit only the fleet file's allow-list to the service port, key llama-server.

Without `listen` the services stay on 127.0.0.1, nothing is opened and any r1fleet firewall
table left from an earlier run is removed. With `listen`:
  * nftables: table `inet r1fleet` accepts the port from `allow` (and loopback) and drops the rest
    for that port only, loaded at boot by r1fleet-firewall.service; ufw rules instead when ufw is
    active (its default-deny would otherwise drop the port whatever our table says);
  * llama.cpp: an API key generated once, on the host, into /etc/r1fleet/api-key (root, 0600).
    systemd hands it to llama-server as a credential (LoadCredential=api-key:/etc/r1fleet/api-key,
    `--api-key-file %d/api-key`), so the key is never in argv, a unit file, a log or the repo.

ExposureRole (r1fleet/operations/stages.py) writes the key and the rules in its configure stage and loads the
firewall in its activate stage, which runs before the backend's: the filter is in place before the service
binds a LAN address, and the service unit requires the firewall unit, so a host is never open unfiltered.

Whether the rules are loaded is read from the host, never from what changed in this run (audit M9): the table
carries its rules' fingerprint (decide.rules_fingerprint), ufw's rules count once a copy of the file records them
applied, so a run cut anywhere is repaired by the next. A change that would stop filtering a port the service may
still listen on (another port, or no exposure) stops the service first; its own activate starts it again.
"""

from __future__ import annotations

import hashlib
import shlex
from io import StringIO
from pathlib import Path

from pyinfra import host
from pyinfra.api import FactBase, deploy, operation
from pyinfra.api.command import StringCommand
from pyinfra.facts.files import File, Sha1File
from pyinfra.facts.server import Which
from pyinfra.operations import apt, dnf, files, server, systemd

from r1fleet.fleet.config import API_KEY_FILE, HostConfig, read_api_key
from r1fleet.errors import FleetError
from r1fleet.records import HostPlan
from r1fleet.operations.common import TEMPLATES as SHARED_TEMPLATES, refusal, refuse
from r1fleet.render.formats import nft_settings, unit_settings
from r1fleet.operations.stages import HostContext, Role
from r1fleet.operations.fact_batch import FactRequest, directory_reads, file_reads, service_reads
from r1fleet.roles.exposure.decide import (
    Exposure,
    FIREWALL_UNIT,
    FIREWALL_UNIT_PATH,
    KEY_DIR,
    RULES_FILE,
    SERVICE_UNITS,
    UFW_APPLIED_FILE,
    UFW_DELETE_HOLD,
    UFW_DELETE_OURS,
    UFW_COUNT_OURS,
    UFW_RULES_FILE,
    LoadedRules,
    exposure_for,
    firewall_drop_in,
    loaded_rules,
    port_leaves_the_filter,
    rules_fingerprint,
    ufw_apply_commands,
    ufw_commands,
    ufw_ports,
    ufw_rules_come_first,
)

TEMPLATES = Path(__file__).resolve().parent / "templates"


# ---------------------------------------------------------------- facts and operations


class NftTable(FactBase):
    """Whether nftables holds `table inet r1fleet` (or another of r1fleet's tables: a pool worker's `r1fleet-rpc`)."""

    default = bool

    def command(self, table: str = "r1fleet") -> str:
        return f"nft list table inet {table} >/dev/null 2>&1 && echo present || true"

    def process(self, output: list[str]) -> bool:
        return any(line.strip() == "present" for line in output)


class UfwActive(FactBase):
    """Whether ufw is installed and active (then its default policy decides, not our table)."""

    default = bool

    def command(self) -> str:
        return "command -v ufw >/dev/null 2>&1 && LC_ALL=C ufw status 2>/dev/null | head -n1 || true"  # not translated

    def process(self, output: list[str]) -> bool:
        return any(line.strip().lower() == "status: active" for line in output)


@operation()
def api_key(path: str = API_KEY_FILE):
    """Generate the API key on the host, once: 32 random bytes, base64, root-only 0600.

    The key is created by the host's shell and never passes through the controller or pyinfra's
    output; later runs only see that the file exists.
    """
    if host.get_fact(File, path=path):
        host.noop(f"API key {path} exists")
        return
    directory = shlex.quote(path.rsplit("/", 1)[0])
    tmp = shlex.quote(path + ".tmp")
    yield StringCommand(
        f"install -d -m 0700 -o root -g root {directory} && (umask 077; head -c 32 /dev/urandom | base64 > {tmp}) "
        f"&& chown root:root {tmp} && chmod 0600 {tmp} && mv -f {tmp} {shlex.quote(path)}")


@operation()
def api_key_from_controller(source: str, host_name: str, path: str = API_KEY_FILE):
    """Install the user's API key from the controller (`api_key_source`), root-only 0600, when the host's differs.

    The key travels on the stdin of one root shell, which writes it into a file mktemp creates (0600) beside
    the target and renames it over: it is never in argv, in a file another user could read on the way, or in
    pyinfra's output. files.put would first upload it as the SSH user into /tmp (0644 under a usual umask), and
    `--diff` would print it, the host's old key with it. The key is read here, when the operation is prepared
    and again when it runs, never passed as an argument (pyinfra can print those)."""
    try:
        key = read_api_key(source, host_name, "api_key_source")
    except FleetError as error:  # changed since the plan step read it
        yield refusal(str(error))
        return
    if host.get_fact(Sha1File, path=path) == hashlib.sha1(key).hexdigest():  # noqa: S324 - pyinfra's own fact
        host.noop(f"API key {path} is the one from api_key_source")
        return
    q = shlex.quote
    directory = path.rsplit("/", 1)[0] or "/"
    install = f'chown root:root "$tmp" && chmod 0600 "$tmp" && mv -f "$tmp" {q(path)}'
    yield StringCommand(
        f"umask 077 && mkdir -p {q(directory)} && tmp=$(mktemp {q(directory + '/.api-key.XXXXXX')}) && "
        f'{{ {{ cat > "$tmp" && {install}; }} || {{ rm -f "$tmp"; false; }}; }}',
        _stdin=key.decode("ascii"))


@operation()
def remove_nft_table(table: str = "r1fleet"):
    """Delete one of r1fleet's nftables tables (`table inet r1fleet` unless named) when present."""
    # the default table is read without arguments, as exposure_reads prefetches it
    if not host.get_fact(NftTable, **({} if table == "r1fleet" else {"table": table})):
        host.noop(f"no {table} nftables table")
        return
    yield f"nft delete table inet {table}"


class NftRules(FactBase):
    """One of r1fleet's tables as nftables holds it now (decide.loaded_rules): present, its fingerprint, its ports."""

    default = LoadedRules

    def command(self, table: str = "r1fleet") -> str:
        return f"nft list table inet {table} 2>/dev/null || true"

    def process(self, output: list[str]) -> LoadedRules:
        return loaded_rules(output)


@operation()
def load_rules(fingerprint: str, table: str = "r1fleet", unit: str = FIREWALL_UNIT):
    """Reload r1fleet's rules unless nftables holds exactly them: the table gone (another `flush ruleset`, e.g.
    `systemctl start nftables`), or loaded from other rules (an earlier allow-list, a run cut before its reload)."""
    # the default table is read without arguments, as exposure_reads prefetches it
    loaded = host.get_fact(NftRules, **({} if table == "r1fleet" else {"table": table}))
    if loaded.fingerprint == fingerprint:
        host.noop(f"{table} nftables table holds the planned rules")
        return
    yield f"systemctl reload {unit}"


class UfwRules(FactBase):
    """r1fleet's rules as ufw holds them: how many it added, whether they come first, whether the rules file is
    the one last applied in full (its copy, UFW_APPLIED_FILE), and the ports of r1fleet's rules.

    `ufw show added` lists each added rule once (a rule without an address becomes a v4 and a v6 rule
    in `ufw status`); `ufw status numbered` is the order ufw matches in, one list per address family."""

    default = dict

    def command(self) -> str:
        return (f"{UFW_COUNT_OURS}; cmp -s {UFW_RULES_FILE} {UFW_APPLIED_FILE} && echo applied || echo pending; "
                "LC_ALL=C ufw show added 2>/dev/null | sed 's/^/added /'; "
                "LC_ALL=C ufw status numbered 2>/dev/null | grep '^\\[' || true")

    def process(self, output: list[str]) -> dict:
        count = output[0].strip() if output else ""
        added = [line[len("added "):] for line in output if line.startswith("added ")]
        numbered = [line for line in output[2:] if line.startswith("[")]
        return {"count": int(count) if count.isdecimal() else 0, "first": ufw_rules_come_first(numbered),
                "applied": len(output) > 1 and output[1].strip() == "applied", "ports": ufw_ports(added)}


@operation()
def apply_ufw_rules(settings: Exposure):
    """Apply the rules file unless ufw holds it in full: applied since it was written (a run cut while writing or
    applying it left no record), all of r1fleet's rules there (not a `ufw reset` since), and first (no rule added
    later with `ufw insert 1` before them). Fails closed: ufw_apply_commands."""
    rules = host.get_fact(UfwRules)
    if rules.get("applied") and rules.get("count") == len(ufw_commands(settings)) and rules.get("first"):
        host.noop("r1fleet's ufw rules are applied, all of them first")
        return
    yield from ufw_apply_commands(settings)


# ---------------------------------------------------------------- deploys


def _settings_or_refuse(entry: HostConfig, plan: HostPlan) -> Exposure | None:
    """The host's exposure, or None after failing this host with the reason (deploy.py checks earlier too)."""
    try:
        return exposure_for(entry, plan, host.name)
    except FleetError as error:
        refuse(name="Refuse exposure settings", message=str(error))
        return None


class ExposureRole(Role):
    """What the LAN may reach: the API key and r1fleet's firewall for an exposed host, nothing for a local one.
    Its activate runs before the backend's, so the filter is loaded before the service binds the LAN."""

    def __init__(self, entry: HostConfig, plan: HostPlan):
        self.entry, self.plan = entry, plan

    @classmethod
    def prepare(cls, ctx: HostContext) -> "ExposureRole":
        if ctx.served.role == "worker":  # a worker serves no API: no LAN exposure (its RPC port has its own table)
            return cls(ctx.settings.model_copy(update={"listen": None, "allow": []}), ctx.plan)
        return cls(ctx.settings, ctx.plan)

    def reads(self) -> list[FactRequest]:
        return exposure_reads(self.entry, self.plan)

    def install(self) -> None:
        _install(self.entry, self.plan)

    def configure(self) -> None:
        _configure(self.entry, self.plan)

    def activate(self) -> None:
        _activate(self.entry, self.plan)


@deploy("Exposure")
def _install(entry: HostConfig, plan: HostPlan) -> None:
    """nftables itself, when the host is exposed and neither nft nor an active ufw is there."""
    settings = _settings_or_refuse(entry, plan)
    if settings and settings.exposed and not host.get_fact(UfwActive) and not host.get_fact(Which, command="nft"):
        if host.get_fact(Which, command="apt-get"):
            apt.packages(name="nftables", packages=["nftables"], update=True)
        else:
            dnf.packages(name="nftables", packages=["nftables"])


@deploy("Exposure")
def _configure(entry: HostConfig, plan: HostPlan) -> None:
    """The API key, and the firewall's rules and unit."""
    settings = _exposure_or_none(entry, plan)
    if settings is None or not settings.exposed:
        return
    files.directory(name="r1fleet configuration directory", path=KEY_DIR, user="root", group="root", mode="700")
    if settings.needs_api_key:
        key_file = entry.api_key_file or API_KEY_FILE  # the file the unit will load
        if entry.api_key_source:  # the user's own key, from the controller: a rebuilt host keeps it
            api_key_from_controller(name="llama-server API key (from api_key_source on the controller)",
                                    source=entry.api_key_source, host_name=entry.name, path=key_file)
        else:
            api_key(name="llama-server API key (generated on the host, once)", path=key_file)
        files.file(name="API key root-only", path=key_file, user="root", group="root", mode="600")
    if host.get_fact(UfwActive):
        # r1fleet's ufw rules live in a file; unless ufw holds that file in full, they are replaced as a whole
        # (activate), so a second run changes nothing and a narrowed allow-list really narrows.
        files.put(name=f"ufw rules: port {settings.port} from the allow-list only",
                  src=StringIO("\n".join(ufw_commands(settings)) + "\n"), dest=UFW_RULES_FILE, user="root",
                  group="root", mode="600")
        return
    _nftables_files(settings)


@deploy("Exposure")
def _activate(entry: HostConfig, plan: HostPlan) -> None:
    """Load (or reload) the firewall before any backend starts; or remove every trace of it. Whatever would stop
    filtering a port a service may still listen on stops that service first (the backend's activate, next,
    starts it again as planned)."""
    settings = _exposure_or_none(entry, plan)
    if settings is None:
        return
    if not settings.exposed:
        _close()
    elif host.get_fact(UfwActive):
        if port_leaves_the_filter(host.get_fact(UfwRules).get("ports", ()), settings.port):
            _stop_services(f"port {settings.port} replaces it in the ufw rules")
        apply_ufw_rules(name="Apply the ufw rules unless ufw holds them in full", settings=settings)
    else:
        if port_leaves_the_filter(host.get_fact(NftRules).ports, settings.port):
            _stop_services(f"port {settings.port} replaces it in the firewall")
        systemd.service(name="Load the firewall rules", service=FIREWALL_UNIT, running=True, enabled=True)
        # A reload replaces the table in one nft transaction (no gap, unlike a restart's delete then load).
        load_rules(name="Reload the firewall unless it holds the planned rules", fingerprint=_fingerprint(settings))


def _stop_services(why: str) -> None:
    """Stop r1fleet's services before the filter of a port they may listen on goes (each only when it runs)."""
    for unit in SERVICE_UNITS.values():
        systemd.service(name=f"Stop {unit} while its filter changes ({why})", service=unit, running=False)


def _exposure_or_none(entry: HostConfig, plan: HostPlan) -> Exposure | None:
    """The exposure; None when it is refused (install, the first stage, has failed the host already)."""
    try:
        return exposure_for(entry, plan, host.name)
    except FleetError:
        return None


def exposure_reads(entry: HostConfig, plan: HostPlan) -> list[FactRequest]:
    """Every fact ExposureRole reads on a host where nothing changes (fetched in one round trip first)."""
    try:
        settings = exposure_for(entry, plan, host.name)
    except FleetError:
        return []
    reads: list[FactRequest] = [(Which, {"command": "nft"}), (NftTable, {}), (NftRules, {}),
                                *[request for unit in SERVICE_UNITS.values() for request in service_reads(unit)]]
    if not settings.exposed:
        paths = [firewall_drop_in(backend) for backend in SERVICE_UNITS] + [FIREWALL_UNIT_PATH, RULES_FILE, UFW_RULES_FILE]
        return reads + [(File, {"path": path}) for path in paths] + [(UfwRules, {})]
    if settings.needs_api_key:
        reads += file_reads(entry.api_key_file or API_KEY_FILE)
    drop_in = firewall_drop_in(settings.backend)
    return [*reads, (UfwActive, {}), (UfwRules, {}), *directory_reads(KEY_DIR), *file_reads(RULES_FILE),
            *file_reads(FIREWALL_UNIT_PATH), *service_reads(FIREWALL_UNIT), *file_reads(drop_in),
            *directory_reads(drop_in.rsplit("/", 1)[0]), *file_reads(UFW_RULES_FILE)]


def _service_requires_firewall(backend: str) -> None:
    """The service starts only after, and only with, r1fleet's firewall: if the rules fail to load, the
    service does not bind the LAN address (a drop-in, so the backend role's unit stays as planned)."""
    drop_in = files.put(
        name=f"{SERVICE_UNITS[backend]} requires the r1fleet firewall",
        src=StringIO(f"[Unit]\nRequires={FIREWALL_UNIT}\nAfter={FIREWALL_UNIT}\n"),
        dest=firewall_drop_in(backend), user="root", group="root", mode="644", create_remote_dir=True)
    systemd.daemon_reload(name="Reload systemd for the firewall requirement", _if=drop_in.did_change)


def _close() -> None:
    """Nothing exposed: no r1fleet firewall unit, rules file or table. A service still listening on the LAN (it
    restarts on 127.0.0.1 in its own activate, after this) is stopped before its filter goes."""
    ufw_ours = host.get_fact(File, path=UFW_RULES_FILE) and host.get_fact(UfwRules).get("ports")
    if host.get_fact(NftRules).present or ufw_ours:
        _stop_services("no longer exposed")
    for backend in SERVICE_UNITS:
        files.file(name=f"No firewall requirement for {SERVICE_UNITS[backend]}", path=firewall_drop_in(backend), present=False)
    if host.get_fact(File, path=FIREWALL_UNIT_PATH):
        systemd.service(name="Stop the r1fleet firewall", service=FIREWALL_UNIT, running=False, enabled=False)
        files.file(name="Remove the r1fleet firewall unit", path=FIREWALL_UNIT_PATH, present=False)
        systemd.daemon_reload(name="Reload systemd")
    files.file(name="Remove the r1fleet firewall rules", path=RULES_FILE, present=False)
    if host.get_fact(File, path=UFW_RULES_FILE):
        server.shell(name="Remove the r1fleet ufw rules",
                     commands=[UFW_DELETE_OURS, UFW_DELETE_HOLD, f"rm -f {UFW_RULES_FILE} {UFW_APPLIED_FILE}"])
    if host.get_fact(Which, command="nft"):
        remove_nft_table(name="Remove the r1fleet nftables table")


def _rules_context(settings: Exposure) -> dict:
    return {"port": settings.port, "allow4": list(settings.allow4), "allow6": list(settings.allow6),
            "service": settings.backend}


def _fingerprint(settings: Exposure) -> str:
    return rules_fingerprint((TEMPLATES / "nftables.conf.j2").read_text(), _rules_context(settings))


def _nftables_files(settings: Exposure) -> None:
    """The rules file, the unit that loads it, and the backend's requirement of it."""
    nft = host.get_fact(Which, command="nft") or "/usr/sbin/nft"  # installed by _install when missing
    files.template(
        name=f"nftables rules: port {settings.port} from {', '.join(settings.allow4 + settings.allow6)} only",
        src=str(TEMPLATES / "nftables.conf.j2"), dest=RULES_FILE, user="root", group="root", mode="600",
        fingerprint=_fingerprint(settings), **_rules_context(settings), jinja_env_kwargs=nft_settings(whitespace=False))
    unit = files.template(
        name="r1fleet firewall unit", src=str(SHARED_TEMPLATES / "r1fleet-firewall.service.j2"), dest=FIREWALL_UNIT_PATH,
        user="root", group="root", mode="644", port=settings.port, rules_path=RULES_FILE, nft=nft,
        service_unit=SERVICE_UNITS[settings.backend], jinja_env_kwargs=unit_settings(whitespace=False))
    systemd.daemon_reload(name="Reload systemd for the firewall unit", _if=unit.did_change)
    _service_requires_firewall(settings.backend)


