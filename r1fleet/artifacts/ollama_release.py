"""Which pinned Ollama release archives a host downloads: the base archive and the add-on its GPU needs, each
with its sha256 from versions.yaml (or the host's own override)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from r1fleet.errors import DeployError
from r1fleet.artifacts.pins import Download, Pins, Platform, load_pins
from r1fleet.fleet.config import OllamaReleaseOverride
from r1fleet.records import INSTALL_ROOT, HostPlan

OLLAMA_ROOT = f"{INSTALL_ROOT}/ollama"


@dataclass(frozen=True)
class OllamaRelease:
    version: str
    assets: tuple[Download, ...]

    @property
    def install_dir(self) -> str:
        return f"{OLLAMA_ROOT}/{self.version}"

    @property
    def binary(self) -> str:
        return f"{self.install_dir}/bin/ollama"

    @property
    def needs_zstd(self) -> bool:
        return any(a.name.endswith(".tar.zst") for a in self.assets)

    @property
    def stamp(self) -> str:
        """A marker file name that changes when any archive changes (so a re-pin reinstalls)."""
        digest = hashlib.sha256("".join(a.sha256 for a in self.assets).encode()).hexdigest()[:16]
        return f"{self.install_dir}/.r1fleet-installed-{digest}"


def ollama_asset_stems(platform: Platform, vendor: str | None, placement: str | None) -> list[str]:
    """Archive names without extension: the base archive plus the add-on the GPU needs."""
    base = f"ollama-linux-{platform.arch}"
    stems = [base]
    if placement != "cpu" and vendor == "amd" and platform.arch == "amd64":
        stems.append(f"{base}-rocm")
    if platform.arch == "arm64" and platform.tegra_major in (35, 36):
        stems.append(f"{base}-jetpack{5 if platform.tegra_major == 35 else 6}")
    return stems


def parse_sha256sums(text: str) -> dict[str, str]:
    """`sha256sum` output ("<hex>  name" or "<hex> *name") -> {name: hex}; './' prefixes dropped."""
    sums: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.strip().split()
        if len(parts) == 2 and re.fullmatch(r"[0-9a-fA-F]{64}", parts[0]):
            sums[parts[1].lstrip("*").removeprefix("./")] = parts[0].lower()
    return sums


def ollama_release(
    host: str,
    platform: Platform,
    plan: HostPlan,
    override: OllamaReleaseOverride | None = None,
    pins: Pins | None = None,
) -> OllamaRelease:
    """Pick the archives for this host and their sha256 (override first, then versions.yaml).

    For each stem, the zstd archive is preferred when its sha256 is known; the .tgz is the
    fallback (pre-0.14 releases, and the lab's stand-in), as install.sh does.
    """
    pinned = (pins or load_pins()).ollama
    override = override or OllamaReleaseOverride()
    version = override.version or pinned.version
    base_url = override.base_url.format(version=version).rstrip("/") if override.base_url else pinned.release_url(version)
    # The pinned sums hold for the pinned version only; host data may add the ones it lacks (a JetPack add-on).
    known = dict(pinned.sha256) if version == pinned.version else {}
    known.update(override.sha256)
    assets = []
    for stem in ollama_asset_stems(platform, plan.vendor, plan.placement):
        for name in (f"{stem}.tar.zst", f"{stem}.tgz"):
            if known.get(name):
                assets.append(Download(name=name, url=f"{base_url}/{name}", sha256=known[name].lower()))
                break
        else:
            raise DeployError(
                f"no sha256 is pinned for {stem}.tar.zst (Ollama {version})",
                host=host,
                field="ollama.sha256",
                fix="add its line from the release's sha256sum.txt to r1fleet/artifacts/versions.yaml or host data ollama_release.sha256",
            )
    return OllamaRelease(version=version, assets=tuple(assets))
