"""The mathematics of the pruning methods, on small problems where the answer is known."""

from __future__ import annotations

import itertools
import logging

import pytest
import torch

from whisper_obs_pruning.methods import (
    METHODS,
    PruningError,
    inverse_hessian,
    mask_from_scores,
    parse_pattern,
    per_row_counts,
    prune_layer,
)
from whisper_obs_pruning.pruning import allocate_sparsity, select_targets


def problem(rows=24, cols=32, n=400, seed=0, correlated=True):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, cols, generator=g, dtype=torch.float64)
    if correlated:
        X = X @ torch.randn(cols, cols, generator=g, dtype=torch.float64) * 0.5 + X
    W = torch.randn(rows, cols, generator=g, dtype=torch.float64).float()
    H = 2.0 / n * X.T @ X
    return W, H, X


def recon_loss(W, W_hat, H):
    """Sum over rows of 1/2 dw H dw^T (the layer-wise OBS objective)."""
    dW = (W_hat - W).double()
    return float(0.5 * torch.einsum("ri,ij,rj->", dW, H, dW))


def brute_force_one_removal(w: torch.Tensor, H: torch.Tensor):
    """For each q: the best change dw with dw_q = -w_q, by solving the reduced system."""
    best = None
    d = w.numel()
    for q in range(d):
        free = [j for j in range(d) if j != q]
        # minimise 1/2 dw^T H dw with dw_q fixed: H_ff dw_f = -H_fq dw_q
        dq = -w[q].double()
        dw_f = torch.linalg.solve(H[free][:, free], -H[free, q] * dq)
        dw = torch.zeros(d, dtype=torch.float64)
        dw[q] = dq
        dw[free] = dw_f
        loss = float(0.5 * dw @ H @ dw)
        if best is None or loss < best[0]:
            best = (loss, q, w.double() + dw)
    return best


def test_obs_single_removal_is_brute_force_optimum():
    W, H, _ = problem(rows=1, cols=10, n=200, seed=3)
    loss, q, w_opt = brute_force_one_removal(W[0], H)
    res = prune_layer(W, H, method="obs", sparsity=0.1, rel_damp=0.0)  # 1 of 10 weights
    assert int(res.pruned_mask.sum()) == 1
    assert int(res.pruned_mask[0].nonzero()) == q
    assert torch.allclose(res.weight[0].double(), w_opt, atol=1e-4)
    assert recon_loss(W, res.weight, H) == pytest.approx(loss, rel=1e-3)
    # and it beats every single-weight removal without compensation
    for j in range(10):
        masked = W.clone()
        masked[0, j] = 0
        assert recon_loss(W, masked, H) >= loss - 1e-9


def test_obs_greedy_steps_follow_obs_formula():
    """Two greedy steps equal the textbook update with an explicitly downdated H^-1."""
    W, H, _ = problem(rows=1, cols=8, n=100, seed=5)
    Hinv = torch.linalg.inv(H)
    w = W[0].double().clone()
    removed = []
    for _ in range(2):
        scores = w**2 / torch.diagonal(Hinv)
        scores[removed] = float("inf")
        q = int(torch.argmin(scores))
        w = w - (w[q] / Hinv[q, q]) * Hinv[:, q]
        Hinv = Hinv - torch.outer(Hinv[:, q], Hinv[q, :]) / Hinv[q, q]
        w[q] = 0
        removed.append(q)
    res = prune_layer(W, H, method="obs", sparsity=0.25, rel_damp=0.0)
    assert sorted(res.pruned_mask[0].nonzero().flatten().tolist()) == sorted(removed)
    assert torch.allclose(res.weight[0].double(), w, atol=1e-4)


def test_diagonal_equals_bruteforce_ranking():
    W, H, _ = problem(rows=6, cols=20, seed=1)
    res = prune_layer(W, H, method="diagonal", sparsity=0.5, rel_damp=0.0)
    diag = torch.diagonal(H)
    for r in range(W.shape[0]):
        scores = [(float(W[r, j]) ** 2 * float(diag[j]), j) for j in range(W.shape[1])]
        expect = {j for _, j in sorted(scores)[:10]}
        assert set(res.pruned_mask[r].nonzero().flatten().tolist()) == expect
    assert torch.equal(res.weight[~res.pruned_mask], W[~res.pruned_mask])  # no compensation


