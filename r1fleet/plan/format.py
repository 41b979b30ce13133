"""A plan as the deploy prints it, one host at a time."""

from __future__ import annotations

from r1fleet.records import HostPlan
from r1fleet.tensor_split import format_flag


# ---------------------------------------------------------------------------------------------
# Printing


def format_plan(plan: HostPlan, rehearsal: bool) -> str:
    """One readable block per host, printed by deploy.py before anything changes."""
    if not plan.fits or not plan.backend:
        why = "; ".join(plan.reasons) or "no model fits"
        return f"[{plan.host}] plan: nothing to deploy ({why})"
    lines = [
        f"[{plan.host}] plan: {plan.model} via {plan.backend} ({plan.placement})"
        + ("  [rehearsal: stand-in model]" if rehearsal else ""),
        f"[{plan.host}]   tag={plan.ollama_tag} context={plan.context_length} kv={plan.kv_cache_type} "
        f"flash_attention={'on' if plan.flash_attention else 'off'}"
        + (f" blocks_per_gpu={format_flag(plan.tensor_split)} --tensor-split {format_flag(plan.tensor_split_flag)}" if plan.tensor_split_flag else "")
        + (f" gpus={','.join(plan.gpu_uuids)}" if plan.gpu_uuids else ""),
    ]
    if plan.reasons:
        lines.append(f"[{plan.host}]   why: {plan.reasons[0]}")
    return "\n".join(lines)
