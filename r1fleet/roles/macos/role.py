"""macOS (Apple Silicon) role: Ollama as a system LaunchDaemon with the plan's settings.

deploy.py calls `macos.install(plan, entry)` instead of the Linux roles on Darwin hosts.
  * Ollama: the pinned, sha256-verified release archive for macOS (r1fleet/plan/drivers.yaml `darwin`,
    version from r1fleet/artifacts/versions.yaml); Homebrew's `ollama` formula only when the host data says
    `macos_ollama: homebrew`. Ollama.app or `brew services` holding the port is stopped and disabled.
  * /Library/LaunchDaemons/com.r1fleet.ollama.plist: runs at boot without a login session (brew
    services makes a per-user LaunchAgent that only runs while that user is logged in; drivers.md 5),
    as the dedicated hidden user _r1ollama, with OLLAMA_* from the plan. Bootstrapped/kickstarted
    only when the plist or the binary changed.
  * iogpu.wired_limit_mb set at boot by a second LaunchDaemon when the plan needs more GPU memory
    than macOS's default working set (about 2/3 of RAM up to 36 GiB, 3/4 above; drivers.md 5).
"""

from __future__ import annotations

import shlex
from pathlib import Path

from pyinfra import host, logger
from pyinfra.api import FactBase, deploy, operation
from pyinfra.api.command import StringCommand
from pyinfra.facts.files import File
from pyinfra.facts.server import Arch
from pyinfra.operations import brew, files, server

from r1fleet.operations.stages import HostContext, Role
from r1fleet.fleet.config import DEFAULT_PORTS, HostConfig
from r1fleet.artifacts.pins import Download, model_download
from r1fleet.cache.download import UNSIZED_MAX_BYTES
from r1fleet.roles.ollama.decide import LOAD_CHECK_INTERVAL_S, imports_stand_in, ollama_load_check, ollama_models_dir
from r1fleet.roles.ollama.decide import ollama_environment as linux_ollama_environment
from r1fleet.plan.memory import constants
from r1fleet.records import Hardware, HostPlan
from r1fleet.operations.common import refusal, wait_http
from r1fleet.render.formats import plist_settings
from r1fleet.roles.ollama.role import ollama_model
from r1fleet.artifacts.pins import load_pins
from r1fleet.roles.macos.decide import (
    BREW_BINARY,
    HOME,
    LABEL,
    LOAD_LABEL,
    LOAD_PLIST,
    LOG_FILE,
    PLIST,
    REAL_NAME,
    RELEASE_ROOT,
    USER,
    WIRED_LABEL,
    WIRED_PLIST,
)

TEMPLATES = Path(__file__).resolve().parent / "templates"


class DarwinUserExists(FactBase):
    """Whether a local macOS user exists (`id -u`)."""

    default = bool

    def command(self, user: str) -> str:
        return f"id -u {shlex.quote(user)} >/dev/null 2>&1 && echo yes || true"

    def process(self, output: list[str]) -> bool:
        return any(line.strip() == "yes" for line in output)


@operation()
def hidden_service_user(user: str, home: str):
    """A hidden role account (UID 400-499, no shell, no login) with its own group, created once, both named
    REAL_NAME (the mark a removal deletes them by)."""
    if host.get_fact(DarwinUserExists, user=user):
        host.noop(f"user {user} exists")
        return
    u, h, name = shlex.quote(user), shlex.quote(home), shlex.quote(REAL_NAME)
    yield StringCommand(
        "uid=$(for i in $(seq 401 499); do dscl . -list /Users UniqueID | awk '{print $2}' | grep -qx $i "
        "|| { dscl . -list /Groups PrimaryGroupID | awk '{print $2}' | grep -qx $i || { echo $i; break; }; }; done) && "
        f"test -n \"$uid\" && dseditgroup -o create -i $uid -r {name} {u} && "
        f"dscl . -create /Users/{u} && dscl . -create /Users/{u} UniqueID $uid && "
        f"dscl . -create /Users/{u} PrimaryGroupID $uid && dscl . -create /Users/{u} UserShell /usr/bin/false && "
        f"dscl . -create /Users/{u} NFSHomeDirectory {h} && dscl . -create /Users/{u} RealName {name} && "
        f"dscl . -create /Users/{u} IsHidden 1 && dscl . -create /Users/{u} Password '*'")


