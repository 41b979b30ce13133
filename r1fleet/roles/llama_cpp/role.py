"""llama.cpp role: llama-server with the plan's tensor split, behind a hardened unit.

Install: the distro package where it ships llama-server with the plan's GPU backend (Debian
forky/sid); elsewhere the llama-server inside the pinned Ollama archive, unpacked into
/opt/r1fleet/ollama/<version> (its CUDA runtime beside it: no toolkit on the host), and checked for
every flag r1fleet passes and for the planned GPUs before the service starts; a source build of the
pinned tag only when the host data asks for it (`llama_cpp_install: source`; needs nvcc).
Model: <model_dir>/llama.cpp/<file>, owned by the `llama` user, downloaded once (resumable,
sha256-verified, renamed into place only when good).
"""

from __future__ import annotations

import shlex
from dataclasses import replace
from typing import TYPE_CHECKING

from pyinfra import host
from pyinfra.api import FactBase, deploy, operation
from pyinfra.facts.files import File
from pyinfra.operations import files, server

from r1fleet.fleet.config import HostConfig
from r1fleet.operations.stages import HostContext, Role
from r1fleet.operations.fact_batch import FactRequest, directory_reads, package_reads
from r1fleet.artifacts.pins import Download, Platform, load_pins, model_download
from r1fleet.roles.llama_cpp.pool import pool_head
from r1fleet.roles.rpc_worker.decide import pinned, pool_versions
from r1fleet.roles.rpc_worker.role import choose_pool_install
from r1fleet.artifacts.llama_cpp_install import LLAMA_ROOT, LlamaInstall, llama_cpp_install
from r1fleet.roles.llama_cpp.decide import (
    API_KEY_CREDENTIAL,
    llama_environment,
    llama_models_dir,
    llama_server_args,
    llama_server_problems,
)
from r1fleet.render.systemd_unit import (
    LLAMA_UNIT,
    OLLAMA_PRELOAD_UNIT,
    OLLAMA_UNIT,
    UnitSpecifier,
    health_timeout_s,
    unit_context,
)
from r1fleet.records import HostPlan
from r1fleet.roles.ollama.role import install_release
from r1fleet.operations.host_progress import newest, watching_build
from r1fleet.operations.tcp_health import check_reachable
from r1fleet.operations.common import (
    refusal,
    retire_service,
    AptCandidates,
    converge_service,
    converge_service_reads,
    download_label,
    fetch_verified,
    fetch_verified_reads,
    retire_service_reads,
    service_user,
    service_user_reads,
    unit_file,
    verified_fetch_steps,
)
from r1fleet.roles.llama_cpp.decide import HOME, USER

if TYPE_CHECKING:  # for annotations only: llama_cpp.pool imports rpc_worker.decide, which imports llama_cpp.decide
    from r1fleet.roles.llama_cpp.pool import PoolHead


def choose_install(plan: HostPlan, settings: HostConfig, platform: Platform) -> LlamaInstall:
    """Ask apt (Debian hosts only) which packages it can install, then decide (pure)."""
    available: set[str] = set()
    if platform.distro_id == "debian":
        debian = load_pins().llama_cpp.debian
        wanted = (debian.server_package, *debian.backend_packages.values())
        available = host.get_fact(AptCandidates, packages=tuple(wanted))
    return llama_cpp_install(platform, plan, settings, available)


@operation()
def build_from_source(tag: str, url: str, sha256: str, flags: tuple[str, ...]):
    """Build llama-server for the plan's GPUs into /opt/r1fleet/llama.cpp/<tag> unless present."""
    binary = f"{LLAMA_ROOT}/{tag}/bin/llama-server"
    if host.get_fact(File, path=binary):
        host.noop(f"llama-server {tag} built")
        return
    q = shlex.quote
    cmake_flags = " ".join(q(f) for f in flags)
    needs_cuda = any(f == "-DGGML_CUDA=ON" for f in flags)
    steps = [
        "set -e",
        "export PATH=/usr/local/cuda/bin:$PATH",
        f"mkdir -p {LLAMA_ROOT}/.build",
        f"tmp=$(mktemp -d {LLAMA_ROOT}/.build/{tag}.XXXXXX)",
        "trap 'rm -rf \"$tmp\"' EXIT",
    ]
    if needs_cuda:
        steps.append(
            "command -v nvcc >/dev/null || { echo 'the CUDA toolkit (nvcc) is missing: a source build "
            "(llama_cpp_install: source) needs it installed first; the default (auto) uses the llama-server "
            "of the pinned Ollama archive, which brings its own CUDA runtime' >&2; exit 1; }"
        )
    steps += [
        *verified_fetch_steps(url, '"$tmp/src.tar.gz"', sha256, None),  # pinned by sha256 alone (versions.yaml)
        'tar -C "$tmp" -xzf "$tmp/src.tar.gz"',
        'src=$(find "$tmp" -mindepth 1 -maxdepth 1 -type d | head -n1)',
        # Static llama/ggml libraries (the CUDA runtime stays the toolkit's shared libraries).
        f'cmake -S "$src" -B "$tmp/build" -DBUILD_SHARED_LIBS=OFF {cmake_flags}',
        # Into a log that the controller polls for the last `[ NN%]` line; its end is shown when the build fails.
        'cmake --build "$tmp/build" --config Release -j"$(nproc)" --target llama-server > "$tmp/build.log" 2>&1 '
        '|| { tail -n 60 "$tmp/build.log" >&2; exit 1; }',
        'install -D -m 0755 "$tmp/build/bin/llama-server" "$tmp/out/bin/llama-server"',
        f"rm -rf {q(f'{LLAMA_ROOT}/{tag}')}",
        f'mv "$tmp/out" {q(f"{LLAMA_ROOT}/{tag}")}',
    ]
    this_build = newest(f"{LLAMA_ROOT}/.build/{q(tag)}.*")  # this build's mktemp dir
    with watching_build(f"llama-server {tag} build", f"{this_build}/build.log"):
        yield "; ".join(steps)


