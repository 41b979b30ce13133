"""The removal (deploy/remove.py, r1fleet/deploy/remove.py) at the operation level on a @fake host: what it runs on a
deployed host, in which order, what it keeps (the models unless `remove_models`, an account or a link that is not
r1fleet's, a user's own drop-in), and that bad host data stops the host before any change."""

from __future__ import annotations

import facts_for as ff
import pytest
from deploy_harness import run_role

from r1fleet.deploy import summary
from r1fleet.deploy.remove import remove_r1

LLAMA = "r1fleet-llama-server.service"
OLLAMA = "r1fleet-ollama.service"
PRELOAD = "r1fleet-ollama-preload.service"
FIREWALL = "r1fleet-firewall.service"
RPC = "r1fleet-rpc-server.service"
RPC_FIREWALL = "r1fleet-rpc-firewall.service"
MODELS = "/var/lib/r1fleet/models"
SETTINGS = {"r1fleet": {"address": "10.0.0.9"}}


@pytest.fixture(autouse=True)
def _no_summary_at_exit(monkeypatch):
    """The run's summary is printed at exit by the real CLI; here each test reads the failures itself."""
    monkeypatch.setattr(summary, "install", lambda state, done="converged": None)
    yield
    summary._failures.clear()


def unit(name: str, state: str = "active", enabled: str = "enabled", drop_ins: tuple[str, ...] | None = None,
         links: tuple[str, ...] = ()) -> dict:
    """A unit as r1fleet left it: its file, its state, its drop-in folder and enablement links."""
    lines = ["file", f"state {state}", f"enabled {enabled}"]
    if drop_ins is not None:
        lines += ["dir", *(f"drop-in {name}" for name in drop_ins)]
    return {f"ActiveState --value {name} ": lines + [f"link {link}" for link in links]}


def present(*paths: str) -> dict:
    return {f"[ -e {path} ]": [path] for path in paths}


def model_dir(path: str, *leftovers: str, foreign: bool = True) -> dict:
    return {f"d={path};": ["dir", *(f"leftover {p}" for p in leftovers), *(["foreign"] if foreign else [])]}


# A llama.cpp host open to the LAN (firewall, key, drop-in) that was an Ollama host before (its store kept).
EXPOSED_LLAMA = {
    **unit(LLAMA, drop_ins=("r1fleet-firewall.conf",)),
    **unit(FIREWALL),
    "inet r1fleet >/dev/null": "present",
    **present(f"/etc/systemd/system/{LLAMA}.d/r1fleet-firewall.conf", "/etc/r1fleet", "/opt/r1fleet/llama.cpp",
              "/opt/r1fleet/ollama"),
    **model_dir(f"{MODELS}/llama.cpp", f"{MODELS}/llama.cpp/m.gguf.r1fleet-sha256", f"{MODELS}/llama.cpp/n.gguf.part"),
    **model_dir(f"{MODELS}/ollama", f"{MODELS}/ollama/.r1fleet-incoming"),
    **ff.users(("llama", "/var/lib/llama", "/usr/sbin/nologin", ["video", "render"])),
    "[ -L /usr/local/bin/ollama ] && readlink": "/opt/r1fleet/ollama/0.32.9/bin/ollama",
}


def remove(monkeypatch, responses=None, data=None):
    return run_role(remove_r1, responses=responses, data={**SETTINGS, **(data or {})}, monkeypatch=monkeypatch)


def first(run, text: str) -> int:
    return next(i for i, command in enumerate(run.commands) if text in command)


