"""Ollama role: the pinned release, a dedicated user, our own hardened unit, the planned model.

Layout on the host:
  /opt/r1fleet/ollama/<version>/{bin,lib}   one directory per release (an upgrade never mixes
                                            old and new runner libraries; older ones are pruned
                                            once the new one is healthy)
  /usr/local/bin/ollama -> <version>/bin/ollama   for the CLI
  /etc/systemd/system/r1fleet-ollama.service      ours, not install.sh's ollama.service, so the
                                            official installer can never overwrite it
An official install (install.sh's or the manual one into /usr: a regular ollama binary, ollama.service, models
where that unit keeps them) is taken over first (takeover.py): its service stopped, disabled and masked (both
would bind 11434), its binaries and libraries removed, its models moved into r1fleet's store.
  <model_dir>/ollama                        OLLAMA_MODELS, owned by the ollama user
"""

from __future__ import annotations

import hashlib
import json
import shlex
from typing import Mapping

from pyinfra import host
from pyinfra.api import FactBase, deploy, operation
from pyinfra.facts.files import File
from pathlib import Path

from pyinfra.operations import files, server, systemd

from r1fleet.fleet.config import HostConfig
from r1fleet.operations.stages import HostContext, Role
from r1fleet.roles.ollama.takeover import (
    OFFICIAL_BINARY,
    OFFICIAL_STORE,
    OfficialInstall,
    StoreHasModels,
    adopt_official_models,
    retire_official_install,
)
from r1fleet.operations.fleet_cache import routed
from r1fleet.operations.host_progress import file_poll, newest, watching
from r1fleet.operations.fact_batch import FactRequest, directory_reads, file_reads, link_reads, package_reads
from r1fleet.artifacts.pins import Download, model_download
from r1fleet.roles.ollama.registry import RegistryFetch, RegistrySource, checked_pull, place_registry_model, registry_source
from r1fleet.artifacts.ollama_release import OLLAMA_ROOT, OllamaRelease, host_release
from r1fleet.roles.ollama.decide import (
    API_WAIT_S,
    API_WAIT_SLACK_S,
    IMPORT_RECORD,
    PRELOAD_RECORD,
    PRELOAD_UNIT,
    weights_label,
    MODELFILE,
    import_dir,
    import_record,
    import_record_digest,
    imported_with,
    imports_stand_in,
    modelfile,
    ollama_api_wait,
    ollama_environment,
    ollama_models_dir,
    ollama_tag_digest,
    preload_unit_context,
    takes_from_registry,
    weights_digest,
)
from r1fleet.render.formats import unit_settings
from r1fleet.render.systemd_unit import LLAMA_UNIT, OLLAMA_UNIT, UNIT_DIR, health_timeout_s, unit_context
from r1fleet.records import HostPlan
from r1fleet.operations.common import (
    HttpJson,
    retire_service,
    converge_service,
    refusal,
    converge_service_reads,
    download_label,
    fetch_verified,
    fetch_verified_reads,
    json_or_none,
    model_names,
    retire_service_reads,
    service_user,
    service_user_reads,
    unit_file,
    verified_fetch_steps,
)
from r1fleet.roles.ollama.decide import HOME, USER


TEMPLATES = Path(__file__).resolve().parent / "templates"


class DirEntries(FactBase):
    """Names in a directory (empty when it does not exist)."""

    default = list

    def command(self, path: str) -> str:
        return f"ls -1A {shlex.quote(path)} 2>/dev/null || true"

    def process(self, output: list[str]) -> list[str]:
        return [line.strip() for line in output if line.strip()]


