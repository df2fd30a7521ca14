"""One trial's measurement, where a worker runs it: prune the model by a plan, run the pruned
model on the calibration inputs, compare with the dense outputs.

A worker gets file paths and plan dicts, never a ModelProto or a session: it loads the model
once, opens its own onnxruntime sessions with ``threads`` intra-op threads (its CPU share), and
measures each plan it is sent. The plan is not verified beyond that onnxruntime run (the search
writes plans; ``spa apply`` verifies the one that is used).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

OBJECTIVES = ("fidelity", "latency", "both")


class Evaluator:
    """Measures plans on one loaded model (one per worker process)."""

    def __init__(self, model_path: str, folder: str, threads: int | None = None, latency: bool = False,
                 metric=None, latency_runs: int = 10):
        from spa.api import load
        from spa.search.cache import load_calibration

        self.model = load(model_path)
        cal = load_calibration(Path(folder))
        if cal is None:
            from spa.errors import ArgumentError

            raise ArgumentError(f"{folder} holds no calibration.npz: start the search with `spa search` first")
        self.feeds, self.dense = cal
        self.threads, self.latency, self.metric, self.latency_runs = threads, latency, metric, latency_runs
        from spa.metrics import count_params

        self.dense_params = count_params(self.model)

    def __call__(self, plan_dict: dict) -> dict:
        from spa import runtime
        from spa.api import pruned_copy
        from spa.equivalence import fidelity
        from spa.metrics import count_params
        from spa.plan import Plan

        t0 = time.perf_counter()
        plan = Plan.from_dict(plan_dict)
        pruned = pruned_copy(self._shallow(plan.blocks), plan)
        t1 = time.perf_counter()
        sess = runtime.session(pruned, threads=self.threads)
        t2 = time.perf_counter()
        got = [runtime.run_flat(sess, f)[1] for f in self.feeds]
        fid = fidelity([a for outs in got for a in outs], [a for outs in self.dense for a in outs])
        t3 = time.perf_counter()
        out = {"rel_error": fid.rel_error, "cosine": fid.cosine,
               "params_ratio": count_params(pruned) / max(self.dense_params, 1)}
        if self.latency:
            out["latency_ms"] = runtime.latency_ms(sess, self.feeds[0], warmup=2, runs=self.latency_runs)
        if self.metric is not None:
            out["metric"] = float(self.metric(sess))
        t4 = time.perf_counter()
        out["seconds"] = {"prune": t1 - t0, "session": t2 - t1, "fidelity": t3 - t2, "latency_metric": t4 - t3}
        out["pid"] = os.getpid()
        return out


    def _shallow(self, blocks):
        """The model with ``blocks`` removed (depth first; the last one kept for the next plan)."""
        if not blocks:
            return self.model
        key = tuple(b.key for b in blocks)
        if getattr(self, "_last", (None,))[0] != key:
            from spa import depth
            from spa.api import clone

            self._last = (key, depth.remove(clone(self.model), blocks))
        return self._last[1]


# ---- a worker process's evaluator (process pools) ---------------------------------------
_EVALUATOR: Evaluator | None = None


def init_process(*args) -> None:
    import signal

    global _EVALUATOR
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's: it fails the trials and stops the pool
    _EVALUATOR = Evaluator(*args)


def run_in_process(plan_dict: dict | None) -> dict:
    """Measure a plan; ``None`` only answers (the pool's start-up check)."""
    return {"pid": os.getpid()} if plan_dict is None else _EVALUATOR(plan_dict)
