"""Depth pruning applied to an ``nn.Module``: removed residual blocks taken out of the module.

A removed block names the parameters only its branch uses. Three cases:

* a whole layer (its parameters are all those of one element of an ``nn.ModuleList``): the
  element is deleted, the later layers' ``layer_idx`` renumbered and, on a `transformers`
  config, the layer count and the per-layer lists shortened in step;
* an attention or FFN sublayer (its norm and projections inside a layer whose forward still
  adds the branch to the residual): the branch's modules become parameterless stand-ins, a
  :class:`ZeroBranch` (zeros shaped like the branch output, in the tuple the caller unpacks)
  and :class:`Skip` for the norm in front of it; so do both branches of a layer whose norms
  stay (a post-norm layer computes ``norm(x + f(x))``: without its branches, ``norm(norm(x))``);
* a generic residual block (a module whose forward is ``x + f(x)``, its parameters exactly the
  module's): the module becomes :class:`Skip`.

What was removed is written in the size record (``depth``: the layers kept per list and the
stand-ins by path), so ``save_module`` / ``load_module`` and ``save_pretrained`` /
``spa.from_pretrained`` rebuild the same module.
"""

from __future__ import annotations

import ast
import inspect
import textwrap

import torch
from torch import nn

from spa.errors import FrontendError, UnsupportedModelError

SUBLAYER_KINDS = ("attention", "ffn")
KINDS = SUBLAYER_KINDS + ("block", "layer")
KEPT_ATTR, DENSE_ATTR = "_spa_kept_layers", "_spa_dense_layers"
_INDEX_ATTRS = ("layer_idx", "layer_id")
_LAYER_COUNTS = ("num_hidden_layers", "n_layer", "num_layers")
_CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past")


class ZeroBranch(nn.Module):
    """A removed residual branch: zeros with the input's leading dims and ``width`` last (0: the
    input's), first of ``outputs`` items (the rest None) when the caller unpacks a tuple. With a
    ``layer_idx`` it still writes its layer's key/value cache (one zero channel per position),
    so the cache length that generation reads stays right."""

    def __init__(self, outputs: int = 1, width: int = 0, layer_idx: int = -1):
        super().__init__()
        self.outputs, self.width, self.layer_idx = int(outputs), int(width), int(layer_idx)

    def forward(self, *args, **kwargs):
        x = args[0] if args else kwargs.get("hidden_states")
        if x is None:
            x = next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
        shape = tuple(x.shape[:-1]) + (self.width or x.shape[-1],)
        zeros = x.new_zeros(shape)
        cache = next((kwargs[k] for k in _CACHE_KWARGS if kwargs.get(k) is not None), None)
        if cache is not None and self.layer_idx >= 0:
            cache = getattr(cache, "self_attention_cache", cache)
            step = x.new_zeros(x.shape[0], 1, x.shape[-2], 1)
            cache.update(step, step, self.layer_idx)
        return zeros if self.outputs == 1 else (zeros,) + (None,) * (self.outputs - 1)

    def extra_repr(self) -> str:
        return f"outputs={self.outputs}, width={self.width}, layer_idx={self.layer_idx}"


class Skip(nn.Module):
    """A removed norm or residual block: returns its first input."""

    def forward(self, x, *args, **kwargs):
        return x


# parameter names -> modules -------------------------------------------------------------------

def _slots(module):
    from spa.frontends.torch import _tensor_slots

    return _tensor_slots(module)


def _counted(module, exported=None) -> set[str]:
    """Names of the tensors a block must cover: parameters and persistent buffers (those in the
    export, when its initializer names are given)."""
    from spa.frontends.hf import _non_persistent

    skip = _non_persistent(module)
    return {n for n, (m, a) in _slots(module).items()
            if getattr(m, a) is not None and n not in skip and (exported is None or n in exported)}


def _under(name: str, path: str) -> bool:
    return not path or name == path or name.startswith(path + ".")


def module_blocks_from_names(module, params) -> str:
    """The path of the smallest module owning every named parameter or buffer ('' for the root).
    Raises UnsupportedModelError for a name that is not one of the module's tensors."""
    from spa.frontends.torch import _common_module

    names = sorted(set(params))
    if not names:
        raise UnsupportedModelError("a removed block names no parameters; it cannot be found in the module")
    slots = _slots(module)
    unknown = [n for n in names if n not in slots]
    if unknown:
        raise UnsupportedModelError(f"parameter(s) {', '.join(unknown[:5])} are not parameters or buffers of "
                                    f"{type(module).__name__}; was the block found on another model?")
    return _common_module(names)


def _get(module, path: str):
    return module.get_submodule(path) if path else module


def _set(module, path: str, new) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_get(module, parent), name, new)


