"""What a host is and what it downloads: its platform, the pinned versions (and sizes), the model file and the
disk it takes (the disk check itself: r1fleet/artifacts/disk.py).

Pure: the roles turn these into operations."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from r1fleet.errors import DeployError
from r1fleet.fleet.config import HostConfig
from r1fleet.plan.memory import MIB
from r1fleet.records import Hardware, HostPlan
from r1fleet.plan.catalog import load_catalog

VERSIONS_FILE = Path(__file__).with_name("versions.yaml")


# ---------------------------------------------------------------------------------------------
# Platform (what the roles need from the probe's Hardware)


@dataclass(frozen=True)
class Platform:
    arch: str  # Ollama/Debian naming: amd64 | arm64
    distro_id: str
    codename: str
    tegra_major: int | None  # 35 (JetPack 5) or 36 (JetPack 6) on Jetson


_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


def platform_from_hardware(hw: Hardware) -> Platform:
    arch = _ARCH.get(hw.os.arch.lower())
    if arch is None:
        raise DeployError(
            f"architecture {hw.os.arch!r} is not supported (Ollama and llama.cpp builds exist for x86_64 and aarch64)",
            host=hw.host,
            field="uname",
            fix="deploy to an x86_64 or aarch64 host",
        )
    tegra = None
    if hw.tegra_release:
        match = re.search(r"R(\d+)", hw.tegra_release)
        tegra = int(match.group(1)) if match else None
    return Platform(arch=arch, distro_id=hw.os.id.lower(), codename=hw.os.codename.lower(), tegra_major=tegra)


# ---------------------------------------------------------------------------------------------
# Pins: versions.yaml, typed


class _Pinned(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-fA-F]{64}$")]


class DarwinOllamaPins(_Pinned):
    asset: str
    sha256: Sha256 | None = None


class AssetSize(_Pinned):
    """An archive's bytes and the bytes of the tree it unpacks to."""

    archive: int = Field(gt=0)
    unpacked: int = Field(gt=0)

    @property
    def install_bytes(self) -> int:
        """What unpacking it needs at once: the archive stays until its tree is in place."""
        return self.archive + self.unpacked


class OllamaPins(_Pinned):
    version: str
    base_url: str = Field(description="the release's download folder; {version} is filled in")
    sha256: dict[str, Sha256 | None] = {}
    sizes: dict[str, AssetSize] = {}
    darwin: DarwinOllamaPins

    def install_bytes(self, asset: str, sha256: str) -> int:
        """The disk an asset's install needs, when it is the pinned one (its sha256): its recorded sizes, else
        the largest recorded; 0 for other bytes (a host's own release, the lab's stand-in), whose sizes no pin
        gives."""
        if (self.sha256.get(asset) or "").lower() != sha256.lower():
            return 0
        size = self.sizes.get(asset) or max(self.sizes.values(), key=lambda s: s.install_bytes, default=None)
        return size.install_bytes if size else 0

    def release_url(self, version: str | None = None) -> str:
        return self.base_url.format(version=version or self.version).rstrip("/")

    def darwin_release(self) -> Download | None:
        """The macOS archive of the pinned release, or None while its sha256 is not known."""
        if not self.darwin.sha256:
            return None
        return Download(name=self.darwin.asset, url=f"{self.release_url()}/{self.darwin.asset}",
                        sha256=self.darwin.sha256.lower())


class OllamaBundlePins(_Pinned):
    llama_cpp_build: str
    server: str
    library_dir: str
    backends: dict[str, str]
    jetson_backends: dict[int, str]
    required_flags: tuple[str, ...]


class DebianLlamaPins(_Pinned):
    codenames: tuple[str, ...]
    server_package: str
    backend_packages: dict[str, str]
    sid_contrib_only: tuple[str, ...] = ()
    server_binary: str
    rpc_server_package: str
    rpc_backend_package: str
    rpc_server_binary: str = Field(description="{multiarch} is filled in")


class LlamaCppPins(_Pinned):
    ollama_bundle: OllamaBundlePins
    tag: str
    source_url: str = Field(description="{tag} is filled in")
    source_sha256: Sha256

    debian: DebianLlamaPins

    @property
    def source(self) -> str:
        return self.source_url.format(tag=self.tag)


class Pins(_Pinned):
    """Every version and sha256 r1fleet installs (versions.yaml)."""

    ollama: OllamaPins
    llama_cpp: LlamaCppPins


@lru_cache(maxsize=4)
def load_pins(path: str | None = None) -> Pins:
    return Pins.model_validate(yaml.safe_load(Path(path or VERSIONS_FILE).read_text()))


# ---------------------------------------------------------------------------------------------
# Models


@dataclass(frozen=True)
class Download:
    """A file a host downloads and checks by sha256 (a model file, an Ollama release archive)."""

    name: str
    url: str
    sha256: str
    size: int | None = None  # bytes, when pinned: the download's progress shows the time left
    fallback_url: str | None = None  # tried when `url` (the controller's cache) cannot be reached


def model_download(host: str, plan: HostPlan, settings: HostConfig) -> Download:
    """The GGUF to fetch: from the artifact mirror in rehearsal (when set), else the catalog URL."""
    gguf = plan.gguf
    if gguf is None:
        raise DeployError("the plan has no GGUF file", host=host, field="plan.gguf", fix="pick a catalog model with a gguf entry")
    sha = (gguf.sha256 or "").lower()
    if not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise DeployError(
            f"no sha256 is known for {gguf.file}; r1fleet downloads only verified models",
            host=host,
            field="catalog gguf.sha256",
            fix="add the file's sha256 to r1fleet/plan/catalog.yaml",
        )
    if settings.mirror and (settings.rehearsal or not gguf.url):
        url = f"{settings.mirror.rstrip('/')}/models/{gguf.file}"
    elif gguf.url:
        url = gguf.url
    else:
        fix = ("rehearsal serves the stand-in from an artifact mirror: set mirror: for this host (the lab does), or drop rehearsal"
               if settings.rehearsal else "set the catalog URL or a mirror for this host")
        raise DeployError(f"no download URL for {gguf.file}", host=host, field="catalog gguf.url", fix=fix)
    return Download(name=gguf.file, url=url, sha256=sha, size=gguf.size_bytes)


def download_mib(plan: HostPlan, hw: Hardware, imported: bool = False) -> int:
    """What the deploy will write to the model directory: nothing for a model file already there; twice the
    file for an Ollama import (`imported`: the GGUF, and Ollama's stored copy of it)."""
    gguf = plan.gguf
    if gguf is None or not gguf.size_bytes:
        return 0
    size_mib = math.ceil(gguf.size_bytes / MIB)
    if plan.backend == "llama.cpp":
        return 0 if hw.model_files.get(gguf.file) == gguf.size_bytes else size_mib
    model = load_catalog().find(plan.model) if plan.model else None
    if model and model.ollama_digest and f"sha256-{model.ollama_digest}" in hw.model_files:
        return 0
    if imported:
        return size_mib * 2
    # a pull writes the tag's own layer, which differs from the GGUF where Ollama quantized the weights itself
    return math.ceil(model.ollama_size_bytes / MIB) if model and model.ollama_size_bytes else size_mib

