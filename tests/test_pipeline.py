"""The real DVC pipeline on a small config, in a temporary copy of the repository."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from whisper_obs_pruning.pipeline import tracking

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

SMALL = {
    "model": {"device": "cpu"},
    "data": {
        "calibration": {"max_samples": 6},
        "evaluation": {"max_samples": 8},
        "extra_evaluation": [
            {"name": "real", "source": "embedded", "split": "real/evaluation", "max_samples": 4}
        ],
    },
    "prune": {"method": "sparsegpt", "sparsity": 0.5},
    "sweep": {"methods": ["magnitude", "sparsegpt"], "sparsities": [0.5], "patterns": ["2:4"]},
    "frontier": {
        "methods": ["magnitude"],
        "sparsities": [0.5],
        "patterns": [],
        "quant": ["none", "int8", "ct2-int8"],
        "latency_clips": 2,
    },
}


def sh(cmd: list[str], cwd: Path, env: dict, timeout: int = 900) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc.stdout


def deep_update(base: dict, over: dict) -> dict:
    for k, v in over.items():
        base[k] = deep_update(base.get(k, {}), v) if isinstance(v, dict) else v
    return base


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory):
    """A git + DVC repository holding this checkout's pipeline, with the small params."""
    root = tmp_path_factory.mktemp("pipeline") / "repo"
    root.mkdir()
    for item in ("dvc.yaml", "stages", "src", "data", "pyproject.toml"):
        src = REPO / item
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, root / item)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump(deep_update(params, SMALL)))
    (root / ".gitignore").write_text("mlflow.db\n")
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    sh(["git", "init", "-q"], root, env)
    sh(["dvc", "init", "-q"], root, env)
    sh(["git", "add", "-A"], root, env)
    sh(["git", "commit", "-qm", "pipeline under test"], root, env)
    return root, env


@pytest.fixture(scope="module")
def repro(repo_copy):
    root, env = repo_copy
    out = sh(["dvc", "repro"], root, env, timeout=1500)
    return root, env, out


