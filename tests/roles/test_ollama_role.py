"""Operation-level tests of roles/ollama.py on a @fake stand-in host (no SSH, no Ollama binary)."""

from __future__ import annotations

import hashlib
import json
import re

from deploy_harness import ollama_role, run_role
import facts_for as ff

from r1fleet.fleet.config import HostConfig, OllamaReleaseOverride
from r1fleet.artifacts.pins import Platform, model_download
from r1fleet.artifacts.ollama_release import ollama_release
from r1fleet.roles.ollama.decide import import_record, ollama_tag_digest
from r1fleet.records import GgufFile, HostPlan


def role_args(plan, settings, release):
    """ollama_role's arguments as deploy.py computes them: the stand-in download only in rehearsal."""
    return plan, settings, release, model_download(plan.host, plan, settings) if settings.rehearsal else None

API = "http://127.0.0.1:11434"
UNIT = "/etc/systemd/system/r1fleet-ollama.service"
PRELOAD = "/etc/systemd/system/r1fleet-ollama-preload.service"
STANDIN_TAG = "r1fleet/smollm2:135m-instruct-q4_1"
GGUF_SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
TARGET = Platform(arch="amd64", distro_id="debian", codename="forky", tegra_major=None)


def plan(**overrides) -> HostPlan:
    base = dict(
        host="h1", model="deepseek-r1-distill-qwen-7b", ollama_tag="deepseek-r1:7b-qwen-distill-q4_K_M",
        backend="ollama", placement="gpu", fits=True, context_length=16384, kv_cache_type="q8_0",
        flash_attention=True, gpu_uuids=["GPU-11111111-2222-3333-4444-555555555555"], vendor="nvidia",
    )
    base.update(overrides)
    return HostPlan(**base)


def rehearsal_plan() -> HostPlan:
    return plan(model="smollm2-135m-instruct-q4_1", ollama_tag=STANDIN_TAG, context_length=8192,
                gguf=GgufFile(url="", file="SmolLM2-135M-Instruct.Q4_1.gguf", sha256=GGUF_SHA))


def release(version="0.32.9"):
    return ollama_release("h1", TARGET, plan(), OllamaReleaseOverride(version=version) if version != "0.32.9" else None)


def present_host(p: HostPlan, settings: HostConfig, rel, uploads: dict[str, str], extra_dirs=()) -> dict:
    """Everything the role manages already in place, as facts (`uploads`: the units a first run wrote)."""
    responses = {
        "cat /etc/group": ["root:x:0:", "video:x:44:", "render:x:993:", "ollama:x:999:"],
        **ff.users(("ollama", "/var/lib/ollama", "/usr/sbin/nologin", ["video", "render"])),
        **ff.directory("/var/lib/ollama", "ollama", "ollama", "drwxr-x---"),
        **ff.directory("/var/lib/r1fleet/models/ollama", "ollama", "ollama", "drwxr-x---"),
        **ff.directory("/var/lib/r1fleet/models/import", "root", "root", "drwxr-xr-x"),
        **ff.directory("/var/lib/r1fleet/models", "root", "root", "drwxr-xr-x"),
        **ff.file_exists(rel.stamp),
        **ff.link("/usr/local/bin/ollama", rel.binary),
        **ff.file_content(UNIT, uploads[UNIT]),
        **ff.file_content(PRELOAD, uploads[PRELOAD]),
        **ff.running("r1fleet-ollama.service"),
        re.compile(r"^systemctl show ollama\.service "): ["LoadState=masked", "UnitFileState=masked"],
        **ff.ollama_api(API, [p.ollama_tag], [p.ollama_tag]),
        "ls -1A /opt/r1fleet/ollama": [rel.version, *extra_dirs],
        **ff.directory("/etc/systemd/system", "root", "root", "drwxr-xr-x"),
        "dpkg -l": ff.dpkg_installed("curl", "ca-certificates", "tar", "zstd"),
    }
    return responses


