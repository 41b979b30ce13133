"""The Ollama role's decisions, made without a host: which release archives, the unit's environment, loading the
model at start, the offline import and its record."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from r1fleet.plan.catalog import load_catalog
from r1fleet.fleet.config import HostConfig
from r1fleet.records import HostPlan
from r1fleet.net import host_port, is_loopback, parse_json
from r1fleet.render.systemd_unit import OLLAMA_PRELOAD_UNIT, OLLAMA_UNIT, command_line
from r1fleet.progress import human_bytes
from r1fleet.cache.registry import DEFAULT_REGISTRY
from r1fleet.fleet import plugins

USER = "ollama"  # the service user
HOME = "/var/lib/ollama"

# ---------------------------------------------------------------------------------------------
# Service settings


def ollama_models_dir(settings: HostConfig) -> str:
    """The server's store (OLLAMA_MODELS): <model_dir>/ollama."""
    return f"{settings.model_dir.rstrip('/')}/ollama"


def import_dir(settings: HostConfig) -> str:
    """Where a rehearsal stand-in's GGUF waits for `ollama create`, with its Modelfile and import record."""
    return f"{settings.model_dir.rstrip('/')}/import"


def ollama_environment(plan: HostPlan, settings: HostConfig, models_dir: str) -> dict[str, str]:
    """The Environment= lines of the Ollama unit (docs/research/ollama.md section 2)."""
    env = {
        "OLLAMA_HOST": host_port(settings.bind_address, settings.port_for("ollama")),
        "OLLAMA_MODELS": models_dir,
        "OLLAMA_CONTEXT_LENGTH": str(plan.context_length),
        "OLLAMA_KV_CACHE_TYPE": plan.kv_cache_type,
        # Negative = keep the planned model loaded forever: the host serves one model.
        "OLLAMA_KEEP_ALIVE": "-1",
        # Context memory is num_ctx x parallel; the plan budgeted one slot.
        "OLLAMA_NUM_PARALLEL": "1",
        "OLLAMA_MAX_LOADED_MODELS": "1",
        "HOME": "/var/lib/ollama",
    }
    if plan.flash_attention_forced or plan.kv_cache_type != "f16":
        # Otherwise Ollama decides per GPU (ml/device.go), as the plan already assumed; a quantized KV
        # cache needs it on.
        env["OLLAMA_FLASH_ATTENTION"] = "1" if plan.flash_attention else "0"
    if plan.placement != "cpu" and plan.devices:
        # Ollama >= 0.30 runs llama-server, whose --fit would push layers to the CPU when less than its
        # margin (default 1024 MiB) stays free; make its margin the plan's headroom (docs/research/ollama.md s2).
        env["LLAMA_ARG_FIT_TARGET"] = str(plan.devices[0].headroom_mib)
    if plan.placement == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = "-1"  # docs/gpu.mdx: -1 forces the CPU
    elif plan.vendor == "nvidia" and plan.gpu_uuids:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(plan.gpu_uuids)
        lab_devices = plugins.gpu_devices(plan, settings)
        if lab_devices:
            # Lab hosts only: each simulated GPU is a llama.cpp RPC device; the stand-in Ollama gives its runner
            # the ones CUDA_VISIBLE_DEVICES names, as CUDA would show it only those (r1fleet/lab/standins/ollama).
            env["R1FLEET_LAB_GPU_RPC"] = ",".join(f"{u}={d}" for u, d in zip(plan.gpu_uuids, lab_devices))
    return env


PRELOAD_UNIT = OLLAMA_PRELOAD_UNIT  # loads the planned model after every start of the server
PRELOAD_RECORD = f"{HOME}/r1fleet-preload"  # its last attempt: result=, at= and detail= lines
API_WAIT_S = 120  # how long a start waits for the server's API before the start fails


