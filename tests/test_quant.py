"""Quantization math (grids, RTN, GPTQ, masks) and the quantized checkpoint, on small inputs."""

from __future__ import annotations

import json

import pytest
import torch

from whisper_obs_pruning.quant import (
    QuantCheckpointError,
    QuantError,
    QuantSpec,
    compute_grid,
    dequantize,
    layer_loss,
    load_quantized,
    load_quantized_state_dict,
    parse_scheme,
    quantize_gptq,
    quantize_rtn,
    save_quantized,
)
from whisper_obs_pruning.quant.checkpoint import CONFIG_NAME, WEIGHTS_NAME


def problem(rows=24, cols=96, n=400, seed=0, dead=()):
    """(W, H) with strongly correlated inputs (so error feedback matters)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    X = torch.randn(n, cols, generator=g) @ mix
    X[:, list(dead)] = 0
    H = (2 / n * X.T @ X).double()
    W = torch.randn(rows, cols, generator=g)
    return W, H


def assert_on_grid(res):
    spec = res.spec
    assert res.codes.dtype == torch.uint8 and int(res.codes.max()) <= spec.maxq
    assert res.scale.dtype == torch.float16 and bool((res.scale > 0).all())
    assert bool(torch.isfinite(res.scale).all())
    assert int(res.zero.max()) <= spec.maxq
    if spec.symmetric:
        assert bool((res.zero == 2 ** (spec.bits - 1)).all())
    # weight == scale * (code - zero), recomputed independently of dequantize()
    cols = res.codes.shape[1]
    gs = cols if spec.group_size is None else spec.group_size
    gidx = torch.arange(cols) // gs
    expect = res.scale.float()[:, gidx] * (res.codes.float() - res.zero.float()[:, gidx])
    assert torch.equal(res.weight, expect)
    assert bool(torch.isfinite(res.weight).all())


# ---------------------------------------------------------------- specs
@pytest.mark.parametrize(
    "name, spec",
    [
        ("int8", QuantSpec(8)),
        ("int4", QuantSpec(4)),
        ("int4-g128", QuantSpec(4, True, 128)),
        ("int4-g64", QuantSpec(4, True, 64)),
        ("int3-g128", QuantSpec(3, True, 128)),
        ("int4-g128-asym", QuantSpec(4, False, 128)),
        ("INT8-asym", QuantSpec(8, False)),
    ],
)
def test_parse_scheme(name, spec):
    assert parse_scheme(name) == spec
    assert parse_scheme(spec.name) == spec


def test_parse_none():
    assert parse_scheme("none") is None and parse_scheme(None) is None


@pytest.mark.parametrize(
    "bad, needle",
    [("int9", "9"), ("int1", "1"), ("int4-g0", "0"), ("fp4", "fp4"), ("int4-g", "int4-g")],
)
def test_bad_scheme_names_the_value(bad, needle):
    with pytest.raises(QuantError, match=needle):
        parse_scheme(bad)


@pytest.mark.parametrize(
    "kwargs, needle", [({"bits": 16}, "16"), ({"bits": 4, "group_size": -8}, "-8")]
)
def test_bad_spec(kwargs, needle):
    with pytest.raises(QuantError, match=needle):
        QuantSpec(**kwargs)
    assert issubclass(QuantError, ValueError)


# ---------------------------------------------------------------- GPTQ vs RTN
@pytest.mark.parametrize("scheme", ["int4", "int3", "int4-g32", "int3-g32", "int4-g32-asym"])
def test_gptq_beats_rtn(scheme):
    W, H = problem()
    rtn = quantize_rtn(W, scheme, H=H)
    gptq = quantize_gptq(W, H, scheme)
    assert gptq.info["loss"] < 0.8 * rtn.info["loss"]
    assert_on_grid(rtn)
    assert_on_grid(gptq)
    # the reported loss is tr(dW H dW^T)
    dW = (W - gptq.weight).double()
    assert gptq.info["loss"] == pytest.approx(float(torch.trace(dW @ H @ dW.T)), rel=1e-6)


def test_gptq_loss_is_sum_of_scaled_errors():
    """With err_i = (w_i - q_i)/U_ii, tr(dW H_damped dW^T) = sum err^2 exactly."""
    W, H = problem(seed=3)
    res = quantize_gptq(W, H, "int4-g32")
    Hd = H.clone()
    Hd.diagonal().add_(res.info["damp"])
    dW = (W - res.weight).double()
    assert res.info["loss_damped"] == pytest.approx(float(((dW @ Hd) * dW).sum()), rel=1e-4)


def test_act_order_on_grid_and_better_than_rtn():
    W, H = problem(seed=1)
    res = quantize_gptq(W, H, "int4-g32", act_order=True)
    assert_on_grid(res)
    assert res.info["loss"] < quantize_rtn(W, "int4-g32", H=H).info["loss"]


def test_rtn_is_nearest_grid_point():
    W, _ = problem(rows=5, cols=40)
    res = quantize_rtn(W, "int3-g16-asym")
    spec = res.spec
    gidx = torch.arange(40) // 16
    s, z = res.scale.float()[:, gidx], res.zero.float()[:, gidx]
    levels = torch.arange(spec.maxq + 1).float()
    grid = s[..., None] * (levels - z[..., None])  # [rows, cols, levels]
    best = (grid - W[..., None]).abs().min(-1).values
    assert torch.allclose((res.weight - W).abs(), best, atol=1e-6)


@pytest.mark.parametrize("cols", [1, 2])
def test_tiny_case_equals_brute_force(cols):
    """1 column: GPTQ = the best grid point under H. 2 columns: column 0 is rounded to nearest,
    then column 1 is the best grid point *given* q0, over all grid points (the OBS update)."""
    W, H = problem(rows=6, cols=cols, n=50, seed=7)
    spec = QuantSpec(3, symmetric=False)
    res = quantize_gptq(W, H, spec, rel_damp=0.0)
    scale, zero = compute_grid(W, spec)
    assert torch.equal(res.scale.float(), scale) and torch.equal(res.zero.float(), zero)
    levels = torch.arange(spec.maxq + 1).float()
    for r in range(W.shape[0]):
        grid = scale[r, 0] * (levels - zero[r, 0])
        if cols == 1:
            best = grid[((W[r, 0] - grid) ** 2).argmin()]
            assert float(res.weight[r, 0]) == float(best)
            continue
        q0 = grid[(W[r, 0] - grid).abs().argmin()]
        assert float(res.weight[r, 0]) == float(q0)
        losses = [
            float(
                (W[r] - torch.stack([q0, q1])).double()
                @ H
                @ (W[r] - torch.stack([q0, q1])).double()
            )
            for q1 in grid
        ]
        got = (W[r] - res.weight[r]).double()
        assert float(got @ H @ got) == pytest.approx(min(losses), rel=1e-9, abs=1e-12)
    if cols == 2:
        assert res.info["loss"] <= quantize_rtn(W, spec, H=H).info["loss"] + 1e-12


# ---------------------------------------------------------------- groups, zeros, dead inputs
def test_group_size_not_dividing_inputs():
    W, H = problem(rows=8, cols=100)
    for fn in (lambda s: quantize_rtn(W, s, H=H), lambda s: quantize_gptq(W, H, s)):
        res = fn("int4-g32")
        assert res.scale.shape == (8, 4)  # 32 + 32 + 32 + 4
        assert_on_grid(res)
    last = W[:, 96:].abs().amax(1)  # RTN's last (short) group: its own 4 inputs
    rtn = quantize_rtn(W, "int4-g32")
    assert torch.allclose(rtn.scale[:, 3].float(), 2 * last / 15, rtol=1e-3)
    assert (
        quantize_gptq(W, H, "int4-g32").info["loss"] < quantize_rtn(W, "int4-g32", H=H).info["loss"]
    )


def test_group_larger_than_row():
    W, H = problem(rows=4, cols=20)
    res = quantize_gptq(W, H, "int4-g128")
    assert res.scale.shape == (4, 1)
    assert_on_grid(res)


@pytest.mark.parametrize("scheme", ["int4", "int4-g16", "int3-g16-asym", "int8"])
def test_zero_rows_groups_and_dead_inputs_are_finite(scheme):
    W, H = problem(rows=10, cols=64, dead=(3, 17, 40))
    W[2] = 0  # all-zero row
    W[5, 16:32] = 0  # all-zero group
    for res in (quantize_rtn(W, scheme, H=H), quantize_gptq(W, H, scheme)):
        assert_on_grid(res)
        assert bool(torch.isfinite(torch.tensor(res.info["loss"])))
        assert bool((res.weight[2] == 0).all())
    assert bool((quantize_rtn(W, scheme).weight[5, 16:32] == 0).all())
    Z = torch.zeros(3, 64)
    res = quantize_gptq(Z, torch.zeros(64, 64, dtype=torch.float64), scheme)
    assert_on_grid(res) or True
    assert bool((res.weight == 0).all())


def test_zero_is_exactly_representable():
    W, _ = problem(rows=8, cols=64)
    W = W + 3.0  # all positive: asymmetric grid still contains 0
    for scheme in ("int4-g16-asym", "int3-asym", "int4-g16"):
        spec = parse_scheme(scheme)
        scale, zero = compute_grid(W, spec)
        assert bool((zero == zero.round()).all())
        z = dequantize(zero.to(torch.uint8)[:, spec.group_index(64)], scale, zero, spec)
        assert bool((z == 0).all())


# ---------------------------------------------------------------- fixed pruning mask
@pytest.mark.parametrize("scheme", ["int4-g32", "int8", "int3-asym"])
def test_mask_is_respected(scheme):
    W, H = problem(seed=5)
    mask = torch.rand(W.shape, generator=torch.Generator().manual_seed(1)) < 0.5
    Wp = W.masked_fill(mask, 0)
    for res in (quantize_rtn(Wp, scheme, H=H, mask=mask), quantize_gptq(Wp, H, scheme, mask=mask)):
        assert bool((res.weight[mask] == 0).all())
        assert not torch.signbit(res.weight[mask]).any()  # +0.0, not -0.0
        assert_on_grid(res)
        assert torch.equal(res.codes[mask], res.zero[:, res.spec.group_index(96)][mask])
    g = quantize_gptq(Wp, H, scheme, mask=mask)
    r = quantize_rtn(Wp, scheme, H=H, mask=mask)
    assert g.info["loss"] < r.info["loss"]


def test_bad_mask_shape():
    W, H = problem(rows=4, cols=16)
    with pytest.raises(QuantError, match="mask shape"):
        quantize_gptq(W, H, "int4", mask=torch.zeros(4, 15, dtype=torch.bool))


# ---------------------------------------------------------------- checkpoint
def small_whisper():
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    cfg = WhisperConfig(
        vocab_size=300,
        num_mel_bins=8,
        d_model=64,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=96,
        decoder_ffn_dim=96,
        max_source_positions=16,
        max_target_positions=16,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=3,
        begin_suppress_tokens=None,
        suppress_tokens=None,
    )
    torch.manual_seed(0)
    return WhisperForConditionalGeneration(cfg).eval()


def quantize_model(model, scheme, sparsity=0.0):
    results = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "proj_out":
            W = mod.weight.detach().clone()
            mask = None
            if sparsity:
                mask = W.abs() <= W.abs().quantile(sparsity)
                W = W.masked_fill(mask, 0)
            cols = W.shape[1]
            X = torch.randn(200, cols)
            res = quantize_gptq(W, 2 / 200 * X.T @ X, scheme, mask=mask, loss=False)
            with torch.no_grad():
                mod.weight.copy_(res.weight)
            results[name] = res
    return results


@pytest.mark.parametrize(
    "scheme, sparsity, other",
    [
        ("int4-g32", 0.5, "float32"),
        ("int8", 0.0, "float16"),
        ("int3-g32-asym", 0.5, "float16"),
    ],
)
def test_checkpoint_round_trip_bit_exact(tmp_path, scheme, sparsity, other):
    model = small_whisper()
    results = quantize_model(model, scheme, sparsity)
    summary = save_quantized(model, results, tmp_path / "q", other_dtype=other)
    if sparsity:
        assert summary["formats"].get("q-bitmask")
    state = load_quantized_state_dict(tmp_path / "q")
    for key, t in model.state_dict().items():
        got = state[key]
        base = key.removesuffix(".weight")
        if base in results:
            assert torch.equal(got.view(torch.int32), t.view(torch.int32)), key
        elif t.is_floating_point() and other == "float16":
            assert torch.equal(got, t.half().float()), key
        else:
            assert torch.equal(got, t), key
    loaded = load_quantized(tmp_path / "q")
    assert loaded.proj_out.weight.data_ptr() == loaded.model.decoder.embed_tokens.weight.data_ptr()
    for name in results:
        assert torch.equal(dict(loaded.named_modules())[name].weight, results[name].weight)


def test_rounded_model_equals_loaded_model(tmp_path):
    from whisper_obs_pruning.quant.checkpoint import round_unquantized_

    model = small_whisper()
    results = quantize_model(model, "int4-g32", 0.5)
    round_unquantized_(model, results, "float16")
    save_quantized(model, results, tmp_path / "q", other_dtype="float16")
    state = load_quantized_state_dict(tmp_path / "q")
    for key, t in model.state_dict().items():
        assert torch.equal(state[key].view(torch.uint8), t.contiguous().view(torch.uint8)), key


def test_checkpoint_is_small(tmp_path):
    model = small_whisper()
    results = quantize_model(model, "int4-g32", 0.5)
    save_quantized(model, results, tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / CONFIG_NAME).read_text())
    meta = cfg["tensors"]["model.encoder.layers.0.fc1.weight"]
    assert meta["format"] == "q-bitmask" and meta["bits"] == 4
    n = 96 * 64
    # kept codes at 4 bits + 1 mask bit per weight + scales: well under 3/8 byte per weight
    from safetensors.torch import load_file

    t = load_file(str(tmp_path / "q" / WEIGHTS_NAME))
    k = "model.encoder.layers.0.fc1.weight::"
    nbytes = sum(t[k + s].numel() * t[k + s].element_size() for s in ("codes", "mask", "scale"))
    assert nbytes < 0.375 * n + 96 * 2 * 2 + 2


def test_checkpoint_refuses_unquantized_weight(tmp_path):
    model = small_whisper()
    results = quantize_model(model, "int4")
    with torch.no_grad():
        model.model.encoder.layers[0].fc1.weight[0, 0] += 1e-3
    with pytest.raises(QuantCheckpointError, match="fc1"):
        save_quantized(model, results, tmp_path / "q")


@pytest.mark.parametrize("damage", ["truncate", "flip", "config"])
def test_checkpoint_refuses_damaged_files(tmp_path, damage):
    model = small_whisper()
    results = quantize_model(model, "int4-g32", 0.5)
    save_quantized(model, results, tmp_path / "q")
    wpath = tmp_path / "q" / WEIGHTS_NAME
    data = bytearray(wpath.read_bytes())
    if damage == "truncate":
        wpath.write_bytes(bytes(data[: len(data) - 100]))
        match = "truncated or was modified"
    elif damage == "flip":
        data[-50] ^= 1
        wpath.write_bytes(bytes(data))
        match = "truncated or was modified"
    else:  # a table edited to claim another group size: the tensor sha256 check catches it
        cpath = tmp_path / "q" / CONFIG_NAME
        cfg = json.loads(cpath.read_text())
        meta = cfg["tensors"]["model.encoder.layers.0.fc1.weight"]
        meta["symmetric"] = False
        cpath.write_text(json.dumps(cfg))
        match = "fc1"
    with pytest.raises(QuantCheckpointError, match=match):
        load_quantized_state_dict(tmp_path / "q")


def test_layer_loss_matches_trace():
    W, H = problem(rows=5, cols=12)
    Q = quantize_rtn(W, "int4").weight
    loss, rel = layer_loss(W, Q, H)
    dW = (W - Q).double()
    Wd = W.double()
    assert loss == pytest.approx(float(torch.trace(dW @ H @ dW.T)))
    assert rel == pytest.approx(loss / float(torch.trace(Wd @ H @ Wd.T)))


def test_act_order_with_mask_and_groups():
    W, H = problem(seed=9)
    mask = torch.rand(W.shape, generator=torch.Generator().manual_seed(2)) < 0.3
    Wp = W.masked_fill(mask, 0)
    res = quantize_gptq(Wp, H, "int4-g32-asym", mask=mask, act_order=True)
    assert_on_grid(res)
    assert bool((res.weight[mask] == 0).all())
    assert int((res.weight != 0).sum()) <= int((~mask).sum())
    assert res.info["loss"] < quantize_rtn(Wp, "int4-g32-asym", H=H, mask=mask).info["loss"]


def test_tied_embedding_is_quantized_once_through_proj_out(tmp_path):
    """quant.embedding: the token embedding (Whisper's largest tensor) is quantized as
    ``proj_out`` with its own scheme; the tied embedding reads the same codes, is stored once,
    and the checkpoint is smaller than with a float16 embedding."""
    from whisper_obs_pruning.quant.apply import embedding_layer, quantize_layers
    from whisper_obs_pruning.quant.checkpoint import checkpoint_summary

    sizes = {}
    for emb in (None, "int4-g32"):
        model = small_whisper()
        assert embedding_layer(model) == "proj_out"
        names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        targets = [n for n in names if n != "proj_out"]
        g = torch.Generator().manual_seed(1)
        hess = {}
        for n in names:
            X = torch.randn(300, dict(model.named_modules())[n].in_features, generator=g)
            hess[n] = 2 / 300 * X.T @ X
        results, _ = quantize_layers(
            model, targets, hess.__getitem__, parse_scheme("int8"), progress=False,
            layer_specs={"proj_out": parse_scheme(emb)} if emb else None,
        )  # fmt: skip
        assert ("proj_out" in results) == (emb is not None)
        emb_w = model.model.decoder.embed_tokens.weight
        assert emb_w.data_ptr() == model.proj_out.weight.data_ptr()  # still tied
        if emb:
            assert results["proj_out"].spec == parse_scheme(emb)
            assert torch.equal(emb_w, results["proj_out"].weight)  # exactly the grid's values
        save_quantized(model, results, tmp_path / str(emb))
        loaded = load_quantized(tmp_path / str(emb))
        assert torch.equal(loaded.model.decoder.embed_tokens.weight, emb_w)
        cfg = json.loads((tmp_path / str(emb) / CONFIG_NAME).read_text())
        assert len(cfg["aliases"]) == 1  # the embedding and proj_out: one tensor on disk
        sizes[emb] = checkpoint_summary(tmp_path / str(emb))["weights_bytes"]
    # 300 x 64 embedding: fp16 38,400 bytes -> int4 9,600 + scales 1,200
    assert sizes[None] - sizes["int4-g32"] > 25_000


def test_untied_output_projection_has_no_embedding_layer():
    from whisper_obs_pruning.quant.apply import embedding_layer

    model = small_whisper()
    model.proj_out.weight = torch.nn.Parameter(model.proj_out.weight.detach().clone())
    assert embedding_layer(model) is None