class LlamaServerReadiness(FactBase):
    """What a llama-server offers on this host: is it there, which of `flags` its --help lacks, which devices it lists."""

    default = dict

    def command(self, binary: str, environment: tuple[tuple[str, str], ...], flags: tuple[str, ...]) -> str:
        q = shlex.quote
        run = "env " + " ".join(q(f"{k}={v}") for k, v in environment) + " " + q(binary)
        checks = "".join(f"printf '%s\\n' \"$help\" | grep -q -e {q(flag)} || echo missing-flag {q(flag)}; " for flag in flags)
        return (
            f"if [ ! -x {q(binary)} ]; then echo missing-binary; exit 0; fi; help=$({run} --help 2>&1); {checks}"
            # --list-devices prints `  CUDA0: NVIDIA GeForce RTX 3090 (24124 MiB, 23853 MiB free)` per device
            f"{run} --list-devices 2>&1 | sed -n 's/^ *\\([A-Za-z_]*[0-9][0-9]*\\): .*/device \\1/p'; true"
        )

    def process(self, output: list[str]) -> dict:
        words = [line.split(" ", 1) for line in output if line.strip()]
        return {
            "missing_binary": any(w[0] == "missing-binary" for w in words),
            "missing_flags": [w[1] for w in words if w[0] == "missing-flag" and len(w) > 1],
            "devices": [w[1] for w in words if w[0] == "device" and len(w) > 1],
        }


@operation()
def check_llama_server(plan: HostPlan, install: LlamaInstall):
    """Refuse this host unless its llama-server has every flag r1fleet passes and sees the planned GPUs."""
    environment = tuple(sorted(llama_environment(plan, install).items()))
    readiness = host.get_fact(LlamaServerReadiness, binary=install.binary, environment=environment, flags=install.required_flags)
    problems = llama_server_problems(readiness or {}, install, plan)
    if not problems:
        host.noop(f"{install.binary} has r1fleet's flags and sees the planned devices")
        return
    yield refusal("; ".join(problems))


class LlamaCppRole(Role):
    """llama-server for the plan (a split over several GPUs): its build, a dedicated user, the GGUF by
    sha256, r1fleet's own unit with the planned --tensor-split. A pool's head passes `pool` (llama_cpp/pool.py,
    with plan = pool.plan): --rpc to its workers, a unit that waits for them, a health gate that names them."""

    def __init__(self, plan: HostPlan, settings: HostConfig, install: LlamaInstall, download: Download,
                 pool: PoolHead | None = None):
        self.plan, self.settings, self.llama, self.download, self.pool = plan, settings, install, download, pool
        self.models_dir = llama_models_dir(settings)
        self.model_path = f"{self.models_dir}/{download.name}"

    @classmethod
    def prepare(cls, ctx: HostContext) -> "LlamaCppRole":
        """llama-server from what this host's apt offers (or the pinned archive, or a source build); a pool's head
        also its workers, from Debian's packages only."""
        download = model_download(ctx.host, ctx.plan, ctx.settings)
        if ctx.served.role != "head":
            return cls(ctx.plan, ctx.settings, choose_install(ctx.plan, ctx.settings, ctx.platform()), download)
        pool = ctx.served.pool
        head = pool_head(pool, ctx.settings, ctx.plan, {w: ctx.members[w] for w in pool.workers})
        install = choose_pool_install(ctx.plan, ctx.settings, ctx.platform(), pool.pool, "head")
        versions = pool_versions(pool, ctx.pool_offers) if ctx.pool_offers else {}
        return cls(ctx.plan, ctx.settings, replace(install, packages=pinned(install.packages, versions)), download,
                   pool=replace(head, versions=tuple(sorted(versions.items()))))

    def reads(self) -> list[FactRequest]:
        return llama_cpp_reads(self.plan, self.settings, self.llama, self.download)

    def install(self) -> None:
        self.changed = _install(self.plan, self.settings, self.llama, self.download, self.models_dir, self.model_path)

    def configure(self) -> None:
        self.unit = _configure(self.plan, self.settings, self.llama, self.models_dir, self.model_path, self.pool)

    def activate(self) -> None:
        if not self.pool:
            _activate(self.plan, self.settings, self.llama, self.model_path, self.unit, self.changed)

    def after_peers(self) -> None:
        if self.pool:  # a head: after every worker of the run has started its rpc-server
            _activate(self.plan, self.settings, self.llama, self.model_path, self.unit, self.changed, self.pool)