def ollama_api_wait(api: str, bound_s: int = API_WAIT_S) -> list[str]:
    """The Ollama unit's ExecStartPost=: the start completes once the API answers, so `active` means it serves.
    Ollama opens its socket before it discovers GPUs and only then answers (server/routes.go:2022-2042 of
    v0.32.9: discover.GPUDevices, then srvr.Serve), so each try is bounded and repeated. Nothing here loads
    the model: that is the preload unit's work (ollama_preload), which never holds the start or boot."""
    script = (f"until curl -s -o /dev/null --max-time 5 {shlex.quote(api + '/api/version')}; "
              "do sleep 1; done")
    return ["/usr/bin/timeout", str(bound_s), "/bin/sh", "-c", script]


def ollama_preload(tag: str, api: str, record: str = PRELOAD_RECORD) -> list[str]:
    """The preload unit's ExecStart=: an empty /api/generate with keep_alive -1 loads the model and keeps it
    loaded (server/routes.go:482-490 answers done_reason "load"), its outcome written to `record`.

    The request keeps its connection open until Ollama answers, however long the load takes: Ollama aborts a
    load whose client goes away (llm/llama_server.go:1297-1299; server/sched.go:733-738 then expires the
    runner), and it ends a stuck load itself after OLLAMA_LOAD_TIMEOUT without progress
    (envconfig/config.go:146-149, llama_server.go:1283), answering an error that is recorded here."""
    body = json.dumps({"model": tag, "keep_alive": -1}, separators=(",", ":"))
    q = shlex.quote
    return ["/bin/sh", "-c", "; ".join([
        f"rec={q(record)}",
        # the record is replaced whole, so a reader sees one attempt's lines, never half of them
        r'say() { printf "result=%s\nat=%s\ndetail=%s\n" "$1" "$(date +%s)" "$2" > "$rec.tmp" && mv -f "$rec.tmp" "$rec"; }',
        "say loading ''",
        (r"out=$(curl -sS --connect-timeout 10 -w '\n%{http_code}' -X POST -H 'Content-Type: application/json' "
         f"-d {q(body)} {q(api + '/api/generate')} 2>&1)"),
        r'code=$(printf "%s\n" "$out" | tail -n 1)',
        "detail=$(printf '%s\\n' \"$out\" | sed '$d' | tr -d '\\n' | cut -c 1-400)",
        'if [ "$code" = 200 ]; then say loaded ""; exit 0; fi',
        'say failed "HTTP $code: $detail"',
        'echo "loading the model failed: HTTP $code: $detail" >&2',
        "exit 1",
    ])]


def preload_unit_context(plan: HostPlan, settings: HostConfig) -> dict[str, Any]:
    """The variables of templates/r1fleet-ollama-preload.service.j2 for this host's plan."""
    api = settings.local_api("ollama")
    host = urlsplit(api).hostname or "127.0.0.1"
    return {
        "description": f"r1fleet: load {plan.ollama_tag} into {OLLAMA_UNIT} after each start",
        "server": OLLAMA_UNIT,
        "user": USER,
        "exec_start": command_line(ollama_preload(plan.ollama_tag or "", api)),
        "record": PRELOAD_RECORD,
        "record_dir": HOME,
        "ip_allow": ["localhost"] + ([] if is_loopback(host) else [host]),
    }


@dataclass(frozen=True)
class PreloadRecord:
    """The preload unit's last attempt, as it wrote it to PRELOAD_RECORD."""

    result: str  # loading, loaded or failed
    at: int | None  # when, seconds since the epoch
    detail: str  # why it failed: the HTTP status and Ollama's error

    @property
    def reason(self) -> str:
        """The failure in a line: Ollama's own error message where its answer was JSON."""
        status, _, body = self.detail.partition(": ")
        try:
            error = parse_json(body).get("error") if body.startswith("{") else None
        except (ValueError, AttributeError):
            error = None
        return f"{status}: {error}" if isinstance(error, str) and error else self.detail or "no detail recorded"


