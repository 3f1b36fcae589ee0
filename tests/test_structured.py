"""Structured FFN-neuron pruning: the OBS math against brute force, and model surgery."""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

import pytest
import torch

from whisper_obs_pruning.hessians.collector import StopForward
from whisper_obs_pruning.structured import (
    StructuredError,
    ffn_removal_counts,
    plan_ffn_pruning,
    prune_ffn,
    prune_ffn_model,
    save_structured,
)


# ------------------------------------------------------------------ layer-level math
def _layer(seed: int, rows: int = 6, cols: int = 12, n: int = 200):
    """A random fc1/fc2 pair and correlated calibration inputs X [cols, n] of fc2."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g, dtype=torch.float64)
    scale = torch.rand(cols, generator=g, dtype=torch.float64) * 2 + 0.1
    X = (mix @ torch.randn(cols, n, generator=g, dtype=torch.float64)) * scale[:, None]
    W = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    fc1 = torch.randn(cols, 5, generator=g, dtype=torch.float64)
    H = 2.0 / n * X @ X.T
    return W, fc1, X, H


def _refit(W: torch.Tensor, X: torch.Tensor, keep: list[int]) -> tuple[torch.Tensor, float]:
    """Least-squares re-fit of the kept columns on X: min ||W X - W' X_keep||^2; loss / n."""
    Xk = X[keep]
    Wk = torch.linalg.lstsq(Xk.T, (W @ X).T).solution.T
    loss = float(((W @ X - Wk @ Xk) ** 2).sum()) / X.shape[1]
    return Wk, loss


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_single_obs_step_equals_brute_force(seed):
    W, fc1, X, H = _layer(seed)
    cols = W.shape[1]
    brute = []
    for j in range(cols):
        keep = [c for c in range(cols) if c != j]
        Wk, loss = _refit(W, X, keep)
        brute.append((loss, j, Wk))
    best_loss, best_j, best_W = min(brute, key=lambda t: t[0])
    res = prune_ffn(fc1, W, H, 1, "obs", rel_damp=0.0)
    assert res.kept.tolist() == [c for c in range(cols) if c != best_j]
    # OBS formula: cost = sum_rows w_j^2 / (2 Hinv_jj), loss convention 1/2 dw H dw^T = ||dW X||^2/n
    Hinv = torch.linalg.inv(H)
    formula = float((W[:, best_j] ** 2).sum() / (2 * Hinv[best_j, best_j]))
    assert res.loss == pytest.approx(best_loss, rel=1e-8)
    assert formula == pytest.approx(best_loss, rel=1e-8)
    assert res.info["predicted_loss_damped"] == pytest.approx(best_loss, rel=1e-8)
    torch.testing.assert_close(res.fc2_weight, best_W, rtol=1e-8, atol=1e-9)


def test_greedy_steps_equal_brute_force_greedy():
    """k OBS steps (with the H^-1 downdate) = k rounds of brute-force greedy with re-fits."""
    W, fc1, X, H = _layer(5, cols=10)
    k, cols = 4, W.shape[1]
    keep = list(range(cols))
    for _ in range(k):
        best = min((_refit(W, X, [c for c in keep if c != j])[1], j) for j in keep)
        keep.remove(best[1])
    Wk, loss = _refit(W, X, keep)
    res = prune_ffn(fc1, W, H, k, "obs", rel_damp=0.0)
    assert res.kept.tolist() == keep
    assert res.loss == pytest.approx(loss, rel=1e-7)
    torch.testing.assert_close(res.fc2_weight, Wk, rtol=1e-7, atol=1e-8)


def test_block_step_is_optimal_refit_of_its_set():
    W, fc1, X, H = _layer(7, cols=16)
    res = prune_ffn(fc1, W, H, 8, "obs", rel_damp=0.0, per_step=4)
    Wk, loss = _refit(W, X, res.kept.tolist())
    assert res.loss == pytest.approx(loss, rel=1e-7)
    torch.testing.assert_close(res.fc2_weight, Wk, rtol=1e-7, atol=1e-8)