@operation()
def install_release(release: OllamaRelease):
    """Download, verify and unpack every archive into a temp dir, then rename it into place."""
    if host.get_fact(File, path=release.stamp):
        host.noop(f"Ollama {release.version} installed")
        return
    routing = routed([(asset, asset.name) for asset in release.assets])
    yield from routing.commands()
    q = shlex.quote
    steps = [
        "set -e",
        f"mkdir -p {OLLAMA_ROOT}",
        f"tmp=$(mktemp -d {OLLAMA_ROOT}/.tmp.XXXXXX)",
        "trap 'rm -rf \"$tmp\"' EXIT",
        'mkdir "$tmp/tree"',
    ]
    for asset in routing.value:
        archive = f'"$tmp"/{q(asset.name)}'
        steps += verified_fetch_steps(asset.url, archive, asset.sha256, asset.size, fallback=asset.fallback_url)
        if asset.name.endswith(".tar.zst"):
            steps.append(f'zstd -dc {archive} | tar -C "$tmp/tree" -xf -')
        else:
            steps.append(f'tar -C "$tmp/tree" -xzf {archive}')
    steps += [
        'test -x "$tmp/tree/bin/ollama" || { echo "archive has no bin/ollama" >&2; exit 1; }',
        f'touch "$tmp/tree/{release.stamp.rsplit("/", 1)[1]}"',
        'chown -R root:root "$tmp/tree"',
        'chmod -R u=rwX,go=rX "$tmp/tree"',
        f"rm -rf {q(release.install_dir)}",
        f'mv "$tmp/tree" {q(release.install_dir)}',
    ]
    this_run = f"d={newest(f'{OLLAMA_ROOT}/.tmp.*')}"  # this run's mktemp dir
    archives = file_poll({asset.name: f'"$d"/{q(asset.name)}' for asset in release.assets}, setup=this_run)
    with watching(f"Ollama {release.version}", archives):
        yield "; ".join(steps)


@operation()
def prune_releases(keep: str):
    """Remove other release directories and leftovers of interrupted installs."""
    stale = [name for name in host.get_fact(DirEntries, path=OLLAMA_ROOT) if name != keep]
    if not stale:
        host.noop("no other Ollama releases")
        return
    yield "rm -rf " + " ".join(shlex.quote(f"{OLLAMA_ROOT}/{name}") for name in stale)


@operation()
def pull_model(tag: str, api: str, binary: str, models_dir: str, weights: str | None):
    """`ollama pull <tag>` unless /api/tags already lists it (`r1fleet verify` checks its weights' digest), its
    progress read from the server's store (`models_dir`, its OLLAMA_MODELS) while it runs, and what it brought
    checked against the pinned `weights` right after (checked_pull)."""
    if tag in model_names(host.get_fact(HttpJson, url=f"{api}/api/tags")):
        host.noop(f"model {tag} present")
        return
    yield from checked_pull(tag, api, binary, models_dir, weights)


class JsonFile(FactBase):
    """A JSON file's content, or None when it is missing or not JSON."""

    default = type(None)

    def command(self, path: str) -> str:
        return f"cat {shlex.quote(path)} 2>/dev/null || true"

    def process(self, output: list[str]):
        return json_or_none(output)


@operation()
def import_model(tag: str, api: str, binary: str, modelfile_path: str, source_sha256: str, record_path: str,
                 modelfile_sha256: str):
    """Offline import of a local GGUF (`ollama create -f Modelfile`). Nothing happens when the tag is there as
    recorded (record_import) for this very file: the stored weights are llama-quantize's rewrite of the file,
    not the file, so only the digest Ollama reported right after the import identifies them.

    Example: import_model(tag="r1fleet/smollm2:135m-instruct-q4_1", api="http://127.0.0.1:11434", ...)"""
    tags = host.get_fact(HttpJson, url=f"{api}/api/tags")
    record = host.get_fact(JsonFile, path=record_path)
    recorded = import_record_digest(record, tag, source_sha256)
    if recorded is not None and recorded == ollama_tag_digest(tags, tag) and imported_with(record, modelfile_sha256):
        host.noop(f"model {tag} present, imported from {source_sha256[:12]}")
        return
    q = shlex.quote
    yield f"OLLAMA_HOST={q(api)} {q(binary)} create {q(tag)} -f {q(modelfile_path)}"


