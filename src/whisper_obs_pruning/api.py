"""The library API: ``WhisperOBSPruner`` and ``prune_whisper_model``.

Kept compatible with the seed README:

    pruner = WhisperOBSPruner(model, rel_damp=1e-4)
    pruner.accumulate_hessian(max_samples=1000)
    pruned_weights = pruner.prune_model(sparsity=0.3, target_layers=["model.encoder.layers.0.fc1"])
    pruner.get_layer_info(); pruner.cleanup()

Hooks are attached at construction, so forward passes the caller makes (e.g. ``generate``) are
accumulated as in the seed; ``accumulate_hessian`` additionally runs teacher-forced calibration
on real audio (the embedded calibration split unless the caller passes utterances).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from .hessians.calibration import run_calibration
from .hessians.collector import HessianCollector, linear_layers
from .methods import get_method
from .pruning import DEFAULT_EXCLUDE, prune_layers, select_targets
from .speech.datasets import Utterance, load_utterances

log = logging.getLogger(__name__)


class WhisperOBSPruner:
    """Collects per-layer Hessians of a Whisper model and prunes its Linear layers.

    ``obs_data[name]`` holds, per Linear module name: ``H`` (the Hessian, or its diagonal),
    ``n_samples``, ``shape`` and ``shared_with`` (the layer whose input it shares).
    """

    def __init__(
        self,
        model: nn.Module,
        rel_damp: float = 1e-4,
        *,
        processor=None,
        diagonal: bool = False,
        exclude_padding: bool = False,
        language: str | None = "en",
    ) -> None:
        if rel_damp < 0:
            raise ValueError(f"rel_damp must be >= 0, got {rel_damp}")
        self.model = model
        self.rel_damp = rel_damp
        self.processor = processor
        self.exclude_padding = exclude_padding
        self.language = language
        self.layers = linear_layers(model)
        if not self.layers:
            raise ValueError("model has no nn.Linear layers to prune")
        device = next(model.parameters()).device
        self.collector = HessianCollector(self.layers, diagonal=diagonal, device=device).attach()
        self.obs_data: dict[str, dict] = {
            name: {"H": None, "n_samples": 0, "shape": tuple(m.weight.shape), "shared_with": None}
            for name, m in self.layers.items()
        }
        self.last_report: dict[str, dict] = {}

    # ------------------------------------------------------------ calibration
    def accumulate_hessian(
        self,
        max_samples: int | None = None,
        utterances: Sequence[Utterance] | Sequence[np.ndarray] | None = None,
        *,
        batch_size: int = 8,
        progress: bool = True,
    ) -> dict[str, dict]:
        """Run up to ``max_samples`` calibration utterances through the model; fill ``obs_data``.

        ``utterances`` may be ``Utterance`` objects (teacher-forced on their transcripts) or raw
        16 kHz arrays (transcribed first by the model itself, then teacher-forced). Default:
        the embedded calibration split. Passes made before (hooked) are kept in the sums.
        """
        from .whisper.prompt import decoder_prompt_ids

        if max_samples is not None and max_samples <= 0:
            raise ValueError(f"max_samples must be positive, got {max_samples}")
        processor = self._processor()
        if utterances is None:
            utterances = load_utterances("embedded", "calibration").utterances
        utterances = self._as_utterances(list(utterances), processor, batch_size)
        if max_samples is not None and max_samples > len(utterances):
            log.warning(
                "max_samples=%d but only %d calibration utterances are available; using all",
                max_samples,
                len(utterances),
            )
        utterances = utterances[: max_samples or None]
        prompt = decoder_prompt_ids(self.model, processor, language=self.language)
        run_calibration(
            self.model,
            processor,
            utterances,
            self.collector,
            prompt,
            batch_size=batch_size,
            exclude_padding=self.exclude_padding,
            progress=progress,
        )
        self._sync_obs_data()
        return self.obs_data

    def _processor(self):
        if self.processor is None:
            from transformers import WhisperProcessor

            source = getattr(self.model.config, "_name_or_path", "")
            if not source:
                raise ValueError("pass processor=... (the model does not say where it came from)")
            self.processor = WhisperProcessor.from_pretrained(source)
        return self.processor

    def _as_utterances(self, items: list, processor, batch_size: int) -> list[Utterance]:
        raw = [i for i, u in enumerate(items) if not isinstance(u, Utterance)]
        if not raw:
            return items
        from .whisper.decoding import transcribe

        self.collector.detach()  # the model's own transcription must not enter the Hessians
        try:
            texts = transcribe(
                self.model,
                processor,
                [np.asarray(items[i]) for i in raw],
                batch_size=batch_size,
                language=self.language,
                progress=False,
            )
        finally:
            self.collector.attach()
        out = list(items)
        for i, text in zip(raw, texts, strict=True):
            out[i] = Utterance(
                id=f"clip{i}", audio=np.asarray(items[i], np.float32), text=text, meta={}
            )
        return out

    def _sync_obs_data(self) -> None:
        for name, stat in self.collector.hessians().items():
            entry = self.obs_data[name]
            entry["H"] = stat.hessian()
            entry["n_samples"] = stat.n_samples
            entry["shared_with"] = self.collector.shared_with.get(name)

    # ------------------------------------------------------------ pruning
    def prune_model(
        self,
        sparsity: float,
        target_layers: Sequence[str] | None = None,
        *,
        method: str = "diagonal",
        pattern: str | None = None,
        allocation: str = "uniform",
        exclude: Sequence[str] | None = DEFAULT_EXCLUDE,
        blocksize: int = 128,
        scope: str = "row",
        progress: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Prune in place; return ``{layer name: pruned weight}``.

        ``target_layers``: names or regexes (default: every Linear but ``proj_out``, which is
        tied to the token embedding). ``method``: magnitude, diagonal (the seed's, default),
        sparsegpt or obs. ``pattern``: None/"unstructured" or "N:M".
        """
        self._sync_obs_data()
        targets = select_targets(
            list(self.layers), target_layers, exclude if not target_layers else None
        )
        if get_method(method).needs_hessian:
            missing = [n for n in targets if self.obs_data[n]["n_samples"] == 0]
            if missing:
                raise RuntimeError(
                    f"no Hessian for {len(missing)} layer(s) (e.g. {missing[0]!r}): call "
                    "accumulate_hessian() first, or use method='magnitude'"
                )
        was_attached = bool(self.collector._handles)
        self.collector.detach()
        try:
            self.last_report = prune_layers(
                self.model,
                targets,
                lambda n: self.obs_data[n]["H"],
                method=method,
                sparsity=sparsity,
                pattern=pattern,
                allocation=allocation,
                rel_damp=self.rel_damp,
                blocksize=blocksize,
                scope=scope,
                progress=progress,
            )
        finally:
            if was_attached:
                self.collector.attach()
        return {n: self.layers[n].weight.data for n in targets}

    def get_layer_info(self) -> dict[str, dict]:
        """Per Linear: shape, measured sparsity, Hessian sample count, whether it was pruned."""
        info = {}
        for name, module in self.layers.items():
            w = module.weight.data
            info[name] = {
                "shape": tuple(w.shape),
                "sparsity": float((w == 0).float().mean()),
                "n_samples": self.obs_data[name]["n_samples"],
                "pruned": name in self.last_report,
            }
        return info

    def cleanup(self) -> None:
        """Remove the hooks and free the Hessians."""
        self.collector.detach()
        self.collector.stats.clear()
        for entry in self.obs_data.values():
            entry["H"] = None
        gc.collect()


def prune_whisper_model(
    model: nn.Module,
    sparsity: float,
    max_samples: int | None = 128,
    *,
    method: str = "diagonal",
    pattern: str | None = None,
    rel_damp: float = 1e-4,
    target_layers: Sequence[str] | None = None,
    utterances: Sequence[Utterance] | None = None,
    processor=None,
    progress: bool = True,
) -> nn.Module:
    """Calibrate on ``max_samples`` utterances, prune every Linear but proj_out, return model."""
    statistic = get_method(method).statistic
    pruner = WhisperOBSPruner(
        model, rel_damp=rel_damp, processor=processor, diagonal=statistic == "diagonal"
    )
    try:
        if statistic != "none":
            pruner.accumulate_hessian(
                max_samples=max_samples, utterances=utterances, progress=progress
            )
        pruner.prune_model(
            sparsity, target_layers, method=method, pattern=pattern, progress=progress
        )
    finally:
        pruner.cleanup()
    return model
