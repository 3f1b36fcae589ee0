"""Export to CTranslate2 / faster-whisper: the float32 export decodes like our PyTorch model."""

from __future__ import annotations

import pytest

ctranslate2 = pytest.importorskip("ctranslate2")

from whisper_obs_pruning.whisper.ct2_export import CT2ExportError, ct2_generate, export_ct2  # noqa: E402
from whisper_obs_pruning.whisper.decoding import (  # noqa: E402
    default_token_cap,
    log_mel_features,
    transcribe_tokens,
)
from whisper_obs_pruning.whisper.prompt import decoder_prompt_ids  # noqa: E402


def test_float32_export_transcribes_token_for_token_like_pytorch(tiny, eval_utts, tmp_path):
    model, processor = tiny
    hf = tmp_path / "hf"
    model.save_pretrained(hf)
    processor.save_pretrained(hf)
    out = export_ct2(hf, tmp_path / "ct2", "float32")
    assert (out / "model.bin").is_file() and (out / "tokenizer.json").is_file()
    audios = [u.audio for u in eval_utts[:4]]
    ours = transcribe_tokens(model, processor, audios, batch_size=4, progress=False)
    prompt = decoder_prompt_ids(model, processor)
    caps = [default_token_cap(len(a) / 16000, len(prompt), 448) for a in audios]
    feats = log_mel_features(processor, audios).numpy()
    theirs = ct2_generate(out, feats, prompt, caps, eot=model.generation_config.eos_token_id)
    assert theirs == ours


def test_bad_quantization_and_non_model_dirs_are_refused(tmp_path):
    with pytest.raises(CT2ExportError, match="int3"):
        export_ct2(tmp_path, tmp_path / "o", "int3")
    with pytest.raises(CT2ExportError, match="no config.json"):
        export_ct2(tmp_path, tmp_path / "o", "int8")
    assert not (tmp_path / "o").exists()


def test_ct2_backend_scores_dense_and_pruned_models_like_torch(fresh_tiny, eval_utts):
    """`evaluate.backend: ct2` is a speed change only (issue 17): on a dense and on a pruned
    model (magnitude 70%, which loops until the token cap) the hypotheses, WER and CER equal
    the torch decoder's, clip for clip."""
    import torch

    from whisper_obs_pruning.methods import prune_layer
    from whisper_obs_pruning.speech.scoring import evaluate_model

    model, processor = fresh_tiny
    utts = eval_utts[:6]
    for pruned in (False, True):
        if pruned:
            for mod in model.modules():
                if isinstance(mod, torch.nn.Linear) and mod.weight.shape[0] != 51864:
                    res = prune_layer(mod.weight.data, None, method="magnitude", sparsity=0.7)
                    mod.weight.data = res.weight.to(mod.weight.dtype)
        runs = {
            b: evaluate_model(model, processor, utts, batch_size=3, progress=False, backend=b)
            for b in ("torch", "ct2")
        }
        (m_t, rows_t), (m_c, rows_c) = runs["torch"], runs["ct2"]
        assert [r["hypothesis"] for r in rows_c] == [r["hypothesis"] for r in rows_t], pruned
        assert (m_c["wer"], m_c["cer"]) == (m_t["wer"], m_t["cer"])
    assert m_t["wer"] > 0.5  # the pruned model really is degenerate: the caps were exercised


def test_converting_in_memory_leaves_the_model_as_it_was(fresh_tiny, eval_utts):
    """CTranslate2's quantizing conversion rewrote the weights it was handed (a second int8
    conversion of the same model decoded "He He He ..."): every type must leave the PyTorch
    model bit for bit as it was, and two int8 exports of it must decode alike."""
    import torch

    from whisper_obs_pruning.whisper.ct2_export import CT2Whisper

    model, processor = fresh_tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    audios = [u.audio for u in eval_utts[:2]]
    first = CT2Whisper(model, processor, quantization="int8", threads=1).tokens(audios)
    for quantization in ("int8_float32", "float32"):
        CT2Whisper(model, processor, quantization=quantization, threads=1)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    again = CT2Whisper(model, processor, quantization="int8", threads=1)
    assert again.tokens(audios) == first
    assert 30e6 < again.model_bytes < 50e6  # int8 weights: about a quarter of float32's 151 MB
    assert len(set(first[0])) > 3  # real words, not a one-token loop