class PortListener(FactBase):
    """The process listening on a TCP port: (uid, executable path), or None when the port is free."""

    @staticmethod
    def default() -> None:
        return None

    def command(self, port: int) -> str:
        return (f"pid=$(lsof -nP -iTCP:{int(port)} -sTCP:LISTEN -t 2>/dev/null | head -n1); "
                'test -n "$pid" && ps -o uid= -o comm= -p "$pid" || true')

    def process(self, output: list[str]) -> tuple[int, str] | None:
        uid, _, path = (output[0].strip() if output else "").partition(" ")
        return (int(uid), path.strip()) if uid.isdecimal() and path.strip() else None


# Other Ollama servers a Mac may already run on the port (audit-ollama row 37): the app's LaunchAgent
# (Ollama.app/Contents/Library/LaunchAgents/com.ollama.ollama.plist) and `brew services` (homebrew.mxcl.ollama).
OTHER_OLLAMA_AGENTS = {"/Applications/Ollama.app/": "com.ollama.ollama", "/opt/homebrew/": "homebrew.mxcl.ollama"}


def other_ollama_agent(listener: tuple[int, str] | None, ours: str) -> str | None:
    """The launchd label of another Ollama holding the port (to stop), "" for an unknown process
    (to refuse), None when the port is free or held by r1fleet's own binary.

    >>> other_ollama_agent((501, "/Applications/Ollama.app/Contents/Resources/ollama"), "/usr/local/lib/r1fleet/ollama-0.32.9/ollama")
    'com.ollama.ollama'
    """
    if listener is None or listener[1] == ours:
        return None
    return next((label for prefix, label in OTHER_OLLAMA_AGENTS.items() if listener[1].startswith(prefix)), "")


@operation()
def stop_other_ollama(port: int, ours: str):
    """Stop and disable the Ollama.app or `brew services` server holding the port, so the LaunchDaemon
    (and the pull and preload that follow) talk to r1fleet's server; any other process there fails the host."""
    listener = host.get_fact(PortListener, port=port)
    label = other_ollama_agent(listener, ours)
    if label is None:
        host.noop(f"port {port} is free or r1fleet's")
        return
    if not label:
        yield refusal(f"port {port} is held by {listener[1]} (uid {listener[0]}): stop it first")
        return
    domain = f"gui/{listener[0]}/{label}"
    # disable: launchd does not start it again at the next login (the app re-registers only when opened)
    yield f"launchctl disable {domain}; launchctl bootout {domain} 2>/dev/null || true; pkill -x Ollama || true"


def default_gpu_limit_mib(total_mib: int) -> int:
    """macOS's default GPU working set: ~2/3 of RAM up to 36 GiB, ~3/4 above (drivers.md 5; Apple
    does not document the formula, these are the measured ratios)."""
    return total_mib * 2 // 3 if total_mib <= 36 * 1024 else total_mib * 3 // 4


def wired_limit_mib(plan: HostPlan, hw: Hardware | None = None) -> int | None:
    """The iogpu.wired_limit_mb the plan needs, or None when the default working set suffices."""
    total = (hw.unified.total_mib if hw and hw.unified else None) or plan.unified_memory_mib
    if not total or not plan.devices:
        return None
    default = hw.unified.gpu_limit_mib if hw and hw.unified else default_gpu_limit_mib(total)
    needed = plan.devices[0].planned_mib
    if needed <= default:
        return None
    return min(max(needed + 1024, default), total - constants().apple_os_reserve_mib)


def ollama_environment(plan: HostPlan, entry: HostConfig, models_dir: str) -> dict[str, str]:
    """The LaunchDaemon's EnvironmentVariables: the plan's settings, as on Linux, with a macOS home."""
    return {**linux_ollama_environment(plan, entry, models_dir), "HOME": HOME}