def _covered(module, path: str, params: set[str], counted: set[str]) -> list[str]:
    """The largest submodules under ``path`` whose counted tensors are all in ``params``."""
    out, stack = [], [path]
    while stack:
        here = stack.pop()
        for name, _ in _get(module, here).named_children():
            child = f"{here}.{name}" if here else name
            mine = {n for n in counted if _under(n, child)}
            if not mine:
                continue
            if mine <= params:
                out.append(child)
            elif mine & params:
                stack.append(child)
    return sorted(out)


# stand-ins ------------------------------------------------------------------------------------

def _is_norm(mod) -> bool:
    return isinstance(mod, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.RMSNorm)) or \
        "norm" in type(mod).__name__.lower()


def _returns(mod) -> int | None:
    """How many items ``mod.forward`` returns (1: not a tuple), from its return statements; None
    when they disagree or the source cannot be read."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(type(mod).forward)))
    except (OSError, TypeError, SyntaxError):
        return None
    func = tree.body[0]
    counts, stack = set(), list(func.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            continue
        if isinstance(node, ast.Return) and node.value is not None:
            counts.add(len(node.value.elts) if isinstance(node.value, ast.Tuple) else 1)
        stack.extend(ast.iter_child_nodes(node))
    return counts.pop() if len(counts) == 1 else None


def _width(mod) -> int:
    """Output width of a branch: that of its last projection, or 0 (the input's, so the stand-in
    follows a later pruning of the hidden size) when the branch maps its input width to itself."""
    widths = []
    for m in mod.modules():
        if isinstance(m, nn.Linear):
            widths.append((m.in_features, m.out_features))
        elif type(m).__name__ == "Conv1D" and getattr(m, "weight", None) is not None:
            widths.append(tuple(m.weight.shape))
    if not widths or widths[0][0] == widths[-1][1]:
        return 0
    return widths[-1][1]


def _layer_idx(mod) -> int:
    for m in mod.modules():
        value = getattr(m, "layer_idx", None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return -1


def _zero_branch(mod, key: str, path: str) -> ZeroBranch:
    inner = [n for n, m in mod.named_modules() if n and _is_norm(m)]
    if inner:
        raise UnsupportedModelError(
            f"block '{key}' covers {path}.{inner[0]}, a norm on the residual path (a post-norm layer): the branch "
            f"cannot be removed without it; remove the whole layer or keep block '{key}'")
    if getattr(mod, "is_cross_attention", False):
        raise UnsupportedModelError(f"block '{key}' is the cross-attention {path}, whose cache reuses the encoder's "
                                    f"states; keep block '{key}'")
    outputs = _returns(mod)
    if outputs is None:
        raise UnsupportedModelError(f"block '{key}': cannot tell what {path} ({type(mod).__name__}) returns, so no "
                                    f"stand-in can replace it; keep block '{key}'")
    return ZeroBranch(outputs, _width(mod), _layer_idx(mod))


def _replace_sublayer(module, block, params: set[str], counted: set[str], owner: str) -> dict:
    """The stand-ins of an attention / FFN branch: norms -> Skip, the rest -> ZeroBranch."""
    whole = {n for n in counted if _under(n, owner)}
    paths = [owner] if whole <= params else _covered(module, owner, params, counted)
    left = params - {n for n in params for p in paths if _under(n, p)}
    if left or not paths:
        raise UnsupportedModelError(
            f"block '{block.key}': parameter(s) {', '.join(sorted(left)[:3]) or owner} sit on {owner or 'the root'} "
            f"beside other tensors, so the branch is no module of its own; keep block '{block.key}'")
    done = {}
    for path in paths:
        mod = _get(module, path)
        done[path] = Skip() if _is_norm(mod) else _zero_branch(mod, block.key, path)
    return done


def _only_norms_left(module, names: set[str]) -> bool:
    """Whether ``names`` (tensors a layer block leaves out) are all norms' (none: False)."""
    slots = _slots(module)
    return bool(names) and all(_is_norm(slots[n][0]) for n in names)


def _largest_owner(module, owner: str, whole: set[str], counted: set[str]) -> str:
    """The outermost module holding exactly the tensors of ``owner`` (a residual block around
    its branch ``f``: the block, not ``f``); no further up than a list element."""
    while owner and not _list_element(module, owner):
        parent = owner.rpartition(".")[0]
        if {n for n in counted if _under(n, parent)} != whole:
            break
        owner = parent
    return owner


def _list_element(module, owner: str):
    """(list path, index) when ``owner`` is an element of an nn.ModuleList, else None."""
    parent, _, last = owner.rpartition(".")
    if last.isdigit() and isinstance(_get(module, parent), nn.ModuleList):
        return parent, int(last)
    return None


