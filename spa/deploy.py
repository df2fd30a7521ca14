"""Deployable LLM folders: the runtime's files beside a pruned model, with its new sizes.

A causal LM is deployed as a folder: the model (``model.onnx`` + external data) and the files a
runtime reads next to it, ``genai_config.json`` (onnxruntime-genai's model builder) or
``config.json`` (Hugging Face / optimum exports), the tokenizer, the generation config. When
the input model has such a file beside it, the pruned model's folder gets:

* the config, rewritten with the sizes read from the *pruned graph* (attention ops' ``num_heads``
  / ``kv_num_heads``, the past-key inputs' shapes, the embedding and FFN weights), never from
  the ratio; every other entry (context length, vocabulary, token ids, search options) as it was;
* the tokenizer, special-token, generation-config, chat-template and vocabulary files, copied
  byte for byte.

``genai_config.json`` holds one size per model: layers whose heads differ cannot be described,
and are refused (:class:`FolderError`, naming the layers) before anything is written. FFN widths
are read from the graph by onnxruntime-genai, so they may differ per layer.

Only files inside the input's folder are read: a path a config names that leads out of it, or
a file that is a link out of it, is refused (or skipped, for copied files). Every file is
written atomically; the input folder is never modified.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir

from spa.errors import UnsupportedModelError

GENAI_CONFIG = "genai_config.json"
HF_CONFIG = "config.json"
#: Files a runtime reads beside the model that pruning does not change (glob patterns).
COPIED = ("tokenizer*.json", "tokenizer.model", "tokenizer*.txt", "special_tokens_map.json", "added_tokens.json",
          "generation_config.json", "chat_template*", "*.jinja", "vocab*.json", "vocab*.txt", "merges*.txt",
          "spiece.model", "sentencepiece*.model", "preprocessor_config.json", "processor_config.json")
ATTENTION_OPS = frozenset({"GroupQueryAttention", "MultiHeadAttention", "Attention", "PagedAttention",
                           "SparseAttention", "PackedMultiHeadAttention"})
_LAYER = re.compile(r"(?:^|[./_])(?:layers?|h|blocks?)[./_](\d+)(?:[./_]|$)")
_DEFAULT_PAST = "past_key_values.%d.key"


class FolderError(UnsupportedModelError):
    """The pruned model's sizes cannot be written into the runtime's config; nothing was written."""


@dataclass(frozen=True)
class LayerSizes:
    heads: int | None
    kv_heads: int | None
    ffn: int | None


@dataclass(frozen=True)
class Sizes:
    """What the pruned graph says about the model, per layer and overall."""

    layers: tuple[LayerSizes, ...]
    head_size: int | None
    hidden_size: int | None
    ffn_layers: int | None = None  # FFNs found in the graph, where their count differs from the layers'

    def uniform(self, field: str) -> int | None:
        values = {getattr(layer, field) for layer in self.layers} - {None}
        return values.pop() if len(values) == 1 else None

    def per_layer(self, field: str) -> list:
        return [getattr(layer, field) for layer in self.layers]


def _layer_of(name: str) -> int | None:
    match = _LAYER.search(name or "")
    return int(match.group(1)) if match else None


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace("%d", r"(\d+)") + "$")


def _int_dim(value: ir.Value, axis: int) -> int | None:
    shape = value.shape
    if shape is None or len(shape) <= axis or not isinstance(shape[axis], int):
        return None
    return int(shape[axis])


def _in_out_sizes(node: ir.Node) -> tuple[int, int] | None:
    """(input features, output features) of a linear layer with a constant weight."""
    if node.op_type == "MatMulNBits":
        k, n = node.attributes.get("K"), node.attributes.get("N")
        return (k.as_int(), n.as_int()) if k is not None and n is not None else None
    if node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    w = node.inputs[1]
    if w.const_value is None or len(w.const_value.shape) != 2:
        return None
    rows, cols = (int(d) for d in w.const_value.shape)
    trans = node.op_type == "Gemm" and node.attributes.get("transB") is not None and node.attributes["transB"].as_int()
    return (cols, rows) if trans else (rows, cols)


def _nodes(model: ir.Model):
    return list(ir.traversal.RecursiveGraphIterator(model.graph))


def _ordered(items: dict, fallback: list) -> list:
    """Values of {layer index or None: value} in layer order (original indices: depth removal
    keeps a layer's names, so the survivors are enumerated in order)."""
    if items and None not in items:
        return [items[k] for k in sorted(items)]
    return fallback


def graph_sizes(model: ir.Model, dense: ir.Model | None = None, ffn: int | None = None,
                past_key: str = _DEFAULT_PAST) -> Sizes:
    """Heads, KV heads, FFN width per layer, head size and hidden size of a (pruned) LLM graph.

    Heads come from the attention ops' attributes, KV heads also from the past-key inputs
    (``past_key``: their name pattern, ``%d`` the layer); the FFN width of a layer is the input
    width of the linear layer whose dense width was ``ffn`` (found by node name in ``dense``)."""
    nodes = _nodes(model)
    attention = [n for n in nodes if n.op_type in ATTENTION_OPS and n.domain == "com.microsoft"]
    pattern = _pattern(past_key)
    pasts = {}
    for v in model.graph.inputs:
        match = pattern.match(v.name or "")
        if match:
            pasts[int(match.group(1))] = v
    pasts = dict(sorted(pasts.items()))
    heads = [n.attributes["num_heads"].as_int() if "num_heads" in n.attributes else None for n in attention]
    kv = [n.attributes["kv_num_heads"].as_int() if "kv_num_heads" in n.attributes else h
          for n, h in zip(attention, heads)]
    past_kv = [_int_dim(v, 1) for v in pasts.values()]
    if not attention:
        kv = past_kv
        heads = [None] * len(kv)
    elif pasts and len(past_kv) == len(kv):
        kv = [p if p is not None else k for p, k in zip(past_kv, kv)]
    n_layers = len(pasts) or len(attention)
    head_size = next((d for d in (_int_dim(v, 3) for v in pasts.values()) if d is not None), None)
    if head_size is None and attention and heads[0]:
        head_size = _attention_width(attention[0]) // heads[0] or None
    widths = _ffn_widths(nodes, dense, ffn)
    ffn_layers = None
    if widths and len(widths) != n_layers and n_layers:
        widths, ffn_layers = [], len(widths)
    layers = tuple(LayerSizes(heads[i] if i < len(heads) else None, kv[i] if i < len(kv) else None,
                              widths[i] if widths else None) for i in range(n_layers))
    return Sizes(layers, head_size, _hidden_size(model), ffn_layers)


def _attention_width(node: ir.Node) -> int:
    """The input width of the linear layer that reads an attention op's output (heads x head size)."""
    for user, _ in node.outputs[0].uses():
        sizes = _in_out_sizes(user)
        if sizes is not None:
            return sizes[0]
    return 0


def _ffn_widths(nodes, dense: ir.Model | None, ffn: int | None) -> list[int]:
    """Per layer, the pruned input width of the nodes that read the FFN activation in the dense
    model (same node names: pruning keeps them)."""
    if dense is None or not ffn:
        return []
    readers = {n.name for n in _nodes(dense) if n.name and (_in_out_sizes(n) or (0, 0))[0] == ffn}
    by_layer: dict = {}
    for n in nodes:
        if n.name in readers:
            sizes = _in_out_sizes(n)
            if sizes is not None:
                by_layer.setdefault(_layer_of(n.name), set()).add(sizes[0])
    if None in by_layer or any(len(v) != 1 for v in by_layer.values()):
        return []
    return [next(iter(by_layer[k])) for k in sorted(by_layer)]


def _hidden_size(model: ir.Model) -> int | None:
    """The embedding width: the table the token ids gather from."""
    ids = {v.name for v in model.graph.inputs if v.name in ("input_ids", "inputs_embeds_ids")}
    for n in model.graph:
        if n.op_type in ("Gather", "GatherBlockQuantized") and len(n.inputs) > 1 and n.inputs[1] is not None \
                and n.inputs[1].name in ids and n.inputs[0] is not None:
            table = n.inputs[0].const_value
            if table is not None and len(table.shape) == 2:
                if n.op_type == "Gather":
                    return int(table.shape[1])
                bits = n.attributes["bits"].as_int() if "bits" in n.attributes else 4
                return int(table.shape[1]) * 8 // bits if table.dtype.bitwidth == 8 else None
    return None


# ---- config rewriting -------------------------------------------------------------------------
def _changes(before: dict, after: dict) -> str:
    parts = [f"{k} {before.get(k)} -> {v}" for k, v in after.items() if before.get(k) != v]
    return ", ".join(parts) if parts else "sizes unchanged"


def _uneven(sizes: Sizes, field: str, what: str) -> str | None:
    values = sizes.per_layer(field)
    if len(set(values) - {None}) <= 1:
        return None
    listed = ", ".join(f"layer {i}: {v}" for i, v in enumerate(values))
    return f"{what} differ per layer ({listed})"


def genai_config(config: dict, sizes: Sizes, filename: str) -> tuple[dict, str]:
    """``config`` (a genai_config.json) with the decoder's sizes from ``sizes`` and the model
    file ``filename``; also what changed. Raises FolderError where layers differ in heads."""
    decoder = config.get("model", {}).get("decoder")
    if not isinstance(decoder, dict):
        raise FolderError(f"{GENAI_CONFIG} has no model.decoder section; SPA cannot say what the pruned model is. "
                          "Write the folder yourself, or pass --no-folder")
    uneven = [w for w in (_uneven(sizes, "heads", "attention heads"), _uneven(sizes, "kv_heads", "KV heads")) if w]
    if uneven:
        raise FolderError(f"{GENAI_CONFIG} holds one head count for all layers, but in the pruned model the "
                          f"{'; the '.join(uneven)}. Prune heads uniformly (--allocation uniform, or --round-to the "
                          "largest count so every layer keeps the same), or pass --no-folder to write the model "
                          "alone. Nothing was written")
    new = {"num_hidden_layers": len(sizes.layers)}
    for key, value in (("num_attention_heads", sizes.uniform("heads")),
                       ("num_key_value_heads", sizes.uniform("kv_heads")),
                       ("head_size", sizes.head_size), ("hidden_size", sizes.hidden_size)):
        if value is not None:
            new[key] = value
    out = json.loads(json.dumps(config))
    before = dict(out["model"]["decoder"])
    out["model"]["decoder"].update(new)
    out["model"]["decoder"]["filename"] = filename
    return out, _changes(before, new)


def hf_config(config: dict, sizes: Sizes) -> tuple[dict, str]:
    """``config`` (a Hugging Face config.json) with the pruned sizes: a number where every
    layer agrees, a per-layer list where they differ (also recorded under SPA's config key);
    ``head_dim`` explicit once heads change."""
    from spa.frontends.hf import CONFIG_KEY

    if sizes.ffn_layers is not None:
        raise FolderError(f"{HF_CONFIG} cannot describe the pruned model: it has {len(sizes.layers)} attention "
                          f"layers but {sizes.ffn_layers} FFNs (depth pruning removed sublayers); remove whole "
                          "layers (--depth-unit layer) or write the model alone (--no-folder, folder=False)")
    new: dict = {"num_hidden_layers": len(sizes.layers)}
    lists = {}
    for key, field in (("num_attention_heads", "heads"), ("num_key_value_heads", "kv_heads"),
                       ("intermediate_size", "ffn")):
        values = sizes.per_layer(field)
        if not values or None in values:
            continue
        if len(set(values)) == 1:
            new[key] = values[0]
        else:
            new[key] = lists[key] = values
    if sizes.hidden_size is not None:
        new["hidden_size"] = sizes.hidden_size
    heads_changed = any(config.get(k) != new.get(k, config.get(k)) for k in ("num_attention_heads", "num_key_value_heads"))
    if heads_changed or "head_dim" in config:
        head = sizes.head_size or config.get("head_dim")
        if head is None and config.get("hidden_size") and config.get("num_attention_heads"):
            head = config["hidden_size"] // config["num_attention_heads"]
        if head is not None:
            new["head_dim"] = head
    out = dict(config)
    before = dict(config)
    out.update(new)
    if lists:
        record = dict(out.get(CONFIG_KEY) or {})
        record["layers"] = lists
        out[CONFIG_KEY] = record
    return out, _changes(before, new)


# ---- the folder -------------------------------------------------------------------------------
@dataclass(frozen=True)
class FolderFile:
    """One file of the output folder: written from ``data`` or copied from ``source``."""

    name: str
    data: bytes | None = None
    source: Path | None = None
    note: str = ""

    def line(self, folder: Path) -> str:
        verb = "wrote" if self.data is not None else "copied"
        return f"{verb} {folder / self.name}" + (f" ({self.note})" if self.note else "")


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FolderError(f"cannot read {path} as JSON ({exc}); fix it, or pass --no-folder to write the model "
                          "alone") from exc
    if not isinstance(data, dict):
        raise FolderError(f"{path} is not a JSON object; fix it, or pass --no-folder to write the model alone")
    return data


def _genai_others(config: dict, folder: Path, model_name: str) -> list[str]:
    """Files other than the decoder that a genai_config names (embedding, vision, speech
    models), each checked to stay inside ``folder``."""
    names = []

    def walk(node, path):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "filename" and isinstance(value, str) and path != ("model", "decoder"):
                    names.append((".".join(path), value))
                else:
                    walk(value, (*path, key))
        elif isinstance(node, list):
            for item in node:
                walk(item, path)

    walk(config, ())
    out = []
    for where, name in names:
        target = folder / name
        if os.path.isabs(name) or not _inside(target, folder):
            raise FolderError(f"{GENAI_CONFIG} ({where}.filename) names {name!r}, outside the model's folder; SPA "
                              "reads only files in that folder. Pass --no-folder to write the model alone")
        if name != model_name and target.is_file():
            out.append(name)
    return out


def has_config(source: str | os.PathLike) -> str | None:
    """The runtime config beside a model file (genai_config.json first), or None."""
    folder = Path(source).parent
    return next((name for name in (GENAI_CONFIG, HF_CONFIG) if (folder / name).is_file()), None)


def same_folder(source: str | os.PathLike, output: str | os.PathLike) -> bool:
    return Path(output).parent.resolve() == Path(source).parent.resolve()


def plan_folder(source: str | os.PathLike, output: str | os.PathLike, model: ir.Model,
                dense: ir.Model | None = None) -> list[FolderFile]:
    """The files to write beside ``output`` for a model pruned from ``source``: the rewritten
    configs and the copied tokenizer files; empty when ``source``'s folder has no
    genai_config.json or config.json, or when the model has no attention op and no past-key
    input (not a causal LM: nothing says its layers). Reads, never writes; raises FolderError when a config
    cannot describe the pruned model."""
    src_dir, out_path = Path(source).parent, Path(output)
    has_genai, has_hf = (src_dir / GENAI_CONFIG).is_file(), (src_dir / HF_CONFIG).is_file()
    if not (has_genai or has_hf):
        return []
    if same_folder(source, output):
        return []
    files: list[FolderFile] = []
    hf = _read_json(src_dir / HF_CONFIG) if has_hf else {}
    genai = _read_json(src_dir / GENAI_CONFIG) if has_genai else {}
    past = ((genai.get("model", {}).get("decoder", {}).get("inputs", {}) or {}).get("past_key_names")
            or _DEFAULT_PAST)
    ffn = hf.get("intermediate_size") if isinstance(hf.get("intermediate_size"), int) else None
    sizes = graph_sizes(model, dense, ffn, past)
    if not sizes.layers:  # not a causal LM (an encoder, a vision model): the model is written alone
        return []
    if has_genai:
        config, note = genai_config(genai, sizes, out_path.name)
        files.append(FolderFile(GENAI_CONFIG, (json.dumps(config, indent=4) + "\n").encode(), note=note))
        for name in _genai_others(genai, src_dir, Path(source).name):
            files.append(FolderFile(name, source=src_dir / name, note="named by genai_config.json, unchanged"))
    if has_hf:
        config, note = hf_config(hf, sizes)
        files.append(FolderFile(HF_CONFIG, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode(), note=note))
    taken = {f.name for f in files} | {out_path.name, out_path.name + ".data"}
    for pattern in COPIED:
        for path in sorted(src_dir.glob(pattern)):
            if path.name in taken or not path.is_file():
                continue
            if not _inside(path, src_dir):  # a link out of the folder: not ours to copy
                continue
            taken.add(path.name)
            files.append(FolderFile(path.name, source=path))
    return files


def _atomic_copy(source: Path, target: Path) -> None:
    import shutil
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_folder(files: list[FolderFile], folder: str | os.PathLike) -> list[Path]:
    """Write ``files`` into ``folder``, each atomically (temp file + rename). Returns the paths
    written; on failure those already written are removed again."""
    from spa.io import atomic_write_bytes

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    try:
        for f in files:
            target = folder / f.name
            if f.data is not None:
                atomic_write_bytes(target, f.data)
            else:
                _atomic_copy(Path(f.source), target)
            written.append(target)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return written


__all__ = ["COPIED", "FolderError", "FolderFile", "LayerSizes", "Sizes", "genai_config", "graph_sizes", "has_config",
           "hf_config", "plan_folder", "same_folder", "write_folder"]