def test_a_deployed_host_loses_services_firewall_files_and_account_services_first(monkeypatch):
    run = remove(monkeypatch, EXPOSED_LLAMA)
    assert not run.failed
    assert run.ran(f"Stop {LLAMA}", f"systemctl disable {LLAMA}") and run.ran(f"Stop {LLAMA}", f"systemctl stop {LLAMA}")
    # every service is down before the firewall goes and before anything is deleted
    assert first(run, f"systemctl stop {LLAMA}") < first(run, f"systemctl stop {FIREWALL}") < first(run, "rm ")
    assert run.ran(f"Stop {FIREWALL}", f"systemctl disable {FIREWALL}")
    assert run.ran("Remove the services' firewall requirement", f"rm -rf -- /etc/systemd/system/{LLAMA}.d/r1fleet-firewall.conf")
    assert run.ran(f"Remove {FIREWALL}", f"rm -f -- /etc/systemd/system/{FIREWALL}")
    assert run.ran(f"Remove {LLAMA}", f"rm -f -- /etc/systemd/system/{LLAMA}") and run.ran(f"Remove {LLAMA}", "systemctl daemon-reload")
    assert run.ran("Remove the nftables table inet r1fleet", "nft delete table inet r1fleet")
    assert run.ran("Remove /etc/r1fleet", "rm -rf -- /etc/r1fleet")
    assert run.ran("Remove /opt/r1fleet/llama.cpp", "rm -rf -- /opt/r1fleet/llama.cpp")
    assert run.ran("Remove /opt/r1fleet/ollama", "rm -rf -- /opt/r1fleet/ollama")
    assert run.ran("Remove the link /usr/local/bin/ollama", "rm -f -- /usr/local/bin/ollama")
    assert run.ran("Remove the account llama", "userdel llama") and run.ran("Remove the account llama", "groupdel llama")
    assert run.ran("Remove the account llama", "rm -rf -- /var/lib/llama")
    # what is not on this host is left alone: no other unit, table or account is touched
    assert run.never_ran(f"systemctl stop {OLLAMA}") and run.never_ran("systemctl stop r1fleet-rpc")
    assert run.never_ran("userdel ollama") and run.never_ran("userdel ggml-rpc")
    assert run.never_ran("nft delete table inet r1fleet-rpc")


def test_an_ollama_host_loses_its_preload_unit_before_the_server_and_its_record(monkeypatch):
    """The preload unit is stopped first (its request would otherwise see the server go) and removed with the
    server's unit; its record goes with the account's home."""
    deployed = {**unit(OLLAMA), **unit(PRELOAD, enabled="static"),
                **ff.users(("ollama", "/var/lib/ollama", "/usr/sbin/nologin", ["video", "render"]))}
    run = remove(monkeypatch, deployed)
    assert not run.failed
    assert first(run, f"systemctl stop {PRELOAD}") < first(run, f"systemctl stop {OLLAMA}") < first(run, "rm ")
    assert run.ran(f"Remove {PRELOAD}", f"rm -f -- /etc/systemd/system/{PRELOAD}")
    assert run.ran("Remove the account ollama", "rm -rf -- /var/lib/ollama")
    assert run.never_ran(f"systemctl disable {PRELOAD}")  # it has no [Install]: nothing enables it


def test_the_models_stay_root_s_without_r1fleet_s_bookkeeping_unless_remove_models(monkeypatch):
    kept = remove(monkeypatch, EXPOSED_LLAMA)
    keep = f"Keep the models in {MODELS}/llama.cpp"
    assert kept.ran(keep, f"find {MODELS}/llama.cpp -mindepth 1 \\( -name '*.r1fleet-sha256' -o -name '*.part' \\) "
                          "-prune -exec rm -rf -- {} +")
    assert kept.ran(keep, f"chown -Rh 0:0 {MODELS}/llama.cpp")
    assert kept.ran(f"Keep the models in {MODELS}/ollama", f"find {MODELS}/ollama -mindepth 1 \\( ")
    assert kept.ran(f"Keep the models in {MODELS}/ollama", "-name .r1fleet-incoming")
    assert kept.never_ran(f"rm -rf -- {MODELS}/llama.cpp\n") and not kept.ran(keep, f"rm -rf -- {MODELS}/llama.cpp ")
    assert all(command != f"rm -rf -- {MODELS}/llama.cpp" for command in kept.commands)
    # the empty-folder step leaves the model folder, which still holds models
    assert kept.never_ran(f"rmdir -- {MODELS}")

    removed = remove(monkeypatch, EXPOSED_LLAMA, data={"remove_models": "true"})
    assert removed.ran(f"Remove the models in {MODELS}/llama.cpp", f"rm -rf -- {MODELS}/llama.cpp")
    assert removed.ran(f"Remove the models in {MODELS}/ollama", f"rm -rf -- {MODELS}/ollama")
    assert removed.never_ran("chown -Rh")


