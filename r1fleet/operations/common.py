"""Operations and facts shared by the backend roles.

Each operation decides from live facts at execute time (pyinfra re-evaluates operations when
they run), so a second deploy yields no commands: nothing changes, nothing restarts.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Callable, Iterable

from pyinfra import host
from pyinfra.api import FactBase, operation
from pyinfra.api.operation import OperationMeta
from pyinfra.facts.files import File
from pyinfra.facts.server import Groups
from pyinfra.operations import files, server, systemd

from r1fleet.artifacts.pins import Download
from r1fleet.hardware.system import apt_policy
from r1fleet.cache.download import UNSIZED_MAX_BYTES
from r1fleet.net import parse_json
from r1fleet.progress import human_bytes
from r1fleet.operations.fleet_cache import routed
from r1fleet.operations.fact_batch import (
    FactRequest,
    directory_reads,
    file_reads,
    service_reads,
)
from r1fleet.operations.host_progress import file_poll, file_size, watching
from r1fleet.render.formats import unit_settings
from r1fleet.render.systemd_unit import UNIT_DIR
from r1fleet.operations.tcp_health import ListenHealth, TcpHealth, wait_tcp

TEMPLATES = Path(__file__).resolve().parent / "templates"


# ---------------------------------------------------------------------------------------------
# Facts


HTTP_JSON_MAX_BYTES = 4 << 20  # what the host's own service may answer a fact (its /api/tags lists every model)


class HttpJson(FactBase):
    """GET a JSON document from the host's own service; None when it does not answer."""

    default = type(None)

    def requires_command(self, url: str) -> str:
        return "curl"

    def command(self, url: str) -> str:
        # `|| true` keeps a refused connection from failing the host: "no answer" is a fact. At most
        # HTTP_JSON_MAX_BYTES come back over SSH: more is cut, so no JSON, so no answer.
        return f"curl -fsS --max-time 10 {shlex.quote(url)} | head -c {HTTP_JSON_MAX_BYTES} || true"

    def process(self, output: list[str]):
        return json_or_none(output)


def json_or_none(output: list[str]):
    """A fact's output as JSON, or None when it is empty or not JSON, or nested deeper than any answer of the
    host's own service ("no answer" is a fact too; r1fleet/net.py parse_json)."""
    text = "\n".join(output).strip()
    if not text:
        return None
    try:
        return parse_json(text)
    except ValueError:
        return None


class AptCandidates(FactBase):
    """The subset of `packages` that apt can install (a Candidate other than (none)).

    A host whose package lists were never fetched (a fresh image) would know no package at all,
    so the lists are fetched first in that case only.
    """

    default = set

    def requires_command(self, packages: tuple[str, ...]) -> str:
        return "apt-cache"

    def command(self, packages: tuple[str, ...]) -> str:
        names = " ".join(shlex.quote(p) for p in packages)
        refresh = "ls /var/lib/apt/lists/*_Packages >/dev/null 2>&1 || apt-get update -qq >/dev/null 2>&1"
        return f"{refresh}; LC_ALL=C apt-cache policy {names} 2>/dev/null || true"

    def process(self, output: list[str]) -> set[str]:
        return {name for name, (_installed, candidate) in apt_policy(output).items() if candidate}


class AptVersions(AptCandidates):
    """{package: (installed version, candidate version)} of `packages`, as apt has them (lists fetched as in
    AptCandidates)."""

    default = dict

    def process(self, output: list[str]) -> dict[str, tuple[str | None, str | None]]:
        return apt_policy(output)


def model_names(tags_document) -> set[str]:
    """Names from Ollama's /api/tags or /api/ps document (both list `models[].name`)."""
    models = tags_document.get("models") if isinstance(tags_document, dict) else None
    names = set()
    for entry in models if isinstance(models, list) else []:
        for key in ("name", "model"):
            if isinstance(entry, dict) and isinstance(entry.get(key), str) and entry[key]:
                names.add(entry[key])
    return names


# ---------------------------------------------------------------------------------------------
# Operations


def refusal(message: str) -> str:
    """The shell command that fails a host with `message` on stderr (for operations that decide on the host)."""
    return f"echo {shlex.quote('r1fleet: ' + message)} >&2; exit 1"


@operation(is_idempotent=False)
def refuse(message: str):
    """Fail this host at this step with `message` (on stderr), leaving the other hosts running."""
    yield refusal(message)


