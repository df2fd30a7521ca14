"""How much of the models users bring SPA can load, analyse and prune.

Rebuilds a corpus of small models in-process (nothing is downloaded), with the builders of the
test suite: TorchScript and dynamo exports with control flow (If), recurrent layers (LSTM, GRU),
models quantized by onnxruntime (QDQ, QOperator, dynamic, MatMulNBits), transformers optimized
by onnxruntime (fused com.microsoft ops), a scikit-learn pipeline with ZipMap, an FPN with a
dynamic height and width, a file with stale value_info and hand-written tf2onnx / paddle2onnx
patterns. For each model it measures:

- whether ``spa.load`` accepts it (or the ``SpaError`` it raises),
- the prunable groups of ``spa.dependency_graph`` and the share of parameters in them
  (``spa.report.coverage``),
- the parameters ``spa.prune(model, 0.3)`` removes, and whether the built-in equivalence check
  was exact and on how many groups,

and prints one markdown table row per model (a failure is a row too, never a stop).

    python examples/coverage_corpus.py [--json ROWS.json]

Needs the test dependencies (torch, transformers, onnxruntime, optionally skl2onnx); a model
whose builder needs a missing package is a row marked "skipped". Runs in a few minutes on a CPU
and writes nothing outside a temporary directory it removes (and the ``--json`` file).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the transformers models are built from configs
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402  (the test builders skip through pytest when a package is missing)

import spa  # noqa: E402
from spa.metrics import count_params  # noqa: E402
from spa.report import coverage  # noqa: E402

RATIO = 0.3


@dataclass
class Case:
    """A model of the corpus: ``build(tmp)`` returns something ``spa.load`` takes."""

    name: str
    pattern: str
    build: Callable[[Path], object]
    input_shapes: dict | None = None


@dataclass
class Row:
    model: str
    pattern: str
    loads: str = "-"
    groups: int | None = None
    prunable: int | None = None
    total: int | None = None
    share: float | None = None
    removed: int | None = None
    removed_share: float | None = None
    exact: bool | None = None
    checked_groups: int | None = None
    seconds: float = 0.0
    notes: list = field(default_factory=list)


# ---- builders ---------------------------------------------------------------------------------

def _torchscript_vad(tmp):
    import test_control_flow

    return test_control_flow._torchscript_vad()


def _dynamo_cond_vad(tmp):
    """The dynamo ``torch.cond`` voice-activity model of test_control_flow."""
    import test_control_flow

    return test_control_flow.cond_vad_export()


def _recurrent(which: str, dynamo: bool):
    def build(tmp):
        import torch
        import test_recurrent
        from helpers import export_torch

        module, args = (test_recurrent.ocr_model if which == "ocr" else test_recurrent.vad_model)(torch)
        return export_torch(module, args, dynamo=dynamo)

    return build


def _quantized(model: str, scheme: str):
    def build(tmp):
        import test_quantized

        return test_quantized.quantized(tmp, model, scheme)

    return build


def _ort_optimized(name: str):
    def build(tmp):
        import test_ort_fused

        return test_ort_fused._optimized(name)

    return build


def _sklearn_pipeline(tmp):
    """skl2onnx's default classifier export: Scaler (ai.onnx.ml), an MLP, ZipMap (as in
    test_real_inputs' scikit-learn test)."""
    pytest.importorskip("skl2onnx")
    from skl2onnx import to_onnx
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 10)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(int) + (x[:, 2] > 1)
    clf = make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=(32, 16), max_iter=30,
                                                        random_state=0)).fit(x, y)
    return to_onnx(clf, x[:1])


def _fpn(tmp):
    import test_real_inputs

    return test_real_inputs._fpn_export()


