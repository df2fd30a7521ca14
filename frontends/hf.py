"""Saving and reloading pruned modules: `transformers` models through ``save_pretrained`` and
plain ``nn.Module``s through a small file of sizes and weights.

A pruned module is described by a *size record*: the shape of every parameter and buffer that
pruning changed, and the integer attributes (``in_features``, ``num_heads``, ...) that changed
with them. Rebuilding the pruned architecture is then: build the original class, give each
recorded tensor its recorded shape, set the recorded attributes, load the weights.

For a `transformers` model the record is stored on the config (key ``spa_pruned_sizes``), so
``save_pretrained`` writes it to ``config.json``. Where every layer keeps the same sizes and the
config accepts them, the config carries them too and ``AutoModel*.from_pretrained`` loads the
model as is (the record then says ``"from_config": true``); otherwise (layers of different sizes,
or sizes the config's validation rejects: a hidden size no longer a multiple of the head count)
the config keeps what it can and :func:`from_pretrained` loads the model.
"""

from __future__ import annotations

import logging
from pathlib import Path

from spa.errors import ArgumentError, FrontendError

log = logging.getLogger("spa")

CONFIG_KEY = "spa_pruned_sizes"
MODULE_FORMAT = "spa.module/1"


def _torch():
    from spa.frontends.torch import _torch as get

    return get()


