"""The per-host table `r1fleet verify` ends with (and writes to --verify-report)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from r1fleet.records import HostPlan

RESULT_PASS = "PASS"
RESULT_FAIL = "FAIL"


# ---------------------------------------------------------------- the table


@dataclass
class HostResult:
    """What one host showed during a verify run (filled by the suite's report plugin)."""

    host: str
    model: str | None = None
    backend: str | None = None
    context: int | None = None
    rehearsal: bool = False
    target_model: str | None = None
    measured_tps: float | None = None
    est_tps: float | None = None
    gpu_used_mib: int | None = None
    gpu_planned_mib: int | None = None
    llama_memory: str | None = None  # llama.cpp's own account at this start against the plan (judge.memory_summary)
    passed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def result(self) -> str:
        return RESULT_FAIL if self.failed or self.error or not self.passed else RESULT_PASS


def planned_gpu_mib(plan: HostPlan) -> int | None:
    """Memory the plan puts on GPUs (or the unified pool); None for CPU-only plans."""
    if plan.placement in (None, "cpu"):
        return None
    return sum(d.planned_mib for d in plan.devices if not d.device.upper().startswith("RAM")) or None


def host_result(host: str, outcomes: dict[str, str], plan: HostPlan | None = None,
                measured: dict[str, Any] | None = None, error: str | None = None) -> HostResult:
    """One host's row: its plan, what the checks measured, the reason it could not be checked (if any) and
    each check's outcome ("passed", "failed" or "skipped")."""
    result = HostResult(host=host, error=error)
    if plan is not None:
        result.model, result.backend, result.context = plan.model, plan.backend, plan.context_length or None
        result.rehearsal, result.target_model = plan.rehearsal, plan.target_model
        result.est_tps, result.gpu_planned_mib = plan.est_tokens_per_second, planned_gpu_mib(plan)
    result.measured_tps = (measured or {}).get("tokens_per_second")
    result.gpu_used_mib = (measured or {}).get("gpu_used_mib")
    result.llama_memory = (measured or {}).get("llama_memory")
    for check, outcome in outcomes.items():
        getattr(result, outcome).append(check)
    if result.error:  # every check failed for the same reason; name it once
        result.failed = []
    return result


def _num(value: float | int | None, fmt: str = "{:,.0f}") -> str:
    return "-" if value is None else fmt.format(value)


def _result_cell(r: HostResult) -> str:
    if r.result == RESULT_PASS:
        return RESULT_PASS
    named = list(r.failed) + ([r.error] if r.error and not r.failed else [])
    return f"{RESULT_FAIL}: {', '.join(named) or 'no check ran'}"


def results_table(results: list[HostResult]) -> str:
    """One line per host: model, backend, context, tokens/s and GPU memory measured vs planned, result."""
    header = ("HOST", "MODEL", "BACKEND", "CONTEXT", "TOK/S measured/est", "GPU MiB used/planned", "RESULT")
    rows = [header]
    for r in sorted(results, key=lambda r: r.host):
        model = r.model or "-"
        if r.rehearsal and r.target_model:
            model = f"{model} (rehearsal for {r.target_model})"
        rows.append((
            r.host,
            model,
            r.backend or "-",
            _num(r.context, "{}"),
            f"{_num(r.measured_tps, '{:.1f}')}/{_num(r.est_tps, '{:g}')}",
            f"{_num(r.gpu_used_mib)}/{_num(r.gpu_planned_mib)}",
            _result_cell(r),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    failed = [r for r in results if r.result != RESULT_PASS]
    lines.append("")
    lines.append(f"{len(results) - len(failed)}/{len(results)} hosts pass")
    for r in sorted(failed, key=lambda r: r.host):
        if r.error:
            lines.append(f"{r.host}: {r.error}")
    for r in sorted(results, key=lambda r: r.host):
        if r.llama_memory:
            lines.append(f"{r.host}: llama.cpp's own account at this start, MiB used/allowed by the plan: {r.llama_memory}")
    return "\n".join(lines)
