"""Ops with subgraphs: If, Loop, Scan. Their bodies are analysed like the outer graph (the
dependency graph runs the rules on body nodes too; a value an outer graph shares with a body is
one value, so it couples by itself); these rules tie each body's inputs and outputs to the
node's. A tie needs the same rank and agreeing sizes on both sides, otherwise both sides are
blocked: what SPA cannot prove stays unpruned."""

from __future__ import annotations

from spa.ops.context import RuleContext
from spa.ops.registry import op


def _rank(v) -> int | None:
    return None if v is None or v.shape is None else len(v.shape)


def _block_all(ctx: RuleContext, v, reason: str) -> None:
    for a in range(_rank(v) or 0):
        ctx.block(ctx.dim(v, a), reason)


def _tie(ctx: RuleContext, outer, inner, what: str, seq_axis: int | None = None) -> None:
    """Axis a of ``outer`` ~ the same axis of ``inner``; ``outer``'s ``seq_axis`` (an iteration
    axis ``inner`` lacks) is blocked, and ``inner``'s axes after it are shifted by one."""
    if outer is None or inner is None:
        return
    ro, ri = _rank(outer), _rank(inner)
    if ro is None or ri is None or ro != ri + (seq_axis is not None):
        reason = f"{ctx.op} '{ctx.name}': the ranks of {what} are unknown or disagree"
        _block_all(ctx, outer, reason)
        _block_all(ctx, inner, reason)
        return
    for a in range(ro):
        d_outer = ctx.dim(outer, a)
        if a == seq_axis:
            ctx.block(d_outer, f"{ctx.op} '{ctx.name}': axis {a} of {what} is the iteration axis")
            continue
        b = a if seq_axis is None or a < seq_axis else a - 1
        d_inner = ctx.dim(inner, b)
        so, si = ctx.size(outer, a), ctx.size(inner, b)
        if so is None or so != si:
            reason = f"{ctx.op} '{ctx.name}': {what} disagree on axis {a} ({so} vs {si})"
            ctx.block(d_outer, reason)
            ctx.block(d_inner, reason)
        else:
            ctx.couple(d_outer, d_inner)


@op("If")
def if_rule(ctx: RuleContext) -> None:
    """output k[a] ~ then_branch output k[a] ~ else_branch output k[a]; the condition is no channel."""
    _block_all(ctx, ctx.inp(0), f"the condition of If '{ctx.name}' is not a channel")
    branches = [ctx.attr("then_branch"), ctx.attr("else_branch")]
    for k, y in enumerate(ctx.node.outputs):
        for name, body in zip(("then", "else"), branches):
            _tie(ctx, y, body.outputs[k], f"output {k} and its {name} branch's")


def _block_counters(ctx: RuleContext, values, what: str) -> None:
    for v in values:
        _block_all(ctx, v, f"{what} of {ctx.op} '{ctx.name}' is not a channel")


@op("Loop")
def loop_rule(ctx: RuleContext) -> None:
    """initial k[a] ~ body input 2+k[a] ~ body output 1+k[a] ~ output k[a]; scan output j:
    body output 1+N+j[a] ~ output N+j[a+1]; trip count, condition and iteration axis are no channels."""
    body = ctx.attr("body")
    _block_counters(ctx, list(ctx.node.inputs[:2]) + list(body.inputs[:2]) + list(body.outputs[:1]),
                    "the trip count or condition")
    carried = len(ctx.node.inputs) - 2
    for k in range(carried):
        what = f"loop-carried value {k}"
        _tie(ctx, ctx.inp(2 + k), body.inputs[2 + k], what)
        _tie(ctx, body.inputs[2 + k], body.outputs[1 + k], what)
        _tie(ctx, ctx.out(k), body.outputs[1 + k], what)
    for j in range(len(ctx.node.outputs) - carried):
        _tie(ctx, ctx.out(carried + j), body.outputs[1 + carried + j], f"scan output {j}", seq_axis=0)


def _axes(ctx: RuleContext, name: str, values, extra: int) -> list[int | None]:
    """Per-value scan axis (attribute ``name``, default 0), made non-negative against the
    value's rank plus ``extra``; None where the rank is unknown."""
    axes = list(ctx.attr(name, [0] * len(values)))
    if len(axes) != len(values):
        ctx.refuse(f"{name} lists {len(axes)} axes for {len(values)} values")
    out = []
    for ax, v in zip(axes, values):
        r = _rank(v)
        out.append(None if r is None else int(ax) % (r + extra) if ax < 0 else int(ax))
    return out


@op("Scan", since=9)
def scan_rule(ctx: RuleContext) -> None:
    """state k: input k[a] ~ body input k[a] ~ body output k[a] ~ output k[a]; scan input j:
    input N+j[a] ~ body input N+j[a - (a > s_j)] (s_j = scan_input_axes[j], not a channel);
    scan output j likewise with scan_output_axes; directions only reverse the iteration axis."""
    body = ctx.attr("body")
    m = int(ctx.attr("num_scan_inputs"))
    n = len(ctx.node.inputs) - m
    for k in range(n):
        what = f"scan state {k}"
        _tie(ctx, ctx.inp(k), body.inputs[k], what)
        _tie(ctx, body.inputs[k], body.outputs[k], what)
        _tie(ctx, ctx.out(k), body.outputs[k], what)
    scan_in = list(ctx.node.inputs[n:])
    for j, (x, s) in enumerate(zip(scan_in, _axes(ctx, "scan_input_axes", scan_in, 0))):
        _tie(ctx, x, body.inputs[n + j], f"scan input {j}", seq_axis=s)
    scan_out = list(ctx.node.outputs[n:])
    inner = list(body.outputs[n:])
    # A negative output axis counts from the end of the stacked output (body rank + 1).
    axes = list(ctx.attr("scan_output_axes", [0] * len(scan_out)))
    for j, (y, t) in enumerate(zip(scan_out, axes)):
        r = _rank(inner[j])
        t = int(t) % (r + 1) if t < 0 and r is not None else int(t)
        _tie(ctx, y, inner[j], f"scan output {j}", seq_axis=t)