def _int_attributes(mod) -> dict:
    """Integer (and tuple-of-integer) attributes of one module, bools excluded."""
    out = {}
    for key, value in vars(mod).items():
        if key.startswith("_"):
            continue
        if isinstance(value, int) and not isinstance(value, bool):
            out[key] = value
        elif (isinstance(value, (tuple, list)) and value
              and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
            out[key] = list(value)
    return out


def _tensors(module) -> dict:
    """Parameter and buffer names -> tensor (tied tensors under each of their names)."""
    from spa.frontends.torch import _tensor_slots

    return {name: getattr(mod, attr) for name, (mod, attr) in _tensor_slots(module).items()
            if getattr(mod, attr) is not None}


def size_record(pruned, original=None) -> dict:
    """Shapes and integer attributes of ``pruned``: those that differ from ``original`` when it
    is given, else all of them."""
    before = _tensors(original) if original is not None else {}
    shapes = {name: list(t.shape) for name, t in _tensors(pruned).items()
              if name not in before or tuple(before[name].shape) != tuple(t.shape)}
    old_modules = dict(original.named_modules()) if original is not None else {}
    attributes = {}
    for name, mod in pruned.named_modules():
        now = _int_attributes(mod)
        old = _int_attributes(old_modules[name]) if name in old_modules else {}
        changed = {k: v for k, v in now.items() if old.get(k) != v}
        if changed:
            attributes[name] = changed
    from spa.frontends.torch_depth import depth_record

    depth = depth_record(pruned)
    return {"shapes": shapes, "attributes": attributes, **({"depth": depth} if depth else {})}


def resize(module, record: dict) -> None:
    """Give ``module``'s tensors the recorded shapes (uninitialized values; tied tensors stay
    tied) and set the recorded attributes. Raises FrontendError when a name is not in it."""
    torch = _torch()
    from spa.frontends.torch import _tensor_slots, put_tensors
    from spa.frontends.torch_depth import restore_depth

    restore_depth(module, record.get("depth", {}))  # removed layers and branches first: names follow them
    owners = _tensor_slots(module)
    modules = dict(module.named_modules())
    unknown = [n for n in record.get("shapes", {}) if n not in owners]
    unknown += [n for n in record.get("attributes", {}) if n not in modules]
    if unknown:
        raise FrontendError(f"the saved sizes name {', '.join(sorted(unknown)[:5])}, which the rebuilt module does not "
                            "have; build the same class (and configuration) that was pruned")
    replaced: dict[int, object] = {}
    for name, shape in record.get("shapes", {}).items():
        mod, attr = owners[name]
        old = getattr(mod, attr)
        if old is None or tuple(old.shape) == tuple(shape):
            continue
        if id(old) not in replaced:
            data = torch.empty(tuple(shape), dtype=old.dtype, device=old.device)
            replaced[id(old)] = (torch.nn.Parameter(data, requires_grad=old.requires_grad)
                                 if isinstance(old, torch.nn.Parameter) else data)
    put_tensors(owners, replaced)
    for name, attrs in record.get("attributes", {}).items():
        for key, value in attrs.items():
            old = getattr(modules[name], key, None)
            setattr(modules[name], key, tuple(value) if isinstance(old, tuple) else value)


def _non_persistent(module) -> set[str]:
    out = set()
    for prefix, mod in module.named_modules(remove_duplicate=False):
        for name in getattr(mod, "_non_persistent_buffers_set", ()):
            out.add(f"{prefix}.{name}" if prefix else name)
    return out


def _load_weights(module, state: dict, what: str) -> None:
    """Load ``state`` strictly, except for keys whose tensor is tied to a loaded one."""
    missing, unexpected = module.load_state_dict(state, strict=False)
    if unexpected:
        raise FrontendError(f"{what} holds weights the rebuilt module does not have: {', '.join(unexpected[:5])}")
    tensors = _tensors(module)
    loaded = {id(tensors[k]) for k in state if k in tensors}
    untied = [k for k in missing if id(tensors.get(k)) not in loaded]
    if untied:
        raise FrontendError(f"{what} lacks weights of the rebuilt module: {', '.join(untied[:5])}")


# transformers ---------------------------------------------------------------------------------

def is_pretrained(module) -> bool:
    """A `transformers` PreTrainedModel (has a config it saves with ``save_pretrained``)."""
    config = getattr(module, "config", None)
    return hasattr(module, "save_pretrained") and hasattr(config, "to_dict")


def _config_valid(config) -> bool:
    validate = getattr(config, "validate", None)
    if validate is None:
        return True
    try:
        validate()
    except Exception:  # noqa: BLE001 - any validation failure: the config cannot carry the sizes
        return False
    return True


def record_on_config(pruned, original) -> None:
    """Store the size record of a pruned `transformers` model on its config (saved by
    ``save_pretrained``). Config sizes the config rejects (a hidden size that is no longer a
    multiple of the head count) go back to their original values; the record still has them."""
    if not is_pretrained(pruned) or not is_pretrained(original):
        return
    config, before = pruned.config, original.config.to_dict()
    changed = {k: before[k] for k, v in config.to_dict().items()
               if k in before and k != CONFIG_KEY and before[k] != v}
    if changed and not _config_valid(config):
        for key, value in changed.items():
            setattr(config, key, value)
        log.info("the config cannot carry the pruned sizes %s; it keeps the original ones", sorted(changed))
    record = size_record(pruned, original)
    record["from_config"] = _builds_same_shapes(pruned)
    prior = getattr(original.config, CONFIG_KEY, None)  # a model pruned twice: build from the first original
    record["config"] = dict(prior["config"], **changed) if isinstance(prior, dict) else changed
    if isinstance(prior, dict):
        record = _merge(prior, record)
    setattr(config, CONFIG_KEY, record)


def _builds_same_shapes(pruned) -> bool:
    """Whether the model's class builds, from its config alone, tensors of the pruned shapes
    (then ``AutoModel*.from_pretrained`` loads the saved model). Built on the meta device."""
    torch = _torch()
    try:
        with torch.device("meta"):
            built = type(pruned)(pruned.config)
    except Exception:  # noqa: BLE001 - a config the class cannot build from
        return False
    want = {k: tuple(v.shape) for k, v in _tensors(pruned).items()}
    return want == {k: tuple(v.shape) for k, v in _tensors(built).items()}


def _merge(first: dict, second: dict) -> dict:
    shapes = dict(first.get("shapes", {}), **second.get("shapes", {}))
    attributes = {k: dict(v) for k, v in first.get("attributes", {}).items()}
    for name, attrs in second.get("attributes", {}).items():
        attributes.setdefault(name, {}).update(attrs)
    out = {"shapes": shapes, "attributes": attributes, "config": second["config"],
           "from_config": second["from_config"]}
    depth = second.get("depth") or first.get("depth")
    return {**out, "depth": depth} if depth else out


def _model_class(config, auto_class):
    """The concrete model class: ``auto_class`` itself, the one an ``AutoModel*`` class maps the
    config to, or the architecture the config names."""
    import transformers

    mapping = getattr(auto_class, "_model_mapping", None)
    if mapping is not None:
        try:
            return mapping[type(config)]
        except KeyError as exc:
            raise ArgumentError(f"{auto_class.__name__} has no model for {type(config).__name__}") from exc
    if auto_class is not None:
        return auto_class
    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    raise ArgumentError("the saved config names no transformers architecture; pass auto_class= (for example "
                        "transformers.AutoModelForCausalLM)")


def from_pretrained(directory, auto_class=None, **kwargs):
    """Load a pruned `transformers` model saved with ``save_pretrained``: the class named by the
    config (or ``auto_class``: a model class or an ``AutoModel*`` class) is built from the
    original sizes, each layer is shrunk to its saved sizes, and transformers loads the weights
    (its own key conversions apply). A model saved without SPA's record loads as usual."""
    from transformers import AutoConfig

    directory = str(directory)
    config = AutoConfig.from_pretrained(directory)
    cls = _model_class(config, auto_class)
    record = getattr(config, CONFIG_KEY, None)
    if not isinstance(record, dict):
        return cls.from_pretrained(directory, config=config, **kwargs)
    pruned_values = {key: getattr(config, key) for key in record.get("config", {})}
    for key, value in record.get("config", {}).items():  # build the original sizes, then shrink
        setattr(config, key, value)

    def __init__(self, config, *args, **kw):
        cls.__init__(self, config, *args, **kw)
        changed = set(record.get("shapes", {})) & _non_persistent(self)
        if changed:
            raise FrontendError(f"pruning changed the shape of buffer(s) {', '.join(sorted(changed)[:5])} that "
                                "save_pretrained does not write; save with spa.save_module instead")
        resize(self, record)

    shrunk = type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__})
    model = shrunk.from_pretrained(directory, config=config, **kwargs)
    model.__class__ = cls  # the subclass only shrinks at construction
    for key, value in pruned_values.items():  # the config says what the model is where it can
        setattr(model.config, key, value)
    return model


