"""Taking over an official Ollama install (install.sh's, or the manual one into /usr): its service stopped,
disabled and masked, its binaries and libraries removed, its models kept in r1fleet's store wherever its unit
kept them (or deleted, when the host data says so). What is official is read in official.py.

The mask is what keeps Ollama's documented update, running install.sh again (docs/linux.mdx:138-144), off
r1fleet's port: install.sh writes its unit with `tee /etc/systemd/system/ollama.service`, which writes through
the mask's link into /dev/null, and its `systemctl enable ollama` then fails on the masked unit
(scripts/install.sh:215-236, under `set -eu`), so its server is never started. Every Ollama host gets the mask,
taken over or not; the drop-ins under ollama.service.d stay (a masked unit ignores them) and come back with it
when r1fleet is removed (roles/ollama/remove.py).
"""

from __future__ import annotations

import shlex

from pyinfra import host
from pyinfra.api import FactBase, operation

from r1fleet.roles.ollama.official import (
    BINARIES,
    DEFAULT_STORE,
    LIBRARIES,
    UNIT,
    UNIT_PROPERTIES,
    OfficialOllama,
    parse_official,
    stores_to_adopt,
)

OFFICIAL_BINARY = BINARIES[0]  # install.sh's, where r1fleet's link goes: the CLI's place on PATH
OFFICIAL_UNIT = UNIT
OFFICIAL_STORE = DEFAULT_STORE


class OfficialInstall(FactBase):
    """What is left of an official Ollama (official.OfficialOllama): its unit as systemd sees it, its user's
    home, its binaries and libraries."""

    default = OfficialOllama

    def command(self) -> str:
        properties = " ".join(f"-p {name}" for name in UNIT_PROPERTIES)
        return (f"systemctl show {UNIT} {properties} 2>/dev/null; "
                f"u=$(systemctl show -p User --value {UNIT} 2>/dev/null); "
                "echo \"Home=$(getent passwd \"${u:-root}\" | cut -d: -f6)\"; "
                f"for f in {' '.join(BINARIES)}; do if test -f $f && ! test -L $f; then echo Binary=$f; fi; done; "
                f"for d in {' '.join(LIBRARIES)}; do if test -d $d && ! test -L $d; then echo Libraries=$d; fi; done; "
                "true")

    def process(self, output: list[str]) -> OfficialOllama:
        return parse_official(output)


class StoreHasModels(FactBase):
    """Whether an Ollama store holds any manifest (a model)."""

    default = bool

    def command(self, path: str) -> str:
        return f"test -n \"$(find {shlex.quote(path)}/manifests -type f 2>/dev/null | head -n1)\" && echo models; true"

    def process(self, output: list[str]) -> bool:
        return any(line.strip() == "models" for line in output)


@operation()
def retire_official_install():
    """Stop, disable and mask ollama.service (its unit file out of the mask's place) and remove Ollama's own
    binaries and libraries: the service holds the port, and runs as the user r1fleet's service takes over, whom
    `usermod` cannot change meanwhile."""
    found: OfficialOllama = host.get_fact(OfficialInstall)
    if found.masked and not found.binaries and not found.libraries:
        host.noop(f"{UNIT} masked, no official Ollama binary")
        return
    q = shlex.quote
    if found.unit_loaded:
        yield f"systemctl disable --now {UNIT}"
        if found.own_unit_file:
            yield f"rm -f {q(found.own_unit_file)}"
    if not found.masked:
        yield f"systemctl mask {UNIT}"
    if found.binaries:
        yield "rm -f " + " ".join(q(path) for path in found.binaries)
    if found.libraries:
        yield "rm -rf " + " ".join(q(path) for path in found.libraries)


def adopt_official_models(models_dir: str, user: str, keep: bool = True, **arguments):
    """Move the models of an official install, from wherever its unit kept them (an OLLAMA_MODELS drop-in) and
    from install.sh's default store, into r1fleet's store, so a model the host already holds is not downloaded
    again and the user's own models stay listed; or, when told not to keep them, delete them. `arguments`:
    pyinfra's own (`name`).

    The unit is read here, while the deploy is prepared: pyinfra runs an operation's body when it executes and
    reads its facts live then, and by then retire_official_install has masked the unit, whose environment (the
    drop-in's OLLAMA_MODELS) systemd no longer shows.

    Example: adopt_official_models(models_dir="/var/lib/r1fleet/models/ollama", user="ollama")"""
    found: OfficialOllama = host.get_fact(OfficialInstall)
    return move_official_models(stores=tuple(stores_to_adopt(found, models_dir)), models_dir=models_dir, user=user,
                                keep=keep, **arguments)


@operation()
def move_official_models(stores: tuple[str, ...], models_dir: str, user: str, keep: bool = True):
    """Move the models of these Ollama stores into r1fleet's (`models_dir`), or delete them (see
    adopt_official_models); a store without a manifest is left alone."""
    stores = [store for store in stores if host.get_fact(StoreHasModels, path=store)]
    if not stores:
        host.noop("no models in an official Ollama store")
        return
    q = shlex.quote
    dst = q(models_dir)
    for store in stores:
        src = q(store)
        if not keep:
            yield f"rm -rf {src}/manifests {src}/blobs"
            continue
        # blobs move without copying on one filesystem; across two they are copied, so they must fit first
        too_big = ("printf 'the models in %s need %s MiB on the filesystem of %s, %s MiB free: free space there, "
                   f"or set model_dir to a folder on the filesystem of %s\\n' {src} \"$need\" {dst} \"$free\" {src} >&2")
        yield (f"mkdir -p {dst}/blobs {dst}/manifests && "
               f"if [ -d {src}/blobs ] && [ \"$(stat -c %d {src}/blobs)\" != \"$(stat -c %d {dst}/blobs)\" ]; then "
               f"need=$(du -sm {src}/blobs | cut -f1); free=$(df -Pm {dst}/blobs | awk 'NR==2 {{print $4}}'); "
               f"if [ \"$need\" -gt \"$free\" ]; then {too_big}; exit 1; fi; fi && "
               # `-n` keeps a blob r1fleet's store already has
               f"find {src}/blobs -maxdepth 1 -type f -name 'sha256-*' -exec mv -n {{}} {dst}/blobs/ \\; && "
               f"cp -a {src}/manifests/. {dst}/manifests/ && rm -rf {src}/manifests && "
               f"chown -R {q(user)}:{q(user)} {dst}")
