"""The ai.onnx.ml domain (scikit-learn exports): the elementwise feature transforms.

Classifiers and regressors (LinearClassifier, TreeEnsemble*, SVM*) hold their weights in
attributes and have no rule: they are barriers that SPA prunes around. ZipMap's map-typed
output is set aside at load (``spa.frontends.onnx_tail``).
"""

from __future__ import annotations

import numpy as np

from spa.ops.context import RuleContext
from spa.ops.registry import op
from spa.ops.shapes import same_shape


def _per_feature_fixup(ctx: RuleContext, feature, names: tuple[str, ...]) -> None:
    """Attribute lists with one entry per feature (a single entry broadcasts) follow the kept."""
    node = ctx.node

    def fix(apply) -> None:
        kept = apply.kept(feature)
        if kept is None:
            return
        for name in names:
            values = ctx.attr(name)
            if values is not None and len(values) > 1:
                apply.set_attr(node, name, [float(v) for v in np.asarray(values)[kept]])

    ctx.fixup("per-feature attributes", fix)


@op("Scaler", domain="ai.onnx.ml", shape=same_shape)
def scaler(ctx: RuleContext) -> None:
    """y[a] = (x[a] - offset[f]) * scale[f]: identity on every axis; offset/scale follow x[-1]."""
    x, y = ctx.inp(0), ctx.out(0)
    dims = list(zip(ctx.dims(x), ctx.dims(y)))
    for dx, dy in dims:
        ctx.couple(dx, dy)
    n = ctx.size(x, -1)
    for name in ("offset", "scale"):
        values = ctx.attr(name)
        if values is not None and len(values) not in (1, n):
            ctx.refuse(f"'{name}' has {len(values)} entries for {n} features")
    _per_feature_fixup(ctx, dims[-1][0], ("offset", "scale"))


@op("Binarizer", domain="ai.onnx.ml", shape=same_shape)
def binarizer(ctx: RuleContext) -> None:
    """y[a] = x[a] > threshold: identity on every axis."""
    for dx, dy in zip(ctx.dims(ctx.inp(0)), ctx.dims(ctx.out(0))):
        ctx.couple(dx, dy)
