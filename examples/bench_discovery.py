"""Group discovery time on large graphs (~2,000 ONNX nodes and more).

    python examples/bench_discovery.py

Discovery = building the dim dependency graph from the op rules + grouping (connected
components and channel index maps). Loading/canonicalization is reported separately.
"""

from __future__ import annotations

import time

import spa
from spa import zoo
from spa.report import table


def timed(fn, repeat: int = 3):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    cases = {
        "ResNet-50 (bottleneck 3,4,6,3)": zoo.resnet50(),
        "deep ResNet (bottleneck 50,60,60,50)": zoo.resnet((50, 60, 60, 50), (16, 32, 64, 128), bottleneck=True,
                                                           image=64),
        "very deep ResNet (bottleneck 100,120,120,100)": zoo.resnet((100, 120, 120, 100), (16, 32, 64, 128),
                                                                    bottleneck=True, image=64),
    }
    rows = []
    for name, proto in cases.items():
        t_load, model = timed(lambda proto=proto: spa.load(proto), 1)

        def discover(model=model):
            dg = spa.dependency_graph(model)
            return dg, dg.groups

        t_disc, (dg, groups) = timed(discover)
        rows.append([name, len(model.graph), dg.graph.number_of_nodes(), dg.graph.number_of_edges(), len(groups),
                     f"{t_load:.2f}", f"{t_disc:.3f}"])
    print(table(["model", "ONNX nodes", "dims", "couplings", "groups", "load+canon (s)", "discovery (s)"],
                rows, "lrrrrrr"))


if __name__ == "__main__":
    main()
