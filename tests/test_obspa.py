"""OBSPA and activation criteria: the OBS formulas against brute force, reconstruction that
beats plain removal on the calibration data, Wanda scores, calibration sources."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import build, feeds_for, run

import spa
from spa.calibration import activations, batches
from spa.calibration.activations import collect, consumers
from spa.criteria.obspa import obs_select
from spa.criteria.wanda import wanda_scores

HEAD = '<ir_version: 9, opset_import: ["" : 18]>\n'
MLP = HEAD + """g (float[N,12] x, float[12,16] w1, float[16] b1, float[16,5] w2) => (float[N,5] y)
{ h = MatMul(x, w1)  a = Add(h, b1)  r = Relu(a)  y = MatMul(r, w2) }"""


def _stats(model, feeds):
    dg = spa.dependency_graph(model)
    g = dg.group("w1:1")
    cons = consumers(dg, g)
    return dg, g, cons, collect(model, cons, feeds)


def _feeds(model, n=4, seed=0):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((32, 12)).astype(np.float32)} for _ in range(n)]


def test_obs_update_is_the_least_squares_optimum_for_one_removed_channel():
    model = spa.load(build(MLP))
    feeds = _feeds(model)
    dg, g, cons, hs = _stats(model, feeds)
    (c,) = cons
    w2 = model.graph.initializers["w2"].const_value.numpy()
    keep, new = obs_select(g, cons, lambda n: model.graph.initializers[n].const_value.numpy(), hs, g.size - 1,
                           steps=1)
    removed = sorted(set(range(16)) - set(keep))[0]
    # Brute force: the best w2 rows for the kept inputs, by least squares on the same activations.
    sess_out = []
    for f in feeds:
        h = f["x"] @ model.graph.initializers["w1"].const_value.numpy() + model.graph.initializers["b1"].const_value.numpy()
        sess_out.append(np.maximum(h, 0))
    r = np.concatenate(sess_out).astype(np.float64)
    kept = [k for k in range(16) if k != removed]
    target = r @ w2
    ls, *_ = np.linalg.lstsq(r[:, kept], target, rcond=None)
    got = new["w2"]
    assert np.allclose(got[removed], 0)
    # OBS is exact for the damped quadratic: close to least squares, and far better than plain removal.
    err_obs = np.linalg.norm(r[:, kept] @ got[kept] - target)
    err_plain = np.linalg.norm(r[:, kept] @ w2[kept] - target)
    err_ls = np.linalg.norm(r[:, kept] @ ls - target)
    assert err_ls <= err_obs + 1e-9 and err_obs < err_plain
    assert err_obs <= 1.02 * err_ls + 1e-6  # only the damping separates it from least squares


def test_obs_loss_of_a_set_matches_its_definition():
    model = spa.load(build(MLP))
    dg, g, cons, hs = _stats(model, _feeds(model))
    from spa.criteria.obspa import _Layer

    layer = _Layer(cons[0], model.graph.initializers["w2"].const_value.numpy(), hs[cons[0].key], g.size)
    q = np.array([3, 7])
    w = layer.w
    hinv = layer.hinv
    want = 0.5 * sum(w[r, q] @ np.linalg.inv(hinv[np.ix_(q, q)]) @ w[r, q] for r in range(w.shape[0]))
    assert np.isclose(layer.loss(q), want)


def test_wanda_scores_weight_magnitude_by_activation_norm():
    model = spa.load(build(MLP))
    feeds = _feeds(model)
    dg, g, cons, hs = _stats(model, feeds)
    w2 = model.graph.initializers["w2"].const_value.numpy()  # [16 in, 5 out]
    r = np.concatenate([np.maximum(f["x"] @ model.graph.initializers["w1"].const_value.numpy()
                                   + model.graph.initializers["b1"].const_value.numpy(), 0) for f in feeds])
    norm = np.sqrt((r.astype(np.float64) ** 2).mean(axis=0))
    want = (np.abs(w2) * norm[:, None]).sum(axis=1)
    got = wanda_scores(g, cons, lambda n: model.graph.initializers[n].const_value.numpy(), hs)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_obspa_prune_keeps_outputs_closer_than_l1_and_stays_valid():
    proto = build(MLP)
    model = spa.load(proto)
    calib = [f["x"] for f in _feeds(model, 4, seed=1)]
    test = {"x": np.random.default_rng(9).standard_normal((64, 12)).astype(np.float32)}
    want = run(model, test)[0]
    errs = {}
    for crit in ("l1", "wanda", "obspa"):
        result = spa.prune(proto, 0.5, criterion=crit, calibration=calib, input_shapes={"N": 8})
        errs[crit] = float(np.linalg.norm(run(result.model, test)[0] - want))
    assert errs["obspa"] < errs["l1"] and errs["obspa"] < errs["wanda"]


def test_heads_are_removed_whole_by_obspa():
    pytest.importorskip("torch")
    import torch
    import transformer_models as trm

    torch.manual_seed(0)
    model, x = trm.bert("eager")
    proto = trm.export(model, x)
    result = spa.prune(proto, 0.5, criterion="obspa", kinds=["heads"], calibration="gaussian")
    heads = [g for g in result.graph.groups if g.kind == "heads"]
    for g in heads:
        gp = next(p for p in result.plan.groups if p.key == g.key)
        assert len(gp.keep) == 2
        w = result.model.graph.initializers[next(m.param for m in g.params if m.role == "in")]
        assert w.shape[1] == 32  # two whole heads of 16 columns kept in the output projection
    assert result.verify_report.ran


def test_calibration_sources(tmp_path):
    model = spa.load(build(MLP))
    from spa import runtime
    from spa.io import to_proto

    sess = runtime.session(to_proto(model))
    a = np.ones((4, 12), np.float32)
    assert len(batches(a, model, sess)) == 1
    assert len(batches([a, a, a], model, sess)) == 3
    assert batches({"x": a}, model, sess)[0]["x"].shape == (4, 12)
    for k in range(2):
        np.save(tmp_path / f"b{k}.npy", a)
    assert len(batches(str(tmp_path), model, sess)) == 2
    assert len(batches(lambda: iter([a]), model, sess)) == 1
    free = batches("gaussian", model, sess, n_batches=3, input_shapes={"N": 5})
    assert len(free) == 3 and free[0]["x"].shape == (5, 12)
    with pytest.raises(spa.ArgumentError, match="neither a directory"):
        batches("nowhere", model, sess)
    with pytest.raises(spa.ArgumentError, match="names input"):
        batches({"y": a}, model, sess)


def test_gaussian_token_ids_cover_the_vocabulary():
    m = build(HEAD + """g (int64[N,6] ids, float[50,8] emb, float[8,3] w) => (float[N,6,3] y)
    { e = Gather(emb, ids)  y = MatMul(e, w) }""", weights="ew")
    model = spa.load(m)
    from spa import runtime
    from spa.io import to_proto

    feeds = batches("gaussian", model, runtime.session(to_proto(model)), n_batches=2, input_shapes={"N": 64})
    ids = np.concatenate([f["ids"].ravel() for f in feeds])
    assert ids.max() > 40 and ids.min() >= 0 and len(np.unique(ids)) > 30
    assert feeds_for(model)["ids"].dtype == np.int64


def test_flap_folds_the_removed_mean_into_the_bias():
    """A channel whose input is constant carries only its mean: FLAP removes it exactly."""
    proto = build(HEAD + """g (float[N,6] x, float[6,8] w1, float[8] b1, float[8,3] w2, float[3] b2)
        => (float[N,3] y)
    { h = MatMul(x, w1)  a = Add(h, b1)  r = Relu(a)  m = MatMul(r, w2)  y = Add(m, b2) }""")
    model = spa.load(proto)
    w1 = model.graph.initializers["w1"].const_value.numpy().copy()
    w1[:, 2] = 0  # channel 2 is relu(b1[2]): a constant
    model.graph.initializers["w1"].const_value = spa.api.ir.tensor(w1, name="w1")
    b1 = model.graph.initializers["b1"].const_value.numpy().copy()
    b1[2] = 3.0
    model.graph.initializers["b1"].const_value = spa.api.ir.tensor(b1, name="b1")
    calib = [np.random.default_rng(k).standard_normal((16, 6)).astype(np.float32) for k in range(3)]
    dg = spa.dependency_graph(model)
    g = dg.group("w1:1")
    plan = spa.Plan((spa.GroupPlan(g.key, 8, tuple(k for k in range(8) if k != 2)),))
    from spa.criteria.flap import flap_compensate, flap_scores

    stats = spa.collect_stats(dg, calib)
    assert np.argmin(flap_scores(g, stats.consumers[g.key], dg.weights, stats.moments)) == 2
    _, updates = flap_compensate(dg, plan, stats)
    compensated = spa.api.clone(model)
    for name, arr in updates.items():
        compensated.graph.initializers[name].const_value = spa.api.ir.tensor(arr, name=name)
    pruned = spa.apply_plan(compensated, plan)
    test = {"x": np.random.default_rng(5).standard_normal((10, 6)).astype(np.float32)}
    np.testing.assert_allclose(run(pruned, test)[0], run(model, test)[0], atol=1e-4)


def test_layerwise_allocations_keep_the_target():
    pytest.importorskip("torch")
    import torch
    import torch_models as tm

    torch.manual_seed(0)
    module, x = tm.randomize_norms(tm.ResNet()).eval(), torch.randn(4, 3, 16, 16)
    sizes = None
    for allocation in ("alpha", "owl"):
        result = spa.prune(module, x, ratio=0.4, allocation=allocation, calibration="gaussian")
        removed = sum(gp.removed for gp in result.plan.groups)
        total = sum(gp.size for gp in result.plan.groups)
        assert abs(removed / total - 0.4) < 0.05
        per_group = [gp.removed / gp.size for gp in result.plan.groups]
        assert max(per_group) - min(per_group) > 0.05  # not uniform
        sizes = sizes or total
    from spa.allocation.layerwise import fit_target, hill_alpha

    r = fit_target(np.array([10.0, 30.0]), np.array([0.1, 0.9]), 0.5)
    assert np.isclose((r * [10, 30]).sum() / 40, 0.5, atol=1e-6)
    rng = np.random.default_rng(0)
    heavy = rng.standard_t(2, size=(64, 64))  # heavy-tailed weights: a smaller alpha than Gaussian ones
    assert hill_alpha(heavy) < hill_alpha(rng.standard_normal((64, 64)))


def test_bn_matched_inputs_reproduce_the_running_statistics():
    pytest.importorskip("torch")
    import torch
    from torch import nn

    from spa.frontends.bn_inputs import bn_matched_inputs

    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    module[1].running_mean.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
    module[1].running_var.copy_(torch.tensor([1.0, 0.25, 4.0, 2.0]))
    (x,) = bn_matched_inputs(module, torch.randn(2, 1, 8, 8), n_batches=1, steps=300)

    def mismatch(inp):
        with torch.no_grad():
            h = module[0](torch.as_tensor(inp))
        return float(((h.mean((0, 2, 3)) - module[1].running_mean) ** 2).sum()
                     + ((h.var((0, 2, 3), unbiased=False) - module[1].running_var) ** 2).sum())

    noise = torch.randn(x.shape).numpy()
    assert x.shape == (16, 1, 8, 8)
    assert mismatch(x) < 0.2 * mismatch(noise)
    with pytest.raises(spa.ArgumentError, match="BatchNorm"):
        bn_matched_inputs(nn.Linear(3, 2), torch.randn(2, 3))


def test_filter_matched_inputs_center_the_first_layers_and_prune_a_module_without_bn():
    pytest.importorskip("torch")
    import torch
    from torch import nn

    from spa.frontends.bn_inputs import filter_matched_inputs, first_layers

    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(),
                           nn.Linear(8 * 4 * 4, 3)).eval()
    with torch.no_grad():
        module[0].bias.copy_(torch.linspace(-2.0, 2.0, 8))  # noise leaves these units on or off
    example = torch.randn(2, 1, 8, 8)
    assert first_layers(module, example) == [module[0], module[2]]
    (x,) = filter_matched_inputs(module, example, n_batches=1, steps=60)

    def firing(inp):  # per channel of the first conv: the share of positions where its ReLU is on
        with torch.no_grad():
            return (module[0](torch.as_tensor(inp)) > 0).float().mean((0, 2, 3))

    assert x.shape == (16, 1, 8, 8)
    off_noise = float((firing(torch.randn(x.shape)) - 0.5).abs().mean())
    off = float((firing(x) - 0.5).abs().mean())
    assert off < 0.8 * off_noise  # closer to firing half the time than noise
    result = spa.prune(module, example, ratio=0.5, criterion="obspa", calibration="filters",
                       calibration_batches=1)
    assert result.module[0].out_channels == 4
    from spa import runtime
    from spa.io import to_proto

    onnx_model = spa.load(build(MLP))
    with pytest.raises(spa.ArgumentError, match="filters.*nn.Module"):
        batches("filters", onnx_model, runtime.session(to_proto(onnx_model)))


# ---- memory-lean OBSPA: the same prune as the plain path, at most one block's H held ----------


@pytest.fixture(scope="module")
def small_transformers():
    pytest.importorskip("torch")
    import transformer_models as tm

    bert, x = tm.bert()
    llama, y = tm.llama(layers=2)
    return {"bert": tm.export(bert, x, dynamo=False), "llama": tm.export(llama, y)}


def _obspa_prune(proto, monkeypatch, lean: bool):
    from spa.calibration import activations
    from spa.criteria import obspa

    monkeypatch.setattr(obspa, "LEAN", lean)
    monkeypatch.setattr(activations, "SPILL_BYTES", 0 if lean else 1 << 62)
    monkeypatch.setattr(obspa, "SPILL_STATE_BYTES", 0 if lean else 1 << 62)  # layer states on disk
    return spa.prune(proto, 0.3, criterion="obspa", calibration="gaussian", calibration_batches=2)


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_lean_obspa_gives_the_keep_sets_and_weights_of_the_plain_path(name, small_transformers, monkeypatch):
    proto = small_transformers[name]
    lean = _obspa_prune(proto, monkeypatch, lean=True)
    plain = _obspa_prune(proto, monkeypatch, lean=False)
    keeps = {g.key: g.keep for g in plain.plan.groups}
    assert {g.key: g.keep for g in lean.plan.groups} == keeps
    assert any(len(g.keep) < g.size for g in plain.plan.groups)
    hidden = [g for g in plain.graph.groups if g.kind == "hidden"]  # the group whose layers go lean
    assert hidden and any(len(keeps[g.key]) < g.size for g in hidden)
    got = {n: v.const_value.numpy() for n, v in lean.model.graph.initializers.items()}
    want = {n: v.const_value.numpy() for n, v in plain.model.graph.initializers.items()}
    assert got.keys() == want.keys()
    for n in want:
        np.testing.assert_allclose(got[n], want[n], rtol=1e-3, atol=1e-5 * (np.abs(want[n]).max() + 1e-12),
                                   err_msg=n)
    assert lean.fidelity.cosine == pytest.approx(plain.fidelity.cosine, abs=1e-4)


def test_lean_layer_matches_the_plain_layer_step_by_step():
    from spa.criteria.obspa import _Layer

    model = spa.load(build(MLP))
    dg = spa.dependency_graph(model)
    g = dg.group("w1:1")
    (c,) = consumers(dg, g)
    rng = np.random.default_rng(3)
    w = rng.standard_normal((16, 40)).astype(np.float32)  # 40 outputs over 16 columns: lean holds WᵀW
    x = rng.standard_normal((64, 16))
    h = x.T @ x / 64
    plain = _Layer(c, w, h, g.size)
    lean = _Layer(c, w, h, g.size, lean=True)
    assert lean.w is None and plain.w is not None
    # the two orders of the same float math agree to the reconstruction dtype's precision
    rel = max(1e-9, 200 * float(np.finfo(activations.DTYPE).eps))
    for q in (np.array([2, 9]), np.array([5]), np.array([0, 11, 14])):
        np.testing.assert_allclose(lean.channel_losses(range(16)), plain.channel_losses(range(16)), rtol=rel,
                                   atol=1e-12)
        assert lean.loss(q) == pytest.approx(plain.loss(q), rel=rel)
        lean.remove(q)
        plain.remove(q)
    np.testing.assert_allclose(lean.updated(), plain.updated(), rtol=max(1e-6, 10 * rel), atol=1e-9)


def test_at_most_one_blocks_moments_are_held_while_scoring_and_reconstructing(small_transformers, monkeypatch):
    from spa.calibration import activations, blockwise
    from spa.criteria import obspa

    monkeypatch.setattr(activations, "SPILL_BYTES", 0)  # every H spills: what is held is what is read
    model = spa.load(small_transformers["llama"])
    blocks = blockwise.partition(model)
    assert len(blocks) >= 3
    held = {"sums": 0, "live": 0}
    add = activations.Accumulator.add

    def counted_add(self, values):
        add(self, values)
        held["sums"] = max(held["sums"], sum(a.nbytes for a in self.sums.values()))

    monkeypatch.setattr(activations.Accumulator, "add", counted_add)
    getitem = activations.Moments.__getitem__

    def counted_get(self, key):
        value = getitem(self, key)
        held["live"] = max(held["live"], self.live_bytes())
        return value

    monkeypatch.setattr(activations.Moments, "__getitem__", counted_get)
    result = spa.prune(model, 0.3, criterion="obspa", calibration="gaussian", calibration_batches=2)
    assert result.plan.pruned_groups
    # the H of each block, by the block of its first consumer
    dg = spa.dependency_graph(spa.load(small_transformers["llama"]))
    stats = activations.collect_stats(dg.model, dg, "gaussian", 2)
    where = blockwise.block_of_nodes(dg.model, stats.blocks)
    per_block: dict[int, int] = {}
    seen = set()
    for cs in stats.consumers.values():
        for c in cs:
            if c.key in stats.moments and c.key not in seen:
                seen.add(c.key)
                n = int(np.prod(stats.moments[c.key].shape)) * 4
                per_block[where[c.node.name]] = per_block.get(where[c.node.name], 0) + n
    one_block = max(per_block.values())
    assert sum(per_block.values()) > 2 * one_block  # holding all would show
    assert 0 < held["sums"] <= 2 * one_block  # float64 sums of one block's keys only
    assert 0 < held["live"] <= one_block
    assert obspa.LEAN


def test_subsample_caps_the_rows_xtx_reads_and_keeps_h(monkeypatch):
    from spa.calibration.activations import Accumulator

    model = spa.load(build(MLP))
    dg = spa.dependency_graph(model)
    (c,) = consumers(dg, dg.group("w1:1"))
    rng = np.random.default_rng(1)
    mix = rng.standard_normal((16, 16)).astype(np.float32)
    xs = [rng.standard_normal((400, 16)).astype(np.float32) @ mix for _ in range(4)]

    def h_of(sub):
        monkeypatch.setattr(activations, "SUBSAMPLE", sub)
        acc = Accumulator({c.key: c})
        acc.batches = len(xs)
        for x in xs:
            acc.add({c.x: x})
        return acc.counts[c.key], acc.result()[c.key]

    rows, full = h_of(None)
    assert rows == 1600
    np.testing.assert_allclose(full, sum(x.T @ x for x in xs) / 1600, rtol=1e-4, atol=1e-4)
    rows, sub = h_of(8)  # 8 x 16 columns = 128 rows over 4 batches: 32 each
    assert rows == 128
    assert np.linalg.norm(sub - full) / np.linalg.norm(full) < 0.4
    assert h_of(8)[1].tobytes() == sub.tobytes()  # seeded


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_damped_inverse_by_cholesky_equals_the_general_inverse(dtype, monkeypatch):
    from spa.calibration import activations
    from spa.criteria.obspa import DAMP, damped_inverse

    monkeypatch.setattr(activations, "DTYPE", dtype)
    rng = np.random.default_rng(0)
    for n in (1, 7, 300, 600):  # one tile, several tiles and a partial last one (tile 256)
        x = rng.standard_normal((2 * n + 3, n))
        h = x.T @ x / len(x)
        got = damped_inverse(h.astype(dtype))
        h = h.astype(dtype).astype(np.float64)
        damped = h + (DAMP * np.mean(np.diag(h)) + 1e-8) * np.eye(n)
        want = np.linalg.inv(damped)
        assert got.dtype == dtype and got.shape == (n, n)
        np.testing.assert_array_equal(got, got.T)
        tol = 1e-3 if dtype == np.float32 else 1e-8
        assert np.abs(got - want).max() <= tol * np.abs(want).max()


def test_damped_inverse_of_an_indefinite_matrix_falls_back_to_the_general_inverse():
    from spa.criteria.obspa import DAMP, damped_inverse

    h = np.diag([4.0, -1.0, 2.0]).astype(np.float32)  # damping cannot make it positive definite
    got = damped_inverse(h)
    want = np.linalg.inv(h + (DAMP * np.mean(np.diag(h)) + 1e-8) * np.eye(3))
    np.testing.assert_allclose(got, want, rtol=1e-5)
