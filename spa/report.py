"""Plain-text tables and JSON reports for the CLI."""

from __future__ import annotations

from spa.depgraph import DependencyGraph


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


def inspect_dict(dg: DependencyGraph) -> dict:
    return {
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
    }


def attention_lines(dg: DependencyGraph) -> list[str]:
    """One line per attention group, e.g. 'layer 3 attention: 16 q heads in 4 KV groups ...'."""
    lines = []
    for layer, g in enumerate(x for x in dg.groups if x.heads is not None):
        lines.append(f"  layer {layer} attention: {g.heads.describe()}  [group {g.key}]")
    return lines


def inspect_text(dg: DependencyGraph, show_all: bool = False) -> str:
    out = []
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
