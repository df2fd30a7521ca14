"""Small helpers shared by op specs: shape completion and MAC arithmetic."""

from __future__ import annotations

import math


def prod(shape) -> int:
    return int(math.prod(shape))


def same_shape(node) -> list | None:
    """Output 0 has input 0's shape (elementwise ops, normalizations)."""
    x = node.inputs[0] if node.inputs else None
    return [x.shape] if x is not None and x.shape is not None else None


def same_shape_and_sum(node) -> list | None:
    """onnxruntime's Skip*Norm: output 0 and the sum (output 3) keep the input's shape."""
    x = node.inputs[0] if node.inputs else None
    if x is None or x.shape is None:
        return None
    return [x.shape, None, None, x.shape]
