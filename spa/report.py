"""Plain-text tables and JSON reports for the CLI."""

from __future__ import annotations

from dataclasses import dataclass

from spa.depgraph import Barrier, DependencyGraph


def table(headers: list[str], rows: list[list], align: str | None = None) -> str:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    align = align or "l" * len(headers)

    def fmt(row):
        return "  ".join(c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(row, widths, align)).rstrip()

    lines = [fmt(headers), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in cells]
    return "\n".join(lines)


def _short(names, limit: int = 3) -> str:
    names = list(names)
    if not names:
        return "-"
    more = f" +{len(names) - limit}" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


@dataclass(frozen=True)
class Coverage:
    """How much of a model SPA can prune: parameters in prunable groups, and per barrier the
    parameters of the blocked groups it touches (largest first)."""

    prunable: int
    total: int
    barriers: tuple[tuple[Barrier, int], ...]

    @property
    def share(self) -> float:
        return self.prunable / self.total if self.total else 0.0

    def line(self) -> str:
        return (f"Prunable parameters: {100 * self.share:.1f}% ({self.prunable:,} of {self.total:,}, in initializers "
                "with an axis in a prunable group)")

    def top(self, n: int = 3) -> str:
        """'LSTM 'lstm' (2,100,000 parameters), ...' for the barriers that block the most."""
        return ", ".join(f"{_op(b)} '{b.node}' ({params:,} parameters)" for b, params in self.barriers[:n])


def _op(b: Barrier) -> str:
    return (b.domain + "::" if b.domain else "") + b.op


def coverage(dg: DependencyGraph, model=None) -> Coverage:
    """Coverage of ``dg``, counted on ``model`` (default: ``dg.model``; after a prune, which
    changes that model in place, pass the dense copy)."""
    from spa.metrics import param_elements

    sizes = param_elements(model if model is not None else dg.model)
    prunable = {m.param for g in dg.groups for m in g.members if m.param in sizes}
    blocked_dims: dict = {}
    for comp in dg.components():
        params = {dg.param_source(d) for d in comp if dg.role(d)} - {None}
        params = {p for p in params if p in sizes and p not in prunable}
        if params:
            for d in comp:
                blocked_dims[d] = params
    per_barrier = []
    for b, dims in dg.barrier_dims():
        names = set().union(*(blocked_dims.get(d, set()) for d in dims)) if dims else set()
        if names:
            per_barrier.append((b, sum(sizes[n] for n in names)))
    per_barrier.sort(key=lambda item: -item[1])
    return Coverage(sum(sizes[n] for n in prunable), sum(sizes.values()), tuple(per_barrier))


def inspect_dict(dg: DependencyGraph) -> dict:
    from dataclasses import asdict

    from spa.depth import find_blocks

    cov = coverage(dg)
    return {
        "blocks": [asdict(b) for b in find_blocks(dg.model)],
        "state": [s.as_dict() for s in getattr(dg, "state_pairs", ())],
        "parameters": {"prunable": cov.prunable, "total": cov.total, "share": round(cov.share, 6)},
        "groups": [
            {
                "key": g.key,
                "channels": g.size,
                "exact": g.exact,
                "kind": g.kind,
                "heads": None if g.heads is None else {
                    "q_heads": g.heads.q_heads, "kv_groups": g.heads.kv_groups, "head_dim": g.heads.head_dim,
                    "slots": g.heads.slots},
                "members": [
                    {"dim": str(m.dim), "size": m.size, "role": m.role, "node": m.node, "param": m.param}
                    for m in g.members
                ],
            }
            for g in dg.groups
        ],
        "blocked": [
            {"key": b.key, "size": b.size, "reason": b.reason, "nodes": list(b.nodes)} for b in dg.blocked_groups
        ],
        "barriers": [
            {"node": b.node, "op": b.op, "domain": b.domain, "reason": b.reason} for b in dg.barriers
        ],
        "barriers_by_blocked_parameters": [
            {"node": b.node, "op": b.op, "domain": b.domain, "parameters": params} for b, params in cov.barriers
        ],
    }


def attention_lines(dg: DependencyGraph) -> list[str]:
    """One line per attention group, e.g. 'layer 3 attention: 16 q heads in 4 KV groups ...'."""
    lines = []
    for layer, g in enumerate(x for x in dg.groups if x.heads is not None):
        lines.append(f"  layer {layer} attention: {g.heads.describe()}  [group {g.key}]")
    return lines


def block_lines(blocks) -> list[str]:
    """The residual blocks along the stream (``spa.depth.find_blocks``): one line per
    transformer layer ('layer 3: attention sublayer, FFN sublayer'), one per other block."""
    names = {"attention": "attention sublayer", "ffn": "FFN sublayer", "block": "residual block"}
    lines, seen = [], set()
    for b in blocks:
        if b.kind == "layer":
            continue
        if b.layer is not None:
            if b.layer in seen:
                continue
            seen.add(b.layer)
            subs = [x for x in blocks if x.layer == b.layer and x.kind != "layer"]
            state = next((f"not removable: {x.reason}" for x in subs if not x.removable), "removable")
            caches = [c for x in subs for c in x.caches]
            lines.append(f"  layer {b.layer}: {', '.join(names[x.kind] for x in subs)}: {state}  "
                         f"[{', '.join(x.key for x in subs)}; {sum(len(x.params) for x in subs)} weights"
                         + (f"; with its K/V cache {', '.join(caches)}" if caches else "") + "]")
        else:
            state = "removable" if b.removable else f"not removable: {b.reason}"
            lines.append(f"  block {b.index} ({_block_shape(b)}): {state}  [{b.key}; {len(b.params)} weights]")
    return lines


