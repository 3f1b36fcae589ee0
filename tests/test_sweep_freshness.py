"""A sweep result never outlives the data, code or model it came from (issue 16, most serious).

Before: after a sweep, editing transcripts in the evaluation metadata and re-running gave
"already done, skipping" for every point and wrote the old WERs.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from whisper_obs_pruning.pipeline.calibrate import calibrate
from whisper_obs_pruning.pipeline.params import Params
from whisper_obs_pruning.pipeline.sweep import run_sweep

REPO = Path(__file__).resolve().parents[1]


def _eval_folder(tmp_path: Path, n: int = 3) -> Path:
    d = tmp_path / "eval"
    d.mkdir()
    with open(REPO / "data/evaluation/metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))[:n]
    for r in rows:
        shutil.copy2(REPO / "data/evaluation" / r["file_name"], d / r["file_name"])
    with open(d / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return d


def test_edited_transcripts_are_rescored_not_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    folder = _eval_folder(tmp_path)
    p = Params().updated(
        {
            "model.device": "cpu",
            "data.calibration.max_samples": 2,
            "data.evaluation.source": str(folder),
            "sweep.methods": ["magnitude"],
            "sweep.sparsities": [0.3],
            "sweep.patterns": [],
        }
    )
    calibrate(p, tmp_path / "h", progress=False)
    args = (p, tmp_path / "h", tmp_path / "out", tmp_path / "state")
    first = run_sweep(*args, progress=False)
    again = run_sweep(*args, progress=False)  # nothing changed: the checkpoint is reused
    assert again["points"] == first["points"]

    meta = folder / "metadata.csv"
    with open(meta, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["transcription"] = "completely different words here " + r["transcription"]
    with open(meta, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    edited = run_sweep(*args, progress=False)
    assert edited["dense"]["wer"] > first["dense"]["wer"] + 0.1
    assert edited["points"][0]["wer"] != pytest.approx(first["points"][0]["wer"])


def test_memo_writes_merge_points_of_the_same_configuration(tmp_path):
    """Two queued experiments share the sweep's memo: a write keeps the other's points of the
    same configuration key, and a different key replaces the memo (its results are stale)."""
    from whisper_obs_pruning.pipeline.sweep import _load_state, _save_state

    a = _load_state(tmp_path, "k1")
    b = _load_state(tmp_path, "k1")
    a["points"]["obs@unstructured@0.5000"] = {"wer": 0.1}
    _save_state(tmp_path, a)
    b["points"]["obs@unstructured@0.6000"] = {"wer": 0.2}
    _save_state(tmp_path, b)  # b never saw a's point
    assert set(_load_state(tmp_path, "k1")["points"]) == {
        "obs@unstructured@0.5000",
        "obs@unstructured@0.6000",
    }
    c = _load_state(tmp_path, "k2")
    assert c["points"] == {}  # another configuration starts empty
    c["points"]["obs@unstructured@0.5000"] = {"wer": 0.3}
    _save_state(tmp_path, c)
    assert _load_state(tmp_path, "k2")["points"] == {"obs@unstructured@0.5000": {"wer": 0.3}}
    assert _load_state(tmp_path, "k1")["points"] == {}
