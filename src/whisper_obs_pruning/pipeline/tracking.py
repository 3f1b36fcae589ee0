"""MLflow tracking: one place that decides the store, and fails fast when it is unreachable.

The default store is an absolute ``sqlite:///<repo>/mlflow.db``: queued DVC experiments run in
a temporary copy under ``.dvc/tmp/exps/``, and a relative URI would put their runs in that copy,
lost when it is deleted. ``MLFLOW_TRACKING_URI`` (or ``mlflow.tracking_uri`` in params.yaml)
overrides it. ``mlflow`` is imported lazily: it costs seconds, and the library needs none of it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from ..errors import WhisperObsError

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"


ARTIFACTS = "mlartifacts"  # the artifact folder, next to the sqlite store


class TrackingError(WhisperObsError, RuntimeError):
    """The MLflow tracking store cannot be used."""


def project_root(start: str | Path | None = None) -> Path:
    """The user's repository, also from inside a queued experiment's temporary copy."""
    start = Path(start or Path.cwd()).resolve()
    parts = start.parts
    for i in range(len(parts) - 3):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    for p in (start, *start.parents):
        if (p / "dvc.yaml").exists() or (p / ".git").exists():
            return p
    return start


def tracking_uri(configured: str | None = None, root: str | Path | None = None) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI") or configured
    if uri:
        return uri
    return f"sqlite:///{project_root(root) / 'mlflow.db'}"


def follow_moved_store(db_path: str | Path, artifacts: str) -> int:
    """Point the store's artifact locations at ``artifacts`` (``<store dir>/mlartifacts``) when
    the checkout holding the store was moved or copied; returns how many rows were changed.

    The locations are absolute (see ``setup``), so without this a moved checkout would keep
    writing artifacts into the old folder, and a copied one into the original. Only locations
    this project made (ending in ``/mlartifacts``) are rewritten, in one transaction.
    """
    import sqlite3

    con = sqlite3.connect(str(db_path), timeout=20)
    try:
        with con:
            olds = [
                row[0]
                for row in con.execute(
                    "SELECT DISTINCT artifact_location FROM experiments "
                    "WHERE artifact_location LIKE ? AND artifact_location != ?",
                    (f"%/{ARTIFACTS}", artifacts),
                )
            ]
            changed = 0
            for old in olds:
                changed += con.execute(
                    "UPDATE experiments SET artifact_location = ? WHERE artifact_location = ?",
                    (artifacts, old),
                ).rowcount
                changed += con.execute(
                    "UPDATE runs SET artifact_uri = ? || substr(artifact_uri, ?) "
                    "WHERE substr(artifact_uri, 1, ?) = ?",
                    (artifacts, len(old) + 1, len(old) + 1, old + "/"),
                ).rowcount
    finally:
        con.close()
    return changed


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """An http(s) tracking server must answer within ``timeout`` s, or we stop with a message."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
            if resp.status >= 500:
                raise TrackingError(f"MLflow server {uri} answered HTTP {resp.status}")
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({exc}). Start it (make ui), or unset "
            "MLFLOW_TRACKING_URI to log to the local sqlite store"
        ) from exc


