"""Streaming per-layer Hessians H = 2/n * sum x x^T of every target ``nn.Linear``'s input.

Forward pre-hooks see each Linear's input; only the running sum ``S = sum x x^T`` (or its
diagonal) and the row count ``n`` are kept, never the activations. The per-batch product is
computed in float32 and added into a float64 accumulator: exact enough (each batch is a few
thousand rows) and twice as fast as float64 products on CPU.

Layers that read the same tensor share one accumulation: q/k/v of one attention block, and the
cross-attention k/v of every decoder layer (they all read the encoder output). Sharing is found
at run time by tensor identity (weak references, so no activation is kept alive), not by names.

Rows that carry no information are excluded through a row mask per batch: Whisper's encoder
always sees a 30 s window, and the frames beyond the clip's end are only zero padding; on the
decoder side, batch padding after the end of a transcript. ``n`` counts the kept rows.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class LayerHessian:
    """The accumulated statistic of one Linear input (possibly shared by several layers)."""

    sum_xxt: torch.Tensor  # [d, d] (full) or [d] (diag), float64
    n_samples: int = 0

    @property
    def is_diagonal(self) -> bool:
        return self.sum_xxt.dim() == 1

    def hessian(self) -> torch.Tensor:
        """H = 2/n * sum x x^T (zeros when nothing was seen)."""
        return self.sum_xxt * (2.0 / self.n_samples) if self.n_samples else self.sum_xxt.clone()


GRAM_BLOCK = 384


def add_gram(acc: torch.Tensor, rows: torch.Tensor, block: int = GRAM_BLOCK) -> None:
    """``acc += rows^T rows`` (float32 products, float64 sum), only blocks on or above the diagonal.

    Why: the Gram matrix is symmetric, and for wide inputs (fc2's 1536) its product is most of
    the calibration overhead; computing the upper block rows and mirroring them skips 3/8 of the
    work at width 1536. The mirror makes ``acc`` exactly symmetric.
    """
    d = rows.shape[1]
    if d <= block:
        acc += (rows.T @ rows).to(torch.float64)
        return
    for i in range(0, d, block):
        j = min(i + block, d)
        acc[i:j, i:] += (rows[:, i:j].T @ rows[:, i:]).to(torch.float64)
        acc[j:, i:j] = acc[i:j, j:].T  # the upper part of these columns is now complete


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` by its module name, in definition order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def row_mask_kind(name: str) -> str:
    """Which row mask applies to a Whisper Linear's input: encoder frames or decoder tokens."""
    if ".encoder." in f".{name}." or name.endswith(("encoder_attn.k_proj", "encoder_attn.v_proj")):
        return "encoder"
    return "decoder"


class StopForward(Exception):
    """Raised by a hook once the input it wanted is in: the rest of the forward pass would only
    compute outputs nobody reads (``HessianCollector(stop_after=...)``, sequential calibration)."""


class HessianCollector:
    """Context manager that hooks Linears and accumulates their input Hessians.

    ``row_masks`` is set by the caller before each forward pass: a dict
    ``{"encoder": bool[B, T_enc], "decoder": bool[B, T_dec]}``; with no mask every row counts
    (e.g. hook passes a library user makes through ``model.generate``).

    ``stop_after``: a layer name; once its input is accumulated, the hook raises
    ``StopForward`` so a pass collecting only the first layers of the model ends early.
    """

    def __init__(
        self,
        layers: dict[str, nn.Linear],
        *,
        diagonal: bool = False,
        device: torch.device | str = "cpu",
        stop_after: str | None = None,
    ) -> None:
        if stop_after is not None and stop_after not in layers:
            raise ValueError(f"stop_after={stop_after!r} is not one of the hooked layers")
        self.layers = layers
        self.diagonal = diagonal
        self.device = torch.device(device)
        self.stop_after = stop_after
        self.stats: dict[str, LayerHessian] = {}
        self.shared_with: dict[str, str] = {}  # layer -> layer whose statistic it shares
        self.row_masks: dict[str, torch.Tensor] | None = None
        self._seen: dict[int, tuple[weakref.ref, str]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    # -- lifecycle
    def attach(self) -> HessianCollector:
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_pre_hook(self._make_hook(name)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._seen.clear()

    def __enter__(self) -> HessianCollector:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def new_batch(self, row_masks: dict[str, torch.Tensor] | None = None) -> None:
        """Call before each forward pass: sets its row masks and resets identity tracking."""
        self.row_masks = row_masks
        self._seen.clear()

    # -- accumulation
    def _make_hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            self._accumulate(name, args[0])
            if name == self.stop_after:
                raise StopForward

        return hook

    def _accumulate(self, name: str, x: torch.Tensor) -> None:
        key = id(x)
        seen = self._seen.get(key)
        if seen is not None and seen[0]() is x:
            leader = seen[1]
            if name != leader:
                self.shared_with[name] = leader
            return
        self._seen[key] = (weakref.ref(x), name)
        self.shared_with.pop(name, None)
        rows = self._valid_rows(name, x)
        d = rows.shape[-1]
        stat = self.stats.get(name)
        if stat is None:
            shape = (d,) if self.diagonal else (d, d)
            stat = self.stats[name] = LayerHessian(
                torch.zeros(shape, dtype=torch.float64, device=self.device)
            )
        if rows.shape[0] == 0:
            return
        rows = rows.to(self.device, torch.float32)
        if self.diagonal:
            stat.sum_xxt += rows.square().sum(0).to(torch.float64)
        else:
            add_gram(stat.sum_xxt, rows)
        stat.n_samples += rows.shape[0]

    def _valid_rows(self, name: str, x: torch.Tensor) -> torch.Tensor:
        x = x.detach()
        if self.row_masks is None or x.dim() != 3:
            return x.reshape(-1, x.shape[-1])
        mask = self.row_masks.get(row_mask_kind(name))
        if mask is None or tuple(mask.shape) != tuple(x.shape[:2]):
            return x.reshape(-1, x.shape[-1])
        return x[mask.to(x.device)]

    # -- results
    def hessians(self, names: Iterable[str] | None = None) -> dict[str, LayerHessian]:
        """Per layer name (shared statistics resolved to their leader's)."""
        names = list(self.layers) if names is None else list(names)
        out = {}
        for name in names:
            leader = self.shared_with.get(name, name)
            if leader in self.stats:
                out[name] = self.stats[leader]
        return out
