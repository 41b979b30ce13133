"""Taking r1fleet off a host: the shape every role's removal has, and the operations the removals share.

Every role that writes something on a host has a removal beside it (`r1fleet/roles/<role>/remove.py`), which
names exactly what that role writes, with the names of its decide.py, so deploy and removal cannot drift apart.
A removal is built from the host's settings alone (no probe, no plan: a host whose hardware changed, or that
no model fits, is removed all the same) and offers two stages:

  stop     services and daemons, so nothing runs from r1fleet's files any more
  remove   firewall, files, directories and accounts

The run stops every role's services before any role removes anything (`apply_removals`). Each operation decides
from the host when it runs, so a removal of a clean host changes nothing, and one that stopped midway is
completed by the next.

What a removal deletes is r1fleet's by name or by mark, never by guess: files and directories whose names are
r1fleet's (its units, `/opt/r1fleet`, `/etc/r1fleet`), accounts that carry r1fleet's mark
(`SERVICE_COMMENT`), firewall rules marked `r1fleet`. The model files stay unless the host data says
`remove_models`; kept, they become root's, so no later account that reuses the deleted user's id owns them.
"""

from __future__ import annotations

import posixpath
import shlex
from typing import Iterable

from pyinfra import host
from pyinfra.api import FactBase, operation

from r1fleet.fleet.config import HostConfig
from r1fleet.operations.common import SERVICE_COMMENT, STAMP_SUFFIX, SystemAccount
from r1fleet.render.systemd_unit import UNIT_DIR

STAGES = ("stop", "remove")
# What r1fleet leaves beside every model file it downloads: the stamp of its verification, and a download
# that has not finished (a model file only once it is verified and renamed).
DOWNLOAD_LEFTOVERS = (f"*{STAMP_SUFFIX}", "*.part")


class Removal:
    """The shape of every role's removal, built from the host's settings alone; a stage with nothing to do is
    simply not overridden."""

    def __init__(self, settings: HostConfig):
        self.settings = settings

    def stop(self) -> None:
        """Stop and disable the role's services and daemons."""

    def remove(self) -> None:
        """Remove the role's firewall, files, directories and accounts."""


def apply_removals(removals: list[Removal]) -> None:
    """Every removal's stop stage, then every removal's remove stage, in the removals' order."""
    # host.loop: pyinfra orders a loop's operations by their position in it, not only by source line
    for stage in host.loop(STAGES):
        for removal in host.loop(removals):
            getattr(removal, stage)()


# ---------------------------------------------------------------------------------------------
# Facts


class UnitFiles(FactBase):
    """An r1fleet unit as a removal sees it: {"file": its unit file exists, "state": ActiveState, "enabled":
    is-enabled's word, "drop_ins": the names in its .d folder (None: no folder), "links": enablement links left
    in UNIT_DIR's .wants/.requires folders}."""

    default = dict

    def command(self, unit: str) -> str:
        q = shlex.quote
        path = q(f"{UNIT_DIR}/{unit}")
        return (f"[ -e {path} ] || [ -L {path} ] && echo file; "
                f"echo \"state $(systemctl show -p ActiveState --value {q(unit)} 2>/dev/null)\"; "
                f"echo \"enabled $(systemctl is-enabled {q(unit)} 2>/dev/null)\"; "
                f"if [ -d {path}.d ]; then echo dir; ls -1A {path}.d | sed 's/^/drop-in /'; fi; "
                f"for l in {q(UNIT_DIR)}/*/{q(unit)}; do [ -L \"$l\" ] && echo \"link $l\"; done; true")

    def process(self, output: list[str]) -> dict:
        words = [line.split(" ", 1) + [""] for line in output if line.strip()]
        found = {"file": False, "state": "", "enabled": "", "drop_ins": None, "links": []}
        for key, value, *_ in words:
            if key == "file":
                found["file"] = True
            elif key in ("state", "enabled"):
                found[key] = value.strip()
            elif key == "dir":
                found["drop_ins"] = []
            elif key == "drop-in" and found["drop_ins"] is not None:
                found["drop_ins"].append(value.strip())
            elif key == "link":
                found["links"].append(value.strip())
        return found