def test_fresh_install_downloads_verifies_and_starts(monkeypatch):
    p, rel = plan(), release()
    run = run_role(ollama_role, *role_args(p, HostConfig(name="h1", address="10.0.0.1"), rel), monkeypatch=monkeypatch)
    assert not run.failed
    install = run.script("mktemp -d /opt/r1fleet/ollama/.tmp.")
    assert "https://github.com/ollama/ollama/releases/download/v0.32.9/ollama-linux-amd64.tar.zst" in install
    assert "5d747a43369f61e38f20b5a39fcc5c90647e562cdc61e2e56034f1c5b113d540" in install
    assert install.index("sha256sum") < install.index("zstd -dc") < install.index("mv \"$tmp/tree\" /opt/r1fleet/ollama/0.32.9")
    assert run.ran("ollama on PATH", "ln -s /opt/r1fleet/ollama/0.32.9/bin/ollama /usr/local/bin/ollama")
    assert "zstd" in run.installs("Packages for Ollama")  # the archive is .tar.zst
    # every tool the install script calls comes from the packages operation, and it runs before the script
    packages = run.installs("Packages for Ollama")
    for tool in ("curl", "tar", "zstd"):
        assert re.search(rf"(^|[ ;|({{]){tool} ", install) and tool in packages, tool
    assert "https://" in install and "ca-certificates" in packages  # curl over TLS needs the CA bundle
    assert run.op_names.index(run.op("Packages for Ollama")) < run.op_names.index(run.op("Ollama 0.32.9"))
    assert run.ran("Reload systemd for r1fleet-ollama.service", "systemctl daemon-reload")
    assert run.ran("Run r1fleet-ollama.service", "systemctl start r1fleet-ollama.service") and run.ran("Run r1fleet-ollama.service", "systemctl enable r1fleet-ollama.service")
    assert run.ran("Health of r1fleet-ollama.service", f"{API}/api/version")  # health gate after the start
    assert run.ran(f"Model {p.ollama_tag}", f"ollama pull {p.ollama_tag}") and run.never_ran("ollama create")
    # the deploy loads the model through the unit that loads it after every start, and waits for its result
    assert run.ran("Preload deepseek-r1:7b-qwen-distill-q4_K_M", "systemctl start --wait r1fleet-ollama-preload.service")
    assert run.never_ran("--max-time 600")


def test_unit_carries_exactly_the_planned_settings(monkeypatch):
    p = plan()
    run = run_role(ollama_role, *role_args(p, HostConfig(name="h1", address="10.0.0.1"), release()), monkeypatch=monkeypatch)
    unit = run.uploads[UNIT]
    env = sorted(line.split("=", 1)[1].strip('"') for line in unit.splitlines() if line.startswith("Environment="))
    assert env == sorted([
        "OLLAMA_HOST=127.0.0.1:11434", "OLLAMA_MODELS=/var/lib/r1fleet/models/ollama",
        "OLLAMA_CONTEXT_LENGTH=16384", "OLLAMA_FLASH_ATTENTION=1", "OLLAMA_KV_CACHE_TYPE=q8_0",
        "OLLAMA_KEEP_ALIVE=-1", "OLLAMA_NUM_PARALLEL=1", "OLLAMA_MAX_LOADED_MODELS=1", "HOME=/var/lib/ollama",
        "CUDA_VISIBLE_DEVICES=GPU-11111111-2222-3333-4444-555555555555",
    ])
    assert "ExecStart=/opt/r1fleet/ollama/0.32.9/bin/ollama serve" in unit
    assert "User=ollama" in unit and "CapabilityBoundingSet=\n" in unit and "DevicePolicy=closed" in unit
    assert "DeviceAllow=char-nvidia-uvm rw" in unit and "PrivateDevices=no" in unit
    assert "MemoryDenyWriteExecute=yes" not in unit  # CUDA maps W+X memory
    # a start completes once the API answers; the model is loaded by the preload unit it pulls in, never here
    post = next(line for line in unit.splitlines() if line.startswith("ExecStartPost="))
    assert post.startswith("ExecStartPost=/usr/bin/timeout 120 ") and "http://127.0.0.1:11434/api/version" in post
    assert "/api/generate" not in unit and "Wants=r1fleet-ollama-preload.service" in unit
    assert "TimeoutStartSec=150" in unit.splitlines()


