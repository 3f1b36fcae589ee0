"""The sweep's quantization axis (joint prune + GPTQ from one calibration, sizes measured) and
its extra evaluation splits."""

from __future__ import annotations

import pytest

from whisper_obs_pruning.pipeline.calibrate import calibrate
from whisper_obs_pruning.pipeline.params import Params, ParamsError
from whisper_obs_pruning.pipeline.sweep import format_table, run_sweep


def test_bad_scheme_names_the_key():
    with pytest.raises(ParamsError, match=r"sweep.quant\[\]: unknown quantization scheme 'int4-x'"):
        Params().updated({"sweep.quant": ["none", "int4-x"]})
    with pytest.raises(ParamsError, match="bits must be in 2..8"):
        Params().updated({"sweep.quant": ["int9"]})
    with pytest.raises(ParamsError, match=r"quant.method = 'obq' is not allowed"):
        Params().updated({"quant.method": "obq"})
    with pytest.raises(
        ParamsError, match=r"sweep.quant\[\]: unknown CTranslate2 scheme 'ct2-int3'"
    ):
        Params().updated({"sweep.quant": ["ct2-int3"]})
    with pytest.raises(ParamsError, match=r"quant.embedding: 'ct2-int8': a CTranslate2 export"):
        Params().updated({"quant.embedding": "ct2-int8"})
    with pytest.raises(ParamsError, match=r"quant.embedding: unknown quantization scheme"):
        Params().updated({"quant.embedding": "int4-x"})
    with pytest.raises(ParamsError, match=r"frontier.latency_clips = -1 must be an integer >= 0"):
        Params().updated({"frontier.latency_clips": -1})
    p = Params().updated({"sweep.quant": ["none", "CT2-int8"], "quant.embedding": "int8"})
    assert p.sweep.quant == ["none", "ct2-int8"] and p.quant.embedding == "int8"


@pytest.mark.slow  # ~3 min; test_pipeline's frontier covers the same path on a smaller grid
def test_quantized_points_are_smaller_and_keep_the_zeros(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    p = Params().updated(
        {
            "model.device": "cpu",
            "data.calibration.max_samples": 2,
            "data.evaluation.max_samples": 3,
            "sweep.methods": ["sparsegpt"],
            "sweep.sparsities": [0.5],
            "sweep.patterns": [],
            "sweep.quant": ["none", "int4-g128"],
            "sweep.extra_splits": True,
            "data.extra_evaluation": [
                {"name": "again", "source": "embedded", "split": "evaluation", "max_samples": 2}
            ],
        }
    )
    calibrate(p, tmp_path / "h", progress=False)
    summary = run_sweep(p, tmp_path / "h", tmp_path / "out", tmp_path / "state", progress=False)
    pts = {(pt["method"], pt["quant"]): pt for pt in summary["points"]}
    assert set(pts) == {("sparsegpt", "none"), ("dense", "int4-g128"), ("sparsegpt", "int4-g128")}
    dense_fp32 = summary["dense"]["model_bytes"]
    sparse, q_dense, q_sparse = (
        pts[("sparsegpt", "none")],
        pts[("dense", "int4-g128")],
        pts[("sparsegpt", "int4-g128")],
    )
    assert q_sparse["model_bytes"] < q_dense["model_bytes"] < sparse["model_bytes"] < dense_fp32
    # GPTQ kept the pruning mask; small kept weights may also round to the zero code
    assert 0.5 - 1e-4 <= q_sparse["sparsity"] < 0.55
    assert q_sparse["bits_per_weight"] < 16
    assert (tmp_path / "out" / "size_wer.png").stat().st_size > 1000
    assert "sparsegpt+int4-g128" in format_table(summary)
    assert "int4-g128" in (tmp_path / "out" / "sweep.csv").read_text()
    # every point is also scored on the extra split (issue 12): its own WER column and table
    for pt in [summary["dense"], *summary["points"]]:
        assert 0 <= pt["wer_again"] < 5 and pt["num_utterances_again"] == 2
    assert "wer_again" in (tmp_path / "out" / "sweep.csv").read_text().splitlines()[0]
    assert "WER % on split 'again' (2 utterances)" in format_table(summary)
