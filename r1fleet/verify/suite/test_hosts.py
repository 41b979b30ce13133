"""The checks: each host serves its planned model, on its planned GPUs, and nobody else can reach it.

One test per check, parametrized by host (fixtures in conftest.py), so a failure reads
`test_<check>[<host>]`. Judgements live in r1fleet/verify/judge.py (pure, unit tested); these
tests only gather the evidence on the host and state the verdict with the host's name.
"""

from __future__ import annotations

import ipaddress
import socket
import time

import pytest

from r1fleet.plan.catalog import load_catalog
from r1fleet.roles.ollama.decide import (IMPORT_RECORD, PRELOAD_RECORD, PRELOAD_UNIT, import_dir, import_record_digest,
                                         ollama_tag_digest, preload_problem, read_preload_record, takes_from_registry,
                                         weights_digest)
from r1fleet.plan.memory import kv_cache_mib, padded_context
from r1fleet.records import HostPlan
from r1fleet.net import parse_json, source_address_towards
from r1fleet.verify.readings import exec_start_argv, flag_value, listener_problems, parse_memory_breakdown
from r1fleet.cache.registry import ollama_manifest_path, weights_problem
from r1fleet.verify.judge import (
    gpu_problems,
    memory_by_gpu,
    memory_problems,
    memory_summary,
    ollama_chat_body,
    ollama_chat_reply,
    openai_chat_reply,
    parse_compute_apps,
    parse_device_buffers,
    parse_gpu_query,
    speed_problem,
    split_problems,
)

from r1fleet.roles.exposure.decide import ufw_rules_come_first
from r1fleet.roles.llama_cpp.decide import llama_models_dir
from r1fleet.verify.target import Target, fail

PROMPT = "What is 7 + 5? Reply with the number only."
MIB = 1024 * 1024


def chat(target: Target):
    """One real chat request per host and session (the chat, speed and GPU checks share it)."""
    if "chat_error" in target.cache:  # a hung server costs one timeout per session, not one per check
        fail(target, target.cache["chat_error"])
    if "chat" not in target.cache:
        try:
            target.cache["chat"] = _ask(target)
        except pytest.fail.Exception as err:
            target.cache["chat_error"] = f"the chat request failed: {str(err).removeprefix(target.name + ': ')}"
            raise
        target.measured["tokens_per_second"] = target.cache["chat"].tokens_per_second
    return target.cache["chat"]


def _ask(target: Target):
    """Send the chat request for the plan's backend and read the reply."""
    plan = target.plan
    messages = [{"role": "user", "content": PROMPT}]
    # R1 thinks before it answers: leave room for the thoughts; the stand-in only needs a few tokens.
    budget = 1024 if target.reasoning else 64
    if plan.backend == "ollama":
        shown = target.get_json("/api/show", "POST", {"model": plan.ollama_tag}) if target.reasoning else {}
        body = ollama_chat_body(plan.ollama_tag, messages, budget, target.reasoning, shown.get("capabilities"))
        reply = ollama_chat_reply(target.get_json("/api/chat", "POST", body, target.chat_timeout))
    else:
        body = {"messages": messages, "max_tokens": budget, "temperature": 0}
        reply = openai_chat_reply(target.get_json("/v1/chat/completions", "POST", body, target.chat_timeout, target.api_key_file()))
    return reply


# ---------------------------------------------------------------- driver and GPUs


@pytest.mark.roles("host", "head", "worker")
def test_gpus_visible(target: Target, plan: HostPlan) -> None:
    if not plan.uses_gpu:
        pytest.skip("the plan uses no GPU")
    if plan.vendor != "nvidia":
        pytest.skip(f"only NVIDIA GPUs are checked (this plan uses {plan.vendor})")
    result = target.run("nvidia-smi --query-gpu=index,name,uuid,driver_version --format=csv,noheader,nounits")
    if result.rc != 0:
        fail(target, f"nvidia-smi failed (exit {result.rc}): the driver is not loaded? {result.stdout.strip() or result.stderr.strip()}")
    problems = gpu_problems(plan, parse_gpu_query(result.stdout))
    assert not problems, f"{target.name}: " + "; ".join(problems)