def setup(experiment: str, configured_uri: str | None = None):
    """Configure mlflow (URI, experiment, no long HTTP retries); return the module."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    uri = tracking_uri(configured_uri)
    check_reachable(uri)
    import mlflow

    mlflow.set_tracking_uri(uri)
    try:
        with _sqlite_init_lock(uri):
            if uri.startswith("sqlite:///"):
                # Artifacts next to the database, by absolute path: MLflow's default is
                # ./mlruns of the current directory, i.e. inside a queued experiment's temp copy.
                artifacts = (Path(uri.removeprefix("sqlite:///")).parent / ARTIFACTS).as_uri()
                if mlflow.get_experiment_by_name(experiment) is None:
                    mlflow.create_experiment(experiment, artifacts)
                else:
                    follow_moved_store(uri.removeprefix("sqlite:///"), artifacts)
            try:
                exp = mlflow.set_experiment(experiment)
            except Exception:  # noqa: BLE001 - another stage created it between get and create
                if mlflow.get_experiment_by_name(experiment) is None:
                    raise
                exp = mlflow.set_experiment(experiment)
            _set_experiment_kind(mlflow, exp)
    except Exception as exc:  # noqa: BLE001 - any store failure must say where and why
        raise TrackingError(f"cannot use MLflow store {uri}: {exc}") from exc
    return mlflow


def _set_experiment_kind(mlflow, exp) -> None:
    """Tag the experiment for classic ML: without it MLflow 3's UI opens it in GenAI mode
    (traces, no runs). Two stages starting at once on a new server store may both try; the
    loser's insert fails on the tag's unique key, which is fine once the tag is there."""
    if exp.tags.get(EXPERIMENT_KIND_TAG) is not None:
        return
    client = mlflow.MlflowClient()
    try:
        client.set_experiment_tag(
            exp.experiment_id, EXPERIMENT_KIND_TAG, "custom_model_development"
        )
    except Exception:  # noqa: BLE001 - MlflowException or a store's IntegrityError
        if client.get_experiment(exp.experiment_id).tags.get(EXPERIMENT_KIND_TAG) is None:
            raise


@contextlib.contextmanager
def _sqlite_init_lock(uri: str) -> Iterator[None]:
    """Serialise the first use of a sqlite store across processes.

    Two queued experiments starting together would both run MLflow's schema migrations on a
    new database and one fails ("table already exists"); afterwards sqlite's own locking (MLflow
    sets a 20 s busy timeout) is enough for concurrent runs.
    """
    if not uri.startswith("sqlite:///"):
        yield
        return
    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def run(
    experiment: str,
    run_name: str,
    *,
    params: dict | None = None,
    tags: dict | None = None,
    configured_uri: str | None = None,
    nested: bool = False,
    started: float | None = None,
) -> Iterator[object]:
    """Start a (possibly nested) MLflow run with params and tags; yields the mlflow module.

    ``started`` (``time.time()`` when the work began) back-dates a top-level run, so a stage
    that logs after its work still shows how long the work took, not the few ms of logging.
    """
    mlflow = setup(experiment, configured_uri)
    run_id = None
    if started is not None and not nested:
        exp_id = mlflow.get_experiment_by_name(experiment).experiment_id
        run_id = (
            mlflow.MlflowClient()
            .create_run(exp_id, start_time=int(1000 * started), tags=tags, run_name=run_name)
            .info.run_id
        )
    with mlflow.start_run(run_id=run_id, run_name=run_name, nested=nested, tags=tags or {}):
        if params:
            mlflow.log_params({k: ("null" if v is None else v) for k, v in params.items()})
        yield mlflow


def provenance(root: str | Path | None = None) -> dict[str, str]:
    """Tags that trace a run to the code and pipeline state that made it: the git commit, the
    DVC experiment (inside ``dvc exp run``), and the sha256 of ``dvc.lock`` when present."""
    import hashlib
    import subprocess

    root = Path(root or Path.cwd())
    tags: dict[str, str] = {}
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        if commit:
            tags["git_commit"] = commit
    except (OSError, subprocess.SubprocessError):
        pass
    for env, tag in (("DVC_EXP_NAME", "dvc_exp_name"), ("DVC_EXP_BASELINE_REV", "dvc_baseline")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    lock = root / "dvc.lock"
    if lock.is_file():
        tags["dvc_lock_sha256"] = hashlib.sha256(lock.read_bytes()).hexdigest()[:16]
    return tags


@contextlib.contextmanager
def local_server(
    backend_uri: str, *, artifacts_destination: str | Path | None = None, timeout: float = 180
) -> Iterator[str]:
    """An ``mlflow server`` on a free 127.0.0.1 port over ``backend_uri``; yields its URL and
    stops it on exit. For the REST checks, the UI screenshot and the shared-server set-up."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--workers", "1", "--backend-store-uri", backend_uri]
    if artifacts_destination is not None:
        cmd += ["--artifacts-destination", str(artifacts_destination)]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError as exc:
                if time.time() > deadline or server.poll() is not None:
                    raise TrackingError(f"mlflow server on {backend_uri} did not start") from exc
                time.sleep(1)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)
