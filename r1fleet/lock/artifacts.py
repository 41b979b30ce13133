"""What a locked host downloads, by digest: the `artifacts` of a lock entry (r1fleet/lock/match.py).

Pure: every value comes from the repository's pinned data (versions.yaml, catalog.yaml,
data/drivers.yaml) through the same functions the roles decide with, never from the network, so a
digest is recorded only where the repository knows it (null otherwise, never a guess).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from r1fleet.plan.catalog import load_catalog
from r1fleet.fleet.config import HostConfig
from r1fleet.plan.drivers import decide_driver
from r1fleet.errors import R1FleetError
from r1fleet.records import DriverFacts, Hardware, HostPlan
from r1fleet.artifacts.pins import Pins, Platform, load_pins, platform_from_hardware
from r1fleet.artifacts.llama_cpp_install import llama_cpp_install
from r1fleet.artifacts.ollama_release import host_release, release_downloads, release_override


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OllamaAsset(_Strict):
    name: str
    sha256: str | None = None


class OllamaArtifact(_Strict):
    """The Ollama release archives for this host's platform (Linux: base + GPU add-on; macOS: one archive)."""

    version: str
    assets: list[OllamaAsset]


class OllamaManifest(_Strict):
    """The registry manifest of the tag the host serves (the stand-in's in rehearsal), as the controller's cache
    took it: its sha256 is the digest the host's Ollama reports."""

    tag: str
    sha256: str


class ModelArtifact(_Strict):
    """The model as the catalog pins it: the Ollama tag and its weights layer, and the GGUF file."""

    id: str
    ollama_tag: str
    ollama_digest: str | None = None
    ollama_manifest: OllamaManifest | None = None  # null until a deploy (or `r1fleet cache fill`) cached it

    def manifest_for(self, tag: str | None) -> str | None:
        """The locked manifest's sha256 when it is the one of `tag` (the tag the host serves)."""
        manifest = self.ollama_manifest
        return manifest.sha256 if manifest is not None and manifest.tag == tag else None
    gguf_file: str
    gguf_size_bytes: int | None = None
    gguf_sha256: str | None = None
    gguf_revision: str | None = None


class LlamaCppArtifact(_Strict):
    """Where llama-server comes from: inside the Ollama archive (build named by Ollama), or a pinned source build."""

    method: Literal["ollama-bundle", "source", "package"]
    build: str | None = None
    source_sha256: str | None = None


class DriverArtifact(_Strict):
    """The GPU driver branch a clean install of this host gets (data/drivers.yaml). Package names are left
    out: some carry the kernel release (linux-headers-6.8.0-45-generic), which changes with every kernel."""

    vendor: str | None = None
    branch: str
    open_modules: bool = False


class GatewayArtifact(_Strict):
    """The gateway host's HAProxy: the distribution's package, as apt saw it when the lock was written (the
    distribution's security updates move it; the lock records which one a fleet was proven with)."""

    package: Literal["haproxy"] = "haproxy"
    installed: str | None = None
    candidate: str | None = None


class Artifacts(_Strict):
    ollama: OllamaArtifact | None = None
    model: ModelArtifact | None = None
    llama_cpp: LlamaCppArtifact | None = None
    driver: DriverArtifact | None = None
    gateway: GatewayArtifact | None = None  # the gateway host only (the fleet file's gateway.host)
    notes: list[str] = []


def with_gateway(artifacts: Artifacts, hw: Hardware) -> Artifacts:
    """The gateway host's artifacts with its HAProxy package's versions, from its probe; a note when apt gave none."""
    versions = hw.haproxy
    if versions is None or not (versions.installed or versions.candidate):
        note = "the gateway's haproxy package: apt on this host reports no version (not a Debian or Ubuntu host?)"
        return artifacts.model_copy(update={"gateway": GatewayArtifact(), "notes": [*artifacts.notes, note]})
    return artifacts.model_copy(update={"gateway": GatewayArtifact(installed=versions.installed,
                                                                   candidate=versions.candidate)})


def artifacts_for(hw: Hardware, plan: HostPlan, settings: HostConfig,
                  pins: Pins | None = None) -> Artifacts:
    """Every artifact the deploy would fetch for this plan on this host, by digest, and notes on what the lock
    cannot pin or the deploy will refuse."""
    pins = pins or load_pins()
    notes: list[str] = []
    # Artifacts is built last: pydantic copies a list it validates, so notes added after would be lost.
    found = {"model": model_artifact(plan), "driver": driver_artifact(hw, plan, notes)}
    if plan.model is not None and hw.os.system.lower() == "darwin":
        found["ollama"] = darwin_ollama(pins)
    elif plan.model is not None:
        found.update(linux_artifacts(hw, plan, settings, pins, notes))
    return Artifacts(**found, notes=notes)