@deploy("llama.cpp")
def _install(plan: HostPlan, settings: HostConfig, install: LlamaInstall, download: Download, models_dir: str,
             model_path: str) -> list:
    """The binary, the user, the directories and the model; returns the operations that change what runs."""
    retire_service(OLLAMA_PRELOAD_UNIT)  # before the server it is bound to
    retire_service(OLLAMA_UNIT)
    packages = server.packages(name="llama.cpp packages", packages=["curl", "ca-certificates", *install.packages])
    changed = [packages]
    if install.method == "ollama-bundle":
        changed.append(install_release(name=f"Ollama {install.release.version} archive (its llama-server)", release=install.release))
        check_llama_server(name="llama-server flags and devices", plan=plan, install=install)
    if install.method == "source":
        pins = load_pins().llama_cpp
        changed.append(build_from_source(
            name=f"Build llama-server {install.tag}",
            tag=install.tag,
            url=pins.source,
            sha256=pins.source_sha256,
            flags=install.cmake_flags,
        ))
    service_user(USER, HOME, plan.uses_gpu)
    files.directory(name="Model root", path=settings.model_dir, user="root", group="root", mode="0755")
    # A removal that kept the model left it root's (roles/llama_cpp/remove.py): the user's again
    files.directory(name="llama.cpp models, a kept one too, owned by llama", path=models_dir, user=USER, group=USER,
                    recursive=True)
    files.directory(name="llama.cpp models", path=models_dir, user=USER, group=USER, mode="0750")
    changed.append(fetch_verified(name=f"Model {download_label(download)}", download=download, dest=model_path,
                                  user=USER, group=USER))
    return changed


@deploy("llama.cpp")
def _configure(plan: HostPlan, settings: HostConfig, install: LlamaInstall, models_dir: str, model_path: str,
               pool: PoolHead | None = None):
    # The key file stays root-only; systemd passes it to the service as a credential (%d).
    credential = None
    key_path = None
    if not settings.local_only and settings.api_key_file:
        credential = f"{API_KEY_CREDENTIAL}:{settings.api_key_file}"
        key_path = UnitSpecifier(f"%d/{API_KEY_CREDENTIAL}")
    context = unit_context(
        plan,
        settings,
        description=f"r1fleet llama-server ({plan.model})",
        user=USER,
        exec_start=[install.binary, *llama_server_args(plan, settings, model_path, key_path,
                                                       rpc_servers=pool.rpc_servers if pool else ())],
        environment=llama_environment(plan, install),
        read_write_paths=[HOME],
        read_only_paths=[models_dir],
        restrict_ip=True,
        credential=credential,
        **(pool.unit_options(settings, install.binary) if pool else {}),
    )
    return unit_file(LLAMA_UNIT, context)


@deploy("llama.cpp")
def _activate(plan: HostPlan, settings: HostConfig, install: LlamaInstall, model_path: str, unit, changed: list,
              pool: PoolHead | None = None) -> None:
    if pool:
        # Before the (re)start, from the head itself: a worker that is down fails the head here, by name.
        check_reachable(name=f"RPC workers of pool {pool.pool}", endpoints=pool.workers, timeout_s=pool.wait_s,
                        what=f"pool {pool.pool}: the head {pool.host}'s RPC workers",
                        fix="deploy the workers first; on each named one check r1fleet-rpc-server.service and that "
                            "its firewall admits the head's address")
    converge_service(
        LLAMA_UNIT, unit, changed, f"{settings.local_api('llama.cpp')}/health",
        health_timeout_s(plan) + (pool.load_s if pool else 0), files_used=(model_path, install.binary),
    )


def llama_cpp_reads(plan: HostPlan, settings: HostConfig, install: LlamaInstall,
                    download: Download) -> list[FactRequest]:
    """Every fact LlamaCppRole reads on a host where nothing changes (fetched in one round trip first)."""
    models_dir = llama_models_dir(settings)
    model_path = f"{models_dir}/{download.name}"
    reads = [*retire_service_reads(OLLAMA_PRELOAD_UNIT), *retire_service_reads(OLLAMA_UNIT), *package_reads(), *service_user_reads(USER, HOME),
             *directory_reads(settings.model_dir), *directory_reads(models_dir), *fetch_verified_reads(model_path),
             *converge_service_reads(LLAMA_UNIT, (model_path, install.binary))]
    if install.method == "ollama-bundle":
        reads.append((File, {"path": install.release.stamp}))
    if install.method == "source":
        reads.append((File, {"path": install.binary}))
    return reads