def test_the_preload_unit_loads_after_every_start_without_holding_it(monkeypatch):
    """Its own unit, ordered after the server and stopped with it, active at once (Type=exec), its request open
    until Ollama answers (no client bound: Ollama aborts a load whose client leaves), its result recorded."""
    run = run_role(ollama_role, *role_args(plan(), HostConfig(name="h1", address="10.0.0.1"), release()), monkeypatch=monkeypatch)
    unit = run.uploads[PRELOAD].splitlines()
    for line in ("Type=exec", "After=r1fleet-ollama.service", "BindsTo=r1fleet-ollama.service", "User=ollama",
                 "ReadWritePaths=/var/lib/ollama", "IPAddressDeny=any", "IPAddressAllow=localhost"):
        assert line in unit, line
    start = next(line for line in unit if line.startswith("ExecStart="))
    assert '\\"model\\":\\"deepseek-r1:7b-qwen-distill-q4_K_M\\",\\"keep_alive\\":-1' in start
    assert "http://127.0.0.1:11434/api/generate" in start and "/var/lib/ollama/r1fleet-preload" in start
    assert "--max-time" not in start and "timeout" not in start.split("curl", 1)[0]
    assert not any(line.startswith("WantedBy=") for line in unit)  # the server pulls it in, not a target
    assert run.ran("Unit r1fleet-ollama-preload.service", "r1fleet-ollama-preload.service")
    # on a LAN address the unit may reach that address too
    lan = HostConfig(name="h1", address="10.0.0.1", listen="192.168.1.20", allow=["192.168.1.0/24"])
    run = run_role(ollama_role, *role_args(plan(), lan, release()), monkeypatch=monkeypatch)
    assert "IPAddressAllow=localhost 192.168.1.20" in run.uploads[PRELOAD].splitlines()


def test_a_changed_preload_unit_reloads_systemd_and_restarts_nothing(monkeypatch):
    p, rel, settings = plan(), release(), HostConfig(name="h1", address="10.0.0.1")
    first = run_role(ollama_role, *role_args(p, settings, rel), monkeypatch=monkeypatch)
    responses = present_host(p, settings, rel, {**first.uploads, PRELOAD: "# an older preload unit\n"})
    run = run_role(ollama_role, *role_args(p, settings, rel), responses=responses, monkeypatch=monkeypatch)
    assert run.ran("Reload systemd for r1fleet-ollama-preload.service", "systemctl daemon-reload")
    assert run.never_ran("systemctl restart") and run.never_ran("systemctl start")


def test_listen_opens_the_bind_address(monkeypatch):
    settings = HostConfig(name="h1", address="10.0.0.1", listen="192.168.1.20", allow=["192.168.1.0/24"], port=11500)
    run = run_role(ollama_role, *role_args(plan(), settings, release()), monkeypatch=monkeypatch)
    assert 'Environment="OLLAMA_HOST=192.168.1.20:11500"' in run.uploads[UNIT]
    assert run.ran("Health of r1fleet-ollama.service", "http://192.168.1.20:11500/api/version")


def test_already_present_changes_nothing(monkeypatch):
    p, rel, settings = plan(), release(), HostConfig(name="h1", address="10.0.0.1")
    first = run_role(ollama_role, *role_args(p, settings, rel), monkeypatch=monkeypatch)
    responses = present_host(p, settings, rel, first.uploads)
    again = run_role(ollama_role, *role_args(p, settings, rel), responses=responses, monkeypatch=monkeypatch)
    assert not again.failed
    assert again.changed == []
    assert again.never_ran("systemctl restart") and again.never_ran("systemctl daemon-reload")
    assert again.never_ran("ollama pull") and again.never_ran("/api/generate")


def test_upgrade_installs_new_version_restarts_and_prunes_old(monkeypatch):
    p, settings = plan(), HostConfig(name="h1", address="10.0.0.1")
    old = release()
    first = run_role(ollama_role, *role_args(p, settings, old), monkeypatch=monkeypatch)
    new = ollama_release("h1", TARGET, p, OllamaReleaseOverride(
        version="0.33.0", base_url="https://example.invalid/v{version}",
        sha256={"ollama-linux-amd64.tar.zst": "a" * 64}))
    responses = present_host(p, settings, old, first.uploads)
    responses["ls -1A /opt/r1fleet/ollama"] = ["0.32.9", "0.33.0"]
    run = run_role(ollama_role, *role_args(p, settings, new), responses=responses, monkeypatch=monkeypatch)
    assert not run.failed
    assert run.ran("Ollama 0.33.0", "https://example.invalid/v0.33.0/ollama-linux-amd64.tar.zst")
    assert "ExecStart=/opt/r1fleet/ollama/0.33.0/bin/ollama serve" in run.uploads[UNIT]
    assert run.ran("Reload systemd for r1fleet-ollama.service", "systemctl daemon-reload") and run.ran("Restart r1fleet-ollama.service", "systemctl restart r1fleet-ollama.service")
    assert "rm -rf /opt/r1fleet/ollama/0.32.9" in run.commands  # the prune, after the health gate