def test_folders_r1fleet_emptied_go_children_first_and_others_stay(monkeypatch):
    empty = {"echo dir /var/lib/r1fleet/models;": ["dir /var/lib/r1fleet/models", "dir /var/lib/r1fleet",
                                                    "entry models", "entry driver-reboot", "dir /opt/r1fleet"]}
    run = remove(monkeypatch, {**EXPOSED_LLAMA, **present("/var/lib/r1fleet/driver-reboot"), **empty})
    # /var/lib/r1fleet holds something else (here the record, as if its removal had failed): it stays
    assert run.ran("Remove r1fleet's folders left empty", "rmdir -- /var/lib/r1fleet/models /opt/r1fleet")
    assert run.ran("Remove the record of a driver reboot", "rm -rf -- /var/lib/r1fleet/driver-reboot")
    holding = {"echo dir /var/lib/r1fleet/models;": ["dir /var/lib/r1fleet/models", "entry my-own.gguf",
                                                      "dir /var/lib/r1fleet", "entry models"]}
    assert not remove(monkeypatch, holding).ran("Remove r1fleet's folders left empty", "rmdir")


def test_an_account_without_r1fleet_s_mark_stays(monkeypatch):
    """An `ollama` made by Ollama's install.sh (and never taken over) or by a distribution's package is not r1fleet's."""
    install_sh = ff.users(("ollama", "/usr/share/ollama", "/bin/false", []), comment="")
    packaged = ff.users(("ollama", "/var/lib/ollama", "/usr/sbin/nologin", []), comment="Ollama")
    for account in (install_sh, packaged):
        run = remove(monkeypatch, account)
        assert not run.failed and run.never_ran("userdel") and run.never_ran("/var/lib/ollama")
    taken_over = remove(monkeypatch, ff.users(("ollama", "/var/lib/ollama", "/usr/sbin/nologin", ["render"])))
    assert taken_over.ran("Remove the account ollama", "userdel ollama")


def test_what_is_not_r1fleet_s_beside_its_units_stays(monkeypatch):
    """A user's own drop-in keeps its folder; an `ollama` link that points elsewhere (a package's) stays."""
    run = remove(monkeypatch, {**unit(OLLAMA, drop_ins=("r1fleet-firewall.conf", "override.conf")),
                               "[ -L /usr/local/bin/ollama ] && readlink": "/usr/lib/ollama/bin/ollama"})
    assert run.ran(f"Remove {OLLAMA}", f"rm -f -- /etc/systemd/system/{OLLAMA}")
    assert run.never_ran(f"rmdir /etc/systemd/system/{OLLAMA}.d") and run.never_ran("rm -f -- /usr/local/bin/ollama")
    emptied = remove(monkeypatch, unit(OLLAMA, drop_ins=(), links=(f"/etc/systemd/system/multi-user.target.wants/{OLLAMA}",)))
    assert emptied.ran(f"Remove {OLLAMA}", f"rmdir /etc/systemd/system/{OLLAMA}.d")
    assert emptied.ran(f"Remove {OLLAMA}", f"/etc/systemd/system/multi-user.target.wants/{OLLAMA}")


def test_a_former_pool_worker_loses_rpc_server_and_its_firewall(monkeypatch):
    worker = {**unit(RPC), **unit(RPC_FIREWALL), "inet r1fleet-rpc >/dev/null": "present",
              **present("/etc/r1fleet/rpc-nftables.conf"),
              **ff.users(("ggml-rpc", "/var/lib/ggml-rpc", "/usr/sbin/nologin", ["video"]))}
    run = remove(monkeypatch, worker)
    assert first(run, f"systemctl stop {RPC}") < first(run, f"systemctl stop {RPC_FIREWALL}")
    assert run.ran("Remove the nftables table inet r1fleet-rpc", "nft delete table inet r1fleet-rpc")
    assert run.ran("Remove the RPC firewall rules", "rm -rf -- /etc/r1fleet/rpc-nftables.conf")
    assert run.ran("Remove the account ggml-rpc", "userdel ggml-rpc")


