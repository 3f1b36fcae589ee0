"""Global row selection of greedy OBS (``rows="global"``) and the ``obs_loss`` allocation."""

from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch

from whisper_obs_pruning.methods import per_row_counts, prepare_hessian, prune_layer
from whisper_obs_pruning.methods.obs import layer_trace, select_counts
from whisper_obs_pruning.methods.obs import prune_obs as _prune_obs
from whisper_obs_pruning.pruning import allocate_sparsity, choose_grid_sparsities

# The library default is rows='uniform' (the published sweep); these tests are about 'global'.
prune_obs = functools.partial(_prune_obs, rows="global")


def problem(rows, cols, seed, n=None):
    g = torch.Generator().manual_seed(seed)
    n = n or 4 * cols
    Z = torch.randn(n, cols, generator=g, dtype=torch.float64)
    X = Z @ torch.randn(cols, cols, generator=g, dtype=torch.float64) * 0.5 + Z  # correlated
    # rows of different scale and inputs of different energy: rows want different counts
    X = X * torch.linspace(0.2, 3.0, cols, dtype=torch.float64)
    W = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    W = W * torch.linspace(0.1, 2.0, rows, dtype=torch.float64)[:, None]
    return W.float(), 2.0 / n * X.T @ X


def layer_loss(W, res, H, rel_damp=0.01):
    """1/2 tr(dW H dW^T) with the damped H the method minimises."""
    Hd, _ = prepare_hessian(H, rel_damp)
    dW = res.weight.double() - W.double()
    return float(0.5 * ((dW @ Hd) * dW).sum())


def brute_force(cum, total):
    best, arg = math.inf, None
    for ks in itertools.product(*(range(cum.shape[1]) for _ in range(cum.shape[0]))):
        if sum(ks) != total:
            continue
        v = sum(float(cum[r, k]) for r, k in enumerate(ks))
        if v < best:
            best, arg = v, ks
    return best, arg


def random_traces(rows, width, seed, convex):
    g = torch.Generator().manual_seed(seed)
    steps = torch.rand(rows, width - 1, generator=g, dtype=torch.float64) ** 3
    if convex:
        steps = steps.sort(dim=1).values
    cum = torch.zeros(rows, width, dtype=torch.float64)
    cum[:, 1:] = steps.cumsum(1)
    cut = torch.randint(2, width + 1, (rows,), generator=g)  # some rows end early
    cum[torch.arange(width) >= cut[:, None]] = math.inf
    return cum


@pytest.mark.parametrize("sparsity", [0.2, 0.5, 0.7, 0.9])
@pytest.mark.parametrize("seed", [0, 1])
def test_global_never_worse_exact_count_and_loss_matches_traces(sparsity, seed):
    W, H = problem(rows=10, cols=40, seed=seed)
    uni = prune_obs(W, H, sparsity, rows="uniform", dtype=torch.float64)
    glo = prune_obs(W, H, sparsity, rows="global", dtype=torch.float64)
    total = round(sparsity * W.numel())
    assert int(glo.pruned_mask.sum()) == total == int(uni.pruned_mask.sum())
    assert not glo.weight[glo.pruned_mask].any()
    lu, lg = layer_loss(W, uni, H), layer_loss(W, glo, H)
    assert lg <= lu * (1 + 1e-9)
    # the final weights' loss is the chosen traces' cumulative loss: greedy re-run is exact
    assert lg == pytest.approx(glo.info["trace_loss"], rel=1e-7)
    # rows really differ (otherwise the test proves nothing)
    assert len(set(glo.pruned_mask.sum(1).tolist())) > 1


def test_global_strictly_better_on_uneven_rows():
    W, H = problem(rows=12, cols=48, seed=3)
    uni = prune_obs(W, H, 0.6, rows="uniform", dtype=torch.float64)
    glo = prune_obs(W, H, 0.6, dtype=torch.float64)
    assert glo.info["rows"] == "global"
    assert layer_loss(W, glo, H) < 0.95 * layer_loss(W, uni, H)


def test_short_traces_are_extended_not_binding():
    """A trace margin of one step makes caps bind; extending them gives the full-trace answer."""
    W, H = problem(rows=8, cols=32, seed=4)
    short = prune_obs(W, H, 0.5, trace_margin=0.0, dtype=torch.float64)
    full = prune_obs(W, H, 0.5, trace_margin=1.0, dtype=torch.float64)
    assert short.info["trace_extensions"] > 0
    assert torch.equal(short.pruned_mask, full.pruned_mask)
    assert short.info["trace_loss"] == pytest.approx(full.info["trace_loss"], rel=1e-9)


def test_float32_default_matches_float64():
    W, H = problem(rows=16, cols=64, seed=5)
    f32 = prune_obs(W, H, 0.7)
    f64 = prune_obs(W, H, 0.7, dtype=torch.float64)
    assert layer_loss(W, f32, H) == pytest.approx(layer_loss(W, f64, H), rel=1e-4)