def test_obs_beats_no_update_baselines():
    totals = {"obs": 0.0, "diagonal": 0.0, "magnitude": 0.0}
    for seed in range(8):
        W, fc1, X, H = _layer(100 + seed, rows=8, cols=32, n=400)
        losses = {m: prune_ffn(fc1, W, H, 16, m).loss for m in totals}
        assert losses["obs"] <= losses["diagonal"] + 1e-12
        assert losses["obs"] <= losses["magnitude"] + 1e-12
        for m in totals:
            totals[m] += losses[m]
    # diagonal reads the input energy, magnitude does not: better on average, not per seed
    assert totals["obs"] < totals["diagonal"] < totals["magnitude"]


def test_zero_removal_and_bad_counts():
    W, fc1, X, H = _layer(3)
    res = prune_ffn(fc1, W, H, 0, "obs")
    assert res.kept.tolist() == list(range(W.shape[1]))
    assert torch.equal(res.fc2_weight, W) and res.loss == 0.0
    for bad in (-1, W.shape[1]):
        with pytest.raises(StructuredError):
            prune_ffn(fc1, W, H, bad, "obs")
    with pytest.raises(StructuredError):
        prune_ffn(fc1, W, H, 2, "nope")
    with pytest.raises(StructuredError):
        prune_ffn(fc1, W, None, 2, "obs")


# ------------------------------------------------------------------ model surgery
@pytest.fixture(scope="module")
def tiny_model():
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    cfg = WhisperConfig(
        vocab_size=100,
        num_mel_bins=16,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_source_positions=50,
        max_target_positions=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )
    model = WhisperForConditionalGeneration(cfg).eval()
    feats = torch.randn(6, 16, 100)
    dec = torch.randint(3, 100, (6, 12))
    return model, feats, dec


def _clone(model):
    import copy

    return copy.deepcopy(model)


def _hessians(model, feats, dec) -> dict[str, torch.Tensor]:
    acc: dict[str, torch.Tensor] = {}
    hooks = []
    for name, mod in model.named_modules():
        if name.endswith(".fc2"):

            def hook(m, args, name=name):
                x = args[0].reshape(-1, args[0].shape[-1]).to(torch.float64)
                acc[name] = 2.0 / x.shape[0] * x.T @ x

            hooks.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(input_features=feats, decoder_input_ids=dec)
    for h in hooks:
        h.remove()
    return acc


def _logits(model, feats, dec):
    with torch.no_grad():
        return model(input_features=feats, decoder_input_ids=dec).logits


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_surgery_saves_loadable_model_with_same_logits(tiny_model, tmp_path):
    from transformers import WhisperForConditionalGeneration

    base, feats, dec = tiny_model
    model = _clone(base)
    H = _hessians(model, feats, dec)
    dense = _logits(model, feats, dec)
    report = prune_ffn_model(model, 0.25, 0.5, H.__getitem__, "obs")
    assert model.config.encoder_ffn_dim == 96 and model.config.decoder_ffn_dim == 64
    assert report["encoder_ffn_dim"] == 96 and len(report["layers"]) == 4
    shrunk = _logits(model, feats, dec)
    assert not torch.allclose(shrunk, dense)
    out = save_structured(model, None, tmp_path / "m")
    loaded = WhisperForConditionalGeneration.from_pretrained(out).eval()
    for stack in ("encoder", "decoder"):
        dim = getattr(loaded.config, f"{stack}_ffn_dim")
        for layer in getattr(loaded.model, stack).layers:
            assert tuple(layer.fc1.weight.shape) == (dim, 64)
            assert tuple(layer.fc1.bias.shape) == (dim,)
            assert tuple(layer.fc2.weight.shape) == (64, dim)
    torch.testing.assert_close(_logits(loaded, feats, dec), shrunk, rtol=0, atol=0)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_obs_surgery_beats_magnitude_on_output(tiny_model):
    base, feats, dec = tiny_model
    dense = _logits(base, feats, dec)
    H = _hessians(base, feats, dec)
    err = {}
    for method in ("obs", "diagonal", "magnitude"):
        m = _clone(base)
        prune_ffn_model(m, 0.5, 0.5, H.__getitem__, method)
        err[method] = float(((_logits(m, feats, dec) - dense) ** 2).mean())
    assert err["obs"] < err["magnitude"]
    assert err["obs"] < err["diagonal"]