@operation()
def record_import(tag: str, api: str, source_sha256: str, record_path: str, modelfile_sha256: str):
    """The import record verify compares with: the tag, the file it came from and the digest Ollama reports
    for it now (read when this runs, after any import). Deterministic, so a rebuilt host writes the same bytes."""
    digest = ollama_tag_digest(host.get_fact(HttpJson, url=f"{api}/api/tags"), tag)
    wanted = import_record(tag, source_sha256, digest, modelfile_sha256)
    if host.get_fact(JsonFile, path=record_path) == wanted:
        host.noop(f"import of {tag} recorded")
        return
    if digest is None:
        yield refusal(f"Ollama does not list {tag} after importing it; see journalctl -u {OLLAMA_UNIT}")
        return
    q = shlex.quote
    text = json.dumps(wanted, sort_keys=True)
    yield f"printf '%s\\n' {q(text)} > {q(record_path + '.tmp')} && mv -f {q(record_path + '.tmp')} {q(record_path)}"


@operation()
def preload_model(tag: str, api: str):
    """Load the model now and keep it loaded (an empty generate request with keep_alive -1)."""
    if tag in model_names(host.get_fact(HttpJson, url=f"{api}/api/ps")):
        host.noop(f"model {tag} loaded")
        return
    body = json.dumps({"model": tag, "keep_alive": -1})
    yield f"curl -fsS --max-time 600 -X POST -H 'Content-Type: application/json' -d {shlex.quote(body)} {shlex.quote(api + '/api/generate')} >/dev/null"


@operation()
def load_through_preload_unit(tag: str, api: str, bound_s: int):
    """Load the model through the preload unit (the one that loads it after every start of the server) and wait
    for its result, unless it is loaded: the record and the unit show this attempt as they show one at boot. The
    wait is bounded, the load is not: `timeout` ends only systemctl's wait, never the unit's request."""
    if tag in model_names(host.get_fact(HttpJson, url=f"{api}/api/ps")):
        host.noop(f"model {tag} loaded")
        return
    q = shlex.quote
    yield (f"timeout {bound_s} systemctl start --wait {q(PRELOAD_UNIT)}; rc=$?; "
           f"if [ $rc -eq 124 ]; then echo \"{tag} is still loading after {bound_s} s; the load goes on "
           f"(r1fleet status shows when it ends; journalctl -u {PRELOAD_UNIT})\" >&2; exit 1; fi; "
           f"if [ $rc -ne 0 ]; then echo \"loading {tag} failed: $(sed -n 's/^detail=//p' {q(PRELOAD_RECORD)})"
           f" (journalctl -u {PRELOAD_UNIT} -u {OLLAMA_UNIT})\" >&2; exit 1; fi")


class OllamaRole(Role):
    """Ollama for the plan: the pinned release, a dedicated user, r1fleet's own unit, the planned model;
    `download` is the stand-in GGUF in rehearsal."""

    def __init__(self, plan: HostPlan, settings: HostConfig, release: OllamaRelease, download: Download | None,
                 model_files: Mapping[str, int] | None = None):
        self.plan, self.settings, self.release, self.download = plan, settings, release, download
        self.model_files = model_files or {}  # the probe's large files in the model directory, by name
        self.registry: RegistrySource | RegistryFetch | None = None  # the model through the controller's cache
        self.models_dir = ollama_models_dir(settings)
        self.api = settings.local_api("ollama")

    @classmethod
    def prepare(cls, ctx: HostContext) -> "OllamaRole":
        """The release for this platform (the pinned one, or the lab mirror's stand-in); the stand-in GGUF when
        the host imports it."""
        download = model_download(ctx.host, ctx.plan, ctx.settings) if imports_stand_in(ctx.plan, ctx.settings, ctx.system) else None
        return cls(ctx.plan, ctx.settings, host_release(ctx.plan, ctx.settings, ctx.platform()), download,
                   ctx.hardware.model_files)

    def reads(self) -> list[FactRequest]:
        return ollama_reads(self.plan, self.settings, self.release, self.download)

    def install(self) -> None:
        if self.download is None and takes_from_registry(self.plan, self.settings, "Linux"):  # this role serves Linux hosts
            self.registry = registry_source(self.plan, self.settings, self.model_files)
        self.installed = _install(self.plan, self.settings, self.release, self.models_dir)

    def configure(self) -> None:
        self.unit, self.preload_unit = _configure(self.plan, self.settings, self.release, self.models_dir)

    def activate(self) -> None:
        _activate(self.plan, self.settings, self.release, self.download, self.unit, self.preload_unit, self.installed,
                  self.registry)


