"""Taking over an official Ollama install (install.sh): its service stopped and disabled, its binary and
libraries removed, its models kept in r1fleet's store (or deleted, when the host data says so).
"""

from __future__ import annotations

import shlex

from pyinfra import host
from pyinfra.api import FactBase, operation

# What Ollama's install.sh leaves (scripts/install.sh of v0.32.9): the archive unpacked into /usr/local, so the
# binary is a regular file; ollama.service running `ollama serve` as user ollama (home /usr/share/ollama), so
# its models are in that home's .ollama/models (envconfig.Models()).
OFFICIAL_BINARY = "/usr/local/bin/ollama"
OFFICIAL_LIBRARIES = "/usr/local/lib/ollama"
OFFICIAL_UNIT = "ollama.service"
OFFICIAL_STORE = "/usr/share/ollama/.ollama/models"


class OfficialInstall(FactBase):
    """What is left of an official (install.sh) Ollama: {"binary": regular file there, "unit": enabled or
    running, "models": its store holds manifests}."""

    default = dict

    def command(self) -> str:
        return (f"test -f {OFFICIAL_BINARY} && ! test -L {OFFICIAL_BINARY} && echo binary; "
                f"systemctl is-enabled --quiet {OFFICIAL_UNIT} 2>/dev/null && echo unit; "
                f"systemctl is-active --quiet {OFFICIAL_UNIT} 2>/dev/null && echo unit; "
                f"test -n \"$(find {OFFICIAL_STORE}/manifests -type f 2>/dev/null | head -n1)\" && echo models; true")

    def process(self, output: list[str]) -> dict:
        found = {line.strip() for line in output}
        return {key: key in found for key in ("binary", "unit", "models")}


@operation()
def retire_official_install():
    """Stop and disable install.sh's ollama.service and remove its binary and libraries (the service holds
    the port, and runs as the user r1fleet's service takes over, whom `usermod` cannot change meanwhile)."""
    found = host.get_fact(OfficialInstall)
    if not (found.get("unit") or found.get("binary")):
        host.noop("no official Ollama service or binary")
        return
    if found.get("unit"):
        yield f"systemctl disable --now {OFFICIAL_UNIT}"
    if found.get("binary"):
        yield f"rm -f {OFFICIAL_BINARY} && rm -rf {OFFICIAL_LIBRARIES}"


@operation()
def adopt_official_models(models_dir: str, user: str, keep: bool = True):
    """Move the models of an official install into r1fleet's store, so a model the host already holds is
    not downloaded again and the user's own models stay listed; or, when told not to keep them, delete them.

    Example: adopt_official_models(models_dir="/var/lib/r1fleet/models/ollama", user="ollama")"""
    if not host.get_fact(OfficialInstall).get("models"):
        host.noop("no models in an official Ollama store")
        return
    if not keep:
        yield f"rm -rf {OFFICIAL_STORE}/manifests {OFFICIAL_STORE}/blobs"
        return
    src, dst = OFFICIAL_STORE, shlex.quote(models_dir)
    # blobs move without copying on one filesystem; `-n` keeps a blob r1fleet's store already has
    yield (f"mkdir -p {dst}/blobs {dst}/manifests && "
           f"find {src}/blobs -maxdepth 1 -type f -name 'sha256-*' -exec mv -n {{}} {dst}/blobs/ \\; && "
           f"cp -a {src}/manifests/. {dst}/manifests/ && rm -rf {src}/manifests && "
           f"chown -R {shlex.quote(user)}:{shlex.quote(user)} {dst}")