# ---------------------------------------------------------------- the service


@pytest.mark.roles("host", "head", "worker")
def test_service_active(target: Target) -> None:
    how = (f"sudo launchctl kickstart system/{target.unit}; see /Library/Logs/r1fleet" if target.darwin
           else f"systemctl start {target.unit}; journalctl -u {target.unit}")
    assert target.service_running(), f"{target.name}: {target.unit} is not running ({how})"


@pytest.mark.roles("host", "head", "worker")
def test_service_enabled(target: Target) -> None:
    state = target.enabled_state()
    assert state == "enabled", f"{target.name}: {target.unit} is {state}, not enabled: it will not start at boot"


@pytest.mark.roles("host", "head", "worker")
def test_service_user(target: Target) -> None:
    configured = target.configured_user()
    assert configured == target.user, f"{target.name}: {target.unit} is configured to run as {configured or 'root'!r}, not {target.user!r}"
    pids = target.service_pids()
    if not pids:
        fail(target, f"{target.unit} has no running process")
    owners = target.output(f"ps -o user= -p {','.join(str(p) for p in sorted(pids))}").split()
    wrong = sorted(set(owners) - {target.user})
    assert not wrong, f"{target.name}: {target.unit} has processes running as {', '.join(wrong)}, not only {target.user!r}"


@pytest.mark.roles("host", "head", "worker")
def test_listens_only_on_plan(target: Target) -> None:
    listeners = target.listeners()
    service_pids = target.service_pids()
    others = {pid for lis in listeners if lis.port == target.port for pid in lis.pids} - service_pids
    units = {pid: target.unit_of(pid) for pid in sorted(others)}
    problems = listener_problems(listeners, service_pids, target.bind, target.port, units)
    assert not problems, f"{target.name}: " + "; ".join(problems)


def test_api_healthy(target: Target) -> None:
    if target.backend == "ollama":
        version = target.get_json("/api/version")
        assert version.get("version"), f"{target.name}: /api/version has no version: {version}"
    else:
        health = target.get_json("/health")
        assert health.get("status") == "ok", f"{target.name}: /health says {health}"


# ---------------------------------------------------------------- the model


def _check_file(target: Target, path: str, size: int | None, sha256: str | None, hash_it: bool) -> list[str]:
    stat = target.run(f"stat -L -c %s {path}")
    if stat.rc != 0:
        return [f"{path} is missing"]
    problems = []
    actual = int(stat.stdout.strip() or 0)
    if size and actual != size:
        problems.append(f"{path} is {actual:,} bytes, the planned file is {size:,}")
    if sha256 and hash_it and not problems:
        digest = target.output(f"sha256sum {path}", timeout=1800).split()[0]
        if digest != sha256:
            problems.append(f"{path} has sha256 {digest}, the planned file has {sha256}")
    return problems


def _imported_as_recorded(target: Target, plan: HostPlan, tags: dict) -> list[str]:
    """Ollama rewrites an imported GGUF (llama-quantize COPY, server/create.go), so its weights are not the
    file's sha256: the tag must still be what Ollama reported right after the deploy imported the planned file."""
    path = f"{import_dir(target.entry)}/{IMPORT_RECORD}"
    try:
        record = parse_json(target.output(f"cat {path} 2>/dev/null || true") or "null")
    except ValueError:
        record = None
    recorded = import_record_digest(record, plan.ollama_tag, plan.gguf.sha256 if plan.gguf else None)
    if recorded is None:
        return [f"{path} does not record importing {plan.gguf.file if plan.gguf else 'the planned file'} "
                f"as {plan.ollama_tag} (run the deploy)"]
    served = ollama_tag_digest(tags, plan.ollama_tag)
    if served != recorded:
        return [f"{plan.ollama_tag} is manifest {served}, the deploy imported it as {recorded}"]
    return []


