"""Remove FFN neurons from a ``WhisperForConditionalGeneration``: dense, smaller, loadable.

Every layer of a stack loses the SAME number of neurons. Why: HF Whisper's config has one
``encoder_ffn_dim`` and one ``decoder_ffn_dim`` and builds every layer's ``fc1``/``fc2`` from it, so
per-layer widths would not load with ``from_pretrained``; the CTranslate2 converter also takes
the layer shapes from that config/spec and expects them uniform within a stack. Encoder and
decoder may use different fractions (they are two config fields).

Order of work: validate everything (fractions, counts, shapes, config, Hessians present), then
compute every layer's decision on copies, and only then modify the model; a
:class:`StructuredError` therefore leaves the model and the output directory untouched.
:func:`save_structured` writes ``save_pretrained`` (+ processor) into a temporary sibling and
renames it into place.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_directory
from ..hessians.store import load_hessian, read_manifest
from ..whisper.model_card import write_model_card
from .ffn import METHODS, FFNPruneResult, StructuredError, prune_ffn

HessianSource = str | Path | Callable[[str], torch.Tensor] | None

STACKS = ("encoder", "decoder")


def _stack_layers(model: nn.Module, stack: str) -> list[nn.Module]:
    return list(getattr(model.model, stack).layers)


def ffn_removal_counts(config, encoder_fraction: float, decoder_fraction: float) -> dict[str, int]:
    """Neurons to remove per layer of each stack: ``round(fraction * ffn_dim)``, validated."""
    counts = {}
    for stack, frac in (("encoder", encoder_fraction), ("decoder", decoder_fraction)):
        try:
            frac = float(frac)
        except (TypeError, ValueError) as exc:
            raise StructuredError(f"{stack} fraction must be a number, got {frac!r}") from exc
        if not 0.0 <= frac < 1.0:  # also rejects NaN
            raise StructuredError(f"{stack} FFN fraction must be in [0, 1), got {frac}")
        dim = getattr(config, f"{stack}_ffn_dim", None)
        if not isinstance(dim, int) or dim < 1:
            raise StructuredError(f"config has no usable {stack}_ffn_dim (got {dim!r})")
        k = round(frac * dim)
        if k >= dim:
            raise StructuredError(
                f"{stack} fraction {frac} removes {k} of {dim} neurons: every neuron; "
                "at least one must stay"
            )
        counts[stack] = k
    return counts


def _check_uniform(model: nn.Module) -> None:
    cfg = model.config
    for stack in STACKS:
        dim = getattr(cfg, f"{stack}_ffn_dim")
        d_model = cfg.d_model
        for i, layer in enumerate(_stack_layers(model, stack)):
            fc1, fc2 = layer.fc1, layer.fc2
            if not (isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear)):
                raise StructuredError(f"{stack} layer {i}: fc1/fc2 are not nn.Linear")
            if tuple(fc1.weight.shape) != (dim, d_model) or tuple(fc2.weight.shape) != (
                d_model,
                dim,
            ):
                raise StructuredError(
                    f"{stack} layer {i}: fc1 {tuple(fc1.weight.shape)} / fc2 "
                    f"{tuple(fc2.weight.shape)} do not match config {stack}_ffn_dim={dim}, "
                    f"d_model={d_model}: the config cannot express these shapes"
                )


def _hessian_getter(hessians: HessianSource) -> Callable[[str], torch.Tensor] | None:
    if hessians is None or callable(hessians):
        return hessians
    path = Path(hessians)
    try:
        manifest = read_manifest(path)
    except ValueError as exc:
        raise StructuredError(str(exc)) from exc
    if manifest.get("hessian") == "diagonal":
        raise StructuredError(f"{path} holds diagonal Hessians; structured OBS needs full ones")

    def get(name: str) -> torch.Tensor:
        return load_hessian(path, manifest, name)

    return get


def plan_ffn_pruning(
    model: nn.Module,
    encoder_fraction: float,
    decoder_fraction: float,
    hessians: HessianSource = None,
    method: str = "obs",
    *,
    rel_damp: float = 0.01,
    per_step: int = 1,
    layers: dict[str, list[int]] | None = None,
) -> dict[str, FFNPruneResult]:
    """Every FFN's decision (``{"model.encoder.layers.0": FFNPruneResult, ...}``), model untouched.

    ``hessians``: a Hessian-set directory, a callable ``name -> H`` (name of the fc2 Linear,
    e.g. ``model.encoder.layers.0.fc2``), or ``None`` (``magnitude`` only). ``layers`` limits
    the work to some layer indices per stack (for sequential re-calibration); the count per layer
    stays that of the whole stack.
    """
    if method not in METHODS:
        raise StructuredError(f"unknown structured method {method!r}; choose from {METHODS}")
    counts = ffn_removal_counts(model.config, encoder_fraction, decoder_fraction)
    _check_uniform(model)
    get_h = _hessian_getter(hessians)
    if get_h is None and method != "magnitude" and any(counts.values()):
        raise StructuredError(f"method {method!r} needs Hessians of the fc2 inputs")
    plan: dict[str, FFNPruneResult] = {}
    for stack in STACKS:
        k = counts[stack]
        if k == 0:
            continue
        for i, layer in enumerate(_stack_layers(model, stack)):
            if layers is not None and i not in layers.get(stack, []):
                continue
            name = f"model.{stack}.layers.{i}"
            H = None
            if get_h is not None and method != "magnitude":
                try:
                    H = get_h(f"{name}.fc2")
                except ValueError as exc:  # ArtifactError is a ValueError
                    raise StructuredError(f"no usable Hessian for {name}.fc2: {exc}") from exc
            plan[name] = prune_ffn(
                layer.fc1.weight,
                layer.fc2.weight,
                H,
                k,
                method,
                rel_damp=rel_damp,
                per_step=per_step,
            )
    return plan


def _shrink_linear(lin: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    new = nn.Linear(
        weight.shape[1],
        weight.shape[0],
        bias=bias is not None,
        device=lin.weight.device,
        dtype=lin.weight.dtype,
    )
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    new.train(lin.training)
    return new


def shrink_layer(layer: nn.Module, res: FFNPruneResult) -> None:
    """Replace one block's fc1 (kept rows + bias) and fc2 (compensated columns) in place."""
    kept = res.kept.to(layer.fc1.weight.device)
    fc1, fc2 = layer.fc1, layer.fc2
    fc1_bias = None if fc1.bias is None else fc1.bias.detach()[kept]
    fc2_bias = None if fc2.bias is None else fc2.bias.detach()
    layer.fc1 = _shrink_linear(fc1, fc1.weight.detach()[kept], fc1_bias)
    layer.fc2 = _shrink_linear(fc2, res.fc2_weight.to(fc2.weight.device), fc2_bias)


