"""Sparse export: exact round trip, real compression, loud failures on damaged files.

Why these: a pruned checkpoint is only useful if it reloads to the very same weights (bit for
bit: the pruning result is the experiment), if it is actually smaller than ``save_pretrained``
(otherwise the format is pointless), and if a damaged file can never load as a silently
different model. Pruning here is per-layer magnitude (no Hessians needed) on the real tiny.en.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from whisper_obs_pruning.methods import prune_layer
from whisper_obs_pruning.pruning import select_targets
from whisper_obs_pruning.whisper.decoding import transcribe
from whisper_obs_pruning.whisper.sparse_checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    SparseFormatError,
    decode_tensor,
    encode_tensor,
    load_sparse,
    save_sparse,
    sparse_size_report,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"u50": (0.5, None), "u70": (0.7, None), "2:4": (0.0, "2:4")}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view, so equality is bitwise (-0.0 != +0.0, NaN payloads compared)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.detach().contiguous().view(ints[t.element_size()])


def _assert_bit_identical(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape, k
        assert torch.equal(_bits(sa[k]), _bits(sb[k])), k


def _targets(model: nn.Module) -> list[str]:
    return select_targets([n for n, m in model.named_modules() if isinstance(m, nn.Linear)])


def _pruned(model: nn.Module, sparsity: float, pattern: str | None) -> nn.Module:
    m = copy.deepcopy(model)
    with torch.no_grad():
        for name in _targets(m):
            w = m.get_submodule(name).weight
            res = prune_layer(w.data, None, method="magnitude", sparsity=sparsity, pattern=pattern)
            w.copy_(res.weight)
    return m


@pytest.fixture(scope="module")
def pruned(tiny):
    """{label: pruned deep copy of tiny.en}."""
    model, _ = tiny
    return {label: _pruned(model, sp, pat) for label, (sp, pat) in CONFIGS.items()}


@pytest.fixture(scope="module")
def saved(pruned, tmp_path_factory):
    """{label: (sparse dir, save_sparse summary)}."""
    root = tmp_path_factory.mktemp("sparse")
    out = {}
    for label, model in pruned.items():
        d = root / label.replace(":", "_")
        out[label] = (d, save_sparse(model, d, targets=_targets(model)))
    return out


# ----------------------------------------------------------------------- round trip


@pytest.mark.parametrize("label", list(CONFIGS))
def test_roundtrip_is_bit_identical(pruned, saved, label):
    from transformers import WhisperProcessor

    out_dir, info = saved[label]
    n = len(_targets(pruned[label]))
    if label == "2:4":
        assert info["n_2_4"] == n and info["n_bitmask"] == 0
    else:
        assert info["n_bitmask"] == n and info["n_2_4"] == 0
    assert info["aliases"] == {"proj_out.weight": "model.decoder.embed_tokens.weight"}
    loaded = load_sparse(out_dir)
    _assert_bit_identical(pruned[label], loaded)
    assert loaded.proj_out.weight is loaded.model.decoder.embed_tokens.weight  # still tied
    assert not loaded.training
    assert loaded.generation_config.no_timestamps_token_id == 50362
    proc = WhisperProcessor.from_pretrained(out_dir)
    assert proc.tokenizer.decode([50257, 50362, 18435, 995, 50256], skip_special_tokens=True) == (
        " Hello world"
    )
    cfg = json.loads((out_dir / CONFIG_NAME).read_text())
    assert cfg["format_version"] == 1
    assert cfg["tensors"]["model.encoder.layers.0.fc1.weight"]["format"] in ("bitmask", "2:4")
    assert not list(out_dir.parent.glob(".*.tmp-*"))  # atomic write left no temp dir


def test_sparse_dir_is_smaller_than_save_pretrained(tiny, pruned, saved, tmp_path):
    _, processor = tiny
    dense = tmp_path / "dense"
    pruned["u50"].save_pretrained(dense)
    processor.save_pretrained(dense)
    r = sparse_size_report(dense, saved["u50"][0])
    # 50% of the Linear weights gone: values (4 B) for half + 1 bit mask each = 53% of them;
    # the 80 MB token embedding stays dense, so the whole directory shrinks to ~0.82.
    assert r["sparse_tensors_ratio"] == pytest.approx(0.53125, abs=1e-4)
    assert r["weights_ratio"] < 0.82 and r["dir_ratio"] < 0.85
    r24 = sparse_size_report(dense, saved["2:4"][0])
    assert r24["sparse_tensors_ratio"] == pytest.approx(0.53125, abs=1e-4)
    r70 = sparse_size_report(dense, saved["u70"][0])
    assert r70["weights_ratio"] < r["weights_ratio"] - 0.05


def test_loaded_model_transcribes_like_the_pruned_one(tiny, pruned, saved, eval_utts):
    _, processor = tiny
    clips = [u.audio for u in eval_utts[:2]]
    want = transcribe(pruned["u50"], processor, clips, batch_size=2, progress=False)
    got = transcribe(load_sparse(saved["u50"][0]), processor, clips, batch_size=2, progress=False)
    assert got == want and all(t.strip() for t in want), want


# ----------------------------------------------------------------------- damaged files


def _copy_dir(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_truncated_or_corrupt_files_fail_clearly(saved, tmp_path):
    src = saved["u50"][0]

    d = _copy_dir(src, tmp_path / "cut")
    w = d / WEIGHTS_NAME
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(SparseFormatError, match="truncated or corrupt"):
        load_sparse(d)
    w.write_bytes(data[:5])
    with pytest.raises(SparseFormatError, match="truncated or corrupt"):
        load_sparse(d)

    # A flipped byte in the data: safetensors cannot see it, the sha256 check must.
    d = _copy_dir(src, tmp_path / "flip")
    w = d / WEIGHTS_NAME
    data = bytearray(w.read_bytes())
    data[-1000] ^= 0x40
    w.write_bytes(bytes(data))
    with pytest.raises(SparseFormatError, match="sha256|corrupt"):
        load_sparse(d)

    d = _copy_dir(src, tmp_path / "cfg")
    (d / CONFIG_NAME).write_text("{not json")
    with pytest.raises(SparseFormatError, match="corrupt JSON"):
        load_sparse(d)
    cfg = json.loads((src / CONFIG_NAME).read_text())
    cfg["format_version"] = 99
    (d / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(SparseFormatError, match="format_version 99"):
        load_sparse(d)
    (d / CONFIG_NAME).unlink()
    with pytest.raises(SparseFormatError, match="not a sparse model directory"):
        load_sparse(d)


# ----------------------------------------------------------------------- codec units


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_codec_exact_for_signed_zero_nan_and_odd_shapes(dtype):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(7, 13, generator=g).to(dtype)  # 91 elements: mask padding, cols % 4 != 0
    w[w.abs() < 0.6] = 0.0
    w[0, 0], w[1, 1], w[2, 2] = -0.0, float("nan"), float("inf")
    fmt, enc, meta = encode_tensor("w", w, sparse=True)
    assert fmt == "bitmask" and meta["nnz"] == int((_bits(w) != 0).sum())
    assert torch.equal(_bits(decode_tensor("w", meta, enc)), _bits(w))

    # 2:4 with groups holding 0, 1 or 2 non-zeros and an odd number of rows (index padding).
    w24 = torch.randn(3, 8, generator=g).to(dtype)
    keep = torch.tensor(
        [[1, 0, 1, 0, 0, 0, 0, 1], [0, 1, 1, 0, 1, 0, 0, 0], [0] * 4 + [1, 1, 0, 0]]
    )
    w24 = torch.where(keep.bool(), w24, torch.zeros((), dtype=dtype))
    w24[0, 0] = -0.0  # a kept slot holding -0.0
    fmt, enc, meta = encode_tensor("w", w24, sparse=True, force="2:4")  # bitmask is smaller here
    assert fmt == "2:4" and enc["w::idx"].numel() == 3  # 12 positions, 4 per byte
    assert torch.equal(_bits(decode_tensor("w", meta, enc)), _bits(w24))


def test_auto_format_choice_and_bad_targets(tiny, tmp_path):
    model, _ = tiny
    w = torch.randn(16, 16)
    assert encode_tensor("w", w)[0] == "dense"  # nothing pruned: sparse would be bigger
    w[:, ::2] = 0
    assert encode_tensor("w", w)[0] == "2:4"
    assert encode_tensor("w", w, sparse=False)[0] == "dense"
    with pytest.raises(ValueError, match="not an nn.Linear"):
        save_sparse(model, tmp_path / "x", targets=["model.encoder.conv1"])
    assert not (tmp_path / "x").exists()


def test_sparse_export_picks_the_smaller_of_2to4_and_bitmask():
    """Issue 16: at 99.9% sparsity a 2:4-compatible layer was stored 2:4 (35 MB, not 2 MB)."""
    from whisper_obs_pruning.whisper.sparse_checkpoint import decode_tensor, encode_tensor

    torch.manual_seed(0)
    w = torch.zeros(64, 256)
    w[torch.rand(64, 256) < 0.002] = 1.0  # very sparse, and every group of 4 has >= 2 zeros
    fmt, enc, meta = encode_tensor("w", w, sparse=True)
    assert fmt == "bitmask"
    half = torch.where(torch.arange(256) % 4 < 2, torch.randn(64, 256), 0.0)  # exactly 2:4
    fmt24, _, _ = encode_tensor("h", half, sparse=True)
    assert fmt24 == "2:4"
    assert torch.equal(decode_tensor("w", meta, enc), w)
