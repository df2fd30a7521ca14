"""Gradient criteria (Taylor, SNIP, GraSP): per-element importances computed with autograd on
an nn.Module (``spa.frontends.gradients``), keyed by parameter name, summed per channel."""

from __future__ import annotations

import numpy as np

from spa.criteria.magnitude import signed_sum, weight_scores
from spa.criteria.registry import Scores, ScoringInputs, criterion


def _from_arrays(inputs: ScoringInputs, name: str) -> Scores:
    arrays = inputs.arrays

    def array_of(param: str) -> np.ndarray:
        shape = inputs.weights(param).shape
        imp = arrays.get(param)
        # A tensor without a gradient (a buffer such as BN running stats) contributes zero.
        return np.zeros(shape) if imp is None else np.asarray(imp).reshape(shape)

    return weight_scores(inputs, name, signed_sum, array_of=array_of)


@criterion("taylor", needs=("weights", "gradients"))
def taylor(inputs: ScoringInputs) -> Scores:
    """|w·∂L/∂w| summed per channel (first-order Taylor)."""
    return _from_arrays(inputs, "taylor")


@criterion("snip", needs=("weights", "gradients"))
def snip(inputs: ScoringInputs) -> Scores:
    """|w·g| at initialization, normalized over the network (SNIP)."""
    return _from_arrays(inputs, "snip")


@criterion("grasp", needs=("weights", "gradients"))
def grasp(inputs: ScoringInputs) -> Scores:
    """w·Hg by double backprop (GraSP)."""
    return _from_arrays(inputs, "grasp")