def test_diagonal_accepts_diagonal_vector_and_layer_scope():
    W, H, _ = problem(rows=5, cols=16, seed=2)
    full = prune_layer(W, H, method="diagonal", sparsity=0.25, rel_damp=0.0, scope="layer")
    vec = prune_layer(
        W, torch.diagonal(H).clone(), method="diagonal", sparsity=0.25, rel_damp=0.0, scope="layer"
    )
    assert torch.equal(full.pruned_mask, vec.pruned_mask)
    scores = (W.double() ** 2 * torch.diagonal(H)).flatten()
    expect = set(torch.argsort(scores)[:20].tolist())
    assert set(full.pruned_mask.flatten().nonzero().flatten().tolist()) == expect


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7, 0.9])
def test_exact_sparsity(method, sparsity):
    W, H, _ = problem(rows=37, cols=48, seed=4)
    res = prune_layer(W, H, method=method, sparsity=sparsity, rel_damp=0.01, blocksize=16)
    expected = round(sparsity * W.numel())
    assert int(res.pruned_mask.sum()) == expected
    assert int((res.weight == 0).sum()) == expected  # no extra zeros, no surviving "pruned"
    assert torch.isfinite(res.weight).all()


def test_per_row_counts_sum_and_balance():
    counts = per_row_counts(37, 48, 0.3)
    assert int(counts.sum()) == round(0.3 * 37 * 48)
    assert set(counts.tolist()) <= {14, 15}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8"])