def test_rehearsal_imports_the_stand_in_from_the_mirror(monkeypatch):
    p = rehearsal_plan()
    settings = HostConfig(name="h1", address="10.0.0.1", rehearsal=True, mirror="http://10.77.0.1:8088")
    listed = ff.ollama_api(API, [STANDIN_TAG], [])  # what Ollama lists once `create` has run
    run = run_role(ollama_role, *role_args(p, settings, release()), responses=listed, monkeypatch=monkeypatch)
    assert not run.failed
    fetch = run.script("SmolLM2-135M-Instruct.Q4_1.gguf.part")
    assert "http://10.77.0.1:8088/models/SmolLM2-135M-Instruct.Q4_1.gguf" in fetch and GGUF_SHA in fetch
    assert fetch.index("sha256sum") < fetch.index("mv -f")
    # no num_ctx of its own: the unit's OLLAMA_CONTEXT_LENGTH is the context, and it follows a replan
    assert run.uploads["/var/lib/r1fleet/models/import/Modelfile"] == (
        "FROM /var/lib/r1fleet/models/import/SmolLM2-135M-Instruct.Q4_1.gguf\n")
    assert run.ran(f"Import {STANDIN_TAG}", f"ollama create {STANDIN_TAG} -f /var/lib/r1fleet/models/import/Modelfile")
    # then the record of what Ollama reports for the import (its rewrite of the file), for verify
    record = run.script("/var/lib/r1fleet/models/import/imported.json.tmp")
    modelfile_sha = hashlib.sha256(run.uploads["/var/lib/r1fleet/models/import/Modelfile"].encode()).hexdigest()
    assert json.dumps(import_record(STANDIN_TAG, GGUF_SHA, "d" * 64, modelfile_sha), sort_keys=True) in record
    assert run.commands.index(run.script("ollama create")) < run.commands.index(record)
    assert run.never_ran("ollama pull")
    assert 'Environment="OLLAMA_CONTEXT_LENGTH=8192"' in run.uploads[UNIT]


def test_rehearsal_stand_in_present_is_not_reimported(monkeypatch):
    p = rehearsal_plan()
    settings = HostConfig(name="h1", address="10.0.0.1", rehearsal=True, mirror="http://10.77.0.1:8088")
    rel = release()
    first = run_role(ollama_role, *role_args(p, settings, rel), monkeypatch=monkeypatch)
    gguf = "/var/lib/r1fleet/models/import/SmolLM2-135M-Instruct.Q4_1.gguf"
    responses = {
        **present_host(p, settings, rel, first.uploads),
        **ff.sha256_of(gguf, GGUF_SHA),
        **ff.file_content("/var/lib/r1fleet/models/import/Modelfile", first.uploads["/var/lib/r1fleet/models/import/Modelfile"]),
    }
    modelfile_sha = hashlib.sha256(first.uploads["/var/lib/r1fleet/models/import/Modelfile"].encode()).hexdigest()
    digest = ollama_tag_digest(json.loads(responses[f"{API}/api/tags"]), STANDIN_TAG)
    record = import_record(STANDIN_TAG, GGUF_SHA, digest, modelfile_sha)
    recorded = {"cat /var/lib/r1fleet/models/import/imported.json": json.dumps(record), **responses}
    run = run_role(ollama_role, *role_args(p, settings, rel), responses=recorded, monkeypatch=monkeypatch)
    assert run.changed == []
    assert run.never_ran("ollama create") and run.never_ran(".part")
    # imported with another Modelfile (before a replan, or one that set num_ctx, baked into the model): again
    older = {**responses, "cat /var/lib/r1fleet/models/import/imported.json": json.dumps(
        {**record, "modelfile_sha256": hashlib.sha256(b"FROM x\nPARAMETER num_ctx 4096\n").hexdigest()})}
    replanned = run_role(ollama_role, *role_args(p, settings, rel), responses=older, monkeypatch=monkeypatch)
    assert replanned.ran("Import r1fleet/smollm2:135m-instruct-q4_1", "ollama create")
    # the tag is there but not as recorded (another file under that name, or no record): imported again
    unrecorded = run_role(ollama_role, *role_args(p, settings, rel), responses=responses, monkeypatch=monkeypatch)
    assert unrecorded.ran("Import r1fleet/smollm2:135m-instruct-q4_1", "ollama create")