class ExistingPaths(FactBase):
    """Which of `paths` exist (a dangling link counts), in the order given."""

    default = list

    def command(self, paths: tuple[str, ...]) -> str:
        checks = [f"{{ [ -e {shlex.quote(p)} ] || [ -L {shlex.quote(p)} ]; }} && echo {shlex.quote(p)}" for p in paths]
        return "; ".join([*checks, "true"])

    def process(self, output: list[str]) -> list[str]:
        return [line.strip() for line in output if line.strip()]


class DirectoryEntries(FactBase):
    """For each of `paths` that is a directory: the names in it ({path: [names]}; absent when it is none)."""

    default = dict

    def command(self, paths: tuple[str, ...]) -> str:
        steps = [f"if [ -d {shlex.quote(p)} ] && ! [ -L {shlex.quote(p)} ]; then echo dir {shlex.quote(p)}; "
                 f"ls -1A {shlex.quote(p)} | sed 's/^/entry /'; fi" for p in paths]
        return "; ".join([*steps, "true"])

    def process(self, output: list[str]) -> dict:
        found: dict[str, list[str]] = {}
        current = None
        for line in output:
            key, _, value = line.partition(" ")
            if key == "dir":
                current = value.strip()
                found[current] = []
            elif key == "entry" and current is not None:
                found[current].append(value.strip())
        return found


def name_tests(names: tuple[str, ...]) -> str:
    """find's tests for any of `names` (patterns), quoted for the shell: `-name A -o -name B`."""
    return " -o ".join(f"-name {shlex.quote(name)}" for name in names)


class ModelDirectory(FactBase):
    """A folder of models as a removal sees it: {"leftovers": r1fleet's own files in it (download stamps,
    unfinished downloads, the names given), "foreign": whether anything in it belongs to another owner than
    root}; {} when it does not exist."""

    default = dict

    def command(self, path: str, leftovers: tuple[str, ...]) -> str:
        q = shlex.quote
        names = name_tests(leftovers)
        # Whether there are any, never their names: a file name may hold a newline, and the removal deletes them on
        # the host by find itself (leftovers_removed), so no name is ever read back into a command.
        return (f"d={q(path)}; [ -d \"$d\" ] && ! [ -L \"$d\" ] || exit 0; echo dir; "
                f"find \"$d\" -mindepth 1 \\( {names} \\) -prune -print -quit | sed 's/^.*$/leftover/'; "
                "find \"$d\" \\( ! -uid 0 -o ! -gid 0 \\) -print -quit | sed 's/^.*$/foreign/'; true")

    def process(self, output: list[str]) -> dict:
        lines = [line.rstrip("\n") for line in output if line.strip()]
        if "dir" not in lines:
            return {}
        return {"leftovers": any(line.split(" ", 1)[0] == "leftover" for line in lines), "foreign": "foreign" in lines}


class LinkTarget(FactBase):
    """Where a symbolic link points (None when `path` is no link)."""

    @staticmethod
    def default() -> None:
        return None

    def command(self, path: str) -> str:
        return f"[ -L {shlex.quote(path)} ] && readlink {shlex.quote(path)} || true"

    def process(self, output: list[str]) -> str | None:
        return output[0].strip() if output and output[0].strip() else None


# ---------------------------------------------------------------------------------------------
# Operations


def running(state: str) -> bool:
    """Whether a unit's ActiveState means something of it may still run (a restart pending, a start underway)."""
    return state not in ("", "inactive", "failed")


@operation()
def stop_unit(unit: str):
    """Stop and disable an r1fleet unit (a unit whose file went already is still stopped if it runs)."""
    found = host.get_fact(UnitFiles, unit=unit)
    stop, disable = running(found.get("state", "")), found.get("file") and found.get("enabled") == "enabled"
    if not (stop or disable):
        host.noop(f"{unit} neither runs nor is enabled")
        return
    q = shlex.quote(unit)
    if disable:
        yield f"systemctl disable {q}"
    if stop:
        yield f"systemctl stop {q}"