def linux_artifacts(hw: Hardware, plan: HostPlan, settings: HostConfig, pins: Pins, notes: list[str]) -> dict:
    """The Ollama release and the llama.cpp build of a Linux host (whichever its backend needs)."""
    try:
        platform = platform_from_hardware(hw)
    except R1FleetError as err:
        notes.append(f"no Ollama or llama.cpp artifact: {err}")
        return {}
    llama = None
    if plan.backend == "llama.cpp":
        llama = llama_cpp_artifact(platform, plan, settings, pins, notes)
    needs_ollama = plan.backend == "ollama" or (llama is not None and llama.method == "ollama-bundle")
    ollama = linux_ollama(platform, plan, settings, pins, notes) if needs_ollama else None
    if settings.profile and needs_ollama:
        notes.append("lab host: the lab mirror serves its own stand-in Ollama release in place of the pinned one")
    return {"ollama": ollama, "llama_cpp": llama}


def model_artifact(plan: HostPlan) -> ModelArtifact | None:
    if plan.model is None:
        return None
    model = load_catalog().find(plan.model)
    gguf = model.gguf
    return ModelArtifact(id=model.id, ollama_tag=model.ollama_tag, ollama_digest=model.ollama_digest,
                         gguf_file=gguf.file, gguf_size_bytes=gguf.size_bytes, gguf_sha256=gguf.sha256,
                         gguf_revision=gguf.revision)


def linux_ollama(platform: Platform, plan: HostPlan, settings: HostConfig, pins: Pins,
                 notes: list[str]) -> OllamaArtifact:
    """The archives roles/ollama installs (host_release decides for both); an archive without a sha256 stays null
    and the others keep theirs."""
    try:
        release = host_release(plan, settings, platform, pins)
    except R1FleetError as err:
        notes.append(f"the deploy will refuse this host's Ollama archive: {err}")
        version, downloads = release_downloads(platform, plan, release_override(settings), pins)
        return OllamaArtifact(version=version, assets=[
            OllamaAsset(name=d.name, sha256=d.sha256) if d else OllamaAsset(name=f"{stem}.tar.zst")
            for stem, d in downloads.items()])
    return OllamaArtifact(version=release.version,
                          assets=[OllamaAsset(name=a.name, sha256=a.sha256) for a in release.assets])


def darwin_ollama(pins: Pins) -> OllamaArtifact:
    """The macOS role's archive (versions.yaml `ollama.darwin`)."""
    darwin = pins.ollama.darwin
    return OllamaArtifact(version=pins.ollama.version, assets=[OllamaAsset(name=darwin.asset, sha256=darwin.sha256)])


def llama_cpp_artifact(platform: Platform, plan: HostPlan, settings: HostConfig, pins: Pins,
                       notes: list[str]) -> LlamaCppArtifact | None:
    """The llama.cpp role's own choice (llama_cpp_install), asked as if apt offered no package: what a host
    offers is known only at deploy time, and a distro package's version is the distro's, not pinned here."""
    debian = pins.llama_cpp.debian
    if platform.distro_id == "debian" and platform.codename in debian.codenames:
        notes.append(f"Debian {platform.codename}: the deploy prefers the distro's {debian.server_package} when apt "
                     "offers it; its version is the distro's, not locked here")
    try:
        install = llama_cpp_install(platform, plan, settings, set(), pins)
    except R1FleetError as err:
        notes.append(f"the deploy will refuse this host's llama.cpp: {err}")
        return None
    sha = pins.llama_cpp.source_sha256 if install.method == "source" else None
    return LlamaCppArtifact(method=install.method, build=install.tag, source_sha256=sha)


def driver_artifact(hw: Hardware, plan: HostPlan, notes: list[str]) -> DriverArtifact | None:
    """The driver decision for this hardware with no driver installed: what a rebuild installs, whatever
    driver runs today (the deploy leaves a good one alone, a reinstalled host gets this branch)."""
    clean = hw.model_copy(update={"gpus": [g.model_copy(update={"driver_version": None}) for g in hw.gpus],
                                  "driver": DriverFacts()})
    action = decide_driver(clean, plan)
    if action.kind == "refuse":
        notes.append(f"driver: {action.reason}")
    if not action.branch:
        return None  # none to install (macOS, DGX OS, Jetson, no GPU) or the distro's in-kernel driver (AMD)
    return DriverArtifact(vendor=action.vendor, branch=action.branch, open_modules=action.open_modules)
