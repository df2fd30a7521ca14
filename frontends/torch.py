"""PyTorch frontend: an ``nn.Module`` is lowered through the torch ONNX exporter (dynamo,
``optimize=False``, so initializers keep their parameter names), analysed and planned like any
ONNX model, and the plan is applied back to a copy of the module: parameters and buffers are
sliced by name along the axes the groups name, and the attributes that describe shapes are
updated so the module runs in eager mode and exports again.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import re
import warnings
from collections import defaultdict

import numpy as np

from spa.errors import FrontendError, PlanError, UnsupportedModelError, ValidationError

log = logging.getLogger("spa")


def _torch():
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - torch is an optional dependency
        raise FrontendError("pruning an nn.Module needs torch: pip install 'spa[torch]'") from exc
    return torch


def is_module(obj) -> bool:
    """True for an ``nn.Module``. Never imports torch (about 2 s): an object can only be a
    module if torch is already imported."""
    import sys

    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


def as_call(example_inputs) -> tuple[tuple, dict]:
    """``example_inputs`` as the positional and keyword arguments of the call: a tensor, a tuple or
    list of them, or a mapping of keyword inputs (what a tokenizer returns, ``BatchEncoding`` included)."""
    from collections.abc import Mapping

    torch = _torch()
    if example_inputs is None:
        raise FrontendError("pruning an nn.Module needs example_inputs (a tensor, a tuple of tensors or a dict of "
                            "keyword inputs) to trace it; pass spa.prune(module, example_inputs, ratio=...)")
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs), {}
    if isinstance(example_inputs, Mapping):
        return (), {str(k): v for k, v in example_inputs.items() if v is not None}
    raise FrontendError(f"example_inputs must be a tensor, a tuple of tensors or a dict of keyword inputs, "
                        f"not {type(example_inputs).__name__}")


def as_args(example_inputs) -> tuple:
    """The tensors of ``example_inputs`` in the order the exported model takes them."""
    args, kwargs = as_call(example_inputs)
    return args + tuple(kwargs.values())


@contextlib.contextmanager
def _caching_off(module):
    """Within: every config of the module says ``use_cache=False`` (a cache is no tensor and
    cannot be a graph output); the configs are restored on leaving."""
    saved = {}
    for m in module.modules():
        for config in (getattr(m, "config", None), getattr(getattr(m, "config", None), "text_config", None)):
            if config is not None and id(config) not in saved and getattr(config, "use_cache", None):
                saved[id(config)] = (config, config.use_cache)
    try:
        for config, _ in saved.values():
            config.use_cache = False
        yield
    finally:
        for config, value in saved.values():
            config.use_cache = value


def _call_kwargs(module, kwargs: dict) -> dict:
    """The keyword inputs, with ``use_cache=False`` added where forward() takes it and the caller left it out."""
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return kwargs
    if "use_cache" in params and "use_cache" not in kwargs:
        return {**kwargs, "use_cache": False}
    return kwargs


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _innermost(exc: BaseException) -> BaseException:
    """The last exception of the chain of causes (the real reason, under the exporter's wrappers)."""
    seen = {id(exc)}
    while True:
        nxt = exc.__cause__ or exc.__context__
        if nxt is None or id(nxt) in seen:
            return exc
        seen.add(id(nxt))
        exc = nxt


def _export_advice(reason: str) -> str:
    low = reason.lower()
    if "dynamiccache" in low or "cache_utils" in low or "past_key_values" in low:
        return ("the model returns a key/value cache, which is no tensor: leave use_cache out of example_inputs "
                "(SPA exports with caching off) or pass use_cache=False")
    if "data-dependent" in low or "data dependent" in low or "guard" in low:
        return ("forward() branches or sizes on tensor values: make the Python control flow depend on shapes "
                "only, or write the branch with torch.cond / torch.where")
    if "unsupported" in low or "no decomposition" in low or "not implemented" in low:
        return ("an operator has no ONNX translation: replace it in forward(), or export to ONNX yourself "
                "(torch.onnx.export(..., dynamo=True, optimize=False)) and prune the file")
    return ("make forward() take and return tensors; check that example_inputs run through the module "
            "(module(*inputs) or module(**inputs)); or export to ONNX yourself "
            "(torch.onnx.export(..., dynamo=True, optimize=False)) and prune the file")


def _exporter_error(module, exc: BaseException) -> FrontendError:
    """The exporter's failure with its innermost cause (no terminal colours) and advice fitting it."""
    inner = _innermost(exc)
    lines = [ln.strip() for ln in _ANSI.sub("", str(inner)).strip().splitlines() if ln.strip()]
    reason = f"{type(inner).__name__}: {lines[0]}" if lines else type(inner).__name__
    return FrontendError(f"the torch exporter cannot export {type(module).__name__}: {reason}. "
                         f"Try: {_export_advice(reason)}")


def export(module, example_inputs, dynamic_shapes=None):
    """The module as an ONNX ModelProto (dynamo exporter, parameter names kept).

    Keyword inputs become graph inputs of the same names; caching is off during the export and
    outputs that are not tensors (a `transformers` ModelOutput) are flattened by the exporter.
    Raises FrontendError with the exporter's innermost reason and what to try when it cannot export.
    """
    torch = _torch()
    args, kwargs = as_call(example_inputs)
    kwargs = _call_kwargs(module, kwargs)
    was_training = module.training
    module.eval()
    torch_log = logging.getLogger("torch.onnx")
    level = torch_log.level
    try:
        with warnings.catch_warnings(), _caching_off(module):
            warnings.simplefilter("ignore")
            torch_log.setLevel(logging.ERROR)
            prog = None
            tensors = list(args) + [v for v in kwargs.values() if isinstance(v, torch.Tensor)]
            if dynamic_shapes is None and all(isinstance(a, torch.Tensor) for a in args) and \
                    all(a.dim() > 0 and a.shape[0] > 1 for a in tensors):
                try:  # a dynamic batch, so calibration batches of any size run through the export
                    batch = torch.export.Dim("batch")
                    dims = {k: {0: batch} if isinstance(v, torch.Tensor) else None for k, v in kwargs.items()}
                    shapes = tuple({0: batch} for _ in args) if not kwargs else {**dict(zip(
                        _positional_names(module, len(args)), ({0: batch} for _ in args))), **dims}
                    prog = _export_once(module, args, kwargs, shapes)
                except Exception:  # noqa: BLE001 - the module fixes its batch size: export it static
                    prog = None
            if prog is None:
                prog = _export_once(module, args, kwargs, dynamic_shapes)
    except Exception as exc:  # noqa: BLE001 - every exporter failure is reported with its cause
        raise _exporter_error(module, exc) from exc
    finally:
        torch_log.setLevel(level)
        module.train(was_training)
    return prog.model_proto


def _export_once(module, args, kwargs, shapes):
    """One export. When the exporter's own decomposition fails (it lowers some reshapes of
    transposed tensors to views), the program decomposed by torch.export's default table is
    exported instead; the first failure is the one reported."""
    torch = _torch()
    try:
        return torch.onnx.export(module, args, kwargs=kwargs or None, dynamo=True, optimize=False,
                                 dynamic_shapes=shapes, verbose=False, report=False)
    except Exception as exc:  # noqa: BLE001 - retried once through the default decompositions
        first = exc
    try:
        program = torch.export.export(module, args, kwargs=kwargs or None, dynamic_shapes=shapes, strict=False)
        return torch.onnx.export(program.run_decompositions(), args, kwargs=kwargs or None, dynamo=True,
                                 optimize=False, verbose=False, report=False)
    except Exception:  # noqa: BLE001 - the module cannot be exported at all: the first failure is reported
        pass
    raise first


def _positional_names(module, n: int) -> list[str]:
    try:
        return list(inspect.signature(module.forward).parameters)[:n]
    except (TypeError, ValueError):
        return [f"arg{i}" for i in range(n)]


def _kept_cuts(dg, plan) -> dict[str, list[tuple[int, np.ndarray]]]:
    """Per initializer: the (axis, kept indices) the plan cuts, read off the group members
    that are initializers themselves (the names are the module's parameter names)."""
    groups = {g.key: g for g in dg.groups}
    cuts: dict[str, list[tuple[int, np.ndarray]]] = defaultdict(list)
    for gp in plan.groups:
        group = groups.get(gp.key)
        if group is None:
            raise PlanError(f"plan group '{gp.key}' is not a group of this module; was the plan made for "
                            "another model?")
        if group.size != gp.size:
            raise PlanError(f"plan group '{gp.key}' has {gp.size} channels, the module's has {group.size}")
        if not gp.changes:
            continue
        keep = np.asarray(gp.keep, dtype=np.int64)
        slots = None if gp.slots is None else np.asarray(gp.slots, dtype=np.int64)
        for m in group.members:
            v = dg.values.get(m.dim.value)
            if m.dim.virtual or v is None or v.const_value is None:
                continue
            kept = m.kept_indices(keep, slots)
            if kept.size != m.size:
                cuts[m.dim.value].append((m.dim.axis, kept))
    return cuts


def _tensor_slots(module) -> dict[str, tuple[object, str]]:
    """Parameter and buffer names -> (owning module, attribute name)."""
    out = {}
    for prefix, mod in module.named_modules(remove_duplicate=False):
        for name, _ in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            out[f"{prefix}.{name}" if prefix else name] = (mod, name)
    return out


def slice_module(module, dg, plan, exported: set[str] | None = None, updates: dict | None = None):
    """A copy of ``module`` with the plan applied to its parameters and buffers (tied tensors
    stay tied) and shape attributes updated. ``dg`` is the dependency graph of its export;
    ``exported`` the export's initializer names (its parameters and buffers). Other constants
    the trace made (the zero bias of a Conv without one) have no tensor in the module.
    ``updates`` replaces some tensors' values first (OBSPA's reconstructed weights)."""
    torch = _torch()
    pruned = copy.deepcopy(module)
    cuts = _kept_cuts(dg, plan)
    owners = _tensor_slots(pruned)
    for name, arr in (updates or {}).items():
        if name in owners:
            mod, attr = owners[name]
            with torch.no_grad():
                getattr(mod, attr).copy_(torch.as_tensor(arr))
    if exported is not None:
        cuts = {name: c for name, c in cuts.items() if name in exported or name in owners}
    missing = [name for name in cuts if name not in owners]
    if missing:
        raise UnsupportedModelError(
            f"initializer(s) {', '.join(sorted(missing)[:5])} of the export cannot be mapped back to a parameter or "
            "buffer of the module (the exporter renamed or folded them); keep their groups whole with protect=[...]"
        )
    replaced: dict[int, object] = {}  # id of the old tensor -> new tensor (tied parameters)
    for name, axis_cuts in cuts.items():
        mod, attr = owners[name]
        old = getattr(mod, attr)
        if id(old) in replaced:
            continue
        data = old.detach()
        for axis, kept in axis_cuts:
            data = torch.index_select(data, axis, torch.as_tensor(kept, dtype=torch.long, device=data.device))
        data = data.contiguous().clone()
        new = torch.nn.Parameter(data, requires_grad=old.requires_grad) if isinstance(old, torch.nn.Parameter) else data
        replaced[id(old)] = new
    put_tensors(owners, replaced)
    _update_attributes(pruned, module)
    _update_heads(pruned, dg, plan)
    from spa.frontends.hf import record_on_config
    from spa.frontends.torch_mha import swap_multihead_attention

    pruned = swap_multihead_attention(pruned, module, dg, plan)

    record_on_config(pruned, module)  # a transformers config carries the sizes save_pretrained writes
    return pruned


def put_tensors(owners: dict, replaced: dict) -> None:
    """Swap in new tensors: ``replaced`` maps the id of an old tensor to its replacement, under
    every name that holds it (``owners`` from ``_tensor_slots``), so tied tensors stay tied."""
    torch = _torch()
    for mod, attr in owners.values():
        old = getattr(mod, attr)
        if old is not None and id(old) in replaced:
            if isinstance(old, torch.nn.Parameter):
                setattr(mod, attr, replaced[id(old)])
            else:
                mod._buffers[attr] = replaced[id(old)]


def _update_attributes(pruned, original) -> None:
    """Shape attributes of standard layers follow their (sliced) weights."""
    torch = _torch()
    nn = torch.nn
    before = dict(original.named_modules())
    for name, mod in pruned.named_modules():
        old = before.get(name)
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            per_group_out = old.out_channels // old.groups
            mod.out_channels = mod.weight.shape[0]
            mod.groups = max(1, mod.out_channels // per_group_out) if old.groups > 1 else 1
            mod.in_channels = mod.weight.shape[1] * mod.groups
        elif isinstance(mod, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            per_group_in = old.in_channels // old.groups
            mod.in_channels = mod.weight.shape[0]
            mod.groups = max(1, mod.in_channels // per_group_in) if old.groups > 1 else 1
            mod.out_channels = mod.weight.shape[1] * mod.groups
        elif isinstance(mod, nn.Linear):
            mod.out_features, mod.in_features = mod.weight.shape
        elif isinstance(mod, nn.modules.batchnorm._NormBase):
            ref = mod.weight if mod.weight is not None else mod.running_mean
            if ref is not None:
                mod.num_features = ref.shape[0]
        elif isinstance(mod, nn.GroupNorm):
            if mod.weight is not None:
                per_group = old.num_channels // old.num_groups
                mod.num_channels = mod.weight.shape[0]
                mod.num_groups = mod.num_channels // per_group
        elif isinstance(mod, nn.LayerNorm):
            if mod.weight is not None:
                mod.normalized_shape = tuple(mod.weight.shape)
        elif isinstance(mod, nn.PReLU):
            mod.num_parameters = mod.weight.numel()
        elif isinstance(mod, nn.RNNBase) and not getattr(mod, "proj_size", 0):
            # One hidden_size serves every layer: layers pruned to different sizes fail the check.
            mod.input_size = mod.weight_ih_l0.shape[1]
            mod.hidden_size = mod.weight_hh_l0.shape[1]
        elif isinstance(mod, nn.Embedding):
            mod.num_embeddings, mod.embedding_dim = mod.weight.shape
        elif type(mod).__name__ == "Conv1D" and hasattr(mod, "nf"):  # transformers' GPT-2 Conv1D
            mod.nf = mod.weight.shape[1]
        elif hasattr(mod, "normalized_shape") and getattr(mod, "weight", None) is not None:
            mod.normalized_shape = tuple(mod.weight.shape)


_HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads")
_KV_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")


def _common_module(names) -> str:
    parts = [n.split(".")[:-1] for n in names]
    prefix = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        prefix.append(level[0])
    return ".".join(prefix)


def _update_heads(pruned, dg, plan) -> None:
    """Head counts on attention modules (and on ``config`` where every layer agrees)."""
    groups = {g.key: g for g in dg.groups}
    counts = []
    modules = dict(pruned.named_modules())
    for gp in plan.groups:
        g = groups.get(gp.key)
        if g is None or g.heads is None:
            continue
        info = g.heads
        rep = info.q_per_group or 1
        new_rep = len(gp.slots) if gp.slots is not None else rep
        kv, q = len(gp.keep), len(gp.keep) * new_rep
        counts.append((q, kv if rep > 1 else q))
        owner = modules.get(_common_module([m.param for m in g.params if m.param]))
        if owner is None or not gp.changes:
            continue
        for attr in _HEAD_ATTRS:
            if isinstance(getattr(owner, attr, None), int):
                setattr(owner, attr, q)
        for attr in _KV_ATTRS:
            if isinstance(getattr(owner, attr, None), int):
                setattr(owner, attr, kv)
        if isinstance(getattr(owner, "num_key_value_groups", None), int):
            owner.num_key_value_groups = new_rep
        dim = getattr(owner, "head_dim", None) or getattr(owner, "attention_head_size", None)
        if isinstance(dim, int):
            for attr in ("all_head_size", "split_size"):
                if isinstance(getattr(owner, attr, None), int):
                    setattr(owner, attr, q * dim)
    config = getattr(pruned, "config", None)
    if config is None:
        return
    _update_sizes_on_config(config, dg, plan, groups)
    if not counts:
        return
    if len(set(counts)) == 1:
        q, kv = counts[0]
        for attr, value in (("num_attention_heads", q), ("num_key_value_heads", kv), ("n_head", q)):
            if isinstance(getattr(config, attr, None), int):
                setattr(config, attr, value)
    else:
        log.info("layers keep different head counts %s; model.config keeps the original ones", counts)


_FFN_HINTS = ("intermediate", "mlp", "fc1", "gate_proj", "up_proj", "c_fc", "ffn", "feed_forward")


def _update_sizes_on_config(config, dg, plan, groups) -> None:
    """``hidden_size`` and ``intermediate_size`` of a `transformers` config follow the hidden
    group and the FFN groups, when every layer agrees."""
    kept = {gp.key: len(gp.keep) for gp in plan.groups}
    hidden = [kept[g.key] for g in dg.groups if g.kind == "hidden" and g.key in kept]
    if len(hidden) == 1 and isinstance(getattr(config, "hidden_size", None), int):
        config.hidden_size = hidden[0]
    ffn = {kept[g.key] for g in dg.groups if g.kind == "channels" and g.key in kept
           and any(h in (m.param or "") for m in g.params if m.role == "out" for h in _FFN_HINTS)}
    if len(ffn) == 1 and isinstance(getattr(config, "intermediate_size", None), int):
        config.intermediate_size = ffn.pop()


def module_outputs(module, example_inputs) -> list[np.ndarray]:
    """The module's outputs on ``example_inputs`` as numpy arrays (flattened like the export)."""
    torch = _torch()
    args, kwargs = as_call(example_inputs)
    with torch.no_grad(), _caching_off(module):
        out = module(*args, **_call_kwargs(module, kwargs))
    flat = []

    def walk(o):
        if isinstance(o, torch.Tensor):
            flat.append(o.detach().cpu().numpy())
        elif isinstance(o, dict) or hasattr(o, "to_tuple"):
            for v in (o.values() if isinstance(o, dict) else o.to_tuple()):
                walk(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)

    walk(out)
    return flat


def check_module(pruned_module, pruned_onnx, example_inputs, atol: float = 1e-4) -> None:
    """The pruned module runs and gives the outputs of the ONNX model pruned with the same plan."""
    from spa import runtime

    try:
        got = module_outputs(pruned_module, example_inputs)
    except Exception as exc:  # noqa: BLE001 - any eager failure means a wrong attribute update
        raise ValidationError(
            f"the pruned module does not run in eager mode: {exc}. A size written as a literal in forward() "
            "(torch.split sizes, a view shape) cannot follow pruning: compute it from tensor shapes, or keep "
            "the group whole with protect=[...]") from exc
    sess = runtime.session(pruned_onnx, optimize=False)
    feeds = _feeds(sess, example_inputs)
    want = sess.run(None, feeds)
    if len(want) != len(got):
        raise ValidationError(f"the pruned module returns {len(got)} tensors, the pruned ONNX model {len(want)}; "
                              "the module's outputs cannot be checked one by one")
    for k, (w, g) in enumerate(zip(want, got)):
        if w.shape != g.shape or not np.allclose(w, g, atol=atol, rtol=1e-3):
            diff = float(np.max(np.abs(w - g))) if w.shape == g.shape else f"shape {g.shape} vs {w.shape}"
            raise ValidationError(f"output {k} of the pruned module differs from the pruned ONNX model ({diff})")


def _feeds(sess, example_inputs) -> dict:
    """Session feeds: keyword inputs by name, the others in order."""
    args, kwargs = as_call(example_inputs)
    names = [i.name for i in sess.get_inputs()]
    feeds = {k: v.detach().cpu().numpy() for k, v in kwargs.items() if k in names and hasattr(v, "detach")}
    rest = [n for n in names if n not in feeds]
    feeds.update({n: a.detach().cpu().numpy() for n, a in zip(rest, args)})
    return feeds


def blame_module_group(module, loaded, dg, plan, example_inputs, exported, exc, apply_onnx):
    """The first group whose pruning alone breaks the module, named in the error (``apply_onnx``
    prunes the ONNX model with a plan)."""
    from spa.plan import GroupPlan, Plan

    for gp in plan.pruned_groups:
        single = Plan(tuple(g if g.key == gp.key else GroupPlan(g.key, g.size, tuple(range(g.size)))
                            for g in plan.groups))
        try:
            check_module(slice_module(module, dg, single, exported), apply_onnx(loaded, single), example_inputs)
        except ValidationError as one:
            return ValidationError(f"pruning group '{gp.key}' breaks the module: {one} "
                                   f"(protect=['{gp.key.rsplit(':', 1)[0]}'] keeps it whole)")
    return exc