def read_preload_record(text: str) -> PreloadRecord | None:
    """PRELOAD_RECORD's text (`result=`, `at=`, `detail=` lines), or None when it holds no result.

    >>> read_preload_record('result=failed\\nat=1700000000\\ndetail=HTTP 404: {"error":"model not found"}\\n').reason
    'HTTP 404: model not found'
    """
    fields = dict(line.partition("=")[::2] for line in text.splitlines() if "=" in line)
    result = fields.get("result", "").strip()
    if result not in ("loading", "loaded", "failed"):
        return None
    at = fields.get("at", "").strip()
    return PreloadRecord(result, int(at) if re.fullmatch(r"[0-9]{1,19}", at) else None, fields.get("detail", "").strip())


def preload_problem(tag: str, record: PreloadRecord | None, preload_running: bool) -> str:
    """Why `tag` is not loaded, in status's and verify's words, from the preload's record and whether its unit
    runs now (then it is loading it)."""
    again = f"systemctl start {PRELOAD_UNIT}"
    if preload_running:
        return f"{tag} is not loaded yet: {PRELOAD_UNIT} is loading it"
    if record is None:
        return f"{tag} is not loaded, and {PRELOAD_UNIT} has recorded no attempt (fix: {again})"
    if record.result == "failed":
        return (f"{tag} is not loaded, last attempt failed: {record.reason} "
                f"(fix: journalctl -u {PRELOAD_UNIT} -u {OLLAMA_UNIT}, then {again})")
    if record.result == "loading":
        return f"{tag} is not loaded, its last attempt was stopped before Ollama answered (fix: {again})"
    return f"{tag} is not loaded, though {PRELOAD_UNIT} loaded it after the last start (unloaded since? fix: {again})"


def ollama_load_request(tag: str, api: str) -> str:
    """The shell command that loads `tag` and keeps it loaded: an empty /api/generate with keep_alive -1."""
    body = json.dumps({"model": tag, "keep_alive": -1}, separators=(",", ":"))
    return (f"curl -sf -o /dev/null -X POST -H 'Content-Type: application/json' -d {shlex.quote(body)} "
            f"{shlex.quote(api + '/api/generate')}")


def ollama_load_check(tag: str, api: str) -> str:
    """macOS has no systemd units: a LaunchDaemon runs this at boot and every LOAD_CHECK_INTERVAL_S, loading
    the planned model whenever the server answers without it loaded (after a restart or a crash)."""
    return (f"curl -sf --max-time 10 {shlex.quote(api + '/api/ps')} | grep -qF {shlex.quote(json.dumps(tag))} "
            f"|| {ollama_load_request(tag, api)}")


LOAD_CHECK_INTERVAL_S = 30
API_WAIT_SLACK_S = 30  # TimeoutStartSec beyond the API wait's own bound

IMPORT_RECORD = "imported.json"  # in import_dir: what Ollama reported for r1fleet's import
MODELFILE = "Modelfile"  # in import_dir: the stand-in's Modelfile


def ollama_tag_digest(tags_document: Any, tag: str) -> str | None:
    """The digest Ollama reports for `tag` in /api/tags (the manifest's sha256, server/model_list_cache.go)."""
    models = tags_document.get("models") if isinstance(tags_document, dict) else None
    for entry in models if isinstance(models, list) else []:
        if isinstance(entry, dict) and tag in (entry.get("name"), entry.get("model")):
            return entry.get("digest") if isinstance(entry.get("digest"), str) else None
    return None


def import_record(tag: str, source_sha256: str, digest: str | None, modelfile_sha256: str) -> dict[str, str | None]:
    """What r1fleet records after importing the file `source_sha256` as `tag` with the Modelfile `modelfile_sha256`:
    the digest Ollama reported."""
    return {"digest": digest, "modelfile_sha256": modelfile_sha256, "source_sha256": source_sha256, "tag": tag}


