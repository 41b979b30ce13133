"""The disk a deploy writes, checked before anything is downloaded: every filesystem it writes to, with what it
writes there, against that filesystem's free space (the probe's `df`, `df-install` and `releases` sections). Pure.

What a deploy writes:
- the model into the model directory (`download_mib`: nothing for a model already there);
- a release of Ollama (an Ollama host's, or the one a llama.cpp host takes llama-server from) under INSTALL_ROOT,
  unless that very release is installed: each archive is downloaded and unpacked in a temporary folder there
  (roles/ollama/role.py install_release), so an archive and its tree are on disk at once. Their sizes are pins
  (versions.yaml `ollama.sizes`): about 3.5 GiB for amd64, 3.4 GiB more with the ROCm add-on. The release it
  replaces stays until the new one is healthy, and is already counted as used.
Two folders on one filesystem (the same mount point) add up there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from r1fleet.artifacts.ollama_release import OllamaRelease
from r1fleet.artifacts.pins import Pins, download_mib, load_pins
from r1fleet.errors import DeployError
from r1fleet.plan.memory import MIB, constants
from r1fleet.records import INSTALL_ROOT, Hardware, HostPlan


@dataclass(frozen=True)
class DiskUse:
    """What the deploy writes into one folder, and that folder's filesystem as the probe saw it."""

    what: str  # e.g. "the model (4,467 MiB) in /var/lib/r1fleet/models"
    need_mib: int
    mount: str | None  # None: an older probe without the mount point (its own filesystem, then)
    free_mib: int | None


def release_mib(release: OllamaRelease, hw: Hardware, pins: Pins | None = None) -> int:
    """What installing `release` writes under INSTALL_ROOT: nothing when the probe found it installed."""
    if release.stamp in hw.installed_releases:
        return 0
    ollama = (pins or load_pins()).ollama
    return math.ceil(sum(ollama.install_bytes(asset.name, asset.sha256) for asset in release.assets) / MIB)


def disk_uses(plan: HostPlan, hw: Hardware, model_dir: str, imported: bool = False,
              release: OllamaRelease | None = None, pins: Pins | None = None) -> list[DiskUse]:
    """Each folder the deploy writes to, with what it writes there (only those it writes to)."""
    uses = []
    model = download_mib(plan, hw, imported)
    if model:
        uses.append(DiskUse(f"the model ({model:,} MiB) in {model_dir}", model, hw.model_mount, hw.disk_free_mib))
    runtime = release_mib(release, hw, pins) if release is not None else 0
    if runtime and hw.install_disk is not None:
        uses.append(DiskUse(f"Ollama {release.version}, its archives and their unpacked tree ({runtime:,} MiB), "
                            f"in {INSTALL_ROOT}", runtime, hw.install_disk.mount, hw.install_disk.free_mib))
    return uses


def check_disks(host: str, plan: HostPlan, hw: Hardware, model_dir: str, imported: bool = False,
                release: OllamaRelease | None = None, pins: Pins | None = None) -> None:
    """Refuse a host when a filesystem the deploy writes to cannot take what it writes there plus a margin,
    naming the filesystem, what goes there, what it needs and what is free; before anything changes."""
    margin = constants().disk_margin_mib
    by_filesystem: dict[str, list[DiskUse]] = {}
    for use in disk_uses(plan, hw, model_dir, imported, release, pins):
        if use.free_mib is not None:
            by_filesystem.setdefault(use.mount or use.what, []).append(use)
    for mount, uses in by_filesystem.items():
        need, free = sum(use.need_mib for use in uses), uses[0].free_mib
        if free >= need + margin:
            continue
        where = f"the filesystem at {mount}" if uses[0].mount else "its filesystem"
        model_only = all(use.what.startswith("the model") for use in uses)
        raise DeployError(
            f"{where} needs {need:,} MiB for {' and '.join(use.what for use in uses)}, plus a {margin:,} MiB margin, "
            f"and {free:,} MiB are free",
            host=host, field="model_dir" if model_only else "disk",
            fix=(f"free space on {mount if uses[0].mount else 'it'}"
                 + (", or set model_dir to a directory on a larger disk" if model_only else
                    f", or mount a larger disk at {INSTALL_ROOT}" if not any(u.what.startswith("the model") for u in uses)
                    else f", or set model_dir to a directory on another disk than {INSTALL_ROOT}")),
        )