def test_zero_fraction_is_identity(tiny_model):
    base, feats, dec = tiny_model
    model = _clone(base)
    H = _hessians(model, feats, dec)
    before = _state(model)
    prune_ffn_model(model, 0.0, 0.0, H.__getitem__, "obs")
    assert model.config.encoder_ffn_dim == 128 and model.config.decoder_ffn_dim == 128
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(
    "enc,dec_frac", [(-0.1, 0.0), (1.0, 0.0), (0.0, 1.5), (math.nan, 0.0), ("x", 0.0), (0.999, 0)]
)
def test_bad_fractions_raise_before_anything_changes(tiny_model, tmp_path, enc, dec_frac):
    base, feats, dec = tiny_model
    model = _clone(base)
    H = _hessians(model, feats, dec)
    before = _state(model)
    with pytest.raises(StructuredError):
        prune_ffn_model(model, enc, dec_frac, H.__getitem__, "obs")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.config.encoder_ffn_dim == 128
    assert list(tmp_path.iterdir()) == []


def test_all_neurons_count_is_rejected():
    from transformers import WhisperConfig

    cfg = WhisperConfig(encoder_ffn_dim=128, decoder_ffn_dim=128)
    assert ffn_removal_counts(cfg, 0.5, 0.25) == {"encoder": 64, "decoder": 32}
    with pytest.raises(StructuredError, match="every neuron"):
        ffn_removal_counts(cfg, 0.9999, 0.0)