# A stalled download gives up and resumes from the bytes it has. curl(1): a transfer slower than --speed-limit
# bytes/s for --speed-time seconds is aborted (exit 28). curl's own --retry would throw those bytes away: it
# truncates the file to where that run began ("Throwing away N bytes", curl/curl#1084, still in 8.14: #18035),
# so its retries are kept to a window shorter than a stall takes to show (--retry-max-time < --speed-time): they
# cover the quick failures (a 503, a connect timeout) that wrote nothing, and the shell loop resumes (-C -).
STALL_BYTES_PER_S = 1024
STALL_S = 60
RETRY_WINDOW_S = 30
RESUMES = 5


def _size_or_zero(target: str) -> str:
    return f"$( {file_size(target)} || echo 0 )"


def resuming_curl(url: str, target: str, options: str) -> str:
    """Shell: curl `url` into `target` (a shell word), resuming from its bytes (-C -) after a stall or a break
    that added bytes, up to RESUMES times; a status other than 0 when it could not finish.

    >>> resuming_curl("https://x/m.gguf", "/m/m.gguf.part", "--retry 3").startswith("{ r1_n=0; ")
    True
    """
    curl = (f"curl -fSL {options} -C - --retry-max-time {RETRY_WINDOW_S} --speed-limit {STALL_BYTES_PER_S} "
            f"--speed-time {STALL_S} -o {target} {shlex.quote(url)}")
    note = shlex.quote(f"r1fleet: {url} stalled or broke after adding bytes; resuming")
    return (f"{{ r1_n=0; r1_had={_size_or_zero(target)}; until {curl}; do r1_n=$((r1_n+1)); "
            f"r1_has={_size_or_zero(target)}; if [ $r1_n -gt {RESUMES} ] || [ \"$r1_has\" -le \"$r1_had\" ]; "
            f"then r1_n=failed; break; fi; echo {note} >&2; r1_had=$r1_has; sleep 2; done; [ $r1_n != failed ]; }}")


def verified_fetch_steps(url: str, target: str, sha256: str, size: int | None, resume: bool = False,
                         fallback: str | None = None, header: str | None = None) -> list[str]:
    """Shell steps: fetch `url` into `target` (a shell word, e.g. "$tmp/x.tgz") and stop the script,
    deleting the file, unless its sha256 is the pinned one. `size`: the artifact's pinned size in bytes; no
    transfer takes more (None: the controller's bound for an artifact pinned by sha256 alone, UNSIZED_MAX_BYTES).
    `fallback`: the upstream URL, fetched when `url` (the controller's cache, which resumes) does not answer
    within a few seconds. `resume`: keep the bytes an earlier run left in `target`. `header`: one request header
    (`Accept: ...`). A stalled transfer resumes (resuming_curl); a server that cannot resume starts over."""
    q = shlex.quote
    upstream = fallback or url
    # curl(1) --max-filesize: a transfer announced larger does not start, and since curl 8.4.0 one that grows past
    # it stops (exit 63); `0` would mean no limit, so an empty artifact is bounded at one byte.
    extra = f" --max-filesize {max(size if size is not None else UNSIZED_MAX_BYTES, 1)}"
    extra += f" -H {q(header)}" if header else ""
    fetch = resuming_curl(upstream, target, f"--retry 3{extra}")
    if fallback:  # the controller first, briefly: a firewall there costs one retry of a LAN connect, 7 s at most
        fetch = f"{resuming_curl(url, target, f'--retry 1 --connect-timeout 3{extra}')} || {fetch}"
    start_over = (f"curl -fSL --retry 3{extra} --speed-limit {STALL_BYTES_PER_S} --speed-time {STALL_S} "
                  f"-o {target} {q(upstream)}")
    mismatch = q(f"sha256 mismatch for {url} (expected {sha256})")
    return [*([] if resume else [f"rm -f {target}"]), f"{{ {fetch} || {start_over}; }}",
            f'if [ "$({sha256_of(target)})" != {q(sha256)} ]; then rm -f {target}; echo {mismatch} >&2; exit 1; fi']


def exclusive(directory: str, what: str) -> str:
    """Shell: hold a lock on `directory` until the script ends, or stop with the reason when another r1fleet
    deploy holds it. Two deploys at once on one host would resume into the same partial file (`curl -C -`), and
    one could verify and rename it while the other still appends. A host without flock(1) (macOS) goes without.

    >>> exclusive("/m", "m.gguf").startswith("if command -v flock >/dev/null 2>&1; then exec 9</m && flock -n 9 ")
    True
    """
    busy = shlex.quote(f"r1fleet: another deploy is downloading {what} into {directory} on this host; "
                       "run this one again when it is done")
    return (f"if command -v flock >/dev/null 2>&1; then exec 9<{shlex.quote(directory)} && flock -n 9 "
            f"|| {{ echo {busy} >&2; exit 1; }}; fi")