def test_a_gateway_host_loses_the_gateway_its_firewall_and_the_packages_mask(monkeypatch):
    gateway = {**unit("r1fleet-gateway.service"), **unit("r1fleet-gateway-firewall.service"),
               "inet r1fleet-gateway >/dev/null": "present", **present("/etc/r1fleet/gateway"),
               **ff.link("/etc/systemd/system/haproxy.service", "/dev/null")}
    run = remove(monkeypatch, gateway)
    assert first(run, "systemctl stop r1fleet-gateway.service") < first(run, "systemctl stop r1fleet-gateway-firewall")
    assert run.ran("Remove the nftables table inet r1fleet-gateway", "nft delete table inet r1fleet-gateway")
    assert run.ran("Remove /etc/r1fleet/gateway", "rm -rf -- /etc/r1fleet/gateway")
    assert run.ran("Unmask haproxy.service", "rm -f /etc/systemd/system/haproxy.service")
    # a haproxy.service of the user's own (a real file, not r1fleet's mask) stays
    own = remove(monkeypatch, {**gateway, **ff.file_exists("/etc/systemd/system/haproxy.service")})
    assert not own.ran("Unmask haproxy.service", "rm -f")
    linked = remove(monkeypatch, {**gateway, **ff.link("/etc/systemd/system/haproxy.service", "/srv/my-haproxy.service")})
    assert not linked.ran("Unmask haproxy.service", "rm -f")


def test_r1fleet_s_ufw_rules_go_and_only_they(monkeypatch):
    run = remove(monkeypatch, {"ufw show added 2>/dev/null | grep -c": ["3"]})
    assert run.ran("Remove r1fleet's ufw rules", "ufw --force delete $rule")
    assert run.ran("Remove r1fleet's ufw rules", "comment 'r1fleet\\(-hold\\)\\{0,1\\}'$/")
    assert not remove(monkeypatch).ran("Remove r1fleet's ufw rules", "ufw --force delete")
    # a hold left by an apply cut short (roles/exposure/decide.py ufw_apply_commands) goes too, though it is no rule
    # of r1fleet's count
    held = remove(monkeypatch, {"ufw show added 2>/dev/null | grep -c": ["0", "pending", "added ufw deny 11434/tcp comment 'r1fleet-hold'"]})
    assert held.ran("Remove r1fleet's ufw rules", "ufw --force delete $rule")


def test_a_stopped_or_failed_unit_is_cleaned_without_a_stop(monkeypatch):
    run = remove(monkeypatch, unit(OLLAMA, state="failed", enabled="disabled"))
    assert not run.ran(f"Stop {OLLAMA}", "systemctl stop") and not run.ran(f"Stop {OLLAMA}", "systemctl disable")
    assert run.ran(f"Remove {OLLAMA}", f"systemctl reset-failed {OLLAMA}")
    # still starting (its ExecStartPost waiting for the API): stopped all the same
    assert remove(monkeypatch, unit(OLLAMA, state="activating")).ran(f"Stop {OLLAMA}", f"systemctl stop {OLLAMA}")


def test_a_clean_host_changes_nothing(monkeypatch):
    run = remove(monkeypatch)
    assert not run.failed and run.changed == [] and run.op_names


@pytest.mark.parametrize("value", ["maybe", "2", "", "ture"])
def test_bad_remove_models_stops_that_host_before_any_change(monkeypatch, capsys, value):
    run = remove(monkeypatch, EXPOSED_LLAMA, data={"remove_models": value})
    assert run.failed and not run.op_names and not run.by_op
    step, why = summary._failures[run_host()]
    assert step == "remove" and "field remove_models" in why and f"{value!r} is not true or false" in why
    assert "(fix: " in why and "Traceback" not in capsys.readouterr().err


def run_host() -> str:
    return next(iter(summary._failures))


MAC = {"uname -s": "Darwin", "uname -m": "arm64"}