def test_missing_hessian_and_nonuniform_shapes_raise_before_writing(tiny_model, tmp_path):
    base, feats, dec = tiny_model
    model = _clone(base)
    H = _hessians(model, feats, dec)
    H.pop("model.decoder.layers.1.fc2")

    def get(name):
        if name not in H:
            raise ValueError(f"no Hessian for {name}")
        return H[name]

    before = _state(model)
    with pytest.raises(StructuredError, match="decoder.layers.1"):
        prune_ffn_model(model, 0.5, 0.5, get, "obs")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # one layer shrunk by hand: the config cannot express it, so nothing may be written
    plan = plan_ffn_pruning(model, 0.5, 0.0, get, "obs")
    layer = model.model.encoder.layers[0]
    res = plan["model.encoder.layers.0"]
    layer.fc1 = torch.nn.Linear(64, len(res.kept))
    layer.fc2 = torch.nn.Linear(len(res.kept), 64)
    with pytest.raises(StructuredError, match="cannot express"):
        save_structured(model, None, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ real model + CTranslate2
HESSIANS = Path(os.environ.get("WHISPER_OBS_TINY_HESSIANS", "/work/hessians-tiny"))


def test_bundled_tiny_ct2_export(tmp_path):
    """Shrink tiny.en 25%/25% (magnitude: no Hessians needed), save, reload, convert to CT2."""
    ct2 = pytest.importorskip("ctranslate2")
    from transformers import WhisperForConditionalGeneration

    from whisper_obs_pruning.whisper.loading import load_whisper

    try:
        model, processor = load_whisper("bundled:tiny.en")
    except Exception as exc:  # the bundled weights are an optional extra
        pytest.skip(f"bundled tiny.en unavailable: {exc}")
    prune_ffn_model(model, 0.25, 0.25, None, "magnitude")
    out = save_structured(model, processor, tmp_path / "hf")
    loaded = WhisperForConditionalGeneration.from_pretrained(out)
    assert loaded.model.encoder.layers[0].fc1.out_features == 1152
    ct2_dir = tmp_path / "ct2"
    ct2.converters.TransformersConverter(str(out)).convert(str(ct2_dir), quantization="int8")
    w = ct2.models.Whisper(str(ct2_dir), device="cpu", compute_type="int8", intra_threads=1)
    feats = torch.zeros(1, 80, 3000).numpy()
    res = w.generate(ct2.StorageView.from_array(feats), [[50257, 50362]], max_length=8)
    assert len(res) == 1


def test_sequential_recalibration_on_bundled_tiny():
    """Layer 0 sees the dense input either way: it must equal one-shot OBS; the rest shrinks."""
    import copy

    from whisper_obs_pruning.hessians.calibration import teacher_forced_batches
    from whisper_obs_pruning.hessians.collector import HessianCollector
    from whisper_obs_pruning.speech.datasets import load_utterances
    from whisper_obs_pruning.structured.sequential import prune_ffn_sequential
    from whisper_obs_pruning.whisper.loading import load_whisper
    from whisper_obs_pruning.whisper.prompt import decoder_prompt_ids

    try:
        model, processor = load_whisper("bundled:tiny.en")
    except Exception as exc:
        pytest.skip(f"bundled tiny.en unavailable: {exc}")
    clips = load_utterances("embedded", "calibration", limit=2).utterances
    seq = copy.deepcopy(model)
    with pytest.raises(StructuredError):
        prune_ffn_sequential(seq, processor, clips, 1.0, 0.0)
    report = prune_ffn_sequential(
        seq, processor, clips, 0.25, 0.5, "obs", batch_size=2, per_step=32
    )
    assert (seq.config.encoder_ffn_dim, seq.config.decoder_ffn_dim) == (1152, 768)
    assert len(report["layers"]) == 8
    fc2 = model.model.encoder.layers[0].fc2
    prompt = decoder_prompt_ids(model, processor)
    with HessianCollector({"e0": fc2}, stop_after="e0") as col:
        for feats, _, masks in teacher_forced_batches(clips, processor, prompt, 2):
            col.new_batch(masks)
            with contextlib.suppress(StopForward), torch.no_grad():
                model.model.encoder(feats)
    H = col.hessians(["e0"])["e0"].hessian()
    one = prune_ffn(
        model.model.encoder.layers[0].fc1.weight, fc2.weight, H, 384, "obs", per_step=32
    )
    torch.testing.assert_close(seq.model.encoder.layers[0].fc2.weight, one.fc2_weight)


def test_drop_decoder_layers_loads_and_matches(tiny_model, tmp_path):
    from transformers import WhisperForConditionalGeneration

    from whisper_obs_pruning.structured.layers import drop_decoder_layers

    base, feats, dec = tiny_model
    model = _clone(base)
    before = _state(model)
    for bad in ([2], [-1], [0, 1]):
        with pytest.raises(StructuredError):
            drop_decoder_layers(model, bad)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    drop_decoder_layers(model, [0])
    assert model.config.decoder_layers == 1
    assert model.model.decoder.layers[0].self_attn.layer_idx == 0
    out = save_structured(model, None, tmp_path / "m")
    loaded = WhisperForConditionalGeneration.from_pretrained(out).eval()
    torch.testing.assert_close(_logits(loaded, feats, dec), _logits(model, feats, dec))
    # the KV cache path (layer_idx renumbered) gives the same last-step logits
    with torch.no_grad():
        full = loaded(input_features=feats, decoder_input_ids=dec).logits[:, -1]
        enc = loaded.model.encoder(feats).last_hidden_state
        o = loaded(encoder_outputs=(enc,), decoder_input_ids=dec[:, :-1], use_cache=True)
        step = loaded(
            encoder_outputs=(enc,),
            decoder_input_ids=dec[:, -1:],
            cache=o.past_key_values,
            use_cache=True,
        ).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-4)


def test_prune_decoder_layers_greedy_on_bundled_tiny():
    from whisper_obs_pruning.speech.datasets import load_utterances
    from whisper_obs_pruning.structured.layers import _batches, _ce, prune_decoder_layers
    from whisper_obs_pruning.whisper.loading import load_whisper

    try:
        model, processor = load_whisper("bundled:tiny.en")
    except Exception as exc:
        pytest.skip(f"bundled tiny.en unavailable: {exc}")
    clips = load_utterances("embedded", "calibration", limit=2).utterances
    with pytest.raises(StructuredError):
        prune_decoder_layers(model, processor, clips, 4)
    rep = prune_decoder_layers(model, processor, clips, 1, batch_size=2)
    first = rep["history"][1]
    assert rep["removed"] == [min(first["scores"], key=first["scores"].get)]
    assert model.config.decoder_layers == 3 == len(model.model.decoder.layers)
    batches = _batches(model, processor, clips, 2)
    after = _ce(model, batches, list(model.model.decoder.layers))
    assert after == pytest.approx(first["loss"], rel=1e-5)
