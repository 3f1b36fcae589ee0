"""The MLflow store travels with the checkout, and a stage's run spans its work (issue 11)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from whisper_obs_pruning.pipeline import tracking


def _log_one_artifact(monkeypatch, root: Path, name: str, started: float | None = None) -> str:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    src = root / f"{name}.txt"
    src.write_text(name)
    with tracking.run("whisper-obs", name, started=started) as mlflow:
        mlflow.log_artifact(str(src))
        return mlflow.active_run().info.run_id


def test_a_moved_checkout_logs_into_its_own_folder_and_keeps_old_artifacts(tmp_path, monkeypatch):
    old_root, new_root = tmp_path / "old", tmp_path / "new"
    old_root.mkdir()
    first = _log_one_artifact(monkeypatch, old_root, "first")
    assert list((old_root / "mlartifacts").rglob("first.txt"))
    shutil.move(old_root, new_root)  # the whole checkout moves, store and artifacts with it

    second = _log_one_artifact(monkeypatch, new_root, "second")
    assert not old_root.exists()  # nothing written into the old place
    client = tracking.setup("whisper-obs").MlflowClient()
    for run_id, name in ((first, "first"), (second, "second")):
        uri = client.get_run(run_id).info.artifact_uri
        assert uri.startswith((new_root / "mlartifacts").as_uri()), uri
        local = client.download_artifacts(run_id, f"{name}.txt", str(tmp_path / name))
        assert Path(local).read_text() == name
    exp = client.get_experiment_by_name("whisper-obs")
    assert exp.artifact_location == (new_root / "mlartifacts").as_uri()


def test_a_copied_checkout_stops_writing_into_the_original(tmp_path, monkeypatch):
    orig, copy = tmp_path / "orig", tmp_path / "copy"
    orig.mkdir()
    _log_one_artifact(monkeypatch, orig, "first")
    shutil.copytree(orig, copy)
    _log_one_artifact(monkeypatch, copy, "second")
    assert not list((orig / "mlartifacts").rglob("second.txt"))
    assert list((copy / "mlartifacts").rglob("second.txt"))
    assert tracking.follow_moved_store(copy / "mlflow.db", (copy / "mlartifacts").as_uri()) == 0


def test_a_backdated_run_spans_the_work(tmp_path, monkeypatch):
    started = time.time() - 42.0  # the work began 42 s before the run is logged
    run_id = _log_one_artifact(monkeypatch, tmp_path, "stage", started=started)
    info = tracking.setup("whisper-obs").MlflowClient().get_run(run_id).info
    assert info.run_name == "stage" and info.status == "FINISHED"
    assert (info.end_time - info.start_time) / 1000 >= 42.0
    assert abs(info.start_time / 1000 - started) < 1e-3
