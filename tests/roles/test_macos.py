"""roles/macos.py at the operation level (@fake connector standing in for an Apple Silicon Mac)."""

from __future__ import annotations

import json
import plistlib
import re

import pytest

from deploy_harness import mac_role, run_role
from r1fleet.fleet.config import HostConfig
from r1fleet.plan.catalog import load_catalog
from r1fleet.plan.memory import constants
from r1fleet.records import DevicePlan, HostPlan
from r1fleet.roles.macos import role as macos

ARM = {"uname -m": "arm64", "uname -s": "Darwin"}


def mac_plan(planned_mib: int, total_mib: int = 32768) -> HostPlan:
    device = DevicePlan(device="unified", capacity_mib=total_mib, planned_mib=planned_mib, weights_mib=planned_mib - 2000,
                        kv_cache_mib=1500, compute_mib=300, overhead_mib=200)
    return HostPlan(host="mac", model="deepseek-r1-distill-qwen-14b", ollama_tag="deepseek-r1:14b-qwen-distill-q4_K_M",
                    backend="ollama", placement="unified", vendor="apple",
                    context_length=16384, kv_cache_type="q8_0", unified_memory_mib=total_mib, devices=[device])


def entry(listen=None):
    return HostConfig(name="mac", address="192.168.1.30", listen=listen, allow=["192.168.1.0/24"])


def test_launchdaemon_carries_the_plan_and_runs_as_dedicated_user(monkeypatch):
    run = run_role(mac_role, mac_plan(12000), entry(), responses=ARM,
                   base_responses=False, monkeypatch=monkeypatch)
    assert not run.failed
    plist = plistlib.loads(run.uploads[macos.PLIST].encode())     # well-formed plist
    assert plist["Label"] == "com.r1fleet.ollama" and plist["UserName"] == "_r1ollama"
    # the pinned release archive, verified, not Homebrew (audit-ollama row 35)
    assert plist["ProgramArguments"] == ["/usr/local/lib/r1fleet/ollama-0.32.9/ollama", "serve"]
    env = plist["EnvironmentVariables"]
    assert env["OLLAMA_HOST"] == "127.0.0.1:11434" and env["OLLAMA_CONTEXT_LENGTH"] == "16384"
    assert env["OLLAMA_MODELS"] == "/var/lib/r1fleet/models/ollama" and env["OLLAMA_KV_CACHE_TYPE"] == "q8_0"
    assert env["OLLAMA_FLASH_ATTENTION"] == "1" and env["OLLAMA_KEEP_ALIVE"] == "-1"
    assert plist["RunAtLoad"] and plist["KeepAlive"] and "LimitLoadToSessionType" not in plist
    assert run.never_ran("brew install")
    assert run.ran("Service user _r1ollama", "dscl . -create /Users/_r1ollama")
    assert run.ran("(Re)load the Ollama LaunchDaemon", "launchctl bootstrap system /Library/LaunchDaemons/com.r1fleet.ollama.plist")
    assert run.ran("(Re)load the Ollama LaunchDaemon", "launchctl kickstart -k system/com.r1fleet.ollama")
    # 12000 MiB fits in the default working set of 32 GiB (2/3 = 21845 MiB): no wired limit
    assert macos.WIRED_PLIST not in run.uploads and run.never_ran("iogpu.wired_limit_mb")
    # then the model itself: pulled by its exact tag from the LaunchDaemon's server, and kept loaded
    assert run.ran("Pull deepseek-r1:14b-qwen-distill-q4_K_M", "OLLAMA_HOST=http://127.0.0.1:11434 /usr/local/lib/r1fleet/ollama-0.32.9/ollama pull deepseek-r1:14b-qwen-distill-q4_K_M")
    assert run.ran("Preload deepseek-r1:14b-qwen-distill-q4_K_M", '"keep_alive": -1') and run.ran("Preload deepseek-r1:14b-qwen-distill-q4_K_M", "http://127.0.0.1:11434/api/generate")