def _stale_nhwc_value_info(tmp):
    """NCHW convolutions whose value_info says NHWC (as in test_stale_value_info_is_discarded)."""
    from helpers import build
    from onnx import TensorProto, helper

    proto = build('''<ir_version: 8, opset_import: ["" : 17]>
    g (float[1,3,8,8] x, float[8,3,3,3] w1, float[4,8,1,1] w2) => (float[1,4,8,8] y)
    { h = Conv <pads=[1,1,1,1]> (x, w1)  r = Relu(h)  y = Conv(r, w2) }''')
    for name in ("h", "r"):
        proto.graph.value_info.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 8, 8, 3]))
    return proto


def _exporter_pattern(exporter: str):
    def build(tmp):
        import test_real_inputs
        from helpers import build as parse

        return parse(test_real_inputs.EXPORTER_PATTERNS[exporter][0])

    return build


def _exporter_shapes(exporter: str) -> dict:
    import test_real_inputs

    return test_real_inputs.EXPORTER_PATTERNS[exporter][1]


def corpus() -> list[Case]:
    cases = [
        Case("vad_nested_if", "TorchScript torch.jit.script, nested If", _torchscript_vad),
        Case("vad_cond_if", "dynamo torch.cond -> If", _dynamo_cond_vad),
        Case("ocr_cnn_bilstm_ts", "TorchScript CNN + 2-layer BiLSTM", _recurrent("ocr", False)),
        Case("ocr_cnn_bilstm_dynamo", "dynamo CNN + 2-layer BiLSTM", _recurrent("ocr", True)),
        Case("vad_gru_ts", "TorchScript 2-layer GRU (batch first)", _recurrent("vad", False)),
        Case("vad_gru_dynamo", "dynamo 2-layer GRU (batch first)", _recurrent("vad", True)),
    ]
    schemes = {"qdq": "ORT QDQ per tensor", "qdq_pc": "ORT QDQ per channel", "qop": "ORT QOperator",
               "dynamic": "ORT dynamic (MatMulInteger/ConvInteger)", "nbits": "ORT MatMulNBits (4 bit)"}
    for model in ("cnn", "mlp"):
        for scheme, pattern in schemes.items():
            if model == "cnn" and scheme == "nbits":  # MatMulNBits quantizes MatMul only; the CNN has none
                continue
            cases.append(Case(f"{model}_{scheme}", pattern, _quantized(model, scheme)))
    for name, pattern in (("bert", "ORT optimizer: Attention, EmbedLayerNorm, SkipLayerNorm, BiasGelu"),
                          ("gpt2", "ORT optimizer: SkipLayerNorm, FastGelu"),
                          ("llama", "ORT optimizer: GQA-like heads, SimplifiedLayerNorm")):
        cases.append(Case(f"{name}_ort_fused", pattern, _ort_optimized(name)))
    cases += [
        Case("sklearn_mlp_zipmap", "skl2onnx pipeline: Scaler, MLP, ZipMap", _sklearn_pipeline),
        Case("fpn_dynamic_hw", "TorchScript FPN, dynamic H/W, Resize to Shape", _fpn,
             {"x": [2, 3, 48, 80]}),
        Case("stale_nhwc_value_info", "NHWC value_info on NCHW values", _stale_nhwc_value_info),
    ]
    for exporter in ("tf2onnx", "paddle2onnx"):
        cases.append(Case(f"{exporter}_like", f"{exporter}-like (hand-written)", _exporter_pattern(exporter),
                          _exporter_shapes(exporter)))
    return cases


# ---- measuring ----------------------------------------------------------------------------------

def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:80]}"


def _analyse(row: Row, source) -> None:
    dg = spa.dependency_graph(spa.load(source))
    cov = coverage(dg)
    row.groups, row.prunable, row.total, row.share = len(dg.groups), cov.prunable, cov.total, cov.share


