"""Exact greedy OBS (OBC's ExactOBS) for one layer, rows batched.

The one method whose cost needs engineering; the math is the loop below.

The algorithm, for each row w of W on its own (H^-1 starts as the damped inverse Hessian):
    repeat k times:  q = argmin over eligible j of  w_j^2 / [H^-1]_jj
                     w    <- w - (w_q / [H^-1]_qq) H^-1[:, q]          (w_q becomes 0)
                     H^-1 <- H^-1 - H^-1[:, q] H^-1[q, :] / [H^-1]_qq
Eligible: not pruned yet and, for an N:M pattern, in a group of M with fewer than N pruned.
k per row comes from the pattern (N:M) or, unstructured, from ``rows``: ``"uniform"`` takes
``per_row_counts`` (every row floor/ceil of sparsity * cols); ``"global"`` (default, OBC's way)
first traces every row's greedy past that count, recording the exact loss of each removal,
w_q^2 / (2 [H^-1]_qq), then picks the counts that meet the layer's exact total at the least
summed loss (``select_counts``), and prunes again with them. Either way the layer loses exactly
round(sparsity * rows * cols) weights.

Why this implementation is fast, while giving the result of the loop above:
- A step needs only the pivot's column of the current H^-1 (plus the diagonal, which is kept for
  every coordinate by subtracting u^2, u = H^-1[:, q] / sqrt([H^-1]_qq)). Each row therefore keeps
  explicit rows of H^-1 (= columns, by symmetry) only for a *working set*: its "remaining prunes
  + margin" best candidates. The set loses its pivot at every step, so keeping it current costs
  about (k - t) * d per step instead of the d^2 of the full matrix (the OBC way) or the GEMV over
  all t past downdates of a low-rank form. When the pivot is not in the set (under 1% of the
  steps on Whisper layers) the set is refreshed to the current best candidates: the missing rows
  are rebuilt from the downdate history F (H^-1_t = H^-1_0 - F^T F, one row u per step) by one
  matrix product.
- Downdates are blocked: the stored rows are H^-1 as of the last flush; the pivot's row gets the
  at most ``block`` newer downdates by a short product, and the whole set gets them every
  ``block`` steps by one batched GEMM (compute-bound, unlike rank-1 updates).
- Rows run in lockstep batches, so a step is a few dozen tensor ops on the whole batch, with
  preallocated buffers and in-place ops (fresh large allocations page-fault), on one thread;
  ``workers`` batches run at once in Python threads (1.8x on 2 idle cores).

Precision: float32 by default. Late in a row two candidates' scores can differ by less than the
accumulated float32 rounding (relative ~1e-5); the pick, and the rest of that row, may then differ
from float64 (on Whisper tiny at 50%: 10 of 33792 rows). ``dtype=torch.float64`` costs 2x.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from ._base import (
    Method,
    Pattern,
    PruneResult,
    PruningError,
    available_threads,
    check_nm,
    inverse_hessian,
    per_row_counts,
    prepare_hessian,
    second_order_saliency,
    single_thread,
)


def prune_obs(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    pattern: Pattern = None,
    *,
    rel_damp: float = 0.01,
    rows: str = "uniform",
    trace_margin: float = 0.1,
    final: str = "auto",
    row_batch: int | None = None,
    block: int = 32,
    margin: int = 32,
    workspace_mb: int = 256,
    dtype: torch.dtype = torch.float32,
    workers: int | None = None,
    **_: object,
) -> PruneResult:
    """Exact greedy OBS per row (OBC's ExactOBS); see the module docstring.

    ``rows`` (unstructured only; N:M fixes every row's count): ``"uniform"`` prunes every row
    by ``per_row_counts``; ``"global"`` (OBC's way) runs each row's greedy past that count, to
    ``uniform + ceil(trace_margin * cols)`` removals (the trace), records the loss after each
    removal, and picks per-row counts with the layer total ``round(sparsity * rows * cols)``
    at minimum summed loss (:func:`select_counts`); a row whose pick reaches its trace's end
    gets a longer trace and the pick is redone, so the trace length never decides. The rows
    are then pruned again with their counts (greedy is deterministic: same removals, weights
    exact). ``final`` says how those weights are made: ``"rerun"`` the greedy with the
    counts; ``"solve"`` the closed form for the traced masks (OBS's result for a removal set
    S is the least-squares optimum with w_S = 0: ``w_F += H_FF^-1 H_FS w_S`` over the kept
    inputs F, a batched Cholesky solve of size |F|, float64); ``"auto"`` (default) the solve
    where its estimated cost is lower (high sparsity), else the re-run.

    Tuning knobs, none of which changes the result beyond float rounding: ``block`` (downdates
    applied to the working set at once), ``margin`` (working-set size beyond a row's remaining
    prunes), ``row_batch`` (rows in lockstep; default: what fits in ``workspace_mb``, at most
    about 64K weights), ``dtype`` (float64 follows a float64 reference exactly, at twice the cost),
    ``workers`` (row batches run at once, each in its own Python thread on one core; default:
    the cores torch may use). The batches do not depend on ``workers``, so neither does the result.
    """
    if final not in ("auto", "rerun", "solve"):
        raise PruningError(f"obs final must be 'auto', 'rerun' or 'solve', got {final!r}")
    if rows not in ("uniform", "global"):
        raise PruningError(f"obs rows must be 'uniform' or 'global', got {rows!r}")
    # The step loop is many small ops that a GPU launch per op would not speed up, and its index
    # bookkeeping lives on the CPU: compute there, hand the result back on W's device.
    device = W.device
    W, H = W.cpu(), H.cpu()
    n_rows, cols = W.shape
    check_nm(cols, pattern)
    with single_thread():  # two OpenMP threads on a busy machine made this 10x slower
        Hinv0, info = inverse_hessian(H, rel_damp)
    Hinv0 = Hinv0.to(dtype).contiguous()  # cholesky_inverse returns it column-major
    knobs = {
        "row_batch": row_batch,
        "block": block,
        "margin": margin,
        "workspace_mb": workspace_mb,
        "workers": workers,
    }
    if pattern is not None:
        counts = torch.full((n_rows,), cols // pattern[1] * pattern[0], dtype=torch.long)
    else:
        counts = per_row_counts(n_rows, cols, sparsity)
        total = int(counts.sum())
        info["rows"] = rows
        if rows == "global" and 0 < total < n_rows * cols:
            counts, order, trace_info = _global_counts(W, Hinv0, counts, total, trace_margin, knobs)
            info.update(trace_info)
            kept = (cols - counts).double()
            solve_cost = float((kept**3).sum()) / 3  # Cholesky of H_FF per row
            rerun_cost = float((counts.double() ** 2).sum()) * cols / 2 * 3  # ~3x: small ops
            if final == "solve" or (final == "auto" and solve_cost < rerun_cost):
                info["final"] = "solve"
                r, t = (torch.arange(order.shape[1]) < counts.unsqueeze(1)).nonzero(as_tuple=True)
                mask = torch.zeros(n_rows, cols, dtype=torch.bool)
                mask[r, order[r, t]] = True  # each row's first counts[r] removals
                Wout = _solve_weights(W, H, mask, rel_damp, info, workers)
                return PruneResult(Wout.to(device, W.dtype), mask.to(device), info)
            info["final"] = "rerun"
    Wout, mask, _, _ = _greedy(W, Hinv0, counts, pattern, **knobs)
    return PruneResult(Wout.to(device, W.dtype), mask.to(device), info)


def _solve_weights(
    W: torch.Tensor,
    H: torch.Tensor,
    mask: torch.Tensor,
    rel_damp: float,
    info: dict,
    workers: int | None,
    batch_mb: int = 256,
) -> torch.Tensor:
    """The least-squares optimum under ``mask`` (True = zero): per row, over the kept inputs
    F and removed S, ``w_F + H_FF^-1 H_FS w_S`` with H damped exactly as its inverse was (so
    it equals what greedy OBS reaches with the same removals). Float64, rows in batches, the
    kept sets padded to the batch's largest with identity."""
    if info.get("fallback_identity"):
        Hd = torch.eye(H.shape[0], dtype=torch.float64)
    else:
        Hd, prep = prepare_hessian(H, rel_damp)
        Hd.diagonal().add_(info["damp"] - prep["damp"])  # the retries' extra damping
    rows, cols = W.shape
    W64 = W.detach().to(torch.float64)
    keep = ~mask
    nkeep = keep.sum(1)
    # rows sorted by kept count, so that a batch pads little
    order = torch.argsort(nkeep, descending=True)
    Wout = torch.zeros(rows, cols, dtype=torch.float64)
    rhs_all = (W64 * mask) @ Hd  # H_{:,S} w_S for every row
    batches = []
    i = 0
    while i < rows:
        m = max(1, int(nkeep[order[i]]))
        b = max(1, min(rows - i, (batch_mb << 20) // (m * m * 8 * 2)))
        batches.append(order[i : i + b])
        i += b
    workers = max(1, min(workers or available_threads(), len(batches)))
    inference = torch.is_inference_mode_enabled()  # per thread, as in _greedy

    def run(worker: int) -> None:
        with torch.inference_mode(inference):
            _solve_batches(batches[worker::workers])

    def _solve_batches(todo: list[torch.Tensor]) -> None:
        for idx in todo:
            if _CANCEL.is_set():
                raise _Cancelled
            kc = nkeep[idx]
            m = int(kc.max())
            if m == 0:
                continue
            # kept inputs first (stable: ascending index), then removed ones as padding
            key = torch.where(keep[idx], 0, cols) + torch.arange(cols)
            F = torch.argsort(key, dim=1)[:, :m]
            valid = torch.arange(m) < kc.unsqueeze(1)
            A = Hd[F.unsqueeze(2), F.unsqueeze(1)]
            pad = ~(valid.unsqueeze(2) & valid.unsqueeze(1))
            A.masked_fill_(pad, 0.0)
            A.diagonal(dim1=1, dim2=2).masked_fill_(~valid, 1.0)
            rhs = rhs_all[idx].gather(1, F).masked_fill_(~valid, 0.0)
            L, _ = torch.linalg.cholesky_ex(A)
            delta = torch.cholesky_solve(rhs.unsqueeze(2), L).squeeze(2)
            new = W64[idx].gather(1, F) + delta
            out = torch.zeros(idx.numel(), cols, dtype=torch.float64)
            out.scatter_(1, F, torch.where(valid, new, 0.0))
            Wout[idx] = out

    with single_thread():
        _run_workers(run, workers)
    return Wout.to(W.dtype)


def _global_counts(
    W: torch.Tensor,
    Hinv0: torch.Tensor,
    uniform: torch.Tensor,
    total: int,
    trace_margin: float,
    knobs: dict,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Per-row counts summing to ``total`` at minimum summed OBS loss, from greedy traces;
    also each row's removal order (``[rows, max cap]``, valid up to the row's cap).

    Every row is traced to ``cap = uniform + extra`` removals; rows whose chosen count reaches
    a cap below ``cols`` are traced further (twice the extra each time) and the choice redone.
    """
    n_rows, cols = W.shape
    extra = max(1, math.ceil(trace_margin * cols))
    caps = (uniform + extra).clamp(max=cols)
    cum, order = _traces(W, Hinv0, caps, knobs)
    extensions = 0
    while True:
        counts, sel = select_counts(cum, total)
        bind = (counts >= caps) & (caps < cols)
        if not bool(bind.any()):
            break
        extensions += 1
        extra *= 2
        r = bind.nonzero().squeeze(1)
        caps[r] = (caps[r] + extra).clamp(max=cols)
        width = int(caps.max()) + 1
        if width > cum.shape[1]:
            grown = torch.full((n_rows, width), math.inf, dtype=torch.float64)
            grown[:, : cum.shape[1]] = cum
            cum = grown
            wider = torch.zeros(n_rows, width - 1, dtype=torch.long)
            wider[:, : order.shape[1]] = order
            order = wider
        cum[r] = math.inf
        part, part_order = _traces(W[r], Hinv0, caps[r], knobs)
        cum[r, : part.shape[1]] = part
        order[r, : part_order.shape[1]] = part_order
    return (
        counts,
        order,
        {
            "trace_steps": int(caps.sum()),
            "trace_extensions": extensions,
            "trace_loss": sel["loss"],
            "count_gap": sel["gap"],
        },
    )


def layer_trace(
    W: torch.Tensor,
    H: torch.Tensor,
    top: float,
    *,
    rel_damp: float = 0.01,
    dtype: torch.dtype = torch.float32,
    **knobs: object,
) -> tuple[torch.Tensor, float]:
    """Every row's greedy OBS trace to ``ceil(top * cols)`` removals, and the dense loss.

    Returns ``(cum, dense)``: ``cum[r, k]`` the loss of row r after k removals (as
    :func:`select_counts` takes it) and ``dense = tr(W H W^T) / 2`` with the same damped H,
    the loss of zeroing the whole layer, to normalise by.
    """
    W, H = W.detach().cpu(), H.cpu()
    rows, cols = W.shape
    with single_thread():
        Hinv0, _ = inverse_hessian(H, rel_damp)
        Hd, _ = prepare_hessian(H, rel_damp)
    Wd = W.to(torch.float64)
    dense = float(0.5 * ((Wd @ Hd) * Wd).sum())
    caps = torch.full((rows,), min(cols, math.ceil(top * cols - 1e-9)), dtype=torch.long)
    return _traces(W, Hinv0.to(dtype).contiguous(), caps, knobs)[0], dense


def _traces(
    W: torch.Tensor, Hinv0: torch.Tensor, caps: torch.Tensor, knobs: dict
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cumulative loss ``[rows, max(caps) + 1]`` of each row's greedy: entry k = loss after k
    removals (float64, k = 0 gives 0, +inf beyond the row's cap); and the removal order."""
    _, _, steps, order = _greedy(W, Hinv0, caps, None, record=True, **knobs)
    cum = torch.zeros(W.shape[0], steps.shape[1] + 1, dtype=torch.float64)
    torch.cumsum(steps.to(torch.float64), dim=1, out=cum[:, 1:])
    beyond = torch.arange(cum.shape[1]) > caps.unsqueeze(1)
    return cum.masked_fill_(beyond, math.inf), order


def select_counts(
    cum: torch.Tensor, total: int, *, exact_budget: int = 2_000_000
) -> tuple[torch.Tensor, dict]:
    """Counts ``k_r`` with ``sum k_r = total`` minimising ``sum_r cum[r, k_r]``.

    ``cum[r, k]``: row r's loss after k removals (``cum[:, 0] = 0``, nondecreasing, ``+inf``
    where row r cannot go). Small problems (``rows * total * width <= exact_budget``) are solved
    exactly by dynamic programming over rows. Larger ones by a Lagrangian: bisection on a
    price ``lam`` per removal, each row taking ``argmin_k cum[r, k] - lam * k`` (a vertex of
    its lower convex hull), then the few removals left at the critical price spread by an
    exact DP over the rows whose choice jumps there. This is optimal when the traces are convex
    (marginal losses nondecreasing, as greedy OBS traces nearly are); otherwise the dual bound
    ``sum_r min_k (cum[r, k] - lam k) + lam total`` certifies how far from optimal at most:
    ``info["gap"]`` (relative; 0 for the exact DP).
    """
    cum = cum.to(torch.float64)
    n_rows, width = cum.shape
    finite = torch.isfinite(cum)
    reach = finite.sum(1) - 1  # the largest count each row can take
    if total > int(reach.sum()) or total < 0:
        raise PruningError(f"cannot remove {total} weights: the traces allow {int(reach.sum())}")
    if n_rows * (total + 1) * width <= exact_budget:
        counts = _dp_counts(cum, total)
        loss = float(cum.gather(1, counts.unsqueeze(1)).sum())
        return counts, {"loss": loss, "gap": 0.0, "exact": True}
    k = torch.arange(width, dtype=torch.float64)

    def choose(lam: float) -> torch.Tensor:  # first argmin: the smallest count on ties
        return torch.argmin(cum - lam * k, dim=1)

    step = torch.diff(cum, dim=1)
    step = step[torch.isfinite(step)]
    # above the largest step loss every row takes its whole trace (a chord's slope is a mean)
    lo, hi = 0.0, 2.0 * (float(step.max()) if step.numel() else 0.0) + 1e-300
    k_lo, k_hi = choose(lo), choose(hi)
    for _ in range(200):
        if int(k_lo.sum()) == total or hi - lo <= 1e-15 * hi:
            break
        mid = (lo + hi) / 2
        k_mid = choose(mid)
        if int(k_mid.sum()) <= total:
            lo, k_lo = mid, k_mid
        else:
            hi, k_hi = mid, k_mid
    counts = k_lo.clone()
    left = total - int(counts.sum())
    if left > 0:  # spread over the rows whose choice jumps at the critical price
        jump = (k_hi > k_lo).nonzero().squeeze(1)
        span = int((k_hi[jump] - k_lo[jump]).max())
        sub = torch.full((jump.numel(), span + 1), math.inf, dtype=torch.float64)
        for i, r in enumerate(jump.tolist()):
            a, b = int(k_lo[r]), int(k_hi[r])
            sub[i, : b - a + 1] = cum[r, a : b + 1] - cum[r, a]
        if jump.numel() * (left + 1) * (span + 1) <= exact_budget:
            counts[jump] += _dp_counts(sub, left)
        else:  # many tied rows (e.g. zero losses): in order, each to its jump
            take = torch.minimum(k_hi[jump] - k_lo[jump], torch.tensor(left))
            take = torch.minimum(take, left - (take.cumsum(0) - take)).clamp_min(0)
            counts[jump] += take
    loss = float(cum.gather(1, counts.unsqueeze(1)).sum())
    lam = hi
    bound = float((cum - lam * k).min(1).values.sum()) + lam * total
    gap = max(0.0, loss - bound) / loss if loss > 0 else 0.0
    return counts, {"loss": loss, "gap": gap, "exact": False}


def _dp_counts(cum: torch.Tensor, total: int) -> torch.Tensor:
    """Exact minimum of ``sum_r cum[r, k_r]`` with ``sum k_r = total``, by DP over rows."""
    n_rows, width = cum.shape
    inf = math.inf
    dp = torch.full((total + 1,), inf, dtype=torch.float64)
    dp[0] = 0.0
    choice = torch.zeros(n_rows, total + 1, dtype=torch.long)
    j = torch.arange(total + 1).unsqueeze(1)
    kk = torch.arange(width).unsqueeze(0)
    prev_idx = j - kk  # [total+1, width]
    valid = prev_idx >= 0
    for r in range(n_rows):
        cand = torch.where(valid, dp[prev_idx.clamp_min(0)], inf) + cum[r].unsqueeze(0)
        dp, choice[r] = cand.min(1)
    counts = torch.zeros(n_rows, dtype=torch.long)
    j = total
    for r in range(n_rows - 1, -1, -1):
        counts[r] = choice[r, j]
        j -= int(counts[r])
    return counts


def _greedy(
    W: torch.Tensor,
    Hinv0: torch.Tensor,
    counts: torch.Tensor,
    pattern: Pattern,
    *,
    record: bool = False,
    row_batch: int | None = None,
    block: int = 32,
    margin: int = 32,
    workspace_mb: int = 256,
    workers: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Greedy OBS of every row of ``W`` with its own count: (weights, mask, losses, pivots).

    ``record``: also the loss of each removal and the input removed, ``[rows, max(counts)]``
    (losses 0 past a row's count); otherwise those two are None.
    """
    dtype = Hinv0.dtype
    rows, cols = W.shape
    steps = int(counts.max()) if rows else 0
    Wout = W.detach().to(dtype).clone()
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    losses = torch.zeros(rows, steps, dtype=dtype) if record else None
    pivots = torch.zeros(rows, steps, dtype=torch.long) if record else None
    if steps == 0:
        return Wout, mask, losses, pivots
    setsize = min(cols, steps + max(1, margin))
    if row_batch is None:  # bounded by the buffers' memory, and by ~64K weights (cache-sized steps)
        per_row = (setsize + steps) * cols * Hinv0.element_size()
        row_batch = min((workspace_mb << 20) // per_row, max(16, (64 << 10) // cols))
    row_batch = max(1, min(row_batch, rows))
    row_batch = -(-rows // -(-rows // row_batch))  # same work, batches of even size
    batches = [(r1, min(r1 + row_batch, rows)) for r1 in range(0, rows, row_batch)]
    workers = max(1, min(workers or available_threads(), len(batches)))
    floor = float(torch.diagonal(Hinv0).max()) * 1e-12  # clamp for pivots: never divide by ~0

    # Inference mode is per thread: under the caller's (e.g. sequential calibration) Wout and
    # mask are inference tensors, which worker threads may only update in inference mode too.
    inference = torch.is_inference_mode_enabled()

    def run(worker: int) -> None:
        with torch.inference_mode(inference):
            buffers = (
                torch.empty(row_batch, setsize, cols, dtype=dtype),  # working-set rows of H^-1
                torch.empty(row_batch, steps, cols, dtype=dtype),  # F: the downdate u per step
            )
            for r1, r2 in batches[worker::workers]:
                _obs_rows(
                    Wout[r1:r2],
                    mask[r1:r2],
                    Hinv0,
                    counts[r1:r2],
                    pattern,
                    buffers,
                    block,
                    floor,
                    losses=None if losses is None else losses[r1:r2],
                    pivots=None if pivots is None else pivots[r1:r2],
                )

    with single_thread():  # set once here: each worker's ops then run on one core
        _run_workers(run, workers)
    Wout[mask] = 0
    return Wout, mask, losses, pivots


_CANCEL = threading.Event()  # set when the caller is interrupted: workers stop at their next step


class _Cancelled(Exception):
    """Raised inside a worker thread once the caller has been interrupted."""


def _run_workers(run, workers: int) -> None:
    """``run(0..workers-1)``, in threads when ``workers > 1`` (torch releases the GIL inside
    ops, so the threads use separate cores). Ctrl-C (or any error) in the caller stops the
    workers at their next step instead of letting them finish their batches (was ~26 s)."""
    if workers == 1:
        run(0)
        return
    try:
        with ThreadPoolExecutor(workers) as pool:  # its exit waits for every worker
            futures = [pool.submit(run, i) for i in range(workers)]
            try:
                for f in futures:
                    f.result()
            except BaseException:
                _CANCEL.set()
                raise
    finally:
        _CANCEL.clear()


def _obs_rows(
    w: torch.Tensor,
    pruned: torch.Tensor,
    Hinv0: torch.Tensor,
    counts: torch.Tensor,
    pattern: Pattern,
    buffers: tuple[torch.Tensor, torch.Tensor],
    block: int,
    floor: float,
    losses: torch.Tensor | None = None,
    pivots: torch.Tensor | None = None,
) -> None:
    """Greedy OBS on a batch of rows, in place on ``w`` and ``pruned`` (see the module docstring).

    ``losses`` (``[B, max(counts)]``, optional) receives each removal's exact loss increase
    ``w_q^2 / (2 [H^-1]_qq)`` (0 once a row has finished); ``pivots`` (same shape) the index q
    removed at each step (meaningless once a row has finished).

    State per row: ``S[slot]`` = row ``coord[slot]`` of H^-1 as of step ``t0``, for the working
    set (``where[j]`` = slot of coordinate j, or -1; ``free`` slots hold nothing); ``F[s]`` = the
    downdate u of step s; ``D`` = diagonal of the current H^-1, -inf where j may not be chosen.
    """
    B, d = w.shape
    cap = buffers[0].shape[1]
    c = cap  # slots in use: only [0, c) hold rows; c shrinks by the pivots at each flush
    steps = int(counts.max())
    all_active = int(counts.min())  # before this step every row of the batch still prunes
    S, F = buffers[0][:B], buffers[1][:B]
    S_rows = S.view(B * cap, d)
    slot_base = torch.arange(B) * cap
    D = torch.diagonal(Hinv0).expand(B, d).clone()
    coord = torch.topk(w * w / D, c, dim=1, largest=False).indices
    torch.index_select(Hinv0, 0, coord.flatten(), out=S_rows)
    where = torch.full((B, d), -1, dtype=torch.long)
    where.scatter_(1, coord, torch.arange(c).expand(B, c).contiguous())
    free = torch.zeros(B, cap, dtype=torch.bool)
    if pattern is not None:
        n, m = pattern
        group_count = torch.zeros(B, d // m, dtype=torch.long)
    gain = torch.empty_like(w)  # D / w^2: its first maximum is the first minimum of w^2 / D
    col = torch.empty_like(w)
    best, q = torch.empty(B, dtype=w.dtype), torch.empty(B, dtype=torch.long)
    t0 = 0
    for t in range(steps):
        if _CANCEL.is_set():
            raise _Cancelled
        torch.div(D, torch.mul(w, w, out=gain), out=gain)  # -inf excludes; w = 0 gives +inf
        torch.max(gain, dim=1, out=(best, q))
        q1 = q.unsqueeze(1)
        active = None if t < all_active else counts > t  # None: all rows
        slot = where.gather(1, q1)
        if int(slot.min()) < 0:
            miss = slot.squeeze(1) < 0
            if active is not None:
                miss &= active
            if bool(miss.any()):
                _refresh(miss.nonzero().squeeze(1), gain, S, F, Hinv0, coord, where, free, c, t0)
                slot = where.gather(1, q1)
            slot.clamp_min_(0)  # a finished row may still miss; its step is void
        # pivot column of the current H^-1 = stored row - the downdates since the last flush
        torch.index_select(S_rows, 0, torch.add(slot.squeeze(1), slot_base), out=col)
        if t > t0:
            Fw = F[:, t0:t]
            Fq = Fw.gather(2, q1.unsqueeze(1).expand(B, t - t0, 1))
            col.unsqueeze(1).baddbmm_(Fq.transpose(1, 2), Fw, alpha=-1)
        scale = col.gather(1, q1).clamp_min_(floor).rsqrt_()  # 1 / sqrt([H^-1]_qq)
        if active is not None:
            scale.mul_(active.unsqueeze(1))  # finished rows: u = 0 changes nothing
        u = torch.mul(col, scale, out=F[:, t])
        a = w.gather(1, q1).mul_(scale)  # w_q / sqrt([H^-1]_qq); the step's loss is a^2 / 2
        w.addcmul_(u, a, value=-1)  # w -= w_q / [H^-1]_qq H^-1[:, q]
        if losses is not None:
            torch.mul(a.squeeze(1), a.squeeze(1), out=losses[:, t]).mul_(0.5)
        if pivots is not None:
            pivots[:, t] = q
        D.addcmul_(u, u, value=-1)
        if active is None:
            D.scatter_(1, q1, -math.inf)
            pruned.scatter_(1, q1, True)
            free.scatter_(1, slot, True)
        else:
            r, qa = active.nonzero().squeeze(1), q[active]
            D[r, qa] = -math.inf
            pruned[r, qa] = True
            free[r, slot.squeeze(1)[active]] = True
        if pattern is not None:
            g = q1 // m
            group_count.scatter_add_(
                1, g, torch.ones_like(g) if active is None else active.long().unsqueeze(1)
            )
            full = (group_count.gather(1, g) >= n).squeeze(1)
            if bool(full.any()):  # the rest of the group may not be pruned any more
                r = full.nonzero().squeeze(1)
                D.view(B, d // m, m)[r, g.squeeze(1)[r]] = -math.inf
        if t + 1 - t0 == block and t + 1 < steps:
            c = _compact(S, coord, where, free, c)
            Fw = F[:, t0 : t + 1]
            Fc = Fw.gather(2, coord[:, None, :c].expand(B, t + 1 - t0, c))
            S[:, :c].baddbmm_(Fc.transpose(1, 2), Fw, alpha=-1)
            t0 = t + 1


def _refresh(
    rows: torch.Tensor,
    gain: torch.Tensor,
    S: torch.Tensor,
    F: torch.Tensor,
    Hinv0: torch.Tensor,
    coord: torch.Tensor,
    where: torch.Tensor,
    free: torch.Tensor,
    c: int,
    t0: int,
) -> None:
    """A miss: make each row's working set hold its ``c`` best candidates (this includes the pivot).

    Members that stay keep their slot; newcomers take free slots first, then those of the worst
    members that are not among the best ``c``. A newcomer's row is H^-1_0 minus the first ``t0``
    downdates (one GEMM per row), i.e. as of the last flush like every stored row.
    """
    g = gain[rows]
    want = torch.topk(g, c, dim=1).indices
    eligible = g.gather(1, want) > -math.inf
    new = eligible & (where[rows].gather(1, want) < 0)
    held, is_free = coord[rows, :c], free[rows, :c]
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(1, want, eligible).gather(1, held)
    evict_order = torch.where(is_free, -math.inf, g.gather(1, held))
    evict_order.masked_fill_(keep & ~is_free, math.inf)
    evict_order = torch.argsort(evict_order, dim=1)
    for i, r in enumerate(rows.tolist()):
        x = want[i][new[i]]
        slots = evict_order[i, : x.numel()]
        old = coord[r, slots]
        where[r, old[~free[r, slots]]] = -1
        fresh = Hinv0.index_select(0, x)
        if t0:
            fresh.addmm_(F[r, :t0].index_select(1, x).T, F[r, :t0], alpha=-1)
        S[r, slots] = fresh
        coord[r, slots] = x
        where[r, x] = slots
        free[r, slots] = False


def _compact(
    S: torch.Tensor, coord: torch.Tensor, where: torch.Tensor, free: torch.Tensor, c: int
) -> int:
    """Move used slots at the end into free ones so that slots [0, c') hold all rows; return c'.

    Every row frees one slot per step (its pivot's), so c' = c - block except when some rows
    stopped early; their extra holes just stay free.
    """
    B, cap, d = S.shape
    c_new = c - int(free[:, :c].sum(1).min())
    if c_new == c:
        return c
    k = c - c_new
    pos = torch.arange(c)
    holes = torch.where(free[:, :c] & (pos < c_new), pos, cap).topk(k, largest=False).values
    movers = torch.where(~free[:, :c] & (pos >= c_new), pos, cap).topk(k, largest=False).values
    real = movers < cap  # a row has at least as many holes as movers
    base = torch.arange(B).unsqueeze(1) * cap
    src = (torch.where(real, movers, c - 1) + base).flatten()  # padding: slot c-1 onto itself
    dst = (torch.where(real, holes, c - 1) + base).flatten()
    S_rows = S.view(B * cap, d)
    S_rows.index_copy_(0, dst, S_rows.index_select(0, src))
    moved = coord.view(-1)[src]
    coord.view(-1).index_copy_(0, dst, moved)
    free.view(-1).index_copy_(0, dst, free.view(-1)[src])
    real = real.flatten()
    where[torch.arange(B).repeat_interleave(k)[real], moved[real]] = dst[real] % cap
    return c_new


METHOD = Method(
    name="obs",
    prune=prune_obs,
    statistic="full",
    saliency=second_order_saliency,
    summary="exact greedy OBS per row, re-scored after every removal (OBC's ExactOBS; best)",
)
