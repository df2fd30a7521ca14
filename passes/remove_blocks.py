"""Pass: remove residual branches. Each Add ``y = x + f(x)`` closing a removed branch gives way
to its stream input ``x`` (every reader of ``y`` reads ``x``); a fused skip norm closing one
gives way to the plain norm of ``x`` (its sum output to ``x``). The branch's nodes and the
initializers only they read are then dead and cleaned up; a skip norm whose normalized output
nobody reads any more becomes the Add it holds. K/V caches written by a removed branch leave the
graph's inputs and outputs, and the caches left are renamed to a contiguous numbering
(``spa.depth.cache_changes``). Nothing depends on the ops inside a branch."""

from __future__ import annotations

import onnx_ir as ir


def _take_over(old: ir.Value, new: ir.Value, graph: ir.Graph, before: ir.Node, fresh: bool = False) -> None:
    """Every reader of ``old`` reads ``new``; a graph output keeps its name (``new`` takes it when
    ``fresh``, a value just made for it, else an Identity of ``new`` does)."""
    if not old.is_graph_output():
        ir.convenience.replace_all_uses_with(old, new)
        return
    src = new
    if not fresh:
        ident = ir.Node("", "Identity", [new], num_outputs=1, name=f"{before.name}_spa_bypass")
        graph.insert_before(before, ident)
        src = ident.outputs[0]
    name = old.name
    ir.convenience.replace_all_uses_with(old, src, replace_graph_outputs=True)
    old.name = f"{name}_spa_removed"
    src.name = name
    src.shape, src.type = old.shape, old.type


def _plain_norm(node: ir.Node, x: ir.Value, graph: ir.Graph) -> ir.Value:
    """The norm ``node`` (a skip norm) computes, applied to ``x`` alone."""
    from spa.depth import SKIP_NORMS

    op, kept = SKIP_NORMS[node.op_type]
    eps = node.attributes.get("epsilon")
    attrs = [ir.AttrInt64("axis", -1), ir.AttrFloat32("epsilon", eps.as_float() if eps is not None else 1e-5)]
    if op == "SimplifiedLayerNormalization":
        attrs.append(ir.AttrInt64("stash_type", 1))
    inputs = [x, *[i for i in list(node.inputs)[2:2 + kept] if i is not None]]
    norm = ir.Node("", op, inputs, attributes=attrs, num_outputs=1, name=f"{node.name}_spa_norm")
    graph.insert_before(node, norm)
    out = norm.outputs[0]
    out.name = f"{norm.name}/output_0"
    out.shape, out.type = node.outputs[0].shape, node.outputs[0].type
    return out


def _sum_only(graph: ir.Graph) -> None:
    """Skip norms whose normalized output nobody reads any more: the Add of their operands."""
    from spa.depth import _SUM, skip_norm

    for node in list(graph):
        outs = list(node.outputs)
        if not skip_norm(node) or len(outs) <= _SUM or outs[0].uses() or outs[0].is_graph_output():
            continue
        add = ir.Node("", "Add", list(node.inputs)[:2], num_outputs=1, name=f"{node.name}_spa_add")
        graph.insert_before(node, add)
        add.outputs[0].name = f"{add.name}/output_0"
        add.outputs[0].shape, add.outputs[0].type = outs[_SUM].shape, outs[_SUM].type
        _take_over(outs[_SUM], add.outputs[0], graph, add, fresh=True)
        graph.remove(node, safe=True)


def _drop_outputs(graph: ir.Graph, gone: set[str]) -> None:
    """The removed layers' present outputs leave the graph (their writers are then dead)."""
    for i in reversed(range(len(graph.outputs))):
        if graph.outputs[i].name in gone:
            graph.outputs.pop(i)


def _drop_inputs_and_renumber(graph: ir.Graph, gone: set[str], renames: dict[str, str]) -> None:
    """The removed layers' past inputs leave the graph; the caches left take their new names
    (through temporary ones, so that no two values ever share a name)."""
    for i in reversed(range(len(graph.inputs))):
        v = graph.inputs[i]
        if v.name in gone and not v.uses():
            graph.inputs.pop(i)
    values = {v.name: v for v in (*graph.inputs, *graph.outputs)}
    for old in renames:
        values[old].name = f"{old}_spa_renumbering"
    for old, new in renames.items():
        values[old].name = new


class RemoveBlocksPass(ir.passes.InPlacePass):
    """Remove ``blocks`` (``spa.depth.Block`` or ``spa.plan.BlockPlan``, matched by key)."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks = tuple(blocks)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from spa.depth import _SUM, _discover, branches_of, cache_changes, skip_norm
        from spa.passes.cleanup import CleanupPass

        if not self.blocks:
            return ir.passes.PassResult(model, False)
        graph = model.graph
        found = _discover(model)
        gone, renames = cache_changes(model, self.blocks, found)
        order = {id(n): i for i, n in enumerate(graph)}
        # last first: a later branch's stream may be an earlier one's Add output
        for add, x, _ in sorted(branches_of(model, self.blocks, found), key=lambda b: -order[id(b[0])]):
            outs = list(add.outputs)
            if skip_norm(add):
                _take_over(outs[0], _plain_norm(add, x, graph), graph, add, fresh=True)
                if len(outs) > _SUM:
                    _take_over(outs[_SUM], x, graph, add)
            else:
                _take_over(outs[0], x, graph, add)
            graph.remove(add, safe=True)
        _drop_outputs(graph, gone)
        CleanupPass()(model)
        _sum_only(graph)
        _drop_inputs_and_renumber(graph, gone, renames)
        CleanupPass()(model)
        return ir.passes.PassResult(model, True)
