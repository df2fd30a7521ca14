"""What the sensitivity report costs, and what its two shortcuts buy:

  * masking: exact groups are measured by zeroing their weights in one onnxruntime session
    (weights as graph inputs), with the parameters and MACs saved counted from shapes
    (``spa.metrics.Counter``), instead of building, running and counting each pruned-alone
    copy; the figures of both ways are compared (they must agree: masked equivalence);
  * the cache: a second ``spa.sensitivity`` call with the same model and settings reads the
    JSON back instead of measuring.

Models: SPA's small ResNet (zoo) and a 4-layer random-init LLaMA (transformers, exported with
the dynamo exporter; skipped when transformers is missing). Ratios 0.1, 0.3, 0.5; l1; 2 batches
of gaussian (ResNet) / zipf (LLaMA) inputs.

    python examples/bench_sensitivity.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import spa
from spa import calibration as cal
from spa import sensitivity_report as sr
from spa import zoo
from spa.runtime import ModelInputs


def _models():
    yield "small ResNet", zoo.small_resnet(), None
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        import transformer_models as tm
    except ImportError:
        return
    model, x = tm.llama("sdpa", layers=4)
    yield "LLaMA (4 layers)", tm.export(model, x), "zipf"


def _probe_all(probes, units, scores, ratios) -> tuple[float, list]:
    t0 = time.perf_counter()
    out = [probes.probe([(g, sr._removed(g, scores[g.key], r)) for g in gs], r) for gs in units for r in ratios]
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="timings are the best of N")
    args = ap.parse_args()
    ratios = sr.DEFAULT_RATIOS
    rows = []
    for name, proto, calibration in _models():
        model = spa.load(proto)
        dg = spa.dependency_graph(model)
        scores = spa.score(dg, "l1")
        groups = [g for g in dg.groups if g.size > 1 and scores[g.key] is not None]
        layers = sr.layer_groups(model, groups)
        units = [[g] for g in groups] + [gs for gs in layers.values() if len(gs) > 1]
        feeds = cal.batches(calibration, model, ModelInputs(model), 2, None, 0)[:2]
        probes = sr._Probes(dg, groups, feeds, None, False, 0, None)
        masked = min(_probe_all(probes, units, scores, ratios)[0] for _ in range(args.repeat))
        _, got_masked = _probe_all(probes, units, scores, ratios)
        probes.mask = probes.count_from_shapes = False
        pruned = min(_probe_all(probes, units, scores, ratios)[0] for _ in range(args.repeat))
        _, got_pruned = _probe_all(probes, units, scores, ratios)
        exact = [(a, b) for a, b in zip(got_masked, got_pruned) if a.measured == "masked"]
        diff = max((abs(a.relative_error - b.relative_error) for a, b in exact), default=0.0)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            first = spa.sensitivity(proto, calibration=calibration, cache_dir=tmp)
            miss = time.perf_counter() - t0
            t0 = time.perf_counter()
            again = spa.sensitivity(proto, calibration=calibration, cache_dir=tmp)
            hit = time.perf_counter() - t0
        assert not first.cached and again.cached
        rows.append([name, len(groups), len(layers), len(units) * len(ratios), f"{masked:.2f}", f"{pruned:.2f}",
                     f"{pruned / masked:.1f}x", f"{diff:.1e}", f"{miss:.2f}", f"{hit:.3f}", f"{miss / hit:.0f}x"])
    from spa.report import table

    print(table(["model", "groups", "layers", "probes", "masked s", "pruned s", "speed-up", "max |err diff|",
                 "report s", "cached s", "speed-up"], rows, "l" + "r" * 10))
    print(f"(best of {args.repeat}; probes: units x ratios {ratios}; masked: one session, savings counted from "
          "shapes; pruned: a pruned copy built, run and counted per probe; 'max |err diff|': masked vs pruned "
          "relative error over the exact units; report: the whole spa.sensitivity call, then again from the cache)")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
