"""Structured pruning of the FFN neurons of one transformer block (ZipLM / OBC structured mode).

A block's FFN is ``fc2(act(fc1(x)))``. Neuron ``j`` is row ``j`` (and bias ``j``) of ``fc1`` and
column ``j`` of ``fc2``. Removing it deletes those; what changes the block's output is only
``fc2``'s loss of input ``j``, so the layer-wise problem is column pruning of ``W = fc2.weight``
(``[rows = d_model outputs, cols = ffn neurons]``) with ``H = 2/n sum x x^T`` over fc2's input
(the neurons' activations), the Hessian the calibration stage stores for ``fc2``.

Loss of a change ``dW``: ``L = 1/2 sum_rows dw H dw^T`` (``= ||dW X||^2 / n``). Reported losses are
computed with the *undamped* H on the final weight, the same way for every method.

Methods (scores: lower = removed first):
- ``obs``: greedy structured OBS. With ``Hinv`` the damped inverse, removing column ``j`` and
  re-fitting all other columns optimally costs ``sum_rows w_rj^2 / (2 Hinv_jj)``. Remove the
  cheapest, update every remaining column ``W -= W[:, j] Hinv[j, :] / Hinv_jj`` (column ``j``
  becomes 0), downdate ``Hinv -= Hinv[:, j] Hinv[j, :] / Hinv_jj``, repeat. ``per_step > 1``
  removes the ``per_step`` cheapest at once and applies the joint (block) update
  ``W -= W[:, S] Hinv[S, S]^-1 Hinv[S, :]``, which is still optimal for the chosen set.
- ``diagonal``: ``sum_rows w_rj^2 H_jj`` (the OBS cost with a diagonal H), no weight update.
- ``magnitude``: ``||fc2[:, j]|| * ||fc1[j, :]||``, no update. The product, not ``||fc2[:, j]||``
  alone, because a neuron's activation scales with its fc1 row: a neuron with a tiny fc2 column
  but a huge fc1 row is not negligible. Needs no calibration data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import WhisperObsError
from ..methods._base import damped_diagonal, inverse_hessian, single_thread

METHODS = ("obs", "diagonal", "magnitude")


class StructuredError(WhisperObsError, ValueError):
    """Invalid structured-pruning request (fraction, count, shapes, config), raised before any
    model or file is modified."""


@dataclass
class FFNPruneResult:
    """What to keep of one FFN and fc2's new (compensated, already shrunk) weight."""

    kept: torch.Tensor  # sorted long indices of the neurons kept
    fc2_weight: torch.Tensor  # [d_model, len(kept)], in fc2's dtype
    loss: float  # 1/2 sum_rows dw H dw^T with the undamped H (0 without H)
    info: dict = field(default_factory=dict)


def ffn_layer_loss(W: torch.Tensor, W_new_full: torch.Tensor, H: torch.Tensor) -> float:
    """``1/2 sum_rows dw H dw^T`` for ``dW = W_new_full - W`` (both ``[rows, cols]``)."""
    dW = W_new_full.to(torch.float64) - W.to(torch.float64)
    return float(0.5 * ((dW @ H.to(torch.float64)) * dW).sum())


def neuron_scores(
    method: str,
    fc1_weight: torch.Tensor,
    fc2_weight: torch.Tensor,
    H: torch.Tensor | None,
    rel_damp: float = 0.01,
) -> torch.Tensor:
    """No-update saliency per neuron (lower = less important) for ``diagonal`` / ``magnitude``;
    for ``obs`` the first greedy step's cost ``sum_rows w^2 / (2 Hinv_jj)``."""
    W = fc2_weight.detach().to(torch.float64)
    if method == "magnitude":
        return W.norm(dim=0) * fc1_weight.detach().to(torch.float64).norm(dim=1)
    if H is None:
        raise StructuredError(f"method {method!r} needs the Hessian of fc2's input")
    if method == "diagonal":
        diag, _ = damped_diagonal(H, rel_damp)
        return (W**2).sum(0) * diag
    if method == "obs":
        Hinv, _ = inverse_hessian(H, rel_damp)
        return (W**2).sum(0) / (2 * torch.diagonal(Hinv))
    raise StructuredError(f"unknown structured method {method!r}; choose from {METHODS}")