def test_a_mac_loses_its_launch_daemons_release_and_user_and_the_wired_limit_goes_back(monkeypatch):
    loaded = {f"launchctl print system/{label} ": "loaded" for label in
              ("com.r1fleet.ollama", "com.r1fleet.ollama-load", "com.r1fleet.iogpu-wired-limit")}
    account = {"dscl . -read /Users/_r1ollama": ["user:RealName:", "user: r1fleet Ollama",
                                                 "user:NFSHomeDirectory: /usr/local/var/r1fleet",
                                                 "group:RealName:", "group: r1fleet Ollama"]}
    run = run_role(remove_r1, responses={**MAC, **loaded, **account, **present("/Library/LaunchDaemons/com.r1fleet.iogpu-wired-limit.plist"),
                                         **model_dir(f"{MODELS}/ollama")},
                   data=SETTINGS, base_responses=False, monkeypatch=monkeypatch)
    assert not run.failed
    assert run.ran("Unload com.r1fleet.ollama", "launchctl bootout system/com.r1fleet.ollama")
    bootouts = [c.rsplit("/", 1)[1] for c in run.commands if c.startswith("launchctl bootout")]
    assert bootouts == ["com.r1fleet.ollama-load", "com.r1fleet.ollama", "com.r1fleet.iogpu-wired-limit"]  # loader first
    assert run.ran("GPU wired-memory limit back to macOS's default", "sysctl iogpu.wired_limit_mb=0")
    assert run.ran("Remove the LaunchDaemons", "/Library/LaunchDaemons/com.r1fleet.iogpu-wired-limit.plist")
    assert run.ran("Remove the account _r1ollama", "dscl . -delete /Users/_r1ollama")
    assert run.ran("Remove the account _r1ollama", "dseditgroup -o delete _r1ollama")
    assert run.ran(f"Keep the models in {MODELS}/ollama", f"chown -Rh 0:0 {MODELS}/ollama")
    assert {name for name, _ in run.by_op} == run.sudo  # every operation through sudo (an admin user connects)
    assert run.never_ran("brew uninstall") and run.never_ran("systemctl")
    # a user of that name that r1fleet did not make stays
    other = {"dscl . -read /Users/_r1ollama": ["user:RealName: Someone", "user:NFSHomeDirectory: /Users/someone"]}
    kept = run_role(remove_r1, responses={**MAC, **other}, data=SETTINGS, base_responses=False, monkeypatch=monkeypatch)
    assert kept.never_ran("dscl . -delete") and kept.never_ran("dseditgroup")


def test_leftovers_are_deleted_by_find_itself_whatever_their_names(tmp_path):
    """A file name with a newline (the Ollama service may write into its store) names nothing else to delete: the
    removal's command never reads a name back (security review N2: `x\\n.ssh\\ny.part` once became `rm -rf .ssh`)."""
    import subprocess

    from r1fleet.operations.removal import DOWNLOAD_LEFTOVERS, leftovers_removed

    store, victim = tmp_path / "models", tmp_path / ".ssh"
    store.mkdir()
    victim.mkdir()
    (store / "x\n.ssh\ny.part").write_text("partial")
    (store / "m.gguf").write_text("model")
    (store / "m.gguf.r1fleet-sha256").write_text("stamp")
    subprocess.run(["sh", "-c", leftovers_removed(str(store), DOWNLOAD_LEFTOVERS)], cwd=tmp_path, check=True)
    assert sorted(p.name for p in store.iterdir()) == ["m.gguf"] and victim.is_dir()


def test_ollamas_own_unit_masked_by_the_takeover_is_unmasked(monkeypatch):
    """The deploy masks ollama.service (roles/ollama/takeover.py), a link to /dev/null in /etc/systemd/system: the
    removal takes it away, so Ollama's install script can start its server again; a unit that is not masked
    there (a packaged one elsewhere, or none) is left alone."""
    masked = {"systemctl show ollama.service ": ["LoadState=masked", "UnitFileState=masked",
                                                  "FragmentPath=/etc/systemd/system/ollama.service"]}
    run = remove(monkeypatch, masked)
    assert not run.failed and run.ran("Unmask ollama.service", "systemctl unmask ollama.service")
    loaded = {"systemctl show ollama.service ": ["LoadState=loaded", "FragmentPath=/etc/systemd/system/ollama.service"]}
    assert remove(monkeypatch, loaded).never_ran("systemctl unmask")
    elsewhere = {"systemctl show ollama.service ": ["LoadState=masked", "FragmentPath=/usr/lib/systemd/system/ollama.service"]}
    assert remove(monkeypatch, elsewhere).never_ran("systemctl unmask")