def test_model_present(target: Target, plan: HostPlan, request: pytest.FixtureRequest) -> None:
    hash_it = plan.rehearsal or request.config.getoption("--hash-models")
    problems: list[str] = []
    if plan.backend == "ollama":
        tags = target.get_json("/api/tags")
        names = [m.get("name") for m in tags.get("models") or []]
        if plan.ollama_tag not in names:
            fail(target, f"/api/tags has no {plan.ollama_tag} (it lists: {', '.join(map(str, names)) or 'nothing'})")
        digest = weights_digest(plan)
        if plan.rehearsal and not takes_from_registry(plan, target.entry, target.hardware.os.system):
            # an offline import: compared with what Ollama reported when the deploy imported it
            problems += _imported_as_recorded(target, plan, tags)
        elif digest:
            env = target.service_environment()
            models = env.get("OLLAMA_MODELS")
            if not models:
                fail(target, f"{target.unit} sets no OLLAMA_MODELS, so its model store cannot be checked")
            manifest_path = ollama_manifest_path(models, plan.ollama_tag)
            manifest = target.output(f"cat {manifest_path}")
            try:
                problem = weights_problem(parse_json(manifest), digest)
            except ValueError as error:
                problem = f"its manifest {manifest_path} is not one ({error})"
            if problem:
                problems.append(f"{plan.ollama_tag} does not serve the plan's weights {digest}: {problem}")
            else:
                size = plan.gguf.size_bytes if plan.gguf and plan.gguf.sha256 == digest else None
                problems += _check_file(target, f"{models.rstrip('/')}/blobs/sha256-{digest}", size, digest, hash_it)
    else:
        wanted = f"{llama_models_dir(target.entry)}/{plan.gguf.file}"
        served = target.get_json("/props", key_file=target.api_key_file()).get("model_path")
        if not served:  # builds without model_path in /props: the running unit's -m
            served = flag_value(exec_start_argv(target.output(f"systemctl show -p ExecStart --value {target.unit}")), "-m", "--model")
        if (served or "") != wanted:
            problems.append(f"llama-server serves {served or 'no model'}, the plan's file is {wanted}")
        else:
            problems += _check_file(target, wanted, plan.gguf.size_bytes, plan.gguf.sha256, hash_it)
        models = target.get_json("/v1/models", key_file=target.api_key_file())
        ids = [m.get("id") for m in models.get("data") or []]
        if plan.ollama_tag not in ids:
            problems.append(f"/v1/models lists {ids}, not the plan's model name {plan.ollama_tag}")
    assert not problems, f"{target.name}: " + "; ".join(problems)


def test_model_loaded(target: Target, plan: HostPlan) -> None:
    """An Ollama host has its model in memory after every start, before any request (here: before verify's own
    chat): its preload unit loads it. While that unit still runs, the check waits for it (up to the chat timeout);
    a model that is not loaded is reported with the preload's last result."""
    if plan.backend != "ollama":
        pytest.skip("llama-server loads its model as it starts")
    if target.darwin:
        pytest.skip("a Mac's LaunchDaemon loads the model every 30 s; the chat checks see it loaded")
    deadline = time.monotonic() + target.chat_timeout
    while True:
        loaded = [m.get("name") for m in target.get_json("/api/ps").get("models") or [] if isinstance(m, dict)]
        if plan.ollama_tag in loaded:
            return
        loading = target.output(f"systemctl show -p ActiveState --value {PRELOAD_UNIT}").strip() in ("active", "activating")
        if not loading or time.monotonic() > deadline:
            break
        time.sleep(2)
    record = read_preload_record(target.output(f"cat {PRELOAD_RECORD} 2>/dev/null || true"))
    waited = f" (after waiting {target.chat_timeout} s)" if loading else ""
    fail(target, preload_problem(plan.ollama_tag, record, loading) + waited)


