"""GPTQ (Frantar et al. 2023): OBS-optimal rounding in a fixed column order, lazy block updates.

For each row the inputs are quantized one column at a time; the rounding error of column ``i``
is pushed onto the not yet quantized columns through row ``i`` of the upper Cholesky factor
``U`` of the damped ``H^-1`` (``H^-1 = U^T U``): ``w[i:] -= (w_i - q_i) / U_ii * U[i, i:]``.
Inside a block of columns the update is applied at once; to the later columns lazily, one
matrix product per block (the same loop shape as SparseGPT). With ``err_i = (w_i - q_i)/U_ii``
the layer loss w.r.t. the damped H is exactly ``sum err_i^2``.

Groups: a group's scale and zero point are computed when its first column is reached, on the
weights as updated so far (as the reference implementation does). The block size is rounded to
a multiple of the group size so a group never straddles a block, hence its grid sees every
update made so far (the reference reads the block-start copy for groups that start inside a
block; with group 128 = block 128 the two are identical).

Joint prune-then-quantize: with a fixed ``mask`` (True = pruned, e.g. from SparseGPT on the
same Hessian) pruned weights are exactly 0 in the result and are not quantized; kept weights
get the OBS update. The pruning error itself is never propagated again (the input weights are
already 0 there, compensated by the pruning method). What a pruned position does propagate is
the drift it received from earlier columns' quantization updates: setting it back to 0 is an
OBS step like any other (``err = w_updated / U_ii``, as in SparseGPT's joint mode). Dropping
that drift instead (not propagating anything from pruned positions) was measured *worse than
RTN* on a random 50% mask (loss 31.5 vs RTN 31.1, int4-g32; propagating: 26.5), because half
of each compensation would be discarded. Group grids are computed on the kept weights only.

``act_order``: columns in order of descending ``diag(H)`` (the reference's "desc_act"); groups
stay groups of consecutive *original* inputs, so their grids are computed up front on the
input weights (the reference's ``static_groups``), and the checkpoint layout is unchanged.

Dead inputs (``H_jj == 0``) are repaired by ``inverse_hessian`` (the package convention); the
reference zeroes their weights instead, which would prune them silently.
"""

from __future__ import annotations

import torch

from ..methods._base import inverse_hessian, single_thread
from .grid import (
    QuantError,
    QuantResult,
    QuantSpec,
    block_grid,
    check_mask,
    compute_grid,
    make_result,
)
from .rtn import _need_spec


def quantize_gptq(
    W: torch.Tensor,
    H: torch.Tensor,
    spec: QuantSpec | str,
    *,
    mask: torch.Tensor | None = None,
    rel_damp: float = 0.01,
    blocksize: int = 128,
    act_order: bool = False,
    loss: bool = True,
) -> QuantResult:
    """GPTQ of ``W [outputs, inputs]`` with input Hessian ``H [inputs, inputs]``.

    ``mask``: optional fixed pruning mask (True = pruned), see the module docstring.
    ``loss``: compute ``info["loss"]`` / ``info["rel_loss"]`` with the undamped H (one
    ``rows x cols x cols`` product in float64; off in timing loops).
    """
    spec = _need_spec(spec)
    rows, cols = W.shape
    if tuple(H.shape) != (cols, cols):
        raise QuantError(f"H shape {tuple(H.shape)} does not match W's {cols} inputs")
    mask = check_mask(mask, W)
    with single_thread():
        perm = None
        if act_order:  # damping and dead-input repair commute with a permutation
            perm = torch.argsort(torch.diagonal(H).to(torch.float64), descending=True, stable=True)
            Hinv, info = inverse_hessian(H[perm][:, perm], rel_damp)
        else:
            Hinv, info = inverse_hessian(H, rel_damp)
        U = torch.linalg.cholesky(Hinv, upper=True).to(torch.float32)
        del Hinv
        Wf = W.detach().to(U.device, torch.float32).clone()
        if mask is not None:
            Wf[mask] = 0
        codes, scale, zero, err2 = _gptq_loop(Wf, U, spec, mask, blocksize, perm)
    info = dict(info, method="gptq", act_order=act_order, loss_damped=float(err2))
    return make_result(W, codes, scale, zero, spec, mask, H, info, loss)


def _gptq_loop(
    Wf: torch.Tensor,
    U: torch.Tensor,
    spec: QuantSpec,
    mask: torch.Tensor | None,
    blocksize: int,
    perm: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, cols = Wf.shape
    gs = spec.group_size if spec.group_size is not None and spec.group_size < cols else None
    n_groups = spec.n_groups(cols)
    maxq = spec.maxq
    if perm is not None:
        # Static groups: grids from the input weights, then work in the permuted order.
        scale, zero = compute_grid(Wf, spec)
        gidx = spec.group_index(cols).to(Wf.device)[perm]
        col_scale, col_zero = scale[:, gidx], zero[:, gidx]
        Wf = Wf[:, perm].contiguous()
        mask = None if mask is None else mask[:, perm]
    else:
        scale = torch.empty(rows, n_groups, device=Wf.device)
        zero = torch.empty(rows, n_groups, device=Wf.device)
        if gs is None:  # one grid per row, from the input weights
            scale[:, 0], zero[:, 0] = block_grid(Wf, spec)
        if gs is not None:
            blocksize = gs * max(1, blocksize // gs)
    codes = torch.empty(rows, cols, device=Wf.device)
    err2 = torch.zeros((), dtype=torch.float64)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = Wf[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        d1 = torch.diagonal(U1)
        Err1 = torch.zeros_like(W1)
        m1 = None if mask is None else mask[:, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if perm is not None:
                s, z = col_scale[:, col], col_zero[:, col]
            else:
                g = 0 if gs is None else col // gs
                if gs is not None and col % gs == 0:
                    e = min(gs, cols - col)
                    scale[:, g], zero[:, g] = block_grid(W1[:, i : i + e], spec)
                s, z = scale[:, g], zero[:, g]
            w = W1[:, i]
            c = torch.round(w / s).add_(z).clamp_(0, maxq)  # = quantize_codes (w is finite)
            q = s * (c - z)
            err = (w - q) / d1[i]
            if m1 is not None:
                pruned = m1[:, i]
                c = torch.where(pruned, z, c)
                q = q.masked_fill(pruned, 0.0)
                err = torch.where(pruned, w / d1[i], err)
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            W1[:, i] = q
            codes[:, col] = c
            Err1[:, i] = err
        err2 += (Err1.double() ** 2).sum()
        Wf[:, i1:i2] = W1
        Wf[:, i2:] -= Err1 @ U[i1:i2, i2:]
    if perm is not None:
        inv = torch.argsort(perm)
        codes = codes[:, inv]
    return codes, scale, zero, err2
