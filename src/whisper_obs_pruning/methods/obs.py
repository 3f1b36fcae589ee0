"""Exact greedy OBS (OBC's ExactOBS) for one layer, rows batched.

The one method whose cost needs engineering; the math is the loop below.

The algorithm, for each row w of W on its own (H^-1 starts as the damped inverse Hessian):
    repeat k times:  q = argmin over eligible j of  w_j^2 / [H^-1]_jj
                     w    <- w - (w_q / [H^-1]_qq) H^-1[:, q]          (w_q becomes 0)
                     H^-1 <- H^-1 - H^-1[:, q] H^-1[q, :] / [H^-1]_qq
Eligible: not pruned yet and, for an N:M pattern, in a group of M with fewer than N pruned.
k per row comes from ``per_row_counts`` (exact layer sparsity) or the pattern.

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
from concurrent.futures import ThreadPoolExecutor

import torch

from ._base import (
    Method,
    Pattern,
    PruneResult,
    available_threads,
    check_nm,
    inverse_hessian,
    per_row_counts,
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
    row_batch: int | None = None,
    block: int = 32,
    margin: int = 32,
    workspace_mb: int = 256,
    dtype: torch.dtype = torch.float32,
    workers: int | None = None,
    **_: object,
) -> PruneResult:
    """Exact greedy OBS per row (OBC's ExactOBS); see the module docstring.

    Tuning knobs, none of which changes the result beyond float rounding: ``block`` (downdates
    applied to the working set at once), ``margin`` (working-set size beyond a row's remaining
    prunes), ``row_batch`` (rows in lockstep; default: what fits in ``workspace_mb``, at most
    about 64K weights), ``dtype`` (float64 follows a float64 reference exactly, at twice the cost),
    ``workers`` (row batches run at once, each in its own Python thread on one core; default:
    the cores torch may use). The batches do not depend on ``workers``, so neither does the result.
    """
    # The step loop is many small ops that a GPU launch per op would not speed up, and its index
    # bookkeeping lives on the CPU: compute there, hand the result back on W's device.
    device = W.device
    W, H = W.cpu(), H.cpu()
    rows, cols = W.shape
    check_nm(cols, pattern)
    with single_thread():  # two OpenMP threads on a busy machine made this 10x slower
        Hinv0, info = inverse_hessian(H, rel_damp)
    Hinv0 = Hinv0.to(dtype).contiguous()  # cholesky_inverse returns it column-major
    if pattern is None:
        counts = per_row_counts(rows, cols, sparsity)
    else:
        counts = torch.full((rows,), cols // pattern[1] * pattern[0], dtype=torch.long)
    steps = int(counts.max()) if rows else 0
    Wout = W.detach().to(dtype).clone()
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    if steps == 0:
        return PruneResult(Wout.to(device, W.dtype), mask.to(device), info)
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
                    Wout[r1:r2], mask[r1:r2], Hinv0, counts[r1:r2], pattern, buffers, block, floor
                )

    with single_thread():  # set once here: each worker's ops then run on one core
        if workers == 1:
            run(0)
        else:  # torch releases the GIL inside ops, so the threads use separate cores
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(run, range(workers)))
    Wout[mask] = 0
    return PruneResult(Wout.to(device, W.dtype), mask.to(device), info)


def _obs_rows(
    w: torch.Tensor,
    pruned: torch.Tensor,
    Hinv0: torch.Tensor,
    counts: torch.Tensor,
    pattern: Pattern,
    buffers: tuple[torch.Tensor, torch.Tensor],
    block: int,
    floor: float,
) -> None:
    """Greedy OBS on a batch of rows, in place on ``w`` and ``pruned`` (see the module docstring).

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
        w.addcmul_(u, w.gather(1, q1).mul_(scale), value=-1)  # w -= w_q / [H^-1]_qq H^-1[:, q]
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