def prune_ffn(
    fc1_weight: torch.Tensor,
    fc2_weight: torch.Tensor,
    H: torch.Tensor | None,
    n_remove: int,
    method: str = "obs",
    *,
    rel_damp: float = 0.01,
    per_step: int = 1,
) -> FFNPruneResult:
    """Choose ``n_remove`` neurons of one FFN to remove; return kept indices and the new fc2.

    ``fc1_weight``: ``[ffn, d_model]``; ``fc2_weight``: ``[d_model, ffn]``; ``H``: ``[ffn, ffn]``
    Hessian of fc2's input (optional for ``magnitude``). Pure: the inputs are not modified.
    """
    if method not in METHODS:
        raise StructuredError(f"unknown structured method {method!r}; choose from {METHODS}")
    ffn = fc2_weight.shape[1]
    if fc1_weight.shape[0] != ffn:
        raise StructuredError(
            f"fc1 has {fc1_weight.shape[0]} neurons (rows) but fc2 has {ffn} inputs (columns)"
        )
    if not 0 <= n_remove < ffn:
        raise StructuredError(f"can remove 0..{ffn - 1} of {ffn} neurons, not {n_remove}")
    if H is not None and tuple(H.shape) != (ffn, ffn):
        raise StructuredError(f"Hessian has shape {tuple(H.shape)}, fc2 needs ({ffn}, {ffn})")
    if per_step < 1:
        raise StructuredError(f"per_step must be >= 1, got {per_step}")
    W0 = fc2_weight.detach().to("cpu", torch.float64)
    Hc = None if H is None else H.detach().to("cpu", torch.float64)
    info: dict = {"method": method, "removed": n_remove}
    with single_thread():
        if method == "obs":
            W_new, removed, obs_info = _greedy_obs(W0, Hc, n_remove, rel_damp, per_step)
            info.update(obs_info)
        else:
            scores = neuron_scores(method, fc1_weight, W0, Hc, rel_damp)
            removed = torch.argsort(scores, stable=True)[:n_remove]
            W_new = W0.clone()
            W_new[:, removed] = 0
        mask = torch.ones(ffn, dtype=torch.bool)
        mask[removed] = False
        kept = torch.nonzero(mask).flatten()
        loss = 0.0 if Hc is None else ffn_layer_loss(W0, W_new, Hc)
        base = 0.0 if Hc is None else float(0.5 * ((W0 @ Hc) * W0).sum())
    info["loss_rel"] = loss / base if base > 0 else 0.0
    return FFNPruneResult(
        kept=kept,
        fc2_weight=W_new[:, kept].to(fc2_weight.dtype).contiguous(),
        loss=loss,
        info=info,
    )


def _greedy_obs(
    W: torch.Tensor, H: torch.Tensor | None, k: int, rel_damp: float, per_step: int
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Greedy structured OBS on float64 copies; returns (W with removed columns 0, removed)."""
    if H is None:
        raise StructuredError("method 'obs' needs the Hessian of fc2's input")
    Hinv, hinfo = inverse_hessian(H, rel_damp)
    W = W.clone()
    cols = W.shape[1]
    alive = torch.ones(cols, dtype=torch.bool)
    removed: list[int] = []
    predicted = 0.0
    sq = (W**2).sum(0)
    while len(removed) < k:
        d = torch.diagonal(Hinv).clamp_min(1e-300)
        cost = sq / (2 * d)
        cost[~alive] = float("inf")
        m = min(per_step, k - len(removed))
        if m == 1:
            j = int(torch.argmin(cost))
            hj = Hinv[j, :] / Hinv[j, j]
            predicted += float(cost[j])
            W.addr_(W[:, j].clone(), hj, alpha=-1.0)
            Hinv.addr_(Hinv[:, j].clone(), hj, alpha=-1.0)
            S = [j]
        else:
            S = torch.topk(cost, m, largest=False).indices.tolist()
            HSS = Hinv[S][:, S]
            coef = torch.linalg.solve(HSS, Hinv[S, :])  # [m, cols]: HSS^-1 Hinv[S, :]
            predicted += float(0.5 * (W[:, S] @ torch.linalg.solve(HSS, W[:, S].T)).trace())
            W -= W[:, S] @ coef  # W[:, S] (advanced indexing) is a copy
            Hinv -= Hinv[:, S] @ coef
        W[:, S] = 0  # exact zeros (the update makes them 0 up to rounding)
        Hinv[S, :] = 0
        Hinv[:, S] = 0
        Hinv[S, S] = 1.0  # inert placeholder; masked out of the scores
        alive[S] = False
        removed.extend(S)
        sq = (W**2).sum(0)
    info = {"predicted_loss_damped": predicted, **{f"hessian_{k_}": v for k_, v in hinfo.items()}}
    return W, torch.tensor(removed, dtype=torch.long), info