def sha256_of(path: str) -> str:
    """Shell: the hex sha256 of `path` (a shell word), by GNU sha256sum or, on macOS, shasum -a 256."""
    return f"{{ sha256sum {path} 2>/dev/null || shasum -a 256 {path}; }} | cut -d' ' -f1"


STAMP_SUFFIX = ".r1fleet-sha256"
# size, mtime and inode: a file replaced or rewritten since it was verified no longer matches its stamp
FILE_IDENTITY = "{ stat -c '%s %Y %i' \"$f\" 2>/dev/null || stat -f '%z %m %i' \"$f\"; }"


class VerifiedDigest(FactBase):
    """A downloaded file's sha256 without reading 43 GB on every run: `stamped <sha256>` when the stamp
    written after its verification still matches the file's size, mtime and inode, else `hashed <sha256>`
    (read in full), or nothing when the file is absent."""

    default = type(None)

    def command(self, path: str) -> str:
        q, file = shlex.quote, '"$f"'
        return (f"f={q(path)}; s={q(path + STAMP_SUFFIX)}; [ -f \"$f\" ] || exit 0; id=$({FILE_IDENTITY}); "
                f"if [ -f \"$s\" ]; then read -r sum rest < \"$s\"; [ \"$rest\" = \"$id\" ] && echo \"stamped $sum\" && exit 0; fi; "
                f"echo \"hashed $( {sha256_of(file)} )\"")

    def process(self, output: list[str]):
        words = output[0].split() if output else []
        return (words[0], words[1]) if len(words) == 2 and words[0] in ("stamped", "hashed") else None


def stamp_command(dest: str, sha256: str) -> str:
    """Record that `dest` was verified as `sha256`, with the identity the file has now."""
    q = shlex.quote
    return f"f={q(dest)}; printf '%s %s\\n' {q(sha256)} \"$({FILE_IDENTITY})\" > {q(dest + STAMP_SUFFIX)}"


def fetch_verified_reads(dest: str) -> list[FactRequest]:
    return [(VerifiedDigest, {"path": dest})]


def download_label(download: Download) -> str:
    """The name and, when pinned, the size: what a dry run's list of operations shows for a download.

    >>> download_label(Download(name="m.gguf", url="https://x/m.gguf", sha256="0" * 64, size=4_683_073_184))
    'm.gguf (4.4 GiB)'
    """
    return f"{download.name} ({human_bytes(download.size)})" if download.size else download.name


@operation()
def fetch_verified(download: Download, dest: str, user: str, group: str, mode: str = "0640"):
    """Download once, resumable, sha256-verified; the file appears under its name only when good, with a
    stamp beside it so that later runs need not read it in full again. It comes through the controller's
    cache (r1fleet/operations/fleet_cache.py), routed when the operation runs. Its progress is shown while it
    runs (bytes, rate, and with a pinned size the time left).

    Example: fetch_verified(name="Model", download=model_download(...), dest="/var/lib/r1fleet/models/m.gguf",
    user="llama", group="llama")"""
    digest = host.get_fact(VerifiedDigest, path=dest)
    if digest == ("stamped", download.sha256):
        host.noop(f"{dest} present with sha256 {download.sha256[:12]}")
        return
    if digest == ("hashed", download.sha256):  # verified now, e.g. placed by an earlier r1fleet: stamp it
        yield stamp_command(dest, download.sha256)
        return
    routing = routed([(download, download.name)])
    yield from routing.commands()
    (download,) = routing.value
    part = f"{dest}.part"
    q = shlex.quote
    steps = [
        "set -e",
        f"mkdir -p {q(str(Path(dest).parent))}",
        exclusive(str(Path(dest).parent), download.name),
        *verified_fetch_steps(download.url, q(part), download.sha256, download.size, resume=True,
                              fallback=download.fallback_url),
        f"chown {q(user)}:{q(group)} {q(part)}",
        f"chmod {mode} {q(part)}",
        f"mv -f {q(part)} {q(dest)}",
        stamp_command(dest, download.sha256),
    ]
    # the watcher reports a stall at half curl's --speed-time, before curl gives up and resumes
    with watching(Path(dest).name, file_poll({"": q(part)}), total=download.size, resumable=True,
                  stall_after=STALL_S / 2):
        yield "; ".join(steps)