def test_download_mismatch_fails_the_host(monkeypatch):
    responses = {"mktemp -d /opt/r1fleet/ollama/.tmp.": {"success": False, "stderr": "sha256 mismatch for x"}}
    run = run_role(ollama_role, *role_args(plan(), HostConfig(name="h1", address="10.0.0.1"), release()), responses=responses, monkeypatch=monkeypatch)
    assert run.failed
    assert run.never_ran("systemctl start r1fleet-ollama.service")


def test_nvidia_units_load_nvidia_uvm_before_each_start(monkeypatch):
    """The hardened unit cannot load nvidia-uvm itself (NoNewPrivileges): after a reboot CUDA would fail and
    Ollama would run on the CPU. A privileged ExecStartPre loads it (audit M6); CPU plans do not get it."""
    run = run_role(ollama_role, *role_args(plan(), HostConfig(name="h1", address="10.0.0.1"), release()), monkeypatch=monkeypatch)
    assert "ExecStartPre=-+/sbin/modprobe -q nvidia-uvm" in run.uploads[UNIT]
    cpu = plan(placement="cpu", vendor=None, gpu_uuids=[])
    run = run_role(ollama_role, *role_args(cpu, HostConfig(name="h1", address="10.0.0.1"), release()), monkeypatch=monkeypatch)
    assert "modprobe" not in run.uploads[UNIT]


def test_a_mirror_changes_where_the_pinned_release_comes_from_never_its_sha256():
    """A fleet's `mirror` serves the same pinned bytes; only the lab's own mirror (lab hosts) names its
    stand-in release and sha256 (audit M8). No network is used here: a real fleet's mirror is never asked."""
    from r1fleet.artifacts.pins import load_pins
    from r1fleet.artifacts.ollama_release import host_release

    pinned = load_pins().ollama.sha256["ollama-linux-amd64.tar.zst"]
    release = host_release(plan(), HostConfig(name="h1", address="10.0.0.1", mirror="http://192.168.1.5:8088"), TARGET)
    (asset,) = release.assets
    assert asset.url == "http://192.168.1.5:8088/ollama/ollama-linux-amd64.tar.zst" and asset.sha256 == pinned


def official(*lines: str, store_models: tuple[str, ...] = ("/usr/share/ollama/.ollama/models",)) -> dict:
    """The takeover's facts: what systemd says of ollama.service and Ollama's own binaries (the fact's output,
    as tests/fixtures/ollama-official/ holds it captured), and which stores hold manifests."""
    answers: dict = {re.compile(r"^systemctl show ollama\.service "): list(lines)}
    for store in store_models:
        quoted = store if " " not in store else f"'{store}'"
        answers[re.compile(r'^test -n "\$\(find ' + re.escape(quoted) + "/manifests ")] = ["models"]
    return answers


INSTALL_SH = ("LoadState=loaded", "ActiveState=active", "UnitFileState=enabled",
              "FragmentPath=/etc/systemd/system/ollama.service", "DropInPaths=", "User=ollama",
              "Environment=PATH=/usr/local/bin:/usr/bin:/bin", "Home=/usr/share/ollama",
              "Binary=/usr/local/bin/ollama", "Libraries=/usr/local/lib/ollama")
RETIRE = "Stop and remove an official Ollama install"
ADOPT = "Keep the models of an official Ollama install"


def changes(run, name: str) -> list[str]:
    """The commands an operation ran to change the host (the facts it read left out)."""
    return [c for c in run.op_commands(name) if not c.startswith(("systemctl show ollama.service ", 'test -n "$(find '))]