def test_the_model_is_loaded_again_after_any_start(monkeypatch):
    """launchd has no start hook: a second LaunchDaemon loads the model at boot and after a restart or crash."""
    run = run_role(mac_role, mac_plan(12000), entry(), responses=ARM, base_responses=False, monkeypatch=monkeypatch)
    load = plistlib.loads(run.uploads[macos.LOAD_PLIST].encode())  # well-formed, the script escaped
    assert load["RunAtLoad"] is True and load["StartInterval"] == 30 and load["UserName"] == "_r1ollama"
    script = load["ProgramArguments"][2]
    assert script.startswith("curl -sf --max-time 10 http://127.0.0.1:11434/api/ps | grep -qF")
    assert '"deepseek-r1:14b-qwen-distill-q4_K_M"' in script and '"keep_alive":-1' in script
    assert run.ran("(Re)load that LaunchDaemon", f"launchctl bootstrap system {macos.LOAD_PLIST}")


def test_listen_address_reaches_ollama_host(monkeypatch):
    run = run_role(mac_role, mac_plan(12000), entry("192.168.1.30"), responses=ARM,
                   base_responses=False, monkeypatch=monkeypatch)
    env = plistlib.loads(run.uploads[macos.PLIST].encode())["EnvironmentVariables"]
    assert env["OLLAMA_HOST"] == "192.168.1.30:11434"


def test_plan_beyond_default_working_set_sets_wired_limit_at_boot(monkeypatch):
    run = run_role(mac_role, mac_plan(24000), entry(), responses=ARM,
                   base_responses=False, monkeypatch=monkeypatch)
    wired = plistlib.loads(run.uploads[macos.WIRED_PLIST].encode())
    assert wired["ProgramArguments"] == ["/usr/sbin/sysctl", "iogpu.wired_limit_mb=25024"]
    assert wired["RunAtLoad"] is True
    assert run.ran("Apply iogpu.wired_limit_mb=25024 now", "sysctl iogpu.wired_limit_mb=25024")


def test_wired_limit_leaves_the_os_its_reserve():
    assert macos.wired_limit_mib(mac_plan(31000)) == 32768 - constants().apple_os_reserve_mib
    assert macos.default_gpu_limit_mib(16384) == 10922      # 2/3 (llama-cpp-python #687: 10922.67 MB)
    assert macos.default_gpu_limit_mib(98304) == 73728      # 3/4 (llama.cpp #3213: 73728 MB)


def test_existing_user_and_unchanged_plist_do_nothing(monkeypatch):
    responses = {**ARM, "id -u _r1ollama": "yes"}
    run = run_role(mac_role, mac_plan(12000), entry(), responses=responses,
                   base_responses=False, monkeypatch=monkeypatch)
    assert run.never_ran("dscl . -create")


def test_intel_mac_is_refused(monkeypatch):
    run = run_role(mac_role, mac_plan(12000), entry(), base_responses=False, monkeypatch=monkeypatch,
                   responses={"uname -m": "x86_64", "exit 1": {"success": False}})
    assert run.failed and run.ran("Refuse: not Apple Silicon", "Apple Silicon only")


def test_pinned_archive_is_downloaded_inside_the_root_owned_release_directory(monkeypatch):
    """Not through pyinfra's predictable temp name in /tmp (audit L10)."""
    run = run_role(mac_role, mac_plan(12000), entry(), responses=ARM, base_responses=False, monkeypatch=monkeypatch)
    fetch = next(c for c in run.commands if "ollama-darwin.tgz" in c and ("curl" in c or "wget" in c))
    assert "/tmp/" not in fetch and "-o /usr/local/lib/r1fleet/ollama-0.32.9/" in fetch


def test_homebrew_only_when_asked(monkeypatch):
    run = run_role(mac_role, mac_plan(12000), entry(), responses=ARM, data={"macos_ollama": "homebrew"},
                   base_responses=False, monkeypatch=monkeypatch)
    assert plistlib.loads(run.uploads[macos.PLIST].encode())["ProgramArguments"] == [macos.BREW_BINARY, "serve"]
    assert run.ran("Ollama (Homebrew)", "brew upgrade ollama") or run.ran("Ollama (Homebrew)", "brew install ollama")