@operation()
def wait_http(url: str, timeout_s: int = 120, what: str = "service"):
    """Poll until the URL answers 200; fail the host with a clear message otherwise."""
    q = shlex.quote
    yield (
        f"i=0; while [ $i -lt {timeout_s} ]; do "
        f"if curl -fsS --max-time 5 -o /dev/null {q(url)}; then exit 0; fi; sleep 1; i=$((i+1)); done; "
        f"echo {q(f'{what} did not become healthy at {url} within {timeout_s}s; see journalctl -u {what}')} >&2; exit 1"
    )


class SystemAccount(FactBase):
    """One account as `service_user` manages it: {"comment", "home", "shell", "group", "groups"}; {} when absent.
    (pyinfra's Users fact reads every account on the host, with several commands each: ~0.2 s a run.)"""

    default = dict

    def command(self, account: str) -> str:
        q = shlex.quote(account)
        return (f"entry=$(getent passwd {q}) || exit 0; echo \"passwd $entry\"; "
                f"echo \"group $(id -gn {q})\"; echo \"groups $(id -nG {q})\"")

    def process(self, output: list[str]) -> dict:
        found = {line.split(" ", 1)[0]: line.split(" ", 1)[1] if " " in line else "" for line in output}
        fields = found.get("passwd", "").split(":")
        if len(fields) < 7:
            return {}
        return {"comment": fields[4], "home": fields[5], "shell": fields[6], "group": found.get("group", "").strip(),
                "groups": sorted(set(found.get("groups", "").split()) - {found.get("group", "").strip()})}


SERVICE_SHELL = "/usr/sbin/nologin"
# The GECOS comment of every account r1fleet makes or takes over (an install.sh `ollama`): the mark a removal
# deletes an account by (r1fleet/operations/removal.py), so an account of the same name that r1fleet never
# managed stays.
SERVICE_COMMENT = "r1fleet service account"


def account_in_place(account: dict, name: str, home: str, shell: str, extra_groups: list[str]) -> bool:
    """Whether `server.group` + `server.user` would change nothing (then they are not called at all).

    >>> account_in_place({"comment": "r1fleet service account", "home": "/var/lib/x", "shell": "/usr/sbin/nologin",
    ...                   "group": "x", "groups": ["video"]}, "x", "/var/lib/x", "/usr/sbin/nologin", ["video"])
    True
    """
    return (bool(account) and account.get("comment") == SERVICE_COMMENT and account["home"] == home
            and account["shell"] == shell and account["group"] == name
            and (not extra_groups or account["groups"] == sorted(extra_groups)))


def service_user(name: str, home: str, gpu: bool) -> None:
    """A system user with no login, marked as r1fleet's, in render/video when the host has those groups."""
    existing = host.get_fact(Groups) or []  # None when the host went away mid-run
    extra = [g for g in ("render", "video") if gpu and g in existing]
    if not account_in_place(host.get_fact(SystemAccount, account=name), name, home, SERVICE_SHELL, extra):
        _create_service_user(name, home, extra)
    files.directory(name=f"Home {home}", path=home, user=name, group=name, mode="0750")


def _create_service_user(name: str, home: str, extra: list[str]) -> None:
    server.group(name=f"Group {name}", group=name, system=True)
    server.user(
        name=f"System user {name}",
        user=name,
        group=name,
        groups=extra or None,
        home=home,
        shell=SERVICE_SHELL,
        comment=SERVICE_COMMENT,
        system=True,
        create_home=False,
    )


def service_user_reads(name: str, home: str) -> list[FactRequest]:
    return [(Groups, {}), (SystemAccount, {"account": name}), *directory_reads(home)]


def unit_file(unit: str, context: dict) -> OperationMeta:
    return files.template(
        name=f"Unit {unit}",
        src=str(TEMPLATES / "r1fleet-service.j2"),
        dest=f"{UNIT_DIR}/{unit}",
        user="root",
        group="root",
        mode="0644",
        jinja_env_kwargs=unit_settings(),
        svc=context,
    )