@pytest.mark.parametrize("pattern", [(2, 4), (1, 4)])
def test_nm_ignores_rows_mode(pattern):
    W, H = problem(rows=6, cols=32, seed=6)
    a = prune_obs(W, H, 0.0, pattern, rows="uniform")
    b = prune_obs(W, H, 0.0, pattern, rows="global")
    assert torch.equal(a.pruned_mask, b.pruned_mask) and torch.equal(a.weight, b.weight)


def test_bad_rows_mode():
    W, H = problem(rows=2, cols=8, seed=0)
    with pytest.raises(ValueError, match="rows"):
        prune_layer(W, H, method="obs", sparsity=0.5, rows="best")


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("convex", [True, False])
def test_select_counts_exact_dp_equals_brute_force(seed, convex):
    cum = random_traces(rows=4, width=6, seed=seed, convex=convex)
    reach = int((torch.isfinite(cum).sum(1) - 1).sum())
    for total in range(reach + 1):
        counts, info = select_counts(cum, total)
        opt, _ = brute_force(cum, total)
        assert int(counts.sum()) == total and info["exact"]
        assert info["loss"] == pytest.approx(opt, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("seed", range(6))
def test_select_counts_lagrangian_optimal_on_convex_and_certified_otherwise(seed):
    for convex in (True, False):
        cum = random_traces(rows=5, width=6, seed=100 + seed, convex=convex)
        reach = int((torch.isfinite(cum).sum(1) - 1).sum())
        for total in range(reach + 1):
            counts, info = select_counts(cum, total, exact_budget=0)  # force the large path
            opt, _ = brute_force(cum, total)
            assert int(counts.sum()) == total and not info["exact"]
            assert info["loss"] >= opt - 1e-12
            # the dual bound really is a lower bound: loss * (1 - gap) <= optimum
            assert info["loss"] * (1 - info["gap"]) <= opt + 1e-12
            if convex:
                assert info["loss"] == pytest.approx(opt, rel=1e-9, abs=1e-12)


def test_select_counts_many_zero_ties():
    cum = torch.zeros(50, 11, dtype=torch.float64)
    cum[:, 6:] = torch.arange(1, 6, dtype=torch.float64)  # 5 free removals per row, then cost
    counts, info = select_counts(cum, 200, exact_budget=0)
    assert int(counts.sum()) == 200 and info["loss"] == 0.0 and int(counts.max()) <= 5


# ---------------------------------------------------------------- obs_loss allocation
def test_grid_choice_meets_target_and_equals_brute_force():
    grid = [0.0, 0.25, 0.5, 0.75]
    g = torch.Generator().manual_seed(0)
    sizes = {"a": 100, "b": 200, "c": 100}
    curves = {}
    for n in sizes:
        steps = torch.rand(len(grid) - 1, generator=g, dtype=torch.float64).sort().values
        curves[n] = torch.cat([torch.zeros(1, dtype=torch.float64), steps.cumsum(0)])
    for target in (0.25, 0.5, 0.625):
        out = choose_grid_sparsities(curves, sizes, grid, target)
        N = sum(sizes.values())
        assert sum(out[n] * sizes[n] for n in sizes) / N == pytest.approx(target, abs=1e-12)
        best = min(
            sum(float(curves[n][i]) for n, i in zip(sizes, idx, strict=True))
            for idx in itertools.product(range(len(grid)), repeat=3)
            if sum(grid[i] * sizes[n] for n, i in zip(sizes, idx, strict=True)) == target * N
        )
        got = sum(float(curves[n][grid.index(out[n])]) for n in sizes)
        assert got == pytest.approx(best, rel=1e-12)


def test_grid_choice_off_grid_target_is_exact():
    grid = [i * 0.05 for i in range(20)]
    curves = {n: torch.tensor([s**2 * k for s in grid]) for n, k in (("a", 1.0), ("b", 3.0))}
    sizes = {"a": 384 * 384, "b": 384 * 1536}
    out = choose_grid_sparsities(curves, sizes, grid, 0.7137)
    mean = sum(out[n] * sizes[n] for n in sizes) / sum(sizes.values())
    assert mean == pytest.approx(0.7137, abs=1e-12)


def test_obs_loss_allocation_beats_uniform():
    """An easy layer (redundant inputs) and a hard one: obs_loss moves sparsity to the easy one."""
    g = torch.Generator().manual_seed(1)
    weights, hessians = {}, {}
    for name, rank in (("easy", 4), ("hard", 32)):
        X = torch.randn(256, rank, generator=g, dtype=torch.float64)
        X = X @ torch.randn(rank, 32, generator=g, dtype=torch.float64)
        hessians[name] = 2 / 256 * X.T @ X
        weights[name] = torch.randn(16, 32, generator=g)
    weights["hard2"], hessians["hard2"] = weights["hard"].clone(), hessians["hard"]
    alloc = allocate_sparsity(
        weights, 0.6, hessians.__getitem__, allocation="obs_loss", grid_step=0.05
    )
    sizes = {n: w.numel() for n, w in weights.items()}
    N = sum(sizes.values())
    assert sum(alloc[n] * sizes[n] for n in sizes) / N == pytest.approx(0.6, abs=1e-12)
    assert alloc["easy"] > 0.6 > alloc["hard"]

    def summed(per_layer):
        total = 0.0
        for n, W in weights.items():
            res = prune_obs(W, hessians[n], per_layer[n], dtype=torch.float64)
            _, dense = layer_trace(W, hessians[n], 0.0)
            total += layer_loss(W, res, hessians[n]) / dense
        return total

    assert summed(alloc) < summed(dict.fromkeys(weights, 0.6))


def test_obs_loss_split_sides_meets_target_per_side():
    g = torch.Generator().manual_seed(2)
    weights, hessians = {}, {}
    for i, side in enumerate(["encoder", "encoder", "decoder", "decoder"]):
        X = torch.randn(128, 24, generator=g, dtype=torch.float64) * (i + 1)
        name = f"model.{side}.layers.{i}.fc1"
        hessians[name] = 2 / 128 * X.T @ X
        weights[name] = torch.randn(8 * (i + 1), 24, generator=g)
    alloc = allocate_sparsity(
        weights, 0.5, hessians.__getitem__, allocation="obs_loss", split_sides=True
    )
    for side in ("encoder", "decoder"):
        names = [n for n in weights if f".{side}." in n]
        N = sum(weights[n].numel() for n in names)
        mean = sum(alloc[n] * weights[n].numel() for n in names) / N
        assert mean == pytest.approx(0.5, abs=1e-12)


def test_per_row_counts_unchanged_by_uniform_mode():
    W, H = problem(rows=7, cols=30, seed=8)
    res = prune_obs(W, H, 0.4, rows="uniform")
    assert res.pruned_mask.sum(1).tolist() == per_row_counts(7, 30, 0.4).tolist()


@pytest.mark.parametrize("sparsity", [0.3, 0.8])
def test_final_solve_equals_rerun(sparsity):
    """Weights from the closed form on the traced masks = the greedy re-run with the counts."""
    W, H = problem(rows=12, cols=40, seed=9)
    rerun = prune_obs(W, H, sparsity, final="rerun", dtype=torch.float64)
    solve = prune_obs(W, H, sparsity, final="solve", dtype=torch.float64)
    assert rerun.info["final"] == "rerun" and solve.info["final"] == "solve"
    assert torch.equal(rerun.pruned_mask, solve.pruned_mask)
    assert torch.allclose(rerun.weight, solve.weight, atol=1e-5 * float(W.abs().max()))
    assert layer_loss(W, solve, H) == pytest.approx(solve.info["trace_loss"], rel=1e-7)
    f32 = prune_obs(W, H, sparsity, final="solve")  # float32 traces, float64 solve
    assert layer_loss(W, f32, H) == pytest.approx(layer_loss(W, rerun, H), rel=1e-4)


def test_grid_not_starting_at_zero_and_span():
    grid = [0.5, 0.55, 0.6, 0.65, 0.7]
    curves = {
        n: torch.tensor([(s - 0.4) ** 2 * k for s in grid]) for n, k in (("a", 1.0), ("b", 2.0))
    }
    sizes = {"a": 100, "b": 100}
    out = choose_grid_sparsities(curves, sizes, grid, 0.6)
    assert (out["a"] + out["b"]) / 2 == pytest.approx(0.6, abs=1e-12)
    assert out["a"] > out["b"]  # the cheaper layer takes more
    g = torch.Generator().manual_seed(3)
    weights = {f"l{i}": torch.randn(8, 16, generator=g) for i in range(3)}
    X = torch.randn(64, 16, generator=g, dtype=torch.float64)
    alloc = allocate_sparsity(
        weights, 0.5, lambda n: 2 / 64 * X.T @ X, allocation="obs_loss", obs_loss_span=0.1
    )
    assert all(0.4 - 1e-9 <= v <= 0.6 + 1e-9 for v in alloc.values())
    assert sum(alloc.values()) / 3 == pytest.approx(0.5, abs=1e-12)


@pytest.mark.parametrize("final", ["solve", "rerun"])
def test_global_threads_and_inference_mode(final):
    """Row batches over worker threads, called under inference mode (sequential calibration)."""
    W, H = problem(rows=64, cols=32, seed=10)
    one = prune_obs(W, H, 0.6, final=final, row_batch=8, workers=1)
    with torch.inference_mode():
        two = prune_obs(W, H, 0.6, final=final, row_batch=8, workers=2)
    assert torch.equal(one.pruned_mask, two.pruned_mask)
    assert torch.allclose(one.weight, two.weight, atol=1e-6)