def test_context_matches_plan(target: Target, plan: HostPlan) -> None:
    want = plan.context_length
    problems = []
    if plan.backend == "ollama":
        env = target.service_environment()
        configured = env.get("OLLAMA_CONTEXT_LENGTH")
        if configured != str(want):
            problems.append(f"{target.unit} sets OLLAMA_CONTEXT_LENGTH={configured}, the plan's context is {want}")
        chat(target)  # make sure the model is loaded
        loaded = [m for m in target.get_json("/api/ps").get("models") or [] if m.get("name") == plan.ollama_tag]
        if loaded and loaded[0].get("context_length") not in (None, want):
            problems.append(f"the loaded model runs with context {loaded[0]['context_length']}, the plan's is {want}")
    else:
        argv = exec_start_argv(target.output(f"systemctl show -p ExecStart --value {target.unit}"))
        configured = flag_value(argv, "-c", "--ctx-size")
        if configured != str(want):
            problems.append(f"{target.unit} runs llama-server with -c {configured}, the plan's context is {want}")
        props = target.get_json("/props", key_file=target.api_key_file())
        served = (props.get("default_generation_settings") or {}).get("n_ctx") or props.get("n_ctx")
        if served != padded_context(want):
            problems.append(f"/props reports n_ctx {served}, the plan's context is {want} (llama.cpp pads it to {padded_context(want)})")
    assert not problems, f"{target.name}: " + "; ".join(problems)


# ---------------------------------------------------------------- it answers, on the GPU, fast enough


def test_chat_answers(target: Target, plan: HostPlan) -> None:
    reply = chat(target)
    assert reply.content, f"{target.name}: the chat reply has no answer text"
    if target.reasoning:
        assert reply.reasoning, f"{target.name}: {plan.model} is an R1 model but the reply carries no reasoning (thinking / reasoning_content)"


def test_openai_compatible(target: Target, plan: HostPlan) -> None:
    """The OpenAI-compatible API client libraries speak: /v1/models names the model as the plan does (the
    Ollama tag, which llama-server carries as its --alias) and /v1/chat/completions answers for that name."""
    key = target.api_key_file() if plan.backend == "llama.cpp" else None
    listed = [m.get("id") for m in target.get_json("/v1/models", key_file=key).get("data") or [] if isinstance(m, dict)]
    if plan.ollama_tag not in listed:
        fail(target, f"/v1/models lists {', '.join(map(str, listed)) or 'nothing'}, not {plan.ollama_tag}")
    body = {"model": plan.ollama_tag, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 16, "temperature": 0}
    reply = target.get_json("/v1/chat/completions", "POST", body, target.chat_timeout, key)
    choices = reply.get("choices") if isinstance(reply, dict) else None
    if reply.get("object") != "chat.completion" or not choices or not isinstance(choices[0].get("message"), dict):
        fail(target, f"/v1/chat/completions for {plan.ollama_tag} did not answer a chat completion: {str(reply)[:200]}")


def test_model_on_gpu(target: Target, plan: HostPlan) -> None:
    if not plan.uses_gpu:
        pytest.skip("the plan uses no GPU")
    chat(target)  # the model is loaded once it has answered
    if plan.backend == "ollama":
        loaded = [m for m in target.get_json("/api/ps").get("models") or [] if m.get("name") == plan.ollama_tag]
        if not loaded:
            fail(target, f"{plan.ollama_tag} is not loaded (/api/ps)")
        size, vram = int(loaded[0].get("size") or 0), int(loaded[0].get("size_vram") or 0)
        target.measured["gpu_used_mib"] = round(vram / MIB)
        assert size > 0 and vram == size, (
            f"{target.name}: only {vram / MIB:,.0f} of {size / MIB:,.0f} MiB of {plan.ollama_tag} are on the GPU (size_vram != size)"
        )
        return
    if plan.vendor != "nvidia":
        pytest.skip(f"per-GPU memory is read with nvidia-smi (this plan uses {plan.vendor})")
    apps = parse_compute_apps(target.output(
        "nvidia-smi --query-compute-apps=gpu_uuid,pid,process_name,used_memory --format=csv,noheader,nounits"))
    used = memory_by_gpu(apps, target.service_pids(), plan.gpu_uuids)
    target.measured["gpu_used_mib"] = sum(used)
    empty = [uuid for uuid, mib in zip(plan.gpu_uuids, used) if mib <= 0]
    assert not empty, f"{target.name}: llama-server holds no memory on planned GPU(s) {', '.join(empty)} (used {used} MiB)"


