"""Hessian accumulation on the real tiny.en: exact sums, sharing, padding exclusion."""

from __future__ import annotations

import pytest
import torch

from whisper_obs_pruning.hessians.calibration import encoder_valid_frames, run_calibration
from whisper_obs_pruning.hessians.collector import HessianCollector, linear_layers
from whisper_obs_pruning.methods import prune_layer
from whisper_obs_pruning.whisper.prompt import decoder_prompt_ids

CHECK = [
    "model.encoder.layers.0.self_attn.q_proj",
    "model.encoder.layers.0.self_attn.k_proj",
    "model.encoder.layers.3.fc2",
    "model.decoder.layers.0.self_attn.v_proj",
    "model.decoder.layers.1.encoder_attn.k_proj",
    "model.decoder.layers.3.fc1",
    "proj_out",
]


def capture_inputs(model, names):
    """Plain hooks that keep every input (the thing the collector must not do)."""
    store = {n: [] for n in names}
    modules = dict(model.named_modules())
    handles = [
        modules[n].register_forward_pre_hook(
            lambda m, a, n=n: store[n].append(a[0].detach().clone())
        )
        for n in names
    ]
    return store, handles


def run(model, processor, utts, exclude_padding=True, diagonal=False, batch_size=4):
    layers = linear_layers(model)
    store, handles = capture_inputs(model, CHECK)
    with HessianCollector(layers, diagonal=diagonal) as col:
        counts = run_calibration(
            model,
            processor,
            utts,
            col,
            decoder_prompt_ids(model, processor),
            batch_size=batch_size,
            exclude_padding=exclude_padding,
            progress=False,
        )
    for h in handles:
        h.remove()
    return col, store, counts


def test_hessian_equals_direct_2_over_n_xtx(tiny, calib_utts):
    model, processor = tiny
    utts = calib_utts[:6]
    col, store, counts = run(model, processor, utts, exclude_padding=True)
    hs = col.hessians()
    assert len(hs) == 65  # every nn.Linear of Whisper tiny, proj_out included
    enc_valid = [encoder_valid_frames(len(u.audio)) for u in utts]
    for name in CHECK:
        rows = []
        for b, x in enumerate(store[name]):
            batch = utts[4 * b : 4 * b + 4]
            for i in range(x.shape[0]):
                if ".encoder." in name or "encoder_attn.k_proj" in name:
                    rows.append(x[i, : enc_valid[4 * b + i]])
                else:
                    ntok = counts_tokens(processor, model, batch[i])
                    rows.append(x[i, :ntok])
        X = torch.cat(rows).double()
        direct = 2.0 / X.shape[0] * X.T @ X
        got = hs[name]
        assert got.n_samples == X.shape[0], name
        assert torch.allclose(got.hessian(), direct, rtol=1e-4, atol=1e-6 * direct.abs().max()), (
            name
        )
    assert counts["encoder_frames"] == sum(enc_valid)


def counts_tokens(processor, model, utt):
    prompt = decoder_prompt_ids(model, processor)
    return len(prompt) + len(
        processor.tokenizer(" " + utt.text.strip(), add_special_tokens=False).input_ids
    )


def test_shared_inputs_are_accumulated_once(tiny, calib_utts):
    model, processor = tiny
    col, _, _ = run(model, processor, calib_utts[:2])
    shared = col.shared_with
    assert (
        shared["model.encoder.layers.0.self_attn.k_proj"]
        == "model.encoder.layers.0.self_attn.q_proj"
    )
    assert (
        shared["model.encoder.layers.0.self_attn.v_proj"]
        == "model.encoder.layers.0.self_attn.q_proj"
    )
    for i in range(4):
        for p in ("k_proj", "v_proj"):
            name = f"model.decoder.layers.{i}.encoder_attn.{p}"
            if name != "model.decoder.layers.0.encoder_attn.k_proj":
                assert shared[name] == "model.decoder.layers.0.encoder_attn.k_proj"
    assert "model.encoder.layers.0.fc1" not in shared
    # 65 layers, 4x(enc qkv) + 4x(dec qkv) + cross k/v -> 65 - 8*2 - 7 = 42 distinct inputs
    assert len(col.stats) == 65 - 16 - 7


def test_padding_exclusion_and_diagonal_mode(tiny, calib_utts):
    model, processor = tiny
    utts = calib_utts[:2]
    with_pad, _, _ = run(model, processor, utts, exclude_padding=False)
    no_pad, _, _ = run(model, processor, utts, exclude_padding=True, diagonal=True)
    name = "model.encoder.layers.1.fc1"
    assert with_pad.hessians()[name].n_samples == 2 * 1500
    assert no_pad.hessians()[name].n_samples == sum(
        encoder_valid_frames(len(u.audio)) for u in utts
    )
    assert no_pad.hessians()[name].is_diagonal
    # decoder rows never include batch padding in either mode
    dec = "model.decoder.layers.2.fc2"
    assert with_pad.hessians()[dec].n_samples == no_pad.hessians()[dec].n_samples


def test_second_order_reconstructs_real_activations_best(tiny):
    """On real held-out Whisper activations, OBS and SparseGPT beat diagonal and magnitude.

    16 clips give ~600 decoder tokens, more than the 384 inputs of the decoder layer tested.
    """
    from whisper_obs_pruning.speech.datasets import load_utterances

    model, processor = tiny
    utts = load_utterances("embedded", "calibration", limit=20).utterances
    names = ["model.encoder.layers.2.fc1", "model.decoder.layers.1.self_attn.out_proj"]
    col, _, _ = run(model, processor, utts[:16], exclude_padding=True, batch_size=8)
    held_utts = utts[16:20]
    held, handles = capture_inputs(model, names)
    with HessianCollector({}, diagonal=True) as dummy:
        run_calibration(
            model,
            processor,
            held_utts,
            dummy,
            decoder_prompt_ids(model, processor),
            batch_size=4,
            progress=False,
        )
    for h in handles:
        h.remove()
    modules = dict(model.named_modules())
    for name in names:
        x = held[name][0]
        if ".encoder." in name:  # the same rows the Hessian counts: audio frames, no padding
            X = torch.cat(
                [x[i, : encoder_valid_frames(len(u.audio))] for i, u in enumerate(held_utts)]
            )
        else:
            X = torch.cat(
                [x[i, : counts_tokens(processor, model, u)] for i, u in enumerate(held_utts)]
            )
        X = X.double()
        W = modules[name].weight.detach()
        H = col.hessians()[name].hessian()
        err = {}
        for method in ("magnitude", "diagonal", "sparsegpt", "obs"):
            res = prune_layer(W, H, method=method, sparsity=0.5, rel_damp=0.01)
            err[method] = float(
                ((W - res.weight).double() @ X.T).pow(2).sum() / (W.double() @ X.T).pow(2).sum()
            )
        assert max(err["sparsegpt"], err["obs"]) < min(err["magnitude"], err["diagonal"]), (
            name,
            err,
        )


@pytest.mark.parametrize("d", [5, 384, 385, 1000])
def test_add_gram_blocks_equal_the_full_product(d):
    """The upper-block Gram (with mirror) is the full X^T X, exactly symmetric."""
    from whisper_obs_pruning.hessians.collector import add_gram

    x = torch.randn(700, d, generator=torch.Generator().manual_seed(d))
    acc = torch.zeros(d, d, dtype=torch.float64)
    add_gram(acc, x, block=128)
    add_gram(acc, x, block=128)
    ref = 2 * x.double().T @ x.double()
    assert torch.equal(acc, acc.T)
    assert torch.allclose(acc, ref, rtol=1e-5, atol=1e-3)