# whole layers ---------------------------------------------------------------------------------

def _check_shortening(module, path: str) -> None:
    """Refuse to shorten a list whose length is the config's layer count when another list has that
    length too, or when the layers' arithmetic depends on their index (kept from construction)."""
    layers = _get(module, path)
    dense = len(layers)
    if any(getattr(c, a, None) == dense for c in _configs(module) for a in _LAYER_COUNTS):
        if any(getattr(c, "scale_attn_by_inverse_layer_idx", False) for c in _configs(module)):
            raise UnsupportedModelError(
                f"the layers of {path} scale attention by their index (scale_attn_by_inverse_layer_idx): a "
                "model rebuilt with fewer layers would scale them differently; remove sublayers instead")
        twins = [p for p, m in module.named_modules() if isinstance(m, nn.ModuleList) and m is not layers
                 and len(m) == dense and not hasattr(m, KEPT_ATTR)]
        if twins:
            raise UnsupportedModelError(
                f"{path} and {twins[0]} both have {dense} layers, the config's layer count: shortening {path} "
                "alone cannot say which stack the count describes; keep the layers of this model")


def _shorten(module, path: str, removed: set[int]) -> None:
    """Delete elements of the ModuleList at ``path``, renumber the kept layers' indices, and
    fix the config's layer count and per-layer lists."""
    layers = _get(module, path)
    dense = len(layers)
    kept = [i for i in range(dense) if i not in removed]
    _check_shortening(module, path)
    for new, old in enumerate(kept):
        for m in layers[old].modules():
            for attr in _INDEX_ATTRS:
                if getattr(m, attr, None) == old:
                    setattr(m, attr, new)
    for i in sorted(removed, reverse=True):
        del layers[i]
    before = getattr(layers, KEPT_ATTR, list(range(dense)))
    setattr(layers, KEPT_ATTR, [before[i] for i in kept])
    setattr(layers, DENSE_ATTR, getattr(layers, DENSE_ATTR, dense))
    _shorten_config(module, dense, kept)


def _configs(module):
    config = getattr(module, "config", None)
    return [c for c in (config, getattr(config, "text_config", None)) if c is not None]


def _shorten_config(module, dense: int, kept: list[int]) -> None:
    """`transformers` fix-ups: the layer count (and its aliases) and lists with one item per layer."""
    for config in _configs(module):
        counts = [a for a in _LAYER_COUNTS if getattr(config, a, None) == dense]
        if not counts:
            continue
        for attr in counts:
            setattr(config, attr, len(kept))
        for key in per_layer_keys(config, dense):
            value = getattr(config, key)
            setattr(config, key, type(value)(value[i] for i in kept))


def per_layer_keys(config, n: int) -> list[str]:
    """Config entries holding one item per layer (``layer_types`` and the like)."""
    return [k for k, v in vars(config).items() if not k.startswith("_") and "layer" in k
            and isinstance(v, (list, tuple)) and len(v) == n]


# the entry point ------------------------------------------------------------------------------

def remove_blocks(module, blocks, exported: set[str] | None = None):
    """Remove depth blocks from ``module`` (modified and returned). Each block has ``.key``,
    ``.kind`` (attention / ffn / block / layer), ``.layer`` and ``.params``, the names of the
    parameters and buffers only its branch uses. Raises UnsupportedModelError, naming the block
    and the module path, where the module cannot be made to compute the graph without it."""
    counted = _counted(module, exported)
    tensors = set(_slots(module))
    swaps: dict[str, nn.Module] = {}
    shortened: dict[str, set[int]] = {}
    for block in blocks:
        if block.kind not in KINDS:
            raise UnsupportedModelError(f"block '{block.key}' has kind '{block.kind}'; known: {', '.join(KINDS)}")
        params = set(block.params) & (counted if exported is not None else tensors)  # not the export's constants
        if not params:
            raise UnsupportedModelError(f"block '{block.key}' names none of the module's parameters or buffers "
                                        f"({', '.join(list(block.params)[:3])}...); was it found on another model?")
        owner = module_blocks_from_names(module, params)
        whole = {n for n in counted if _under(n, owner)}
        if block.kind in SUBLAYER_KINDS or (block.kind == "layer" and _only_norms_left(module, whole - params)):
            # A post-norm layer's norms sit on the residual path: both branches go, the norms stay.
            swaps.update(_replace_sublayer(module, block, params, counted, owner))
            continue
        if whole <= params:
            owner = _largest_owner(module, owner, whole, counted)
        if not whole <= params or not owner:
            raise UnsupportedModelError(
                f"{block.kind} '{block.key}' does not cover all of module {owner or 'the root'} "
                f"({len(whole - params)} other tensor(s) there), so it is no module of its own; keep it")
        element = _list_element(module, owner) if block.kind == "layer" else None
        if element is not None:
            shortened.setdefault(element[0], set()).add(element[1])
        else:
            swaps[owner] = Skip()
    for path in shortened:
        _check_shortening(module, path)  # before anything changes
    record = _pending_record(module)
    for path, new in swaps.items():
        _set(module, path, new)
    renames = {}
    for path, removed in shortened.items():
        renames[path] = [i for i in range(len(_get(module, path))) if i not in removed]
        _shorten(module, path, removed)
    _update_record(module, record, renames, list(swaps))
    return module