class MacOllamaRole(Role):
    """Ollama on an Apple Silicon Mac as the plan says (see module docstring)."""

    def __init__(self, plan: HostPlan, entry: HostConfig, hw: Hardware | None = None,
                 download: Download | None = None):
        self.plan, self.entry, self.hw, self.download = plan, entry, hw, download
        self.binary: str | None = None

    @classmethod
    def prepare(cls, ctx: HostContext) -> "MacOllamaRole":
        """The stand-in GGUF when the Mac imports it (rehearsal); Ollama pulls any other model itself."""
        download = model_download(ctx.host, ctx.plan, ctx.settings) if imports_stand_in(ctx.plan, ctx.settings, ctx.system) else None
        return cls(ctx.plan, ctx.settings, hw=ctx.hardware, download=download)

    def install(self) -> None:
        self.binary, self.binary_ops = _install(self.entry)

    def configure(self) -> None:
        if self.binary:
            self.plist = _configure(self.plan, self.entry, self.hw, self.binary)

    def activate(self) -> None:
        if self.binary:
            _activate(self.plan, self.entry, self.download, self.binary, [self.plist, *self.binary_ops])


@deploy("macOS Ollama")
def _install(entry: HostConfig) -> tuple[str | None, list]:
    """The pinned release (or Homebrew's, when the host data asks), the service user and the directories;
    returns the binary and the operations that change it (None: this is no Apple Silicon Mac)."""
    arch = host.get_fact(Arch)
    if arch not in ("arm64", "aarch64"):
        server.shell(name="Refuse: not Apple Silicon",
                     commands=[f"echo 'r1fleet: macOS host is {arch}; r1fleet serves Ollama on Apple Silicon only' >&2; exit 1"])
        return None, []
    pinned = load_pins().ollama
    release = None if host.data.get("macos_ollama") == "homebrew" else pinned.darwin_release()
    if release:
        version, url, sha256 = pinned.version, release.url, release.sha256
        directory = f"{RELEASE_ROOT}/ollama-{version}"
        archive = f"{directory}/ollama-darwin.tgz"
        files.directory(name="Ollama release directory", path=directory, user="root", group="wheel", mode="755",
                        _sudo=True)
        # Downloaded into the root-owned release directory, not pyinfra's predictable name in /tmp, where a
        # local user could plant a link before root writes through it.
        fetched = files.download(name=f"Ollama {version} for macOS", src=url, dest=archive, sha256sum=sha256,
                                 temp_dir=directory, extra_curl_args={"--max-filesize": str(UNSIZED_MAX_BYTES)},
                                 _sudo=True)
        server.shell(name="Unpack Ollama", commands=[f"tar -xzf {archive} -C {directory}"], _if=fetched.did_change,
                     _sudo=True)
        binary = f"{directory}/ollama"
        binary_ops = [fetched]
    else:
        logger.info(f"{host.name}: installing Homebrew's ollama formula, as the host data asks")
        # latest: an older bottle stays broken otherwise (0.30.x bottles shipped no llama-server: ollama#16430)
        binary_ops = [brew.packages(name="Ollama (Homebrew)", packages=["ollama"], latest=True)]
        binary = BREW_BINARY

    hidden_service_user(name=f"Service user {USER}", user=USER, home=HOME, _sudo=True)
    models_dir = ollama_models_dir(entry)
    # A removal that kept the models left them root's (roles/macos/remove.py): every file is the user's again
    files.directory(name=f"Directory {models_dir}, kept models too, owned by {USER}", path=models_dir, user=USER,
                    group=USER, recursive=True, _sudo=True)
    for path, owner, mode in ((HOME, USER, "750"), (entry.model_dir, "root", "755"), (models_dir, USER, "750"),
                              (str(Path(LOG_FILE).parent), USER, "750")):
        files.directory(name=f"Directory {path}", path=path, user=owner, group=owner if owner == USER else "wheel",
                        mode=mode, _sudo=True)
    return binary, binary_ops