def test_another_ollama_on_the_port_is_stopped_or_refused(monkeypatch):
    ours = "/usr/local/lib/r1fleet/ollama-0.32.9/ollama"
    app = (501, "/Applications/Ollama.app/Contents/Resources/ollama")
    assert macos.other_ollama_agent(app, ours) == "com.ollama.ollama"
    assert macos.other_ollama_agent((501, "/opt/homebrew/Cellar/ollama/0.30.1/bin/ollama"), ours) == "homebrew.mxcl.ollama"
    assert macos.other_ollama_agent((0, ours), ours) is None and macos.other_ollama_agent(None, ours) is None
    assert macos.other_ollama_agent((501, "/usr/local/bin/python3"), ours) == ""
    responses = {**ARM, "lsof -nP -iTCP:11434": "501 /Applications/Ollama.app/Contents/Resources/ollama"}
    run = run_role(mac_role, mac_plan(12000), entry(), responses=responses, base_responses=False,
                   monkeypatch=monkeypatch)
    assert run.ran("Stop another Ollama holding the port (Ollama.app, brew services)", "launchctl disable gui/501/com.ollama.ollama")
    other = {**ARM, "lsof -nP -iTCP:11434": "501 /usr/local/bin/python3"}
    refused = run_role(mac_role, mac_plan(12000), entry(), responses=other, base_responses=False,
                       monkeypatch=monkeypatch)
    assert refused.ran("Stop another Ollama holding the port (Ollama.app, brew services)", "r1fleet: port 11434 is held by /usr/local/bin/python3 (uid 501): stop it first' >&2; exit 1")


# ---------------------------------------------------------------- what `ollama pull` brought (audit M1)

PULLED = re.compile(r"^(sudo -H -n )?(sh -c ')?head -c 1048577 /var/lib/r1fleet/models/ollama/manifests/registry\.ollama\.ai/"
                    r"library/deepseek-r1/14b-qwen-distill-q4_K_M'?$")


def pulled_manifest(*model_layers: str, extra: tuple[str, ...] = ()) -> str:
    layers = [{"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}", "size": 9_000_000_000}
              for digest in model_layers]
    layers += [{"mediaType": kind, "digest": "sha256:" + "c" * 64, "size": 100} for kind in extra]
    return json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                       "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                                  "digest": "sha256:" + "e" * 64, "size": 500}, "layers": layers})


PIN = load_catalog().find("deepseek-r1-distill-qwen-14b").ollama_digest
PULL = "Pull deepseek-r1:14b-qwen-distill-q4_K_M"


def test_what_the_pull_brought_is_checked_against_the_pinned_weights_right_after(monkeypatch):
    run = run_role(mac_role, mac_plan(12000), entry(), responses={**ARM, PULLED: pulled_manifest(PIN)},
                   base_responses=False, monkeypatch=monkeypatch)
    assert run.ran(PULL, "ollama pull deepseek-r1:14b-qwen-distill-q4_K_M") and run.ran(PULL, "head -c 1048577")
    assert run.never_ran("r1fleet: `ollama pull") and not run.failed


@pytest.mark.parametrize("manifest, why", [
    (pulled_manifest("b" * 64), f"its weights are {'b' * 64}, catalog.yaml pins {PIN}"),
    (pulled_manifest(PIN, "b" * 64), "it has 2 model layers, not one"),
    (pulled_manifest(PIN, extra=("application/vnd.ollama.image.adapter",)), "adds application/vnd.ollama.image.adapter"),
    ("", "its manifest is not plain JSON"),
])
def test_a_pull_that_brought_other_weights_fails_the_host_and_leaves_no_tag(monkeypatch, manifest, why):
    run = run_role(mac_role, mac_plan(12000), entry(), responses={**ARM, PULLED: manifest},
                   base_responses=False, monkeypatch=monkeypatch)
    (refused,) = [c for c in run.op_commands(PULL) if "r1fleet: `ollama pull" in c]
    assert refused.startswith("rm -f /var/lib/r1fleet/models/ollama/manifests/registry.ollama.ai/library/deepseek-r1/"
                              "14b-qwen-distill-q4_K_M; echo ")
    assert "brought other weights than the pinned ones" in refused and why in refused and refused.endswith("exit 1")