# size record ----------------------------------------------------------------------------------

def depth_record(module) -> dict:
    """What depth pruning removed from ``module``: the layers each shortened ModuleList keeps
    (original indices) and the stand-ins by path. Empty when nothing was removed."""
    layers = {path: {"dense": getattr(m, DENSE_ATTR), "kept": list(getattr(m, KEPT_ATTR))}
              for path, m in module.named_modules() if isinstance(m, nn.ModuleList) and hasattr(m, KEPT_ATTR)}
    branches = {}
    for path, m in module.named_modules():
        if isinstance(m, ZeroBranch):
            branches[path] = {"kind": "zero", "outputs": m.outputs, "width": m.width, "layer_idx": m.layer_idx}
        elif isinstance(m, Skip):
            branches[path] = {"kind": "skip"}
    return {k: v for k, v in (("layers", layers), ("branches", branches)) if v}


def restore_depth(module, record: dict) -> None:
    """Rebuild the removals of :func:`depth_record` on a freshly built module: shorten its lists
    (unless it was built with the shorter length already), then put the stand-ins in."""
    for path, entry in record.get("layers", {}).items():
        try:
            layers = _get(module, path)
        except AttributeError as exc:
            raise FrontendError(f"the saved sizes shorten {path}, which the rebuilt module does not have") from exc
        kept, dense = entry["kept"], entry["dense"]
        if len(layers) == dense and len(kept) != dense:
            _shorten(module, path, set(range(dense)) - set(kept))
            setattr(layers, KEPT_ATTR, list(kept))
        elif len(layers) == len(kept):
            setattr(layers, KEPT_ATTR, list(kept))
            setattr(layers, DENSE_ATTR, dense)
        else:
            raise FrontendError(f"{path} of the rebuilt module has {len(layers)} layers; the saved module kept "
                                f"{len(kept)} of {dense}")
    for path, entry in record.get("branches", {}).items():
        if entry["kind"] == "zero":
            new = ZeroBranch(entry["outputs"], entry["width"], entry["layer_idx"])
        else:
            new = Skip()
        try:
            _set(module, path, new)
        except AttributeError as exc:
            raise FrontendError(f"the saved module replaced {path}, which the rebuilt module does not have") from exc


def _pending_record(module):
    from spa.frontends.hf import CONFIG_KEY, is_pretrained

    if not is_pretrained(module):
        return None
    record = getattr(module.config, CONFIG_KEY, None)
    return record if isinstance(record, dict) else {"shapes": {}, "attributes": {}, "config": {}}


def _rename(name: str, renames: dict[str, list[int]], gone: list[str]) -> str | None:
    """A name of the module before removal -> its name after (None: removed with its module)."""
    for path in gone:
        if _under(name, path):
            return None
    for path, old_of_new in renames.items():
        if name.startswith(path + "."):
            index, _, rest = name[len(path) + 1:].partition(".")
            if index.isdigit():
                if int(index) not in old_of_new:
                    return None
                new = f"{path}.{old_of_new.index(int(index))}"
                return f"{new}.{rest}" if rest else new
    return name


def _update_record(module, record, renames, gone) -> None:
    """The size record on a `transformers` config, renamed after the removal, with the removal
    itself (``from_config``: whether the class builds the pruned model from its config alone)."""
    from spa.frontends.hf import CONFIG_KEY, _builds_same_shapes

    if record is None:
        return
    out = {"shapes": {}, "attributes": {}}
    for part in ("shapes", "attributes"):
        for name, value in record.get(part, {}).items():
            new = _rename(name, renames, gone)
            if new is not None:
                out[part][new] = value
    config = dict(record.get("config", {}))
    for c in _configs(module)[:1]:
        for key in set(_LAYER_COUNTS) | set(per_layer_keys(c, getattr(c, "num_hidden_layers", -1))):
            config.pop(key, None)
    out["config"] = config
    out["depth"] = depth_record(module)
    out["from_config"] = _builds_same_shapes(module)
    setattr(module.config, CONFIG_KEY, out)