@deploy("Ollama")
def _install(plan: HostPlan, settings: HostConfig, release: OllamaRelease, models_dir: str):
    retire_service(LLAMA_UNIT)
    packages = ["curl", "ca-certificates", "tar"] + (["zstd"] if release.needs_zstd else [])
    server.packages(name="Packages for Ollama", packages=packages)
    # An install.sh install holds the port, the CLI's path, the service user and the user's models: taken
    # over before the user is changed and before ours starts.
    retire_official_install(name="Stop and remove an official Ollama install")
    service_user(USER, HOME, plan.uses_gpu)
    files.directory(name="Model root", path=settings.model_dir, user="root", group="root", mode="0755")
    # A removal that kept the models left them root's (roles/ollama/remove.py): every file is the user's again
    files.directory(name="Ollama models, kept ones too, owned by ollama", path=models_dir, user=USER, group=USER,
                    recursive=True)
    files.directory(name="Ollama models", path=models_dir, user=USER, group=USER, mode="0750")
    adopt_official_models(name="Keep the models of an official Ollama install", models_dir=models_dir, user=USER,
                          keep=settings.official_ollama_models == "keep")
    installed = install_release(name=f"Ollama {release.version}", release=release)
    files.link(name="ollama on PATH", path=OFFICIAL_BINARY, target=release.binary, symbolic=True)
    return installed


@deploy("Ollama")
def _configure(plan: HostPlan, settings: HostConfig, release: OllamaRelease, models_dir: str):
    api = settings.local_api("ollama")
    context = unit_context(
        plan,
        settings,
        description=f"r1fleet Ollama {release.version} ({plan.model})",
        user=USER,
        exec_start=[release.binary, "serve"],
        environment=ollama_environment(plan, settings, models_dir),
        read_write_paths=[HOME, models_dir],
        # The server itself downloads models from the registry, so no IP allow-list here.
        restrict_ip=False,
        exec_start_post=ollama_api_wait(api),
        timeout_start_s=API_WAIT_S + API_WAIT_SLACK_S,
        wants=[PRELOAD_UNIT],
    )
    preload = files.template(
        name=f"Unit {PRELOAD_UNIT}", src=str(TEMPLATES / f"{PRELOAD_UNIT}.j2"), dest=f"{UNIT_DIR}/{PRELOAD_UNIT}",
        user="root", group="root", mode="0644", jinja_env_kwargs=unit_settings(), svc=preload_unit_context(plan, settings),
    )
    return unit_file(OLLAMA_UNIT, context), preload


@deploy("Ollama")
def _activate(plan: HostPlan, settings: HostConfig, release: OllamaRelease, download: Download | None,
              unit, preload_unit, installed, registry: RegistrySource | RegistryFetch | None) -> None:
    api = settings.local_api("ollama")
    # the preload unit alone changed: systemd reads it again, and the server keeps running (converge_service
    # reloads when the server's own unit changed)
    systemd.daemon_reload(name=f"Reload systemd for {PRELOAD_UNIT}",
                          _if=lambda: preload_unit.did_change() and not unit.did_change())
    converge_service(OLLAMA_UNIT, unit, [installed], f"{api}/api/version", files_used=(release.binary,))
    prune_releases(name="Prune other Ollama releases", keep=release.version)
    ollama_model(plan, settings, release.binary, download, registry=registry, preload_bound_s=health_timeout_s(plan))