def test_dvc_repro_writes_metrics(repro):
    root, env, out = repro
    ev = json.loads((root / "metrics/eval.json").read_text())
    for key in ("wer", "cer", "sparsity", "method", "target_sparsity", "num_utterances"):
        assert key in ev
    assert ev["method"] == "sparsegpt" and ev["target_sparsity"] == 0.5
    assert ev["sparsity"] == pytest.approx(0.5, abs=1e-4)  # measured on the saved weights
    assert ev["num_utterances"] == 8
    assert 0 <= ev["wer"] < 0.6 and 0 <= ev["cer"] <= ev["wer"] + 0.2

    sweep = json.loads((root / "metrics/sweep.json").read_text())
    assert sweep["dense"]["wer"] < 0.3  # dense tiny.en on the embedded set is ~0.08
    assert sweep["dense"]["sparsity"] < 1e-5  # a handful of exact zeros in the checkpoint
    pts = {(p["method"], p["pattern"]): p for p in sweep["points"]}
    assert set(pts) == {
        ("magnitude", "unstructured"),
        ("sparsegpt", "unstructured"),
        ("magnitude", "2:4"),
        ("sparsegpt", "2:4"),
    }
    for p in sweep["points"]:
        assert p["sparsity"] == pytest.approx(0.5, abs=1e-4)
        for k in ("wer", "cer", "target_sparsity"):
            assert p[k] >= 0
    # the second-order method must not be worse than magnitude at 50 %
    assert pts[("sparsegpt", "unstructured")]["wer"] <= pts[("magnitude", "unstructured")]["wer"]
    csv_lines = (root / "metrics/sweep.csv").read_text().splitlines()
    assert csv_lines[0] == (
        "method,pattern,target_sparsity,quant,sparsity,wer,cer,model_bytes,bits_per_weight"
    )
    assert len(csv_lines) == 1 + 1 + 4
    assert (root / "metrics/sparsity_wer.png").stat().st_size > 10_000
    assert "dense model" in out  # the sweep prints its table
    # what DVC shows: scores per method and point as nested scalars, curves one column each
    wer = json.loads((root / "metrics/sweep_wer.json").read_text())
    assert set(wer) == {"dense", "magnitude", "sparsegpt"}
    assert set(wer["magnitude"]) == {"50", "2:4"}
    assert wer["sparsegpt"]["50"]["wer"] == pytest.approx(
        pts[("sparsegpt", "unstructured")]["wer"], abs=1e-6
    )
    curves = (root / "metrics/sweep_curves.csv").read_text().splitlines()
    assert curves[0] == "target_sparsity,magnitude,sparsegpt" and len(curves) == 3
    assert curves[1] == f"0.0,{sweep['dense']['wer']:.6f},{sweep['dense']['wer']:.6f}"
    shown = json.loads(sh(["dvc", "metrics", "show", "--json"], root, env))
    flat = json.dumps(shown)
    assert '"sweep_wer.json"' in flat.replace("metrics/", "") and "transcribe_seconds" not in flat
    manifest = json.loads((root / "artifacts/hessians/manifest.json").read_text())
    assert len(manifest["layers"]) == 65 and manifest["calibration"]["utterances"] == 6
    from transformers import WhisperForConditionalGeneration

    m = WhisperForConditionalGeneration.from_pretrained(root / "artifacts/pruned/model")
    card = (root / "artifacts/pruned/model/README.md").read_text()
    assert card.startswith("---\nbase_model: openai/whisper-tiny.en\n")
    assert "| method | sparsegpt |" in card and "| utterances | 6 |" in card
    assert "| measured sparsity of the pruned layers | 50.00% |" in card
    assert float((m.model.encoder.layers[0].fc1.weight == 0).float().mean()) == pytest.approx(0.5)

    frontier = json.loads((root / "metrics/frontier/sweep.json").read_text())
    fp = {(p["method"], p["quant"]): p for p in frontier["points"]}
    assert set(fp) == {
        *(("magnitude", q) for q in ("none", "int8", "ct2-int8")),
        *(("dense", q) for q in ("int8", "ct2-int8")),
    }
    assert fp[("magnitude", "int8")]["model_bytes"] < fp[("magnitude", "none")]["model_bytes"]
    # the token embedding is quantized too (quant.embedding: same): int8 of 37.8 M parameters
    # is ~38 MB plus fp16 positions/convs, not the 59 MB of an fp16 embedding
    assert fp[("dense", "int8")]["model_bytes"] < frontier["dense"]["model_bytes"] / 3.5
    # the CTranslate2 int8 export: its model.bin, scored by CTranslate2 (a broken export
    # decodes loops: WER far above the dense model's), timed against dense PyTorch
    ct2 = fp[("dense", "ct2-int8")]
    assert 30e6 < ct2["model_bytes"] < 50e6
    assert ct2["wer"] < frontier["dense"]["wer"] + 0.15
    for pt in [frontier["dense"], *frontier["points"]]:
        assert pt["latency"]["clips"] == 2 and pt["speedup"] > 0
    assert frontier["dense"]["speedup"] == 1.0
    # the small models are kept with their points: the compressed checkpoint (sha256-checked
    # on load) and the faster-whisper folder
    from whisper_obs_pruning.quant import load_quantized

    q_dir = root / "artifacts/points/frontier/magnitude_0.5_int8/model"
    loaded = load_quantized(q_dir)
    assert float((loaded.model.encoder.layers[0].fc1.weight == 0).float().mean()) >= 0.5
    assert (q_dir / "model.quant.safetensors").stat().st_size == fp[("magnitude", "int8")][
        "model_bytes"
    ]
    ct2_dir = root / "artifacts/points/frontier/dense_ct2-int8/model"
    assert (ct2_dir / "model.bin").stat().st_size == ct2["model_bytes"]
    assert (ct2_dir / "tokenizer.json").is_file() and (
        ct2_dir / "preprocessor_config.json"
    ).is_file()
    assert not (root / "artifacts/points/frontier/magnitude_0.5_none/model").exists()
    table = sh([str(BIN / "python"), "-m", "whisper_obs_pruning.pipeline.report",
                "metrics/frontier"], root, env)  # fmt: skip
    assert "dense+ct2-int8" in table and "speedup" in table
    assert (root / "metrics/frontier/size_wer.png").stat().st_size > 10_000
    assert (root / "metrics/frontier/latency_wer.png").stat().st_size > 10_000
    assert not (root / "metrics/latency_wer.png").exists()  # the sweep timed no point
    for pt in frontier["points"]:  # every frontier point scored on the real-speech split too
        assert pt["num_utterances_real"] == 4 and pt["wer_real"] >= 0