def test_an_official_install_is_taken_over_keeping_its_models(monkeypatch):
    """install.sh's state (audit-ollama row 22): a regular /usr/local/bin/ollama, ollama.service enabled and
    running, models in /usr/share/ollama/.ollama/models. Taken over before the link and our service, its unit
    masked so that running install.sh again cannot start it."""
    run = run_role(ollama_role, *role_args(plan(), HostConfig(name="h1", address="10.0.0.1"), release()),
                   responses=official(*INSTALL_SH), monkeypatch=monkeypatch)
    assert not run.failed
    retire = changes(run, RETIRE)
    assert retire == ["systemctl disable --now ollama.service", "rm -f /etc/systemd/system/ollama.service",
                      "systemctl mask ollama.service", "rm -f /usr/local/bin/ollama", "rm -rf /usr/local/lib/ollama"]
    move = run.script("/usr/share/ollama/.ollama/models/manifests/.")
    takeover = [run.commands.index(c) for c in (*retire, move)]
    link = next(i for i, c in enumerate(run.commands) if "ln -s" in c and "/usr/local/bin/ollama" in c)
    start = run.commands.index(next(c for c in run.commands if "systemctl start r1fleet-ollama.service" in c))
    assert max(takeover) < link < start
    # the official service runs as `ollama`, which usermod cannot change while it runs: stopped before
    user = next(i for i, c in enumerate(run.commands) if "useradd -" in c or "usermod -" in c)
    assert run.commands.index(run.script("disable --now ollama.service")) < user
    assert "mv -n {} /var/lib/r1fleet/models/ollama/blobs/" in move and "chown -R ollama:ollama" in move
    # told not to keep them: deleted, not moved
    dropped = run_role(ollama_role, *role_args(plan(), HostConfig(name="h1", address="10.0.0.1", official_ollama_models="remove"), release()),
                       responses=official(*INSTALL_SH), monkeypatch=monkeypatch)
    assert dropped.ran(ADOPT, "rm -rf /usr/share/ollama/.ollama/models/manifests /usr/share/ollama/.ollama/models/blobs")
    assert dropped.never_ran("mv -n")
    # nothing official on the host: only the mask, so that a later install.sh cannot start a second server
    clean = run_role(ollama_role, *role_args(plan(), HostConfig(name="h1", address="10.0.0.1"), release()),
                     responses=official("LoadState=not-found", "Home=/root", store_models=()), monkeypatch=monkeypatch)
    assert changes(clean, RETIRE) == ["systemctl mask ollama.service"]
    assert clean.never_ran("disable --now ollama.service") and clean.never_ran("mv -n")
    # masked, nothing left: nothing to do
    done = run_role(ollama_role, *role_args(plan(), HostConfig(name="h1", address="10.0.0.1"), release()),
                    responses=official("LoadState=masked", "UnitFileState=masked", store_models=()), monkeypatch=monkeypatch)
    assert changes(done, RETIRE) == [] and changes(done, ADOPT) == []


def test_a_drop_in_store_and_a_usr_install_are_taken_over(monkeypatch):
    """The store moved with an OLLAMA_MODELS drop-in (docs/faq.mdx:239-245) and the manual install into /usr
    (docs/linux.mdx:22-25): the models come from where the unit kept them, /usr's binary and libraries go."""
    moved = ("LoadState=loaded", "ActiveState=active", "UnitFileState=enabled",
             "FragmentPath=/etc/systemd/system/ollama.service",
             "DropInPaths=/etc/systemd/system/ollama.service.d/override.conf", "User=ollama",
             'Environment=PATH=/usr/bin:/bin "OLLAMA_MODELS=/srv/my models"', "Home=/usr/share/ollama",
             "Binary=/usr/bin/ollama", "Libraries=/usr/lib/ollama")
    run = run_role(ollama_role, *role_args(plan(), HostConfig(name="h1", address="10.0.0.1"), release()),
                   responses=official(*moved, store_models=("/srv/my models",)), monkeypatch=monkeypatch)
    assert not run.failed
    retire = changes(run, RETIRE)
    assert "rm -f /usr/bin/ollama" in retire and "rm -rf /usr/lib/ollama" in retire
    adopt = changes(run, ADOPT)
    assert len(adopt) == 1 and "find '/srv/my models'/blobs " in adopt[0] and "cp -a '/srv/my models'/manifests/. " in adopt[0]
    # a move across filesystems is a copy: refused with the numbers when it does not fit
    assert "stat -c %d '/srv/my models'/blobs" in adopt[0] and "exit 1" in adopt[0]
    # both stores hold models: both are moved
    both = run_role(ollama_role, *role_args(plan(), HostConfig(name="h1", address="10.0.0.1"), release()),
                    responses=official(*moved, store_models=("/srv/my models", "/usr/share/ollama/.ollama/models")),
                    monkeypatch=monkeypatch)
    assert len(changes(both, ADOPT)) == 2
