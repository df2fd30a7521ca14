"""A pruning plan: per group, the channels to keep. Pure data, serialisable to JSON."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from spa.errors import PlanError

PLAN_FORMAT = "spa-plan"
PLAN_VERSION = 1


@dataclass(frozen=True, slots=True)
class GroupPlan:
    """Keep channels ``keep`` (sorted group-channel indices) of the group named ``key``; for a
    GQA heads group, ``slots`` also keeps only those query-head positions in every K/V group."""

    key: str
    size: int
    keep: tuple[int, ...]
    slots: tuple[int, ...] | None = None

    @property
    def removed(self) -> int:
        return self.size - len(self.keep)

    @property
    def changes(self) -> bool:
        return bool(self.removed) or self.slots is not None


@dataclass(frozen=True, slots=True)
class BlockPlan:
    """Remove the residual block ``key`` (see ``spa.depth``): its branch nodes and the
    parameters ``params`` only it reads go; the stream passes straight through."""

    key: str
    kind: str
    layer: int | None = None
    params: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {"key": self.key, "kind": self.kind, "layer": self.layer, "params": list(self.params)}


@dataclass(frozen=True, slots=True)
class Plan:
    """Channels kept per group (width) and residual blocks removed (depth, applied first)."""

    groups: tuple[GroupPlan, ...]
    meta: dict = field(default_factory=dict)
    blocks: tuple[BlockPlan, ...] = ()

    @property
    def pruned_groups(self) -> tuple[GroupPlan, ...]:
        return tuple(g for g in self.groups if g.changes)

    def to_dict(self) -> dict:
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "meta": self.meta,
            "groups": [{"key": g.key, "size": g.size, "keep": list(g.keep)}
                       | ({"slots": list(g.slots)} if g.slots is not None else {}) for g in self.groups],
        } | ({"blocks": [b.to_dict() for b in self.blocks]} if self.blocks else {})

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            from spa.io import atomic_write_bytes

            atomic_write_bytes(Path(path), text.encode())
        return text

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise PlanError("not an SPA plan: expected a JSON object with \"format\": \"spa-plan\"")
        if data.get("version") != PLAN_VERSION:
            raise PlanError(f"plan version {data.get('version')!r} is not supported (expected {PLAN_VERSION})")
        if not isinstance(data.get("groups", []), list):
            raise PlanError("plan \"groups\" must be a list of {key, size, keep} objects")
        if not isinstance(data.get("meta", {}), dict):
            raise PlanError("plan \"meta\" must be an object")
        groups = []
        for i, g in enumerate(data.get("groups", [])):
            try:
                if not isinstance(g, dict) or not isinstance(g.get("keep"), list) or \
                        not isinstance(g.get("size"), int) or isinstance(g.get("size"), bool):
                    raise TypeError("key must be a string, size an integer and keep a list of integers")
                key, size = str(g["key"]), int(g["size"])
                if not all(isinstance(k, int) and not isinstance(k, bool) for k in g["keep"]):
                    raise TypeError("keep must be a list of integers")
                keep = tuple(sorted(int(k) for k in g["keep"]))
            except (KeyError, TypeError, ValueError, OverflowError) as exc:
                raise PlanError(f"plan group #{i} is malformed ({exc}); it needs key, size and keep") from exc
            if not keep:
                raise PlanError(f"plan group '{key}' keeps no channel; a group is never emptied")
            if len(set(keep)) != len(keep) or keep[0] < 0 or keep[-1] >= size:
                raise PlanError(f"plan group '{key}' has keep indices outside 0..{size - 1} or repeated")
            slots = g.get("slots")
            if slots is not None:
                try:
                    if not isinstance(slots, list):
                        raise TypeError("slots must be a list of integers")
                    slots = tuple(sorted(int(k) for k in slots))
                except (TypeError, ValueError, OverflowError) as exc:
                    raise PlanError(f"plan group '{key}' has malformed slots ({exc})") from exc
                if not slots or len(set(slots)) != len(slots) or slots[0] < 0:
                    raise PlanError(f"plan group '{key}': slots must be distinct, non-negative and not empty")
            groups.append(GroupPlan(key, size, keep, slots))
        return cls(tuple(groups), dict(data.get("meta", {})), _blocks(data.get("blocks", [])))

    @classmethod
    def from_json(cls, source: str | os.PathLike) -> Plan:
        try:
            if isinstance(source, str) and source.lstrip().startswith("{"):
                text = source  # JSON text, not a path
            else:
                text = Path(source).read_text()
            data = json.loads(text)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError, ValueError) as exc:
            raise PlanError(f"cannot read plan {source}: {type(exc).__name__}: {exc}"[:500]) from exc
        return cls.from_dict(data)


def _blocks(items) -> tuple[BlockPlan, ...]:
    if not isinstance(items, list):
        raise PlanError("plan \"blocks\" must be a list of {key, kind, layer, params} objects")
    out = []
    for i, b in enumerate(items):
        if not isinstance(b, dict) or not isinstance(b.get("key"), str) or not isinstance(b.get("kind"), str):
            raise PlanError(f"plan block #{i} is malformed; it needs a string key and kind")
        layer, params = b.get("layer"), b.get("params", [])
        if (layer is not None and (not isinstance(layer, int) or isinstance(layer, bool))) or \
                not isinstance(params, list) or not all(isinstance(p, str) for p in params):
            raise PlanError(f"plan block '{b['key']}': layer must be an integer or null, params a list of names")
        out.append(BlockPlan(b["key"], b["kind"], layer, tuple(params)))
    if len({b.key for b in out}) != len(out):
        raise PlanError("plan blocks repeat a key")
    return tuple(out)