@deploy("macOS Ollama")
def _configure(plan: HostPlan, entry: HostConfig, hw: Hardware | None, binary: str):
    """The LaunchDaemon (returned), and the GPU wired-memory limit."""
    models_dir = ollama_models_dir(entry)
    plist = files.template(
        name="Ollama LaunchDaemon", src=str(TEMPLATES / "com.r1fleet.ollama.plist.j2"), dest=PLIST,
        user="root", group="wheel", mode="644", label=LABEL, binary=binary, service_user=USER,
        environment=ollama_environment(plan, entry, models_dir), home=HOME, log_file=LOG_FILE,
        jinja_env_kwargs=plist_settings(), _sudo=True)
    _wired_limit(plan, hw)
    return plist


@deploy("macOS Ollama")
def _activate(plan: HostPlan, entry: HostConfig, download: Download | None, binary: str, changed: list) -> None:
    """(Re)load the LaunchDaemon when its file or the binary changed, wait for health, then the model."""
    stop_other_ollama(name="Stop another Ollama holding the port (Ollama.app, brew services)",
                      port=int(entry.port or DEFAULT_PORTS["ollama"]), ours=binary, _sudo=True)
    server.shell(
        name="(Re)load the Ollama LaunchDaemon",
        commands=[f"launchctl bootout system/{LABEL} 2>/dev/null || true",
                  f"launchctl bootstrap system {PLIST}",
                  f"launchctl kickstart -k system/{LABEL}"],
        _if=lambda: any(op.did_change() for op in changed), _sudo=True)
    wait_http(name="Health of the Ollama LaunchDaemon", url=f"{entry.local_api('ollama')}/api/version", what=LABEL,
              _if=lambda: any(op.did_change() for op in changed))
    ollama_model(plan, entry, binary, download, group="wheel", _sudo=True)
    _load_after_every_start(plan, entry)


def _load_after_every_start(plan: HostPlan, entry: HostConfig) -> None:
    """The planned model loaded again after a restart, a crash or a reboot (Linux: r1fleet-ollama-preload.service)."""
    api = entry.local_api("ollama")
    plist = files.template(
        name="LaunchDaemon that keeps the planned model loaded", src=str(TEMPLATES / "com.r1fleet.ollama-load.plist.j2"),
        dest=LOAD_PLIST, user="root", group="wheel", mode="644", label=LOAD_LABEL, service_user=USER,
        script=ollama_load_check(plan.ollama_tag or "", api), interval_s=LOAD_CHECK_INTERVAL_S,
        jinja_env_kwargs=plist_settings(), _sudo=True)
    server.shell(name="(Re)load that LaunchDaemon",
                 commands=[f"launchctl bootout system/{LOAD_LABEL} 2>/dev/null || true",
                           f"launchctl bootstrap system {LOAD_PLIST}"],
                 _if=plist.did_change, _sudo=True)


def _wired_limit(plan: HostPlan, hw: Hardware | None) -> None:
    limit = wired_limit_mib(plan, hw)
    if limit is None:
        if host.get_fact(File, path=WIRED_PLIST):
            server.shell(name="Drop the GPU wired-memory limit",
                         commands=[f"launchctl bootout system/{WIRED_LABEL} 2>/dev/null || true",
                                   f"rm -f {WIRED_PLIST}", "sysctl iogpu.wired_limit_mb=0"], _sudo=True)
        return
    total = (hw.unified.total_mib if hw and hw.unified else None) or plan.unified_memory_mib or 0
    plist = files.template(
        name=f"GPU wired-memory limit {limit} MiB at boot", src=str(TEMPLATES / "com.r1fleet.iogpu-wired-limit.plist.j2"),
        dest=WIRED_PLIST, user="root", group="wheel", mode="644", label=WIRED_LABEL, wired_limit_mb=limit,
        reserve_mb=total - limit, total_mb=total, jinja_env_kwargs=plist_settings(), _sudo=True)
    server.shell(name=f"Apply iogpu.wired_limit_mb={limit} now",
                 commands=[f"launchctl bootout system/{WIRED_LABEL} 2>/dev/null || true",
                           f"launchctl bootstrap system {WIRED_PLIST}", f"sysctl iogpu.wired_limit_mb={limit}"],
                 _if=plist.did_change, _sudo=True)