def test_mlflow_runs_nested(repro):
    root, _, _ = repro
    db = sqlite3.connect(root / "mlflow.db")
    runs = db.execute("SELECT run_uuid, name, status FROM runs").fetchall()
    names = [r[1] for r in runs]
    for stage in (
        "calibrate",
        "prune sparsegpt 50%",
        "evaluate sparsegpt 50%",
        "sweep",
        "frontier",
    ):
        assert stage in names
    assert all(r[2] == "FINISHED" for r in runs)
    parent = next(r[0] for r in runs if r[1] == "sweep")
    children = db.execute(
        "SELECT run_uuid FROM tags WHERE key='mlflow.parentRunId' AND value=?", (parent,)
    ).fetchall()
    assert len(children) == 5  # dense + 4 points
    steps = db.execute(
        "SELECT DISTINCT step FROM metrics WHERE key='wer' AND run_uuid IN "
        f"({','.join('?' * len(children))})",
        [c[0] for c in children],
    ).fetchall()
    assert {s[0] for s in steps} == {0, 50}
    artifacts = db.execute("SELECT artifact_uri FROM runs WHERE run_uuid=?", (parent,)).fetchone()
    art_dir = Path(artifacts[0].replace("file://", ""))
    assert (art_dir / "sparsity_wer.png").exists() and (art_dir / "sweep.json").exists()


def _rest(uri: str, endpoint: str, body: dict | None = None, **query: str) -> dict:
    """One MLflow REST call: GET with a query, or POST with a JSON body."""
    import urllib.parse
    import urllib.request

    url = f"{uri}/api/2.0/mlflow/{endpoint}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_mlflow_overlay_chart_and_logged_model_through_rest(repro, tmp_path):
    """What the MLflow UI shows, checked through a live server's REST API (issue 11): the sweep's
    parent run holds one WER metric per method, all at the same steps, dense at step 0, and a
    stored route to the chart that overlays them; the prune run spans its work and holds the
    pruned model. (`scripts/mlflow_screenshot.py` photographs that chart in headless Chromium.)"""
    import urllib.parse
    import urllib.request

    root, _, _ = repro
    shutil.copy2(root / "mlflow.db", tmp_path / "mlflow.db")  # the server reads a copy
    sweep = json.loads((root / "metrics/sweep.json").read_text())
    with tracking.local_server(f"sqlite:///{tmp_path / 'mlflow.db'}") as uri:
        exp = _rest(uri, "experiments/get-by-name", experiment_name="whisper-obs")["experiment"]
        exp_tags = {t["key"]: t["value"] for t in exp.get("tags", [])}
        assert exp_tags["mlflow.experimentKind"] == "custom_model_development"

        def run_named(name: str) -> dict:
            found = _rest(
                uri,
                "runs/search",
                {"experiment_ids": [exp["experiment_id"]], "filter": f"run_name = '{name}'"},
            )["runs"]
            assert len(found) == 1, name
            return found[0]

        parent = run_named("sweep")
        tags = {t["key"]: t["value"] for t in parent["data"]["tags"]}
        path, _, query = tags["overlay_chart"].partition("?")
        q = urllib.parse.parse_qs(query)
        keys = json.loads(q["plot_metric_keys"][0])
        assert path == "/metric" and json.loads(q["runs"][0]) == [parent["info"]["run_id"]]
        assert tags["overlay_chart"] in tags["mlflow.note.content"]  # linked from the run page
        assert keys == ["wer_magnitude", "wer_sparsegpt", "wer_magnitude_nm", "wer_sparsegpt_nm"]
        want = {
            f"wer_{p['method']}" + ("_nm" if p["pattern"] != "unstructured" else ""): p["wer"]
            for p in sweep["points"]
        }
        for key in keys:  # one metric per method, the same steps, dense at step 0
            history = _rest(
                uri, "metrics/get-history", run_id=parent["info"]["run_id"], metric_key=key
            )["metrics"]
            by_step = {m["step"]: m["value"] for m in history}
            assert set(by_step) == {0, 50}, key
            assert by_step[0] == pytest.approx(sweep["dense"]["wer"])
            assert by_step[50] == pytest.approx(want[key])

        prune = run_named("prune sparsegpt 50%")
        files = _rest(uri, "artifacts/list", run_id=prune["info"]["run_id"], path="model")
        names = {Path(f["path"]).name for f in files["files"]}
        assert {"model.safetensors", "config.json", "README.md"} <= names
        metrics = {m["key"]: m["value"] for m in prune["data"]["metrics"]}
        span_s = (int(prune["info"]["end_time"]) - int(prune["info"]["start_time"])) / 1000
        assert span_s >= metrics["prune_seconds"]  # the run spans the work, not the logging
        with urllib.request.urlopen(f"{uri}/", timeout=30) as r:  # the UI itself is served
            assert r.status == 200 and "<html" in r.read().decode().lower()


