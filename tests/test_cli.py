"""The `whisper-obs` command line: evaluate any model on any folder in one command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "whisper_obs_pruning.pipeline.main", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )


def test_evaluate_a_model_on_a_folder(tmp_path):
    out = tmp_path / "m.json"
    proc = run(
        "evaluate",
        "--model",
        "bundled:tiny.en",
        "--data",
        str(REPO / "data" / "evaluation"),
        "--limit",
        "3",
        "--out",
        str(out),
        "--utterances",
        str(tmp_path / "u.csv"),
        "--no-progress",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads(out.read_text())
    assert metrics["num_utterances"] == 3 and 0 <= metrics["wer"] < 1
    assert "WER" in proc.stdout and len((tmp_path / "u.csv").read_text().splitlines()) == 4


def test_bad_folder_is_one_error_line_exit_2(tmp_path):
    proc = run("evaluate", "--model", "bundled:tiny.en", "--data", str(tmp_path / "nope"))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "error: data source" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_export_to_ctranslate2(tmp_path):
    proc = run("export", "--model", "bundled:tiny.en", "--out", str(tmp_path / "ct2"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "ct2" / "model.bin").is_file() and "int8" in proc.stdout
    assert (tmp_path / "ct2" / "model.bin").stat().st_size < 60e6  # int8: well under fp32's 151 MB


def test_shrink_gives_a_smaller_model_that_loads_with_from_pretrained(tmp_path):
    from transformers import WhisperForConditionalGeneration

    out = tmp_path / "small"
    proc = run(
        "shrink",
        "--method",
        "magnitude",
        "--encoder-ffn",
        "0.25",
        "--decoder-ffn",
        "0.5",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    model = WhisperForConditionalGeneration.from_pretrained(out)
    assert model.config.encoder_ffn_dim == 1152 and model.config.decoder_ffn_dim == 768
    assert model.model.encoder.layers[0].fc1.weight.shape == (1152, 384)
    card = (out / "README.md").read_text()  # the model card travels with the folder
    assert "base_model: openai/whisper-tiny.en" in card and "1152 / 768" in card
    assert "whisper-obs shrink --method magnitude" in card
    assert "whole FFN neurons removed" in card and "one-shot" not in card
    bad = run("shrink", "--encoder-ffn", "1.0", "--out", str(tmp_path / "none"))
    assert bad.returncode == 2 and "error:" in bad.stderr and not (tmp_path / "none").exists()


def test_a_programmatic_call_records_its_own_arguments_in_the_card(tmp_path, monkeypatch):
    from whisper_obs_pruning.pipeline.main import main

    monkeypatch.setattr(sys, "argv", ["pytest", "-k", "something else"])
    out = tmp_path / "small"
    argv = ["shrink", "--method", "magnitude", "--decoder-ffn", "0.25", "--out", str(out)]
    assert main(argv) == 0
    card = (out / "README.md").read_text()
    assert "whisper-obs shrink --method magnitude --decoder-ffn 0.25" in card
    assert "something else" not in card