def retire_service(unit: str) -> None:
    """Stop, disable and remove an r1fleet unit this host no longer runs (the plan moved to the other
    backend): its GPU memory is freed before the new service starts, and its port closes."""
    path = f"{UNIT_DIR}/{unit}"
    if not host.get_fact(File, path=path):
        return
    systemd.service(name=f"Stop {unit} (the plan moved to the other backend)", service=unit, running=False, enabled=False)
    files.file(name=f"Remove {unit}", path=path, present=False)
    files.directory(name=f"Remove {unit}'s drop-ins", path=f"{path}.d", present=False)
    systemd.daemon_reload(name=f"Reload systemd without {unit}")


def retire_service_reads(unit: str) -> list[FactRequest]:
    return [(File, {"path": f"{UNIT_DIR}/{unit}"})]


def any_changed(ops: Iterable[OperationMeta]) -> Callable[[], bool]:
    ops = list(ops)
    return lambda: any(op.did_change() for op in ops)


class ServiceStale(FactBase):
    """Whether a running unit predates its own files: systemd holds an older unit (NeedDaemonReload) or a
    file it runs was replaced after it started, as after a deploy stopped between writing and restarting."""

    default = bool

    def command(self, unit: str, paths: tuple[str, ...]) -> str:
        q = shlex.quote
        checks = " ".join(q(p) for p in paths)
        return (
            f"systemctl is-active -q {q(unit)} || exit 0; "
            f"[ \"$(systemctl show -p NeedDaemonReload --value {q(unit)})\" = yes ] && echo stale; "
            f"t=$(date -d \"$(systemctl show -p ActiveEnterTimestamp --value {q(unit)})\" +%s 2>/dev/null || echo 0); "
            f"for f in {checks}; do [ -e \"$f\" ] && [ \"$(stat -L -c %Y \"$f\")\" -gt \"$t\" ] && echo stale; done; true"
        )

    def process(self, output: list[str]) -> bool:
        return any(line.strip() == "stale" for line in output)


@operation()
def restart_if_stale(unit: str, paths: tuple[str, ...]):
    """Restart a service that runs older files than the host has (decided from the host, not this run)."""
    if not host.get_fact(ServiceStale, unit=unit, paths=tuple(paths)):
        host.noop(f"{unit} runs its current files")
        return
    yield f"systemctl daemon-reload && systemctl reset-failed {shlex.quote(unit)}; systemctl restart {shlex.quote(unit)}"


def converge_service_reads(unit: str, files_used: Iterable[str] = ()) -> list[FactRequest]:
    """What converge_service reads on a host where nothing changes (with the unit file's own reads)."""
    return [*file_reads(f"{UNIT_DIR}/{unit}"), *service_reads(unit),
            (ServiceStale, {"unit": unit, "paths": (f"{UNIT_DIR}/{unit}", *files_used)})]


def converge_service(
    unit: str, unit_op: OperationMeta, restart_on: Iterable[OperationMeta], health_url: str | TcpHealth | ListenHealth,
    health_timeout_s: int = 120, files_used: Iterable[str] = (),
) -> None:
    """daemon-reload only when the unit changed; restart only when one of its files changed, in this run or
    in an earlier one that stopped before restarting; then make sure it runs and is enabled; after a
    (re)start wait for health (an HTTP URL that answers 200, a TcpHealth port that accepts a connection, or a
    ListenHealth one a socket listens on)."""
    changed = any_changed([unit_op, *restart_on])
    systemd.daemon_reload(name=f"Reload systemd for {unit}", _if=unit_op.did_change)
    # A deploy's restart is deliberate: it must not be refused by the start limit that guards crash loops.
    server.shell(name=f"Clear the start limit of {unit}", commands=[f"systemctl reset-failed {unit} || true"], _if=changed)
    restarted = systemd.service(name=f"Restart {unit}", service=unit, restarted=True, _if=changed)
    repaired = restart_if_stale(name=f"Restart {unit} if it predates its files", unit=unit,
                                paths=(f"{UNIT_DIR}/{unit}", *files_used))
    started = systemd.service(name=f"Run {unit}", service=unit, running=True, enabled=True)
    came_up = lambda: restarted.did_change() or repaired.did_change() or started.did_change()  # noqa: E731
    if isinstance(health_url, (TcpHealth, ListenHealth)):
        wait_tcp(name=f"Health of {unit}", address=health_url.address, port=health_url.port,
                 timeout_s=health_timeout_s, what=unit, listening=isinstance(health_url, ListenHealth), _if=came_up)
        return
    wait_http(
        name=f"Health of {unit}",
        url=health_url,
        timeout_s=health_timeout_s,
        what=unit,
        _if=came_up,
    )