# plain modules --------------------------------------------------------------------------------

def save_module(module, path, plan=None) -> Path:
    """Write a pruned module as sizes + weights (+ the plan, when known) to ``path`` (torch.save
    of plain data and tensors: it loads with ``weights_only=True``)."""
    torch = _torch()
    if hasattr(module, "module") and hasattr(module, "plan"):  # a PruneResult
        module, plan = module.module, plan if plan is not None else module.plan
    if not hasattr(module, "state_dict"):
        raise ArgumentError(f"save_module needs an nn.Module or the result of spa.prune on one, "
                            f"not {type(module).__name__}")
    extra = {name: t.detach().cpu() for name, t in _tensors(module).items() if name in _non_persistent(module)}
    payload = {"format": MODULE_FORMAT, "sizes": size_record(module),
               "plan": plan.to_dict() if plan is not None else None,
               "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
               "buffers": extra}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, str(tmp))
    tmp.replace(path)
    return path


def read_module_file(path) -> dict:
    torch = _torch()
    try:
        payload = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a missing, truncated or foreign file
        raise FrontendError(f"cannot read {path} as a module saved by spa.save_module: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != MODULE_FORMAT:
        raise FrontendError(f"{path} was not written by spa.save_module")
    return payload


def load_module(path, build, example_inputs=None, **kwargs):
    """Rebuild a module saved by :func:`save_module`: ``build(**kwargs)`` makes the original
    (dense) module (a class or any callable); it is shrunk to the saved sizes, or, with
    ``example_inputs``, pruned again by the saved plan (which also covers modules SPA swaps for
    others), and the saved weights are loaded."""
    payload = read_module_file(path)
    module = build(**kwargs)
    if example_inputs is not None:
        from spa.api import apply_plan
        from spa.plan import Plan

        if payload.get("plan") is None:
            raise ArgumentError(f"{path} holds no plan; load it without example_inputs")
        module = apply_plan(module, Plan.from_dict(payload["plan"]), example_inputs=example_inputs, verify=False)
    else:
        resize(module, payload["sizes"])
    _load_weights(module, payload["state_dict"], str(path))
    torch = _torch()
    owners = dict(_tensors(module))
    with torch.no_grad():
        for name, value in payload.get("buffers", {}).items():
            if name in owners and tuple(owners[name].shape) == tuple(value.shape):
                owners[name].copy_(value)
    return module