def test_repro_again_is_cached_and_exp_run_changes_one_param(repro):
    root, env, _ = repro
    status = sh(["dvc", "status"], root, env)
    assert "up to date" in status.lower() or status.strip() == ""
    out = sh(["dvc", "exp", "run", "-S", "prune.sparsity=0.4"], root, env, timeout=1500)
    assert "Running stage 'calibrate'" not in out  # Hessians come from the cache
    assert "Running stage 'sweep" not in out  # no sweep stage reads prune.sparsity
    ev = json.loads((root / "metrics/eval.json").read_text())
    assert ev["target_sparsity"] == 0.4
    assert ev["sparsity"] == pytest.approx(0.4, abs=1e-4)
    shown = json.loads(sh(["dvc", "exp", "show", "--json"], root, env))
    assert "0.4" in json.dumps(shown)


def run_queue(root: Path, env: dict, workers: int = 2, timeout: float = 1500) -> str:
    """`dvc queue start -j workers`, then wait until nothing is queued or running."""
    import time

    sh(["dvc", "queue", "start", "-j", str(workers)], root, env)
    deadline = time.time() + timeout
    while True:
        status = sh(["dvc", "queue", "status"], root, env)
        if "Running" not in status and "Queued" not in status:
            break
        assert time.time() < deadline, f"queue still busy after {timeout} s:\n{status}"
        time.sleep(5)
    assert "Failed" not in status, status
    return status


def _commit_baseline(root: Path, env: dict) -> None:
    """What a user does after `dvc repro`: commit dvc.lock and the metrics, so queued
    experiments start from a pipeline that is up to date."""
    sh(["git", "add", "-A"], root, env)
    sh(["git", "commit", "-qm", "results", "--allow-empty"], root, env)


def _runs(root: Path) -> dict[str, str]:
    """run id -> run name, every run in the repository's store."""
    db = sqlite3.connect(root / "mlflow.db")
    try:
        return dict(db.execute("SELECT run_uuid, name FROM runs").fetchall())
    finally:
        db.close()


@pytest.mark.slow
def test_two_queued_experiments_run_concurrently(repro):
    """`dvc queue start -j 2` with two prune-only experiments: both finish, both log complete
    runs to the repository's `mlflow.db`, and neither runs a sweep point (issue 11: the sweep's
    state used to be a DVC output missing from the queue's copy, so each re-ran the sweep)."""
    root, env, _ = repro
    _commit_baseline(root, env)
    before = _runs(root)
    for s in ("0.3", "0.6"):
        sh(["dvc", "exp", "run", "--queue", "-S", f"prune.sparsity={s}"], root, env)
    status = run_queue(root, env)
    assert status.count("Success") >= 2, status
    db = sqlite3.connect(root / "mlflow.db")
    rows = db.execute(
        "SELECT r.status, p.value FROM runs r JOIN params p ON p.run_uuid = r.run_uuid "
        "WHERE r.name LIKE 'evaluate%' AND p.key = 'prune.sparsity'"
    ).fetchall()
    finished = {v for st, v in rows if st == "FINISHED"}
    assert {"0.3", "0.6"} <= finished
    new = [n for i, n in _runs(root).items() if i not in before]
    assert not [n for n in new if n in ("sweep", "frontier", "dense") or "@" in n], new
    # the queued runs logged to the repository's store, not to their temporary copies
    assert not list((root / ".dvc" / "tmp" / "exps").rglob("mlflow.db"))


