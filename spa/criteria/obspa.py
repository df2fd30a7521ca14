"""OBSPA: structured Optimal Brain Surgeon with closed-form weight reconstruction.

For a consumer layer with weight W ([out, columns]) and input second moment H (damped), the
loss of removing the columns Q of a set of channels is

    L(Q) = ½ Σ_rows W[:,Q] (H⁻¹[Q,Q])⁻¹ W[:,Q]ᵀ

and the remaining columns are updated in closed form, ΔW = −W[:,Q] (H⁻¹[Q,Q])⁻¹ H⁻¹[Q,:].
A group's loss sums its consumers'. Channels are removed greedily in batches, H⁻¹ and W
updated between batches. A channel is a whole head in a heads group: heads go whole.

The greedy removal never empties a member (a Concat input, a Split output), so the weights it
solves for are those of the kept set the plan ships.

Scores come from the dense model's H (one block-wise pass). With ``SEQUENTIAL`` the
reconstruction runs block by block when the model has cuts (``spa.calibration.blockwise``):
each block's H is read off the outputs of the blocks before it as already pruned and
reconstructed; a model without a cut, or ``SEQUENTIAL`` off (the default), is reconstructed
from the dense H.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from spa.groups import Group
from spa.calibration import activations
from spa.calibration.activations import Consumer
from spa.criteria.consumer import consumer_scores
from spa.criteria.registry import Scores, ScoringInputs, criterion

DAMP = 0.01
#: Reconstruct block by block when the model has cuts (False: from the dense model's H). Off by
#: default: on a trained transformer it measured worse than the dense H (see examples/bench_obspa_cost.py).
SEQUENTIAL = False
#: Greedy removal holds a layer's Gram matrix WᵀW instead of W when W has more rows than columns
#: (the residual-stream group's Q/K/V and FFN-input consumers, held for every layer at once).
LEAN = True


def damped_inverse(h: np.ndarray) -> np.ndarray:
    """(H + λI)⁻¹ in ``activations.DTYPE``, λ = DAMP · mean diag H.

    The damped H is symmetric positive definite, so it is inverted through its Cholesky factor
    (LAPACK potrf + potri: n³ flops against LU's 2n³; 2-5.6× faster than ``np.linalg.inv`` on a
    3072² float32 H here, measured with the second core busy and idle); a factorization that fails (H not numerically positive
    definite) falls back to the general inverse."""
    from scipy.linalg import lapack

    h = np.array(h, dtype=activations.DTYPE)
    h[np.diag_indices_from(h)] += DAMP * float(np.mean(np.diag(h))) + 1e-8
    potrf, potri = lapack.get_lapack_funcs(("potrf", "potri"), (h,))
    factor, info = potrf(h, lower=True, overwrite_a=False, clean=True)
    if info == 0:
        inv, info = potri(factor, lower=True, overwrite_c=True)
        if info == 0:
            return _symmetric_from_lower(inv)
    return np.linalg.inv(h)


def _symmetric_from_lower(a: np.ndarray, tile: int = 256) -> np.ndarray:
    """``a`` (its lower triangle valid, as LAPACK's potri leaves it) made symmetric in place,
    one row tile at a time (20× faster than ``tril(a) + tril(a, -1).T`` on 3072²)."""
    for j in range(0, a.shape[0], tile):
        a[j:j + tile, j + tile:] = a[j + tile:, j:j + tile].T
        block = a[j:j + tile, j:j + tile]
        block[...] = np.tril(block) + np.tril(block, -1).T
    return a


def _solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a⁻¹ b for a symmetric positive (semi)definite block of H⁻¹; least squares if singular."""
    try:
        return np.linalg.solve(a, b)
    except np.linalg.LinAlgError:
        return np.linalg.pinv(a) @ b


class _Layer:
    """The consumers reading one input (one H) through the same columns, their weights stacked
    row-wise, and H⁻¹, during greedy removal: one inversion and one update for all of them.
    (One consumer and its weight may be passed bare.)

    ``lean``: when the stacked weight has more rows than columns, W is not held; its Gram
    matrix G = WᵀW is (every loss reads W only through G), updated as W would be, and the
    weights are solved once at the end from the original W and H⁻¹ for the whole removed set
    (the same optimum: OBS steps compose). ``h`` may be a callable returning H; ``inverse``, one
    returning a fresh damped H⁻¹ (default: inverted from H on each call)."""

    def __init__(self, consumers, weights, h, group_size: int, lean: bool = False, inverse=None):
        self.single = isinstance(consumers, Consumer)
        if self.single:
            consumers, weights = [consumers], [weights]
        self.consumers, self.weights = consumers, weights
        self._h = h if callable(h) else (lambda: h)
        self._inverse = inverse or (lambda: damped_inverse(self._h()))
        mats = [c.matrix(w).astype(activations.DTYPE) for c, w in zip(consumers, weights)]
        self.rows = np.cumsum([0] + [m.shape[0] for m in mats])
        self.w = np.concatenate(mats, axis=0)
        del mats
        self.g = None
        self.removed: list[np.ndarray] = []
        if lean and self.w.shape[0] > self.w.shape[1]:
            self.g, self.w = self.w.T @ self.w, None
        self.hinv = self._inverse()
        col_ch = consumers[0].member.channel[consumers[0].column_channels()]
        order = np.argsort(col_ch, kind="stable")
        bounds = np.searchsorted(col_ch[order], np.arange(group_size + 1))
        self.cols = [order[bounds[c]:bounds[c + 1]] for c in range(group_size)]

    def channel_losses(self, channels) -> np.ndarray:
        """Loss of removing each channel alone; one vectorized pass when channels are single
        columns (Linear inputs), a small solve per channel otherwise (heads, conv kernels)."""
        channels = list(channels)
        if all(self.cols[c].size == 1 for c in channels):
            idx = np.array([self.cols[c][0] for c in channels], dtype=np.int64)
            d = np.diag(self.hinv)[idx]
            sq = np.diag(self.g)[idx] if self.w is None else (self.w[:, idx] ** 2).sum(axis=0)
            return 0.5 * sq / np.maximum(d, 1e-12)
        return np.array([self.loss(self.cols[c]) for c in channels])

    def loss(self, q: np.ndarray) -> float:
        if q.size == 0:
            return 0.0
        if self.w is None:  # ½ trace((H⁻¹[Q,Q])⁻¹ G[Q,Q])
            return 0.5 * float(np.trace(_solve(self.hinv[np.ix_(q, q)], self.g[np.ix_(q, q)])))
        wq = self.w[:, q]
        return 0.5 * float(np.einsum("ij,ji->", wq, _solve(self.hinv[np.ix_(q, q)], wq.T)))

    def remove(self, q: np.ndarray) -> None:
        if q.size == 0:
            return
        step = _solve(self.hinv[np.ix_(q, q)], self.hinv[q, :])  # (H⁻¹[Q,Q])⁻¹ H⁻¹[Q,:]
        if self.w is None:  # G of W - W[:,Q] step
            gs = self.g[:, q] @ step
            self.g += step.T @ (self.g[np.ix_(q, q)] @ step) - gs - gs.T
            self.g[q, :] = 0.0
            self.g[:, q] = 0.0
            self.removed.append(np.asarray(q, dtype=np.int64))
        else:
            self.w -= self.w[:, q] @ step
            self.w[:, q] = 0.0
        self.hinv -= self.hinv[:, q] @ step

    def _final(self) -> np.ndarray:
        """The stacked weight after every removal."""
        if self.w is not None:
            return self.w
        w = np.concatenate([c.matrix(a).astype(activations.DTYPE) for c, a in zip(self.consumers, self.weights)], axis=0)
        if self.removed:
            q = np.unique(np.concatenate(self.removed))
            hinv = self._inverse()
            w -= w[:, q] @ _solve(hinv[np.ix_(q, q)], hinv[q, :])
            w[:, q] = 0.0
        return w

    def updates(self) -> dict[str, np.ndarray]:
        """Each consumer's updated weight, by parameter name."""
        w_all = self._final()
        return {c.member.param: c.unmatrix(w_all[a:b], w).astype(w.dtype)
                for c, w, a, b in zip(self.consumers, self.weights, self.rows[:-1], self.rows[1:])}

    def updated(self) -> np.ndarray:
        """The updated weight of a layer built from one consumer."""
        (arr,) = self.updates().values()
        return arr


def _shared(cons: list[Consumer], hs) -> list[list[Consumer]]:
    """The consumers grouped by input and column layout (Q, K and V share theirs)."""
    shared: dict[tuple, list[Consumer]] = {}
    for c in cons:
        if c.key in hs:
            layout = c.member.channel[c.column_channels()]
            shared.setdefault((c.key, layout.tobytes()), []).append(c)
    return list(shared.values())


def cached_inverse(hs, key) -> np.ndarray:
    """A fresh damped inverse of ``hs[key]``, inverted once per moments object when it keeps
    derived arrays (``Moments.derived``: scoring, selection and the final solve share it)."""
    cache = getattr(hs, "derived", None)
    if cache is None:
        return damped_inverse(hs[key])
    if key not in cache:
        inv = damped_inverse(hs[key])
        cache.put(key, inv)
        return inv
    return cache.get(key)


def _layer(group: Group, cs: list[Consumer], weights, hs, lean: bool = False) -> _Layer:
    key = cs[0].key
    return _Layer(cs, [weights(c.member.param) for c in cs], lambda: hs[key], group.size, lean,
                  inverse=lambda: cached_inverse(hs, key))


def _layers(group: Group, cons: list[Consumer], weights, hs, lean: bool = False) -> list[_Layer]:
    """One :class:`_Layer` per consumer input and column layout (Q, K and V share theirs)."""
    return [_layer(group, cs, weights, hs, lean) for cs in _shared(cons, hs)]


def _member_channels(group: Group) -> list[np.ndarray]:
    return [np.unique(m.channel) for m in group.members if m.size]


#: A greedy removal whose layers' state (W or WᵀW, and H⁻¹) would weigh more than this keeps
#: it in a private temporary folder between steps, one layer in memory at a time.
SPILL_STATE_BYTES = 64 << 20


class _StateStore:
    """The arrays of a greedy removal's layers, on disk between steps (None: in memory)."""

    FIELDS = ("w", "g", "hinv")

    def __init__(self, spill: bool):
        self.dir = None
        if spill:
            import shutil
            import tempfile
            import weakref

            self.dir = tempfile.mkdtemp(prefix="spa-obs-")
            weakref.finalize(self, shutil.rmtree, self.dir, True)

    def put(self, i: int, layer: _Layer) -> None:
        if self.dir is None:
            return
        for f in self.FIELDS:
            arr = getattr(layer, f)
            if arr is not None:
                np.save(f"{self.dir}/{i}.{f}.npy", arr)
                setattr(layer, f, _ON_DISK)

    def get(self, i: int, layer: _Layer) -> _Layer:
        for f in self.FIELDS:
            if getattr(layer, f) is _ON_DISK:
                setattr(layer, f, np.load(f"{self.dir}/{i}.{f}.npy"))
        return layer


_ON_DISK = object()


def _state_bytes(cons, weights, hs, lean: bool) -> int:
    """About what the greedy removal's layers hold: H⁻¹ and W (or WᵀW) per shared input."""
    total = 0
    for cs in _shared(cons, hs):
        n = max(cs[0].column_channels().size, 1)
        rows = sum(int(np.prod(np.shape(weights(c.member.param)))) // n for c in cs)
        total += 8 * n * (n + (min(rows, n) if lean else rows))
    return total


def obs_select(group: Group, cons, weights, hs, n_keep: int, steps: int = 8):
    """Greedy structured OBS: remove ``size - n_keep`` channels in up to ``steps`` batches,
    updating H⁻¹ and the weights between batches; a channel whose removal would empty a member
    is kept. Returns (kept channels, {param: new weight}). Each batch is removed from a layer
    when the layer is next visited (the next step's losses, or its final weights), so a layer
    whose state is on disk (:data:`SPILL_STATE_BYTES`) is read and written once per step."""
    alive = list(range(group.size))
    to_remove = group.size - n_keep
    if to_remove <= 0 or not _shared(cons, hs):
        return tuple(alive), {}
    shared = _shared(cons, hs)  # one layer is in memory while visited anyway: it never spills
    store = _StateStore(len(shared) > 1 and _state_bytes(cons, weights, hs, LEAN) > SPILL_STATE_BYTES)
    layers = []
    for i, cs in enumerate(shared):
        layers.append(_layer(group, cs, weights, hs, lean=LEAN))
        store.put(i, layers[-1])
    members = _member_channels(group)
    alive_in = [len(ch) for ch in members]
    member_of = [[] for _ in range(group.size)]
    for k, ch in enumerate(members):
        for c in ch:
            member_of[int(c)].append(k)
    batch = max(1, int(np.ceil(to_remove / steps)))
    pending: list[int] = []  # the last batch chosen, not yet removed from the layers

    def visit(i: int) -> _Layer:
        layer = store.get(i, layers[i])
        if pending:
            layer.remove(np.concatenate([layer.cols[c] for c in pending]))
        return layer

    while to_remove > 0:
        losses = 0
        for i in range(len(layers)):
            losses = losses + visit(i).channel_losses(alive)
            store.put(i, layers[i])
        pending = []
        take = min(batch, to_remove)
        chosen = []
        for i in np.argsort(losses, kind="stable"):
            c = alive[i]
            if any(alive_in[k] <= 1 for k in member_of[c]):
                continue  # the last channel of a member stays
            chosen.append(c)
            for k in member_of[c]:
                alive_in[k] -= 1
            if len(chosen) == take:
                break
        if not chosen:
            break
        pending = chosen
        alive = [c for c in alive if c not in chosen]
        to_remove -= len(chosen)
    new: dict[str, np.ndarray] = {}
    for i in range(len(layers)):  # each layer's state goes as soon as its weights are out
        new.update(visit(i).updates())
        layers[i] = None
    return tuple(sorted(alive)), new


def obs_scores(group: Group, cons, weights, hs) -> np.ndarray | None:
    """Loss of removing each channel alone (summed over consumers), one layer in memory at a time."""
    total = None
    for cs in _shared(cons, hs):
        part = _layer(group, cs, weights, hs).channel_losses(range(group.size))
        total = part if total is None else total + part
    return total


def _reconstruct_fixed(group: Group, cons, weights, hs, gp) -> dict:
    """Consumer weights reconstructed for the plan's kept set as it is (one OBS step per layer):
    the columns of removed K/V groups and of removed query-head slots go together."""
    keep, slots = np.asarray(gp.keep), np.asarray(gp.slots)
    out = {}
    for layer in _layers(group, cons, weights, hs):
        c = layer.consumers[0]  # stacked consumers share their column layout
        gone = ~np.isin(c.column_channels(), c.member.kept_indices(keep, slots))
        layer.remove(np.flatnonzero(gone))
        out.update(layer.updates())
    return out


def _weights_reader(dg, updates: dict):
    """``weights(name)``: the latest array of an initializer (an update, else the model's)."""
    cache: dict[str, np.ndarray] = {}

    def weights(name: str) -> np.ndarray:
        if name in updates:
            return updates[name]
        if name not in cache:
            cache[name] = dg.weights(name)
        return cache[name]

    return weights


def _reconstructed(gp, cons) -> bool:
    """Whether OBSPA re-selects and reconstructs this plan entry (GQA slot plans stay as they are)."""
    return bool(gp.removed) and gp.slots is None and bool(cons.get(gp.key))


def reconstruct_whole(dg, plan, stats, steps: int = 8) -> tuple:
    """OBSPA on every pruned group from the dense model's H: greedy keep sets (the plan's
    counts) and the consumer weights reconstructed for exactly those sets. Returns (new plan,
    {initializer: array})."""
    from spa.plan import GroupPlan, Plan

    updates: dict[str, np.ndarray] = {}
    weights = _weights_reader(dg, updates)
    groups = {g.key: g for g in dg.groups}
    cons, hs = stats.consumers, stats.moments
    entries = []
    for gp in plan.groups:
        g = groups.get(gp.key)
        if g is not None and gp.slots is not None and cons.get(gp.key):
            # GQA within groups: the plan's K/V groups and query-head slots, reconstructed as they are
            updates.update(_reconstruct_fixed(g, cons[gp.key], weights, hs, gp))
            entries.append(gp)
            continue
        if g is None or not _reconstructed(gp, cons):
            entries.append(gp)
            continue
        keep, new = obs_select(g, cons[gp.key], weights, hs, len(gp.keep), steps)
        if not new:
            entries.append(gp)
            continue
        updates.update(new)
        entries.append(GroupPlan(gp.key, gp.size, keep))
    return Plan(tuple(entries), plan.meta), updates


def reconstruct(dg, plan, stats, steps: int = 8) -> tuple:
    """OBSPA block by block (``spa.calibration.blockwise``) when the model has cuts and the
    statistics kept their calibration batches; else :func:`reconstruct_whole`."""
    blocks = getattr(stats, "blocks", None)
    if not SEQUENTIAL or not blocks or len(blocks) < 2 or not getattr(stats, "feeds", None):
        return reconstruct_whole(dg, plan, stats, steps)
    return reconstruct_sequential(dg, plan, stats, blocks, steps)


def reconstruct_sequential(dg, plan, stats, blocks, steps: int = 8) -> tuple:
    """Sequential OBSPA. Blocks run in order on the calibration batches, each on the outputs of
    the blocks before it as already pruned and reconstructed (removed channels masked, updated
    weights in). A group whose consumers all sit in one block is selected and reconstructed
    from the H of that block's run. A group read by several blocks (the residual stream) gets
    its keep set from the dense H first, over all its consumers (one block cannot choose for
    the others), then each block's consumers are reconstructed for that set from their
    sequential H. GQA slot plans and groups without consumers are masked from the start.
    Only the current cut's values are held between blocks."""
    from spa.calibration.blockwise import BlockRunner, block_of_nodes
    from spa.equivalence import mask_groups
    from spa.plan import GroupPlan, Plan

    updates: dict[str, np.ndarray] = {}
    weights = _weights_reader(dg, updates)
    groups = {g.key: g for g in dg.groups}
    cons = stats.consumers
    where = block_of_nodes(dg.model, blocks)
    entries = {gp.key: gp for gp in plan.groups}
    local: dict[int, list[str]] = {}
    spanning, final = [], set()
    for gp in plan.groups:
        if gp.key not in groups or not gp.removed:
            continue
        if not _reconstructed(gp, cons):
            final.add(gp.key)
            continue
        seen = {where.get(c.node.name) for c in cons[gp.key]}
        if len(seen) == 1 and None not in seen:
            local.setdefault(seen.pop(), []).append(gp.key)
        else:
            spanning.append(gp.key)
    for key in spanning:  # keep sets from the dense H; the weights come block by block
        g = groups[key]
        keep, _ = obs_select(g, cons[key], weights, stats.moments, len(entries[key].keep), steps)
        entries[key] = GroupPlan(key, g.size, keep)
        final.add(key)

    def transform(sub):
        inits = sub.graph.initializers
        for name, arr in updates.items():
            if name in inits:
                inits[name].const_value = ir.tensor(np.ascontiguousarray(arr), name=name)
        current = Plan(tuple(entries.values()), plan.meta)
        return mask_groups(sub, dg, current, sorted(final))[0]

    runner = BlockRunner(dg.model, stats.feeds, blocks)
    for block in blocks:
        k = block.index
        here = [c for key in local.get(k, []) for c in cons[key]] + \
               [c for key in spanning for c in cons[key] if where.get(c.node.name) == k]
        if here:
            hs = _block_moments(runner, k, here, transform)
            for key in local.get(k, []):
                g = groups[key]
                keep, new = obs_select(g, cons[key], weights, hs, len(entries[key].keep), steps)
                if new:
                    updates.update(new)
                    entries[key] = GroupPlan(key, g.size, keep)
                final.add(key)
            for key in spanning:
                mine = [c for c in cons[key] if where.get(c.node.name) == k]
                updates.update(_refit(groups[key], mine, weights, hs, entries[key].keep))
        if k + 1 < len(blocks):  # the pruned block's outputs feed the next one
            runner.run(k, lambda values: None, (), transform=transform)
    return Plan(tuple(entries[gp.key] for gp in plan.groups), plan.meta), updates


def _block_moments(runner, k: int, here, transform) -> dict:
    """H of the consumers ``here`` from one run of block ``k`` (the held cut stays)."""
    from spa.calibration.activations import Accumulator, distinct_inputs

    acc = Accumulator(distinct_inputs(here))
    acc.batches = len(runner.feeds)
    runner.run(k, acc.add, sorted({c.x for c in here}), transform=transform, advance=False)
    return acc.result()


def _refit(group: Group, cons, weights, hs, keep) -> dict[str, np.ndarray]:
    """The consumers' weights reconstructed (one joint OBS update) for a fixed keep set."""
    removed = sorted(set(range(group.size)) - set(keep))
    out: dict[str, np.ndarray] = {}
    for layer in _layers(group, cons, weights, hs):
        layer.remove(np.concatenate([layer.cols[c] for c in removed]).astype(np.int64))
        out.update(layer.updates())
    return out


@criterion("obspa", needs=("weights", "activations"), compensate=reconstruct)
def obspa(inputs: ScoringInputs) -> Scores:
    """Structured OBS loss of removing each channel; the kept weights are reconstructed."""
    return consumer_scores(inputs, "obspa", obs_scores)