def _prune(row: Row, source, input_shapes) -> None:
    result = spa.prune(source, RATIO, input_shapes=input_shapes)
    dense = count_params(result.dense)
    row.removed = dense - count_params(result.model)
    row.removed_share = row.removed / dense if dense else 0.0
    pruned = len(result.plan.pruned_groups)
    if pruned != len(result.graph.groups):
        row.notes.append(f"{pruned} of {len(result.graph.groups)} groups pruned at {RATIO}")
    eq = result.equivalence
    if eq is None:
        row.notes.append("no equivalence check ran")
    else:
        # "exact" means masked equivalence held on at least one group; groups that are only
        # compared by fidelity (inexact) are in the notes.
        row.exact = bool(eq.exact) if eq.checked_groups else None
        row.checked_groups = len(eq.checked_groups)
        row.notes += _equivalence_notes(eq)
    if result.noop:
        row.notes.append(f"noop: {result.noop}")


def _equivalence_notes(eq) -> list[str]:
    """What the exact/checked columns leave out: groups only compared by fidelity, or not at all."""
    notes = []
    if eq.skipped:
        notes.append(f"check skipped: {eq.skipped}")
    if eq.inexact_groups:
        cosine = "" if eq.fidelity is None else f", output cosine {eq.fidelity.cosine:.4f}"
        notes.append(f"{len(eq.inexact_groups)} inexact group(s){cosine}")
    if eq.unchecked:
        notes.append(f"{len(eq.unchecked)} group(s) not maskable")
    return notes


def _stage(row: Row, what: str, fn, *args) -> bool:
    """Run one stage; a SpaError or any other exception becomes a note of the row."""
    try:
        fn(*args)
        return True
    except spa.SpaError as exc:
        row.notes.append(f"{what}: {_error(exc)}")
    except pytest.skip.Exception as exc:
        row.notes.append(f"skipped: {' '.join(str(exc.msg).split())[:80]}")
    except Exception as exc:  # noqa: BLE001 - anything but a SpaError is a bug to report
        row.notes.append(f"{what} (unexpected): {_error(exc)}")
        traceback.print_exc()
    return False


def measure(case: Case, tmp: Path) -> Row:
    row = Row(case.name, case.pattern)
    start = time.perf_counter()
    built = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if _stage(row, "build", lambda: built.setdefault("source", case.build(tmp))):
            source = built["source"]
            try:
                spa.load(source)
                row.loads = "yes"
            except spa.SpaError as exc:
                row.loads = _error(exc)
            except Exception as exc:  # noqa: BLE001
                row.loads = f"(unexpected) {_error(exc)}"
                traceback.print_exc()
            if row.loads == "yes":
                _stage(row, "analysis", _analyse, row, source)
                _stage(row, "prune", _prune, row, source, case.input_shapes)
    row.seconds = time.perf_counter() - start
    return row


# ---- output --------------------------------------------------------------------------------------

def _cell(value, fmt="{}") -> str:
    return "-" if value is None else fmt.format(value)


def markdown(rows: list[Row]) -> str:
    head = ("| model | source pattern | loads | groups | prunable params | removed at 0.3 | masked-equal | checked groups "
            "| time | notes |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        prunable = "-" if r.share is None else f"{100 * r.share:.1f}% ({r.prunable:,} of {r.total:,})"
        removed = "-" if r.removed is None else f"{r.removed:,} ({100 * r.removed_share:.1f}%)"
        exact = "n/a" if r.exact is None else ("yes" if r.exact else "no")
        notes = "; ".join(r.notes).replace("|", "\\|")
        lines.append(f"| {r.model} | {r.pattern} | {r.loads.replace('|', chr(92) + '|')} | {_cell(r.groups)} "
                     f"| {prunable} | {removed} | {exact} | {_cell(r.checked_groups)} | {r.seconds:.1f} s "
                     f"| {notes} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write the rows as JSON to this file")
    args = parser.parse_args(argv)
    rows = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="spa-corpus-") as tmp:
        for case in corpus():
            row = measure(case, Path(tmp))
            print(f"{case.name}: {row.seconds:.1f} s", file=sys.stderr, flush=True)
            rows.append(row)
    print(markdown(rows))
    print(f"\n{len(rows)} models in {time.perf_counter() - start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))


if __name__ == "__main__":
    main()