@pytest.mark.slow
def test_queued_experiment_adding_a_sparsity_computes_only_the_new_points(repro):
    """Issue 11: an experiment that changes `sweep.sparsities` runs only the new points (one
    DVC stage each, the finished ones restored by DVC's run cache in the queue's copy), then
    gathers them all."""
    import re

    root, env, _ = repro
    _commit_baseline(root, env)
    queued = sh(["dvc", "exp", "run", "--queue", "-S", "sweep.sparsities=[0.5,0.6]"], root, env)
    name = re.search(r"Queued experiment '([^']+)'", queued).group(1)
    run_queue(root, env, workers=1)
    logs = sh(["dvc", "queue", "logs", name], root, env)
    ran = sorted(re.findall(r"Running stage '([^']+)'", logs))
    assert ran == [
        "sweep",
        "sweep-point@magnitude-0.6-none",
        "sweep-point@sparsegpt-0.6-none",
    ], logs[-3000:]
    assert "Stage 'sweep-point@magnitude-0.5-none' didn't change" in logs


@pytest.mark.slow
def test_queue_logs_to_one_tracking_server_and_pushes_to_a_remote(repro, tmp_path):
    """The several-workers set-up in its local form: an MLflow server on 127.0.0.1 that every
    queued experiment logs to, and a DVC remote (a directory) that holds the artifacts."""
    from mlflow.tracking import MlflowClient

    root, env, _ = repro
    store = tmp_path / "server"
    store.mkdir()
    server = tracking.local_server(
        f"sqlite:///{store / 'mlflow.db'}", artifacts_destination=store / "artifacts"
    )
    with server as uri:
        env_server = {**env, "MLFLOW_TRACKING_URI": uri}
        for s in ("0.35", "0.45"):
            sh(["dvc", "exp", "run", "--queue", "-S", f"prune.sparsity={s}"], root, env_server)
        run_queue(root, env_server)
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("whisper-obs")
        runs = client.search_runs([exp.experiment_id], "attributes.run_name LIKE 'evaluate%'")
        logged = {r.data.params.get("prune.sparsity") for r in runs if r.info.status == "FINISHED"}
        assert {"0.35", "0.45"} <= logged
        for r in runs:
            assert 0 <= r.data.metrics["wer"] < 1.0

    remote = tmp_path / "dvc-remote"
    sh(["dvc", "remote", "add", "--local", "-d", "shared", str(remote)], root, env)
    sh(["dvc", "push"], root, env)
    assert any(remote.rglob("*")), "nothing pushed"
    shutil.rmtree(root / "artifacts" / "hessians")
    shutil.rmtree(root / ".dvc" / "cache")
    sh(["dvc", "pull"], root, env)
    assert (root / "artifacts" / "hessians" / "manifest.json").is_file()
    status = sh(["dvc", "status"], root, env)
    assert "up to date" in status.lower() or status.strip() == ""


def test_touching_a_method_never_stales_calibrate(repro):
    """Narrow deps (issue 10): editing a pruning method re-runs prune/sweep, never calibrate."""
    root, env, _ = repro
    method = root / "src/whisper_obs_pruning/methods/sparsegpt.py"
    original = method.read_text()
    try:
        method.write_text(original + "\n# touched\n")
        status = sh(["dvc", "status"], root, env)
    finally:
        method.write_text(original)
    stale = {
        line.strip().rstrip(":")
        for line in status.splitlines()
        if line and line[0] != "\t" and not line.startswith(" ")
    }
    assert {"prune", "sweep", "frontier", "sweep-point@sparsegpt-0.5-none"} <= stale, status
    assert "calibrate" not in stale and "evaluate" not in stale, status
