"""Importance criteria, one registration each (``spa.criteria.registry``): magnitude (l1, l2,
random, bn), gradients (taylor, snip, grasp), activations (wanda, flap, obspa)."""

from spa.criteria.registry import Criterion, Scores, ScoringInputs, criterion, get, names, score_groups

__all__ = ["Criterion", "Scores", "ScoringInputs", "criterion", "get", "names", "score_groups"]