def test_layers_per_gpu(target: Target, plan: HostPlan) -> None:
    """llama-server's own load log: the blocks on each device are the plan's, whatever --tensor-split says."""
    if plan.backend != "llama.cpp" or not plan.tensor_split or len(plan.tensor_split) < 2:
        pytest.skip("the plan splits no model across GPUs")
    buffers = parse_device_buffers(start_log(target))
    per_layer = kv_cache_mib(load_catalog().find(plan.model), 1, plan.context_length, plan.kv_cache_type)
    problems = split_problems(plan, buffers, per_layer)
    assert not problems, f"{target.name}: " + "; ".join(problems)


def start_log(target: Target) -> str:
    """llama-server's journal since this start (its unit's running invocation): the load log."""
    if "start_log" not in target.cache:
        invocation = target.output(f"systemctl show -p InvocationID --value {target.unit}").strip()
        if not invocation:
            fail(target, f"{target.unit} is not running, so there is no load log to read")
        target.cache["start_log"] = target.output(f"journalctl -o cat --no-pager _SYSTEMD_INVOCATION_ID={invocation}")
    return target.cache["start_log"]


def test_memory_as_planned(target: Target, plan: HostPlan) -> None:
    """llama-server's own account of each device at this start (its memory breakdown) within what the plan gives the
    device: the check that holds where the lab's devices are stand-ins (docs/verify.md)."""
    if plan.backend != "llama.cpp":
        pytest.skip("Ollama's runner is checked through /api/ps (model_on_gpu)")
    log = start_log(target)
    breakdown = parse_memory_breakdown(log)
    if breakdown is None:
        if "load_tensors:" not in log:
            pytest.skip(f"the journal no longer holds this start's load log (rotated); `systemctl restart {target.unit}` "
                        "logs it again")
        fail(target, f"{target.unit} logged its load but no memory breakdown (it needs --log-verbosity 4 and llama.cpp's "
                     "--fit pre-pass, on by default): redeploy, or check the llama-server build")
    target.measured["llama_memory"] = memory_summary(plan, breakdown)
    problems = memory_problems(plan, breakdown)
    assert not problems, f"{target.name}: " + "; ".join(problems)


def test_decode_speed(target: Target, plan: HostPlan, request: pytest.FixtureRequest) -> None:
    reply = chat(target)
    fraction = request.config.getoption("--min-speed-fraction")
    if fraction is None:
        fraction = 0.0 if plan.rehearsal else 0.5  # the rehearsal stand-in runs on the lab's CPU
    problem = speed_problem(reply.tokens_per_second, plan.est_tokens_per_second, fraction)
    assert problem is None, f"{target.name}: {problem}"


# ---------------------------------------------------------------- exposure


def test_key_required(target: Target, plan: HostPlan) -> None:
    if not target.exposed:
        pytest.skip(f"bound to {target.bind} only")
    if plan.backend == "ollama":
        pytest.skip("Ollama has no API keys; only the allow-list protects it")
    if not target.api_key_file():
        fail(target, f"exposed on {target.bind}:{target.port} without an API key (set api_key_file for this host)")
    # A chat request: protected by every llama-server build. /v1/models is public up to llama.cpp
    # PR #26347 (after b10353, the build in the pinned Ollama archive), so it proves nothing.
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    status, text = target.http("POST", "/v1/chat/completions", body)
    if status in (200, 201):
        fail(target, f"{target.api}/v1/chat/completions answered {status} without a key")
    assert status in (401, 403), f"{target.name}: a request without a key got {status or 'no answer'} ({text.strip()[:200]}), expected 401"


