"""Quantize a (possibly pruned) model's target Linears in place, from the cached Hessians.

Joint pruning + quantization from one calibration: the layer's zeros (the pruning mask) are
kept exactly, and the kept weights are quantized with the OBS update (GPTQ), so the pruning
method's compensation is not undone. Every other floating tensor is rounded to the
checkpoint's storage dtype, so the model evaluated is bit for bit the one the compressed
checkpoint loads (``checkpoint.save_quantized``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import round_unquantized_
from .grid import QuantResult, QuantSpec
from .registry import QUANTIZERS, quantize_layer


def quantize_layers(
    model: nn.Module,
    targets: Sequence[str],
    get_hessian: Callable[[str], torch.Tensor | None],
    spec: QuantSpec,
    *,
    method: str = "gptq",
    rel_damp: float = 0.01,
    blocksize: int = 128,
    other_dtype: str = "float16",
    progress: bool = True,
) -> tuple[dict[str, QuantResult], dict[str, dict]]:
    """Quantize ``targets`` in place; return the results (for the checkpoint) and a report."""
    modules = dict(model.named_modules())
    needs_h = QUANTIZERS[method].statistic != "none"
    results: dict[str, QuantResult] = {}
    report: dict[str, dict] = {}
    for name in tqdm(targets, desc=f"quantize {method} {spec.name}", disable=not progress):
        layer = modules[name]
        W = layer.weight.data.detach().float()
        H = get_hessian(name) if needs_h else None
        t0 = time.perf_counter()
        res = quantize_layer(
            W,
            None if H is None else H.to(W.device),
            spec,
            method=method,
            mask=W == 0,  # pruned (and naturally zero) weights stay exactly 0
            rel_damp=rel_damp,
            blocksize=blocksize,
        )
        layer.weight.data.copy_(res.weight)  # in place: ties and storage are kept
        results[name] = res
        report[name] = {
            "seconds": round(time.perf_counter() - t0, 4),
            **{k: v for k, v in res.info.items() if isinstance(v, (int, float, bool))},
        }
    round_unquantized_(model, results, other_dtype)
    return results, report