def ollama_reads(plan: HostPlan, settings: HostConfig, release: OllamaRelease,
                 download: Download | None) -> list[FactRequest]:
    """Every fact OllamaRole reads on a host where nothing changes (fetched in one round trip first)."""
    models_dir = ollama_models_dir(settings)
    return [
        *retire_service_reads(LLAMA_UNIT), *package_reads(), (OfficialInstall, {}), (StoreHasModels, {"path": OFFICIAL_STORE}),
        *service_user_reads(USER, HOME),
        *directory_reads(settings.model_dir), *directory_reads(models_dir), (File, {"path": release.stamp}),
        *link_reads(OFFICIAL_BINARY), *converge_service_reads(OLLAMA_UNIT, (release.binary,)),
        *file_reads(f"{UNIT_DIR}/{PRELOAD_UNIT}"),
        (DirEntries, {"path": OLLAMA_ROOT}), *ollama_model_reads(settings, download),
    ]


def import_path(settings: HostConfig, download: Download) -> str:
    """Where the stand-in GGUF is kept for `ollama create` (rehearsal)."""
    return f"{import_dir(settings)}/{download.name}"


def ollama_model_reads(settings: HostConfig, download: Download | None) -> list[FactRequest]:
    api = settings.local_api("ollama")
    reads: list[FactRequest] = [(HttpJson, {"url": f"{api}/api/tags"}), (HttpJson, {"url": f"{api}/api/ps"})]
    if download is not None:
        imports = import_dir(settings)
        reads += [*directory_reads(imports), *fetch_verified_reads(import_path(settings, download)),
                  *file_reads(f"{imports}/{MODELFILE}"), (JsonFile, {"path": f"{imports}/{IMPORT_RECORD}"})]
    return reads


@deploy("Ollama model")
def ollama_model(plan: HostPlan, settings: HostConfig, binary: str, download: Download | None,
                 group: str = "root", registry: RegistrySource | RegistryFetch | None = None,
                 preload_bound_s: int | None = None) -> None:
    """The planned model in the running server: placed from the controller's cache (`registry`), else pulled
    by its exact tag, or in rehearsal the stand-in GGUF imported offline (`ollama create`); then loaded and
    kept loaded. Linux and macOS alike: on Linux (`preload_bound_s`, how long the deploy waits for the load)
    through the preload unit, on macOS by a request of its own."""
    api = settings.local_api("ollama")
    tag = plan.ollama_tag or ""
    if download is not None:
        imports = import_dir(settings)
        gguf_path = import_path(settings, download)
        files.directory(name="Import directory", path=imports, user="root", group=group, mode="0755")
        fetch_verified(name=f"Stand-in {download_label(download)}", download=download, dest=gguf_path,
                       user="root", group=group, mode="0644")
        text = modelfile(gguf_path)
        text_sha256 = hashlib.sha256(text.encode()).hexdigest()
        files.put(
            name="Modelfile for the stand-in",
            src=_text(text),
            dest=f"{imports}/{MODELFILE}",
            user="root",
            group=group,
            mode="0644",
        )
        import_model(name=f"Import {tag}", tag=tag, api=api, binary=binary, modelfile_path=f"{imports}/{MODELFILE}",
                     source_sha256=download.sha256, record_path=f"{imports}/{IMPORT_RECORD}",
                     modelfile_sha256=text_sha256)
        record_import(name=f"Record the import of {tag}", tag=tag, api=api, source_sha256=download.sha256,
                      record_path=f"{imports}/{IMPORT_RECORD}", modelfile_sha256=text_sha256)
    elif registry is not None:
        place_registry_model(name=f"Model {tag}{weights_label(plan)}", source=registry,
                             tag=tag, api=api, models_dir=ollama_models_dir(settings), user=USER, binary=binary)
    else:
        pull_model(name=f"Pull {tag}", tag=tag, api=api, binary=binary, models_dir=ollama_models_dir(settings),
                   weights=weights_digest(plan))
    if preload_bound_s is not None:
        load_through_preload_unit(name=f"Preload {tag}", tag=tag, api=api, bound_s=preload_bound_s)
    else:
        preload_model(name=f"Preload {tag}", tag=tag, api=api)


def _text(content: str):
    from io import StringIO

    return StringIO(content)