@operation()
def remove_unit(unit: str):
    """Remove an r1fleet unit's file and enablement links, its drop-in folder once no drop-in is left in it
    (the roles remove their own drop-ins first; one of the user's stays, with its folder), and systemd's
    memory of it."""
    found = host.get_fact(UnitFiles, unit=unit)
    path = f"{UNIT_DIR}/{unit}"
    empty_folder = found.get("drop_ins") == []
    failed = found.get("state") == "failed"
    if not (found.get("file") or found.get("links") or empty_folder or failed):
        host.noop(f"no {unit}")
        return
    q = shlex.quote
    doomed = [path] * bool(found.get("file")) + list(found.get("links") or [])
    if doomed:
        yield "rm -f -- " + " ".join(q(p) for p in doomed)
    if empty_folder:
        yield f"rmdir {q(path + '.d')}"
    yield "systemctl daemon-reload"
    yield f"systemctl reset-failed {q(unit)} 2>/dev/null || true"


@operation()
def remove_paths(paths: tuple[str, ...]):
    """Remove r1fleet's files and folders (whole), those of `paths` that exist."""
    present = host.get_fact(ExistingPaths, paths=tuple(paths))
    if not present:
        host.noop(f"none of {', '.join(paths)}")
        return
    yield "rm -rf -- " + " ".join(shlex.quote(p) for p in present)


@operation()
def remove_empty_directories(paths: tuple[str, ...]):
    """Remove those of `paths` that are folders with nothing left in them, children before parents (one of
    them emptied by removing another counts as empty): a folder that holds anything else stays."""
    entries = host.get_fact(DirectoryEntries, paths=tuple(paths))
    gone: set[str] = set()
    for path in paths:
        if path in entries and all(posixpath.join(path, name) in gone for name in entries[path]):
            gone.add(path)
    if not gone:
        host.noop("no empty r1fleet folder")
        return
    yield "rmdir -- " + " ".join(shlex.quote(p) for p in paths if p in gone)


@operation()
def models_kept_or_removed(path: str, remove: bool, leftovers: Iterable[str] = DOWNLOAD_LEFTOVERS):
    """A folder of model files: removed whole when `remove`; else r1fleet's own files in it (`leftovers`: download
    stamps and unfinished downloads, or the names given) removed and the models kept, owned by root."""
    names = tuple(leftovers)
    found = host.get_fact(ModelDirectory, path=path, leftovers=names)
    if not found:
        host.noop(f"no {path}")
        return
    q = shlex.quote
    if remove:
        yield f"rm -rf -- {q(path)}"
        return
    if not (found["leftovers"] or found["foreign"]):
        host.noop(f"the models in {path} are kept, root's")
        return
    if found["leftovers"]:
        yield leftovers_removed(path, names)
    if found["foreign"]:
        # -h: a link in the folder is changed itself, never what it points to
        yield f"chown -Rh 0:0 {q(path)}"


def leftovers_removed(path: str, names: tuple[str, ...]) -> str:
    r"""Shell: delete r1fleet's own files in a folder of models by name pattern, on the host, by find itself.

    >>> print(leftovers_removed("/m", ("*.part",)))
    find /m -mindepth 1 \( -name '*.part' \) -prune -exec rm -rf -- {} +
    """
    return f"find {shlex.quote(path)} -mindepth 1 \\( {name_tests(names)} \\) -prune -exec rm -rf -- {{}} +"


@operation()
def remove_service_account(account: str, home: str):
    """Delete a service account r1fleet made or took over (marked SERVICE_COMMENT, with r1fleet's home for it),
    its own group and its home; an account of that name without r1fleet's mark is left as it is."""
    found = host.get_fact(SystemAccount, account=account)
    if not found:
        host.noop(f"no account {account}")
        return
    if found.get("comment") != SERVICE_COMMENT or found.get("home") != home:
        host.noop(f"account {account} is not r1fleet's (no {SERVICE_COMMENT!r} with home {home}): kept")
        return
    q = shlex.quote
    yield f"userdel {q(account)}"
    if found.get("group") == account:  # its own group, where the host's userdel does not remove it itself
        yield f"if getent group {q(account)} >/dev/null; then groupdel {q(account)}; fi"
    yield f"rm -rf -- {q(home)}"


@operation()
def remove_link_into(path: str, root: str):
    """Remove the link `path` when it points into `root` (r1fleet's); anything else there stays."""
    target = host.get_fact(LinkTarget, path=path)
    if not target or not target.startswith(root.rstrip("/") + "/"):
        host.noop(f"{path} is no link into {root}")
        return
    yield f"rm -f -- {shlex.quote(path)}"