def test_nm_pattern_exact(method, pattern):
    n, m = parse_pattern(pattern)
    W, H, _ = problem(rows=12, cols=32, seed=6)
    res = prune_layer(W, H, method=method, sparsity=0.0, pattern=pattern, blocksize=8)
    zeros = (res.weight == 0).reshape(12, 32 // m, m).sum(-1)
    assert torch.all(zeros == n)
    assert torch.equal(res.pruned_mask, res.weight == 0)


def test_bad_patterns_and_sparsities():
    for bad in ["4:4", "5:4", "0:4", "2:0", "2-4", "a:b", "2:4:8"]:
        with pytest.raises(PruningError):
            parse_pattern(bad)
    W, H, _ = problem(rows=4, cols=8)
    for s in [-0.1, 1.0, 1.5, float("nan")]:
        with pytest.raises(PruningError, match="sparsity"):
            prune_layer(W, H, method="sparsegpt", sparsity=s)
    with pytest.raises(PruningError, match="unknown method"):
        prune_layer(W, H, method="optimal", sparsity=0.5)
    with pytest.raises(PruningError, match="does not match"):
        prune_layer(W, H[:4, :4], method="obs", sparsity=0.5)
    with pytest.raises(PruningError, match="divisible"):
        prune_layer(
            torch.randn(4, 10), torch.eye(10), method="magnitude", sparsity=0, pattern="2:4"
        )


def test_second_order_beats_first_order_on_correlated_inputs():
    W, H, X = problem(rows=32, cols=64, n=2000, seed=7)
    errs = {}
    for method in METHODS:
        res = prune_layer(W, H, method=method, sparsity=0.5, rel_damp=0.01, blocksize=16)
        errs[method] = float(((res.weight - W).double() @ X.T).pow(2).sum())
    assert errs["sparsegpt"] < min(errs["magnitude"], errs["diagonal"])
    assert errs["obs"] < min(errs["magnitude"], errs["diagonal"])
    assert errs["obs"] <= errs["sparsegpt"] * 1.05


def test_sparsegpt_compensation_never_hurts_its_own_mask():
    W, H, _ = problem(rows=16, cols=48, seed=8)
    res = prune_layer(W, H, method="sparsegpt", sparsity=0.6, rel_damp=0.0, blocksize=16)
    masked_only = W.masked_fill(res.pruned_mask, 0)
    assert recon_loss(W, res.weight, H) <= recon_loss(W, masked_only, H) + 1e-9


@pytest.mark.parametrize("method", ["diagonal", "sparsegpt", "obs"])
def test_no_nan_on_degenerate_hessians(method, caplog):
    rows, cols = 8, 32
    g = torch.Generator().manual_seed(9)
    W = torch.randn(rows, cols, generator=g)
    X = torch.randn(5, cols, generator=g, dtype=torch.float64)  # fewer samples than columns
    X[:, :4] = 0  # dead inputs
    cases = {
        "rank_deficient": 2 / 5 * X.T @ X,
        "all_zero_H": torch.zeros(cols, cols, dtype=torch.float64),
        "indefinite": torch.diag(torch.linspace(-1, 1, cols, dtype=torch.float64)),
    }
    for name, H in cases.items():
        for rel_damp in (0.0, 1e-4):
            with caplog.at_level(logging.WARNING):
                res = prune_layer(W, H, method=method, sparsity=0.5, rel_damp=rel_damp)
            assert torch.isfinite(res.weight).all(), (name, rel_damp)
            assert int(res.pruned_mask.sum()) == rows * cols // 2
    zero_w = prune_layer(
        torch.zeros(rows, cols), cases["rank_deficient"], method=method, sparsity=0.5
    )
    assert torch.isfinite(zero_w.weight).all() and float(zero_w.weight.abs().sum()) == 0


def test_indefinite_hessian_retries_with_more_damping(caplog):
    # positive diagonal, but eigenvalues 3 and -1: only extra damping makes it invertible
    H = torch.tensor([[1.0, 2.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    with caplog.at_level(logging.WARNING):
        Hinv, info = inverse_hessian(H, rel_damp=0.0)
    assert torch.isfinite(Hinv).all()
    assert info["damp_retries"] >= 1
    assert "extra damping" in caplog.text


def test_mask_from_scores_row_scope_lowest():
    scores = torch.tensor([[5.0, 1.0, 3.0, 2.0], [0.1, 0.4, 0.3, 0.2]])
    mask = mask_from_scores(scores, 0.5)
    assert mask.tolist() == [[False, True, False, True], [True, False, False, True]]


def test_allocation_keeps_weighted_mean():
    layers = {}
    for i, (rows, cols) in enumerate([(16, 32), (64, 32), (32, 128)]):
        W, H, _ = problem(rows=rows, cols=cols, seed=10 + i)
        W = W * (i + 1)
        layers[f"l{i}"] = (W, H)
    sizes = {k: v[0].numel() for k, v in layers.items()}
    weights = {k: v[0] for k, v in layers.items()}
    asked: list[str] = []

    def get_hessian(name: str) -> torch.Tensor:
        asked.append(name)
        return layers[name][1]

    for allocation in ("global", "owl"):
        for method in ("magnitude", "diagonal", "sparsegpt"):
            if allocation == "owl" and method != "sparsegpt":
                continue
            asked.clear()
            alloc = allocate_sparsity(
                weights, 0.5, get_hessian, allocation=allocation, method=method
            )
            assert asked == ([] if method == "magnitude" else list(layers))  # each H asked for once
            mean = sum(alloc[k] * sizes[k] for k in alloc) / sum(sizes.values())
            assert mean == pytest.approx(0.5, abs=2e-3), (allocation, method)
            assert all(0 <= v < 1 for v in alloc.values())
    assert allocate_sparsity(weights, 0.4) == dict.fromkeys(layers, 0.4)


def test_select_targets():
    names = [
        f"model.encoder.layers.{i}.{p}" for i, p in itertools.product(range(2), ["fc1", "fc2"])
    ] + ["proj_out"]
    assert select_targets(names) == names[:-1]
    assert select_targets(names, [r".*fc1"]) == [
        "model.encoder.layers.0.fc1",
        "model.encoder.layers.1.fc1",
    ]
    assert select_targets(names, ["proj_out"], None) == ["proj_out"]
    with pytest.raises(PruningError, match="matches no Linear"):
        select_targets(names, ["model.encoder.layers.9.fc1"])
    with pytest.raises(PruningError, match="not a valid regex"):
        select_targets(names, ["(["])


def test_diagonal_counts_dead_inputs_before_damping():
    """Bug (issue 10): dead inputs were counted after damping, so always 0."""
    torch.manual_seed(0)
    W = torch.randn(8, 16)
    H = torch.eye(16, dtype=torch.float64)
    H[3, 3] = H[7, 7] = 0.0
    result = prune_layer(W, H, method="diagonal", sparsity=0.5, rel_damp=0.01)
    assert result.info["dead_inputs"] == 2
