"""Which pinned Ollama release archives a host downloads: the base archive and the add-on its GPU needs, each
with its sha256 from versions.yaml (or the host's own override)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from r1fleet.errors import DeployError
from r1fleet.artifacts.pins import Download, Pins, Platform, load_pins
from r1fleet.fleet.config import HostConfig, OllamaReleaseOverride
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


def release_downloads(
    platform: Platform,
    plan: HostPlan,
    override: OllamaReleaseOverride | None = None,
    pins: Pins | None = None,
) -> tuple[str, dict[str, Download | None]]:
    """(version, {archive stem: its download, or None where no sha256 is known for it}), override first, then
    versions.yaml. For each stem the zstd archive is preferred when its sha256 is known; the .tgz is the
    fallback (pre-0.14 releases, and the lab's stand-in), as install.sh does."""
    pinned = (pins or load_pins()).ollama
    override = override or OllamaReleaseOverride()
    version = override.version or pinned.version
    base_url = override.base_url.format(version=version).rstrip("/") if override.base_url else pinned.release_url(version)
    # The pinned sums hold for the pinned version only; host data may add the ones it lacks (a JetPack add-on).
    known = dict(pinned.sha256) if version == pinned.version else {}
    known.update(override.sha256)
    downloads: dict[str, Download | None] = {}
    for stem in ollama_asset_stems(platform, plan.vendor, plan.placement):
        name = next((n for n in (f"{stem}.tar.zst", f"{stem}.tgz") if known.get(n)), None)
        downloads[stem] = Download(name=name, url=f"{base_url}/{name}", sha256=known[name].lower()) if name else None
    return version, downloads


def ollama_release(
    host: str,
    platform: Platform,
    plan: HostPlan,
    override: OllamaReleaseOverride | None = None,
    pins: Pins | None = None,
) -> OllamaRelease:
    """The archives for this host with their sha256 (release_downloads); DeployError for one without a sha256."""
    version, downloads = release_downloads(platform, plan, override, pins)
    for stem, download in downloads.items():
        if download is None:
            raise DeployError(
                f"no sha256 is pinned for {stem}.tar.zst (Ollama {version})",
                host=host,
                field="ollama.sha256",
                fix="add its line from the release's sha256sum.txt to r1fleet/artifacts/versions.yaml or host data ollama_release.sha256",
            )
    return OllamaRelease(version=version, assets=tuple(d for d in downloads.values() if d is not None))


def host_release(plan: HostPlan, settings: HostConfig, platform: Platform, pins: Pins | None = None) -> OllamaRelease:
    """The release an Ollama host installs: its host data's override (the lab gives its stand-in's), else the
    pinned one, from the host's mirror when it has one."""
    return ollama_release(plan.host, platform, plan, release_override(settings), pins)


def release_override(settings: HostConfig) -> OllamaReleaseOverride | None:
    if settings.ollama_release is None and settings.mirror:
        # a mirror changes where the pinned bytes come from, never which bytes (audit M8)
        return OllamaReleaseOverride(base_url=f"{settings.mirror.rstrip('/')}/ollama")
    return settings.ollama_release