def apply_ffn_plan(model: nn.Module, plan: dict[str, FFNPruneResult]) -> None:
    """Replace fc1/fc2 by the smaller dense Linears and update ``{encoder,decoder}_ffn_dim``.

    All layers of a stack must be in the plan with the same width (checked first).
    """
    modules = dict(model.named_modules())
    widths: dict[str, set[int]] = {s: set() for s in STACKS}
    for name, res in plan.items():
        stack = name.split(".")[1]
        if name not in modules or stack not in widths:
            raise StructuredError(f"plan names {name!r}, which is not a layer of this model")
        widths[stack].add(len(res.kept))
    for stack in STACKS:
        n_layers = len(_stack_layers(model, stack))
        planned = [n for n in plan if n.split(".")[1] == stack]
        if planned and (len(planned) != n_layers or len(widths[stack]) != 1):
            raise StructuredError(
                f"{stack}: every layer must keep the same number of neurons (config has one "
                f"{stack}_ffn_dim); plan covers {len(planned)}/{n_layers} layers with widths "
                f"{sorted(widths[stack])}"
            )
    for name, res in plan.items():
        shrink_layer(modules[name], res)
    for stack in STACKS:
        if widths[stack]:
            setattr(model.config, f"{stack}_ffn_dim", widths[stack].pop())


def prune_ffn_model(
    model: nn.Module,
    encoder_fraction: float,
    decoder_fraction: float,
    hessians: HessianSource = None,
    method: str = "obs",
    *,
    rel_damp: float = 0.01,
    per_step: int = 1,
) -> dict:
    """Plan and apply FFN-neuron removal in place; return per-layer losses and the new dims."""
    plan = plan_ffn_pruning(
        model,
        encoder_fraction,
        decoder_fraction,
        hessians,
        method,
        rel_damp=rel_damp,
        per_step=per_step,
    )
    apply_ffn_plan(model, plan)
    return {
        "method": method,
        "encoder_ffn_dim": model.config.encoder_ffn_dim,
        "decoder_ffn_dim": model.config.decoder_ffn_dim,
        "layers": {n: {"loss": r.loss, "loss_rel": r.info["loss_rel"]} for n, r in plan.items()},
    }


def check_config_shapes(model: nn.Module) -> None:
    """Raise :class:`StructuredError` unless every FFN matches the config (what loading needs)."""
    _check_uniform(model)


def save_structured(
    model: nn.Module, processor, out_dir: str | Path, card: str | None = None
) -> Path:
    """``save_pretrained`` (+ processor, + the model card ``card``) into a temp sibling, then
    rename over ``out_dir``.

    Checks first that the config expresses every FFN shape, so nothing is written otherwise.
    """
    check_config_shapes(model)
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(str(tmp))
        if processor is not None:
            processor.save_pretrained(str(tmp))
        if hasattr(model, "generation_config") and model.generation_config is not None:
            model.generation_config.save_pretrained(str(tmp))
        if card is not None:
            write_model_card(tmp, card)
    return out_dir
