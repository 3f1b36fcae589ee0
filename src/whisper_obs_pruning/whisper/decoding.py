"""Fast batched greedy Whisper transcription (no timestamps).

Why not ``model.generate``: on CPU, transformers' ``SuppressTokensLogitsProcessor`` spends
most of each step in ``torch.isin``, and a pruned model that degenerates into loops decodes
to the 448-token limit. This hand-written loop (KV cache, suppression by indexing, finished
sequences dropped from the batch, a per-clip token cap from the clip's duration) produces
the same tokens as ``generate(num_beams=1, do_sample=False)``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import WhisperForConditionalGeneration, WhisperProcessor
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from .prompt import decoder_prompt_ids

__all__ = [
    "DecodeSetup",
    "default_token_cap",
    "log_mel_features",
    "transcribe",
    "transcribe_tokens",
]

# Read speech rarely exceeds ~8 tokens/s; the margin covers short clips and punctuation.
TOKENS_PER_SECOND = 8
TOKEN_MARGIN = 16


def default_token_cap(duration_s: float, prompt_len: int, max_target_positions: int) -> int:
    """Per-clip limit on generated tokens: ``min(max_target_positions - prompt, ceil(8 * s) + 16)``
    (``max_target_positions`` from the model's config: 448 for every Whisper so far)."""
    cap = math.ceil(TOKENS_PER_SECOND * duration_s) + TOKEN_MARGIN
    return max(1, min(max_target_positions - prompt_len, cap))


@dataclass(frozen=True)
class DecodeSetup:
    """What every decoder of a model shares (ours, CTranslate2's): the prompt, the end token
    and the per-clip token caps, so both backends decode exactly the same problem."""

    prompt: list[int]
    eot: int
    rate: int
    max_positions: int

    @classmethod
    def of(cls, model, processor, language: str | None = "en", task: str = "transcribe"):
        eot = model.generation_config.eos_token_id
        return cls(
            prompt=list(decoder_prompt_ids(model, processor, language=language, task=task)),
            eot=int(eot[0] if isinstance(eot, (list, tuple)) else eot),
            rate=int(processor.feature_extractor.sampling_rate),
            max_positions=int(model.config.max_target_positions),
        )

    def caps(self, batch: Sequence[np.ndarray], max_new_tokens: int | None = None) -> list[int]:
        """Token caps per clip: from its duration, or ``max_new_tokens`` for all."""
        if max_new_tokens is None:
            return [
                default_token_cap(len(a) / self.rate, len(self.prompt), self.max_positions)
                for a in batch
            ]
        return [max(1, min(max_new_tokens, self.max_positions - len(self.prompt)))] * len(batch)


def _as_mono_f32(audio: np.ndarray, index: int, feature_extractor) -> np.ndarray:
    """Mono float32 that fits the feature extractor's window (its rate and ``n_samples``)."""
    a = np.asarray(audio, dtype=np.float32)
    rate = feature_extractor.sampling_rate
    if a.ndim != 1:
        raise ValueError(f"audio {index}: expected mono 1-D samples at {rate} Hz, got {a.shape}")
    if a.shape[0] > feature_extractor.n_samples:
        raise ValueError(
            f"audio {index}: {a.shape[0] / rate:.1f} s is longer than Whisper's "
            f"{feature_extractor.n_samples / rate:.0f} s window"
        )
    return a


def log_mel_features(
    processor: WhisperProcessor,
    audios: Sequence[np.ndarray],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Log-mel features ``(batch, n_mels, 3000)`` padded to 30 s, as ``generate`` expects."""
    fe = processor.feature_extractor
    arrays = [_as_mono_f32(a, i, fe) for i, a in enumerate(audios)]
    feats = fe(arrays, sampling_rate=fe.sampling_rate, return_tensors="pt").input_features
    return feats.to(device=device, dtype=dtype)


class _ThreadChooser:
    """Chooses torch's intra-op threads for each decoding step by timing them.

    Why: a decoding step is many tiny ops. On an idle 2-core CPU two threads are ~2x faster
    than one, but when other processes keep the cores busy every op waits on an OpenMP
    barrier for a descheduled thread and two threads become 5-20x slower. Results are
    bitwise identical across thread counts on CPU (checked: encoder and logits), so only
    speed depends on the choice. Alternates the options for a few steps, keeps the faster
    one, and re-probes later (load changes); the interval doubles while the winner stays.
    """

    def __init__(
        self,
        options: Sequence[int],
        probes: int = 2,
        min_interval: int = 32,
        max_interval: int = 1024,
    ) -> None:
        self.options = sorted(set(options))
        self.probes = probes
        self.min_interval = min_interval
        self.max_interval = max_interval
        self.interval = min_interval
        self.best = self.options[-1]
        self.countdown = 0
        self._plan: list[int] = []
        self._samples: dict[int, list[float]] = {}
        self._start_probe()

    def _start_probe(self) -> None:
        self._plan = [o for _ in range(self.probes) for o in self.options]
        self._samples = {o: [] for o in self.options}

    def pick(self) -> int:
        """Thread count for the next step."""
        if len(self.options) == 1:
            return self.options[0]
        return self._plan[0] if self._plan else self.best

    def record(self, threads: int, seconds: float) -> None:
        """Report the time of a step run with ``threads`` (as returned by :meth:`pick`)."""
        if len(self.options) == 1:
            return
        if self._plan:
            self._samples[threads].append(seconds)
            self._plan.pop(0)
            if not self._plan:
                new = min(self.options, key=lambda o: sum(self._samples[o]) / len(self._samples[o]))
                same = new == self.best
                self.interval = (
                    min(2 * self.interval, self.max_interval) if same else self.min_interval
                )
                self.best = new
                self.countdown = self.interval
            return
        self.countdown -= 1
        if self.countdown <= 0:
            self._start_probe()


def _suppress_tensors(
    model: WhisperForConditionalGeneration, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    gc = model.generation_config
    vocab = model.config.vocab_size
    sup = [t for t in (gc.suppress_tokens or []) if 0 <= t < vocab]
    begin = [t for t in (gc.begin_suppress_tokens or []) if 0 <= t < vocab]
    return (
        torch.tensor(sup, dtype=torch.long, device=device),
        torch.tensor(begin, dtype=torch.long, device=device),
    )


@torch.inference_mode()
def _decode_batch(
    model: WhisperForConditionalGeneration,
    features: torch.Tensor,
    prompt: list[int],
    caps: list[int],
    eot: int,
    suppress: torch.Tensor,
    begin_suppress: torch.Tensor,
    chooser: _ThreadChooser | None,
    encoder_chooser: _ThreadChooser | None = None,
) -> list[list[int]]:
    """Greedy decoding of one batch; returns generated ids (without prompt and eot).

    The encoder runs with ``encoder_chooser``'s thread count (timed per clip), the token loop
    with ``chooser``'s; either None keeps the global setting.
    """
    device = features.device
    n = features.shape[0]
    global_threads = torch.get_num_threads()
    if encoder_chooser is not None:
        enc_threads = encoder_chooser.pick()
        torch.set_num_threads(enc_threads)
        t0 = time.perf_counter()
        try:
            enc = model.model.encoder(features).last_hidden_state
            encoder_chooser.record(enc_threads, (time.perf_counter() - t0) / n)
        finally:
            torch.set_num_threads(global_threads)
    else:
        enc = model.model.encoder(features).last_hidden_state
    decoder = model.model.decoder
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    inp = torch.tensor([prompt] * n, dtype=torch.long, device=device)
    active = list(range(n))  # original row of each live batch row
    out: list[list[int]] = [[] for _ in range(n)]
    step = 0
    try:
        while active:
            # Step 0 (prompt + cross-attention K/V over 1500 frames) is a big GEMM: keep the
            # global setting and do not let it skew the per-step timings.
            threads = chooser.pick() if chooser is not None and step > 0 else global_threads
            if threads != torch.get_num_threads():
                torch.set_num_threads(threads)
            t0 = time.perf_counter()
            hidden = decoder(
                input_ids=inp, encoder_hidden_states=enc, cache=cache, use_cache=True
            ).last_hidden_state[:, -1]
            logits = model.proj_out(hidden).float()
            if suppress.numel():
                logits[:, suppress] = -math.inf
            if step == 0 and begin_suppress.numel():
                logits[:, begin_suppress] = -math.inf
            next_ids = logits.argmax(dim=-1).tolist()  # syncs, so the timing below is real
            if chooser is not None and step > 0:
                chooser.record(threads, time.perf_counter() - t0)
            step += 1
            keep: list[int] = []
            for row, (orig, tok) in enumerate(zip(active, next_ids, strict=True)):
                if tok == eot:
                    continue
                out[orig].append(tok)
                if len(out[orig]) < caps[orig]:
                    keep.append(row)
            if not keep:
                break
            if len(keep) < len(active):
                idx = torch.tensor(keep, dtype=torch.long, device=device)
                cache.batch_select_indices(idx)
                enc = enc.index_select(0, idx)
                active = [active[r] for r in keep]
                next_ids = [next_ids[r] for r in keep]
            inp = torch.tensor(next_ids, dtype=torch.long, device=device).unsqueeze(1)
    finally:
        if torch.get_num_threads() != global_threads:
            torch.set_num_threads(global_threads)
    return out


def _make_chooser(
    threads: int | str | None, device: torch.device, what: str = "decoder_threads", **knobs: int
) -> _ThreadChooser | None:
    if device.type != "cpu" or threads is None:
        return None
    if threads == "auto":
        return _ThreadChooser(sorted({1, torch.get_num_threads()}), **knobs)
    if isinstance(threads, int) and threads >= 1:
        return _ThreadChooser([threads])
    raise ValueError(f"{what} must be 'auto', None or an int >= 1, not {threads!r}")


def transcribe_tokens(
    model: WhisperForConditionalGeneration,
    processor: WhisperProcessor,
    audios: Sequence[np.ndarray],
    *,
    batch_size: int = 8,
    language: str | None = "en",
    task: str = "transcribe",
    max_new_tokens: int | None = None,
    progress: bool = True,
    desc: str = "transcribe",
    decoder_threads: int | str | None = "auto",
    encoder_threads: int | str | None = "auto",
) -> list[list[int]]:
    """Greedy token ids per clip (prompt and eot excluded); see :func:`transcribe`."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    setup = DecodeSetup.of(model, processor, language=language, task=task)
    device = model.device
    dtype = next(model.parameters()).dtype
    suppress, begin_suppress = _suppress_tensors(model, device)
    chooser = _make_chooser(decoder_threads, device)
    # one encoder call per batch: probe once per option, re-probe every 4..32 batches
    enc_chooser = _make_chooser(
        encoder_threads, device, "encoder_threads", probes=1, min_interval=4, max_interval=32
    )

    results: list[list[int]] = []
    with tqdm(total=len(audios), desc=desc, unit="clip", disable=not progress) as bar:
        for start in range(0, len(audios), batch_size):
            batch = list(audios[start : start + batch_size])
            caps = setup.caps(batch, max_new_tokens)
            feats = log_mel_features(processor, batch, device=device, dtype=dtype)
            results.extend(
                _decode_batch(
                    *(model, feats, setup.prompt, caps, setup.eot, suppress, begin_suppress),
                    *(chooser, enc_chooser),
                )
            )
            bar.update(len(batch))
    return results


def transcribe(
    model: WhisperForConditionalGeneration,
    processor: WhisperProcessor,
    audios: Sequence[np.ndarray],
    **options: Any,
) -> list[str]:
    """Transcribe 16 kHz mono float32 clips (<= 30 s each) with greedy decoding, no timestamps.

    ``max_new_tokens=None`` caps each clip at ``min(448 - len(prompt), ceil(8 * seconds) + 16)``
    so a degenerate (looping) pruned model stays cheap to evaluate. ``decoder_threads``: torch
    threads for the token-by-token loop on CPU (the encoder keeps the global setting).
    ``"auto"`` times 1 vs the global count while decoding and keeps the faster (on a busy
    2-core machine two threads made steps 5-20x slower; on an idle one ~2x faster; tokens
    are identical either way); an int fixes it; ``None`` keeps the global setting.
    ``encoder_threads`` does the same for the encoder, timed per clip of a batch (under load
    2 threads were 1.4x slower than 1 for the encoder too). The options (``batch_size``,
    ``language``, ``task``, ``max_new_tokens``, ``progress``, ``desc``, ``decoder_threads``,
    ``encoder_threads``) are :func:`transcribe_tokens`'s. ``backend="ct2"``
    decodes with CTranslate2 float32 instead (the model converted in memory; same tokens).
    """
    if options.pop("backend", "torch") == "ct2":
        from .ct2_export import transcribe_tokens_ct2  # optional dependency, loaded on use

        options.pop("decoder_threads", None)  # CT2 keeps its own thread pool
        options.pop("encoder_threads", None)
        ids = transcribe_tokens_ct2(model, processor, audios, **options)
    else:
        ids = transcribe_tokens(model, processor, audios, **options)
    texts = processor.tokenizer.batch_decode(ids, skip_special_tokens=True)
    return [t.strip() for t in texts]