def imported_with(record: Any, modelfile_sha256: str) -> bool:
    """Whether the recorded import used this Modelfile: one written differently (records from before r1fleet
    kept its sha256, a Modelfile that set num_ctx) is imported again, since `ollama create` bakes its
    parameters into the model (a params layer, which overrides the unit's environment)."""
    return isinstance(record, dict) and record.get("modelfile_sha256") == modelfile_sha256


def import_record_digest(record: Any, tag: str, source_sha256: str | None) -> str | None:
    """The digest Ollama reported for `tag` right after r1fleet imported the file `source_sha256`, from the
    import record; None when the record is missing or is of another file. Ollama's `create` rewrites a GGUF
    through llama-quantize (server/create.go), so what it stores is known only from what it reports then.
    Records written before r1fleet kept only the digest hold the whole /api/tags answer instead.

    >>> import_record_digest({"tag": "t", "source_sha256": "ab", "digest": "cd"}, "t", "ab")
    'cd'
    >>> import_record_digest({"tag": "t", "source_sha256": "ab", "tags": {"models": [{"name": "t", "digest": "cd"}]}}, "t", "ab")
    'cd'
    """
    if not isinstance(record, dict) or record.get("tag") != tag or record.get("source_sha256") != source_sha256:
        return None
    if isinstance(record.get("digest"), str):
        return record["digest"]
    return ollama_tag_digest(record.get("tags"), tag)


def weights_digest(plan: HostPlan) -> str | None:
    """The weights the tag must have: the catalog's pin, or for a rehearsal stand-in taken from a registry, its
    GGUF itself (a registry publishes a GGUF as its model layer unchanged; only `ollama create` rewrites it)."""
    pinned = load_catalog().find(plan.model).ollama_digest if plan.model else None
    return pinned or (plan.gguf.sha256 if plan.rehearsal and plan.gguf else None)


def registry_of(settings: HostConfig) -> str:
    """The Ollama registry this host's model comes from."""
    return (settings.ollama_registry or DEFAULT_REGISTRY).rstrip("/")


def takes_from_registry(plan: HostPlan, settings: HostConfig, system: str) -> bool:
    """r1fleet places an Ollama host's model from its registry (roles/ollama/registry.py), except a rehearsal
    stand-in without one (imported). A Mac (`system` Darwin) pulls or imports it itself: never."""
    if plan.backend != "ollama" or system == "Darwin":
        return False
    return not settings.rehearsal or settings.ollama_registry is not None


def imports_stand_in(plan: HostPlan, settings: HostConfig, system: str) -> bool:
    """An Ollama host imports its rehearsal stand-in from the GGUF (`ollama create`), unless it names a registry
    that serves it (Linux: the Mac role always imports it); any other Ollama model comes from a registry."""
    return plan.backend == "ollama" and settings.rehearsal and not takes_from_registry(plan, settings, system)


def modelfile(model_path: str) -> str:
    """The Modelfile for Ollama's offline import (`ollama create`, docs/research/ollama.md section 7). No
    `PARAMETER num_ctx`: a model's own num_ctx overrides OLLAMA_CONTEXT_LENGTH (server/routes.go:129-145 of
    v0.32.9) and would keep the context of the plan it was imported for, where the unit's environment follows
    every replan (as for a library tag, whose params hold only `stop`)."""
    return f"FROM {model_path}\n"


def pull_command(tag: str, api: str, binary: str) -> str:
    """`ollama pull` of the exact tag, against this host's server.

    >>> pull_command("deepseek-r1:7b", "http://127.0.0.1:11434", "/usr/local/bin/ollama")
    'OLLAMA_HOST=http://127.0.0.1:11434 /usr/local/bin/ollama pull deepseek-r1:7b'
    """
    return f"OLLAMA_HOST={shlex.quote(api)} {shlex.quote(binary)} pull {shlex.quote(tag)}"


def weights_label(plan: HostPlan) -> str:
    """The size of the weights a placement downloads, for a dry run's list of operations ('' when unknown)."""
    size = plan.gguf.size_bytes if plan.gguf else None
    return f" ({human_bytes(size)})" if size else ""
