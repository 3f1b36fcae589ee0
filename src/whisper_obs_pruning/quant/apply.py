"""Quantize a (possibly pruned) model's target Linears in place, from the cached Hessians.

Joint pruning + quantization from one calibration: the layer's zeros (the pruning mask) are
kept exactly, and the kept weights are quantized with the OBS update (GPTQ), so the pruning
method's compensation is not undone. Every other floating tensor is rounded to the
checkpoint's storage dtype, so the model evaluated is bit for bit the one the compressed
checkpoint loads (``checkpoint.save_quantized``).

The token embedding is Whisper's largest tensor (tiny.en: 19.9 M of 37.8 M parameters, 40 MB of
a 51 MB int4 checkpoint in float16). It is tied to ``proj_out``, a Linear whose input Hessian
the calibration caches, so it is quantized like any target: GPTQ on ``proj_out`` (minimising
the logits' error), the tied embedding reading the same codes (``embedding_layer``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

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
    layer_specs: Mapping[str, QuantSpec] | None = None,
) -> tuple[dict[str, QuantResult], dict[str, dict]]:
    """Quantize ``targets`` in place; return the results (for the checkpoint) and a report.

    ``layer_specs``: other schemes for some layers, or extra layers (e.g. the tied embedding's
    ``proj_out``, see :func:`embedding_layer`), quantized with the same method."""
    modules = dict(model.named_modules())
    needs_h = QUANTIZERS[method].statistic != "none"
    plan = {name: spec for name in targets} | dict(layer_specs or {})
    results: dict[str, QuantResult] = {}
    report: dict[str, dict] = {}
    for name in tqdm(plan, desc=f"quantize {method} {spec.name}", disable=not progress):
        layer, spec_here = modules[name], plan[name]
        W = layer.weight.data.detach().float()
        H = get_hessian(name) if needs_h else None
        t0 = time.perf_counter()
        res = quantize_layer(
            W,
            None if H is None else H.to(W.device),
            spec_here,
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


def embedding_layer(model: nn.Module) -> str | None:
    """Name of the Linear that shares its weight with the input token embedding (Whisper's
    ``proj_out``), or None when the output projection is not tied."""
    get_emb = getattr(model, "get_input_embeddings", None)
    emb = get_emb() if callable(get_emb) else None
    if emb is None:
        return None
    ptr = emb.weight.data_ptr()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.weight.data_ptr() == ptr:
            return name
    return None