def test_api_key_is_the_locked_one(target: Target, plan: HostPlan, request: pytest.FixtureRequest) -> None:
    """A rebuilt host keeps its API key: the key file's fingerprint is the one the fleet lock records."""
    lock = getattr(request.config, "_r1fleet_lock", None)
    locked = lock.hosts.get(target.name) if lock else None
    if locked is None or locked.api_key_fingerprint is None:
        pytest.skip("the fleet lock records no API key for this host")
    key_file = target.api_key_file()
    if not key_file:
        fail(target, "the lock records an API key, but the service loads none")
    digest = target.run(f"sha256sum {key_file}").stdout.split()[:1]
    found = f"sha256:{digest[0][:len(locked.api_key_fingerprint) - len('sha256:')]}" if digest else "unreadable"
    assert found == locked.api_key_fingerprint, (
        f"{target.name}: the API key in {key_file} is {found}, the lock records {locked.api_key_fingerprint} "
        "(fix: set api_key_source to the locked key, or relock: r1fleet lock HOST)")


def test_model_is_the_locked_manifest(target: Target, plan: HostPlan, request: pytest.FixtureRequest) -> None:
    """A rebuilt Ollama host serves the same model digest: the manifest the fleet lock records for its tag."""
    lock = getattr(request.config, "_r1fleet_lock", None)
    entry = lock.hosts.get(target.name) if lock else None
    locked = entry.artifacts.model.manifest_for(plan.ollama_tag) if entry and entry.artifacts.model else None
    if plan.backend != "ollama" or locked is None:
        pytest.skip("the fleet lock records no Ollama manifest for the tag this host serves")
    served = ollama_tag_digest(target.get_json("/api/tags"), plan.ollama_tag)
    assert served == locked, (
        f"{target.name}: {plan.ollama_tag} is manifest {served}, the lock records {locked} "
        f"(fix: run the deploy, or relock: r1fleet lock {target.name})")


def test_firewall_in_place(target: Target) -> None:
    """The allow-list is loaded now (another `flush ruleset`, such as starting the distribution's nftables
    service, removes it without stopping the service); `r1fleet verify` from inside the list cannot see that
    by connecting, so the rules are read on the host."""
    if not target.exposed:
        pytest.skip(f"bound to {target.bind} only")
    ufw = target.run("LC_ALL=C ufw status 2>/dev/null | head -n1").stdout.strip().lower()
    if ufw == "status: active":
        rules = target.output("LC_ALL=C ufw status numbered")
        assert "# r1fleet" in rules, f"{target.name}: ufw is active but has no r1fleet rules for port {target.port} (run the deploy again)"
        numbered = [line for line in rules.splitlines() if line.startswith("[")]
        assert ufw_rules_come_first(numbered), (
            f"{target.name}: another ufw rule comes before r1fleet's, and ufw stops at the first match (run the deploy again)")
        return
    table = target.run("nft list table inet r1fleet")
    assert table.rc == 0, (
        f"{target.name}: nftables has no table inet r1fleet: port {target.port} on {target.bind} is open to every "
        "network (something flushed the ruleset; run the deploy again to restore it)"
    )
    assert f"tcp dport {target.port} counter" in table.stdout and "drop" in table.stdout, (
        f"{target.name}: table inet r1fleet does not drop port {target.port}: {table.stdout.strip()[:300]}"
    )


def test_outside_allow_list_refused(target: Target) -> None:
    if not target.exposed:
        pytest.skip(f"bound to {target.bind} only")
    source = source_address_towards(target.bind)
    if source is None:
        pytest.skip(f"this machine has no route to {target.bind}")
    if in_networks(source, target.entry.allow):
        pytest.skip(f"this machine ({source}) is on the allow-list; run verify from outside it to test the refusal")
    try:
        with socket.create_connection((target.bind, target.port), timeout=3):
            connected = True
    except OSError:
        connected = False
    assert not connected, f"{target.name}: {target.bind}:{target.port} accepted a connection from {source}, which is outside allow {target.entry.allow}"


def in_networks(address: str, networks: list[str]) -> bool:
    ip = ipaddress.ip_address(address)
    return any(ip in ipaddress.ip_network(net, strict=False) for net in networks)
