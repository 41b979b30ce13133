"""Scripted answers (for the @fake stand-in host) that describe a host where things exist."""

from __future__ import annotations

import hashlib
import json

from r1fleet.operations.common import SERVICE_COMMENT

STAT = "stat -c 'user=%U group=%G mode=%A atime=%X mtime=%Y ctime=%Z size=%s %N' "


def file_exists(path: str, user: str = "root", group: str = "root", mode: str = "-rw-r--r--") -> dict[str, str]:
    return {f"{STAT}{path} ": f"user={user} group={group} mode={mode} atime=0 mtime=0 ctime=0 size=1 '{path}'"}


def directory(path: str, user: str, group: str, mode: str) -> dict[str, str]:
    return file_exists(path, user, group, mode)


def link(path: str, target: str) -> dict[str, str]:
    return {f"{STAT}{path} ": f"user=root group=root mode=lrwxrwxrwx atime=0 mtime=0 ctime=0 size=1 '{path}' -> '{target}'"}


def file_content(path: str, text: str, mode: str = "-rw-r--r--") -> dict[str, str]:
    """The file exists with exactly this content (what files.put/template compare)."""
    sha1 = hashlib.sha1(text.encode()).hexdigest()
    return {**file_exists(path, mode=mode), f"sha1sum {path}": f"{sha1}  {path}"}


def sha256_of(path: str, digest: str) -> dict[str, str]:
    """A downloaded file with its verification stamp (r1fleet's VerifiedDigest fact)."""
    return {f"s={path}.r1fleet-sha256;": f"stamped {digest}"}


def running(unit: str) -> dict[str, list[str]]:
    return {
        f"--property SubState {unit}": [f"Id={unit}", "SubState=running"],
        f"--property UnitFileState {unit}": [f"Id={unit}", "UnitFileState=enabled"],
    }


def users(*entries: tuple[str, str, str, list[str]], comment: str = SERVICE_COMMENT) -> dict:
    """Answer pyinfra's Users fact and r1fleet's SystemAccount: (name, home, shell, groups), each account marked with
    `comment` (r1fleet's mark unless the test says otherwise)."""
    lines = [f"{name}:x:999:999:{comment}:{home}:{shell}|{name}|{' '.join([name, *groups])}||"
             for name, home, shell, groups in entries]
    accounts = {f"getent passwd {name})": [f"passwd {name}:x:999:999:{comment}:{home}:{shell}", f"group {name}",
                                           f"groups {' '.join([name, *groups])}"]
                for name, home, shell, groups in entries}
    return {"for i in `cat /etc/passwd": lines, **accounts}


def ollama_api(api: str, tags: list[str], loaded: list[str]) -> dict[str, str]:
    return {
        f"{api}/api/tags": json.dumps({"models": [{"name": t, "digest": "d" * 64} for t in tags]}),
        f"{api}/api/ps": json.dumps({"models": [{"name": t} for t in loaded]}),
    }


def dpkg_installed(*packages: str) -> list[str]:
    return [f"ii  {name}  1.0-1  amd64  stand-in package" for name in packages]