def _block_shape(b) -> str:
    return {"attention": "attention", "ffn": "FFN"}.get(b.kind, f"{len(b.nodes)} nodes")


def inspect_text(dg: DependencyGraph, show_all: bool = False) -> str:
    from spa.depth import find_blocks

    cov = coverage(dg)
    out = [cov.line()]
    if cov.barriers and cov.share < 0.8:
        out.append(f"Most of the rest is blocked by (parameters of the blocked axes they touch): {cov.top(5)}")
        out.append("")
    rows = []
    for i, g in enumerate(dg.groups):
        outs = [m.node for m in g.params if m.role == "out"]
        ins = [m.node for m in g.params if m.role == "in"]
        rows.append([i, g.key, g.kind, g.size, len(g.members), len(g.params), _short(dict.fromkeys(outs)),
                     _short(dict.fromkeys(ins)), "yes" if g.exact else "no"])
    n_ch = sum(g.size for g in dg.groups)
    out.append(f"Prunable groups: {len(dg.groups)} ({n_ch} channels)")
    if rows:
        out.append(table(["#", "group", "kind", "channels", "dims", "params", "produced by", "consumed by", "exact"],
                         rows, "rllrrrllr"))
    attention = attention_lines(dg)
    if attention:
        out.append("")
        out.append(f"Attention layers: {len(attention)} (a unit is one KV group: its K/V heads and the query heads "
                   "that read them; head_dim is never cut)")
        out.extend(attention)
    state = state_lines(dg)
    if state:
        out.append("")
        out.append(f"State (KV cache): {len(state)} graph input/output pairs, pruned with their K/V heads")
        out.extend(state)
    blocks = block_lines(find_blocks(dg.model))
    if blocks:
        out.append("")
        out.append(f"Residual blocks (depth pruning units): {len(blocks)}")
        out.extend(blocks)
    if dg.blocked_groups:
        out.append("")
        out.append(f"Blocked parameter axes: {len(dg.blocked_groups)}")
        out.append(table(["axis", "size", "reason"],
                         [[b.key, b.size, b.reason] for b in dg.blocked_groups]))
    barriers = dg.barriers if show_all else dg.relevant_barriers()
    if barriers:
        out.append("")
        out.append(f"Barriers (ops SPA does not see through): {len(barriers)}")
        out.append(table(["node", "op", "reason"],
                         [[b.node, (b.domain + "::" if b.domain else "") + b.op, b.reason] for b in barriers]))
    hidden = len(dg.barriers) - len(barriers)
    if hidden > 0:
        out.append(f"({hidden} more barriers touch only shape computations or unprunable axes; --all lists them)")
    return "\n".join(out)


def _shape_text(v) -> str:
    if v.shape is None:
        return "?"
    return "[" + ", ".join(str(d if isinstance(d, int) else getattr(d, "value", d)) for d in v.shape) + "]"


def signature_changes(dense, pruned, renamed: dict | None = None) -> list[dict]:
    """Graph inputs and outputs that differ between ``dense`` and ``pruned`` (onnx_ir models):
    ``{"name", "kind": "input"|"output", "before", "after", "was"}``, symbolic dims by name;
    ``renamed`` (old -> new names: depth's renumbered caches) pairs values across names, ``was``
    is the old name, ``after`` None for a value that is gone."""
    old_of = {new: old for old, new in (renamed or {}).items()}
    out = []
    for kind in ("input", "output"):
        before = {v.name: v for v in getattr(dense.graph, kind + "s")}
        seen = set()
        for v in getattr(pruned.graph, kind + "s"):
            was = old_of.get(v.name, v.name)
            old = before.get(was)
            seen.add(was)
            if old is not None and (was != v.name or _shape_text(old) != _shape_text(v)):
                out.append({"name": v.name, "kind": kind, "before": _shape_text(old), "after": _shape_text(v),
                            "was": was})
        out.extend({"name": name, "kind": kind, "before": _shape_text(v), "after": None, "was": name}
                   for name, v in before.items() if name not in seen)
    return out


def signature_lines(changes) -> list[str]:
    """``name: [before] -> [after]`` per changed graph input/output (``old -> new`` names where
    renamed, ``removed`` where gone)."""
    lines = []
    for c in changes:
        if c["after"] is None:
            lines.append(f"  {c['name']}: {c['before']} removed")
        elif c.get("was", c["name"]) != c["name"]:
            lines.append(f"  {c['was']} -> {c['name']}: {c['before']} -> {c['after']}")
        else:
            lines.append(f"  {c['name']}: {c['before']} -> {c['after']}")
    return lines


def state_lines(dg: DependencyGraph) -> list[str]:
    """One line per K/V cache pair found (``spa.state``)."""
    return [f"  {s.past} -> {s.present}  (heads axis {s.axis}, read by {s.op} {s.node})"
            for s in getattr(dg, "state_pairs", ())]
