"""Bad input gets a clear error and loses nothing: params, artifacts, numerics, tracking."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from whisper_obs_pruning.atomic import atomic_directory, write_json_atomic
from whisper_obs_pruning.hessians.collector import linear_layers
from whisper_obs_pruning.hessians.store import (
    ArtifactError,
    check_hessian_set,
    load_hessian,
    model_fingerprint,
    read_manifest,
    save_hessian_set,
)
from whisper_obs_pruning.pipeline.params import Params, ParamsError, load_params
from whisper_obs_pruning.pipeline.tracking import TrackingError, check_reachable, project_root

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ params
def write_params(tmp_path, over: dict) -> Path:
    p = copy.deepcopy(yaml.safe_load((REPO / "params.yaml").read_text()))
    for dotted, value in over.items():
        node = p
        *parents, last = dotted.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(p))
    return path


def test_repo_params_are_valid():
    """The committed params.yaml spells out exactly the code's defaults (one source of truth)."""
    p = load_params(REPO / "params.yaml")
    assert p.model.id == "bundled:tiny.en"
    assert p == Params()


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"prune.sparsity": 1.0}, r"prune.sparsity = 1.0 must be a number in \[0, 1\)"),
        ({"prune.sparsity": -0.1}, "prune.sparsity"),
        ({"prune.sparsity": "half"}, "prune.sparsity"),
        ({"prune.method": "obd"}, r"prune.method = 'obd' is not allowed; choose one of \['magn"),
        ({"prune.pattern": "4:2"}, "prune.pattern: pattern 4:2 is malformed"),
        ({"prune.pattern": "0:4"}, "malformed"),
        ({"prune.pattern": "2-4"}, "N:M"),
        ({"prune.rel_damp": -1e-3}, "prune.rel_damp"),
        ({"prune.allocation": "owl", "prune.pattern": "2:4"}, "uniform"),
        ({"prune.targets.include": "fc1"}, "prune.targets.include must be a list"),
        ({"data.calibration.max_samples": 0}, "data.calibration.max_samples = 0 must be a pos"),
        ({"sweep.sparsities": [0.5, 1.2]}, r"sweep.sparsities\[\] = 1.2"),
        ({"sweep.methods": ["sparsegpt", "wanda"]}, "sweep.methods"),
        ({"sweep.patterns": ["unstructured"]}, "sweep.patterns"),
        ({"calibrate.hessian": "diagonal"}, "needs calibrate.hessian = 'full'"),
        ({"model.device": "tpu"}, "model.device"),
        ({"prune.sparsty": 0.5}, "unknown key 'prune.sparsty'"),
        ({"evaluate.batch_size": 0}, "evaluate.batch_size"),
        ({"calibrate.max_hessian_mb": -1}, r"calibrate.max_hessian_mb = -1 must be a number >= 0"),
        ({"calibrate.max_hessian_mb": "2G"}, "calibrate.max_hessian_mb"),
    ],
)
def test_bad_params_name_the_key(tmp_path, over, message):
    with pytest.raises(ParamsError, match=message):
        load_params(write_params(tmp_path, over))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_refused_naming_the_key(tmp_path):
    """Bug (issue 10): model.device: cuda passed validation and died later with a traceback."""
    with pytest.raises(ParamsError, match="model.device = 'cuda' but this machine has no usable"):
        load_params(write_params(tmp_path, {"model.device": "cuda"}))


def test_params_read_as_yaml_1_2_like_dvc_writes_them(tmp_path):
    """`dvc exp run -S` rewrites params.yaml unquoted: 2:4 must stay a pattern, 1e-4 a float."""
    path = tmp_path / "params.yaml"
    path.write_text("prune:\n  pattern: 2:4\n  rel_damp: 1e-4\nsweep:\n  patterns: [2:4, 4:8]\n")
    p = load_params(path)
    assert p.prune.pattern == "2:4" and p.prune.rel_damp == 1e-4
    assert p.sweep.patterns == ["2:4", "4:8"]


def test_params_file_problems(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("prune: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)


def run_stage(stage: str, params: Path, *extra: str, cwd: Path | None = None):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{params.parent / 'mlflow.db'}"}
    return subprocess.run(
        [
            sys.executable,
            str(REPO / "stages" / f"{stage}.py"),
            "--params",
            str(params),
            "--no-progress",
            *extra,
        ],
        capture_output=True,
        text=True,
        cwd=cwd or params.parent,
        env=env,
        timeout=600,
    )


def test_stage_reports_bad_params_without_traceback(tmp_path):
    proc = run_stage("prune", write_params(tmp_path, {"prune.method": "optimal"}))
    assert proc.returncode == 2
    assert "error: prune.method = 'optimal' is not allowed" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_stage_reports_missing_data_and_unknown_layers(tmp_path):
    proc = run_stage(
        "calibrate",
        write_params(tmp_path, {"data.calibration.source": str(tmp_path / "no_such_folder")}),
    )
    assert proc.returncode == 2 and "no_such_folder" in proc.stderr
    assert not (tmp_path / "artifacts").exists()  # nothing half-written
    proc = run_stage(
        "prune",
        write_params(
            tmp_path, {"prune.targets.include": ["encoder.fc9"], "prune.method": "magnitude"}
        ),
        "--out",
        str(tmp_path / "pruned"),
    )
    assert proc.returncode == 2 and "'encoder.fc9' matches no Linear layer" in proc.stderr


def test_unknown_model_offline_says_hub_unreachable(tmp_path):
    proc = run_stage(
        "calibrate", write_params(tmp_path, {"model.id": "openai/whisper-nonexistent"})
    )
    assert proc.returncode == 2
    assert "bundled:tiny.en" in proc.stderr  # tells the user how to use the bundled model


# ------------------------------------------------------------------ artifacts
@pytest.fixture(scope="module")
def hessian_set(tmp_path_factory, tiny):
    """A real (small) Hessian set of tiny.en, written by the calibrate code path."""
    from whisper_obs_pruning.pipeline.calibrate import calibrate

    d = tmp_path_factory.mktemp("hess")
    params = load_params(REPO / "params.yaml").updated(
        {"data.calibration.max_samples": 2, "model.device": "cpu"}
    )
    calibrate(params, d / "hessians", progress=False)
    return d / "hessians"


def copy_set(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def targets_of(model):
    return [n for n in linear_layers(model) if n != "proj_out"]


def test_hessian_set_roundtrip_and_sharing(hessian_set, tiny):
    model, _ = tiny
    manifest = check_hessian_set(
        hessian_set, model, targets_of(model), model_fingerprint(model, list(linear_layers(model)))
    )
    assert len(manifest["layers"]) == 65
    files = {e["file"] for e in manifest["layers"].values()}
    assert len(files) == len(list(hessian_set.glob("*.safetensors"))) == 42
    H = load_hessian(hessian_set, manifest, "model.encoder.layers.0.fc1")
    assert H.dtype == torch.float64 and H.shape == (384, 384)


@pytest.mark.parametrize("damage", ["truncate", "flip", "nan", "dtype", "shape", "missing"])
def test_corrupt_hessian_is_refused_naming_the_layer(hessian_set, tmp_path, damage):
    d = copy_set(hessian_set, tmp_path / "h")
    manifest = read_manifest(d)
    name = "model.decoder.layers.2.fc2"
    f = d / manifest["layers"][name]["file"]
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif damage == "flip":
        b = bytearray(f.read_bytes())
        b[-100] ^= 0xFF
        f.write_bytes(bytes(b))
    elif damage in ("nan", "dtype", "shape"):
        H = torch.zeros(1536, 1536, dtype=torch.float64)
        if damage == "nan":
            H[3, 3] = float("nan")
        elif damage == "dtype":
            H = H.float()
        else:
            H = torch.zeros(384, 384, dtype=torch.float64)
        save_file({"H": H}, str(f))
        from whisper_obs_pruning.atomic import sha256_file

        manifest["layers"][name]["sha256"] = sha256_file(f)  # a consistent but bad file
        (d / "manifest.json").write_text(json.dumps(manifest))
    else:
        f.unlink()
    with pytest.raises(ArtifactError, match=name.replace(".", r"\.")):
        load_hessian(d, read_manifest(d), name)


def test_hessians_of_another_model_are_refused(hessian_set, tiny):
    model, _ = tiny
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.encoder.layers[0].fc1.weight.mul_(1.01)  # another checkpoint
    names = targets_of(other)
    with pytest.raises(ArtifactError, match="another model"):
        check_hessian_set(
            hessian_set, other, names, model_fingerprint(other, list(linear_layers(other)))
        )
    # other layer shapes (e.g. a wider model), with the fingerprint check skipped
    wide = torch.nn.Module()
    wide.add_module("proj", torch.nn.Linear(512, 10))
    with pytest.raises(ArtifactError, match="no Hessian for layer 'proj'"):
        check_hessian_set(hessian_set, wide, ["proj"], None)


def test_missing_manifest_means_no_hessian_set(hessian_set, tmp_path):
    d = copy_set(hessian_set, tmp_path / "h")
    (d / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        read_manifest(d)


def test_save_refuses_nan_and_leaves_old_set(tmp_path):
    out = tmp_path / "set"
    good = {"a": torch.eye(4, dtype=torch.float64)}
    save_hessian_set(out, good, {"a": 3}, {}, {"model_id": "x"})
    bad = {"a": torch.full((4, 4), float("nan"), dtype=torch.float64)}
    with pytest.raises(ArtifactError, match="'a' has NaN"):
        save_hessian_set(out, bad, {"a": 3}, {}, {"model_id": "x"})
    assert read_manifest(out)["layers"]["a"]["n_samples"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]  # no temp dirs left behind


WRITER = r"""
import sys, torch, time
sys.path.insert(0, {src!r})
from whisper_obs_pruning.atomic import write_json_atomic
from whisper_obs_pruning.hessians.store import save_hessian_set
i = 0
while True:
    i += 1
    Hs = {{f"l{{k}}": torch.full((512, 512), float(i), dtype=torch.float64) for k in range(12)}}
    save_hessian_set({out!r}, Hs, {{k: i for k in Hs}}, {{}}, {{"model_id": "gen%d" % i}})
    write_json_atomic({js!r}, {{"i": i, "pad": "x" * 200000}})
    print(i, flush=True)
"""


def test_killed_writer_leaves_old_or_new_never_half(tmp_path):
    """SIGKILL a process that keeps rewriting a Hessian set and a JSON file, at random times."""
    out, js = tmp_path / "set", tmp_path / "m.json"
    code = WRITER.format(src=str(REPO / "src"), out=str(out), js=str(js))
    for delay in (0.3, 0.55, 0.8, 1.1, 1.7):
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        time.sleep(delay + 1.5)  # import time + some writes
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if out.exists():
            manifest = read_manifest(out)
            gen = int(manifest["model_id"][3:])
            for name in manifest["layers"]:
                H = load_hessian(out, manifest, name)  # sha256-verified, complete
                assert float(H[0, 0]) == gen
        if js.exists():
            assert json.loads(js.read_text())["i"] >= 1
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in ("set", "m.json")]
    assert all(p.startswith(".") for p in leftovers)  # only hidden temp names, never the target


def test_atomic_directory_failure_keeps_old(tmp_path):
    target = tmp_path / "d"
    with atomic_directory(target) as tmp:
        (tmp / "f").write_text("old")
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "f").write_text("new")
        raise RuntimeError("interrupted")
    assert (target / "f").read_text() == "old"
    write_json_atomic(tmp_path / "x.json", {"a": 1})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 1}


# ------------------------------------------------------------------ numerics and determinism
def test_fp16_model_prunes_without_nan(tiny):
    from whisper_obs_pruning.pruning import prune_layers

    model = copy.deepcopy(tiny[0]).half()
    names = ["model.encoder.layers.0.fc1", "model.decoder.layers.0.self_attn.q_proj"]
    g = torch.Generator().manual_seed(0)
    Hs = {}
    for n in names:
        d = dict(model.named_modules())[n].weight.shape[1]
        X = torch.randn(50, d, generator=g, dtype=torch.float64)
        X[:, :10] = 0  # dead inputs, and fewer samples than columns
        Hs[n] = 2 / 50 * X.T @ X
    report = prune_layers(
        model, names, Hs.__getitem__, method="sparsegpt", sparsity=0.6, rel_damp=0.0, progress=False
    )
    for n in names:
        w = dict(model.named_modules())[n].weight
        assert w.dtype == torch.float16 and torch.isfinite(w).all()
        assert report[n]["sparsity"] == pytest.approx(0.6, abs=1e-3)


def test_calibration_and_pruning_are_bit_identical_twice(hessian_set, tmp_path, tiny):
    from whisper_obs_pruning.pipeline.calibrate import calibrate

    params = load_params(REPO / "params.yaml").updated(
        {"data.calibration.max_samples": 2, "model.device": "cpu"}
    )
    calibrate(params, tmp_path / "again", progress=False)
    a, b = read_manifest(hessian_set), read_manifest(tmp_path / "again")
    assert {k: v["sha256"] for k, v in a["layers"].items()} == {
        k: v["sha256"] for k, v in b["layers"].items()
    }
    from whisper_obs_pruning.pruning import prune_layers

    results = []
    for _ in range(2):
        model = copy.deepcopy(tiny[0])
        names = ["model.encoder.layers.1.fc2", "model.decoder.layers.0.encoder_attn.k_proj"]
        prune_layers(
            model,
            names,
            lambda n: load_hessian(hessian_set, a, n),
            method="obs",
            sparsity=0.5,
            progress=False,
        )
        results.append([dict(model.named_modules())[n].weight.clone() for n in names])
    assert all(torch.equal(x, y) for x, y in zip(*results, strict=True))


# ------------------------------------------------------------------ tracking
def test_unreachable_tracking_server_fails_fast():
    t0 = time.perf_counter()
    with pytest.raises(TrackingError, match="unreachable"):
        check_reachable("http://127.0.0.1:9", timeout=3)  # discard port: nothing listens
    assert time.perf_counter() - t0 < 10


def test_project_root_from_queued_experiment_copy(tmp_path):
    repo = tmp_path / "repo"
    tmpcopy = repo / ".dvc" / "tmp" / "exps" / "tmpabc123"
    tmpcopy.mkdir(parents=True)
    (tmpcopy / "dvc.yaml").write_text("stages: {}\n")
    assert project_root(tmpcopy) == repo


# ------------------------------------------------------------------ resume
def test_interrupted_sweep_resumes_without_duplicate_runs(hessian_set, tmp_path):
    """Kill `whisper-obs sweep` (the in-process sweep; the DVC pipeline runs a stage per point)
    after two finished points; the rerun reuses them and its run."""
    import sqlite3

    params = write_params(
        tmp_path,
        {
            "model.device": "cpu",
            "data.evaluation.max_samples": 3,
            "sweep.methods": ["magnitude"],
            "sweep.sparsities": [0.2, 0.4, 0.6, 0.8],
            "sweep.patterns": [],
        },
    )
    state = tmp_path / "state" / "state.json"
    cli_sweep = [sys.executable, "-m", "whisper_obs_pruning.pipeline.main", "sweep"]
    cli_sweep += ["--params", str(params), "--no-progress"]
    args = [
        "--hessians",
        str(hessian_set),
        "--out",
        str(tmp_path / "metrics"),
        "--state",
        str(tmp_path / "state"),
    ]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    proc = subprocess.Popen(
        [
            *cli_sweep,
            *args,
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 400
    while time.time() < deadline:
        if state.exists() and len(json.loads(state.read_text())["points"]) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = set(json.loads(state.read_text())["points"])
    assert 2 <= len(done_before) < 4, "the sweep should have been killed half-way"
    assert not (tmp_path / "metrics" / "sweep.json").exists()

    proc = subprocess.run(
        [*cli_sweep, *args], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for key in done_before:
        assert f"{key} already done" in proc.stderr
    summary = json.loads((tmp_path / "metrics" / "sweep.json").read_text())
    assert [p["target_sparsity"] for p in summary["points"]] == [0.2, 0.4, 0.6, 0.8]
    db = sqlite3.connect(tmp_path / "mlflow.db")
    parents = db.execute("SELECT run_uuid FROM runs WHERE name='sweep'").fetchall()
    assert len(parents) == 1  # the rerun continued the same parent run
    # What users see: active runs (a point killed mid-logging is deleted on resume, then relogged).
    children = db.execute(
        "SELECT t.value FROM tags t JOIN runs r ON r.run_uuid = t.run_uuid "
        "WHERE t.key='point' AND r.lifecycle_stage='active' AND r.status='FINISHED'"
    ).fetchall()
    points = [c[0] for c in children if c[0] != "dense"]
    assert len(points) == len(set(points)) == 4  # no point logged twice


def test_yaml_alias_bomb_is_refused_before_expanding(tmp_path):
    """Issue 16: a 'billion laughs' params file grew the process past 3 GB."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdef", "bcdefg", strict=True):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    path = tmp_path / "params.yaml"
    path.write_text("\n".join(lines) + "\nseed: *g\n")
    with pytest.raises(ParamsError, match=r"line 2: YAML aliases \(\*a\) are not allowed"):
        load_params(path)


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"seed": -1}, r"seed = -1 must be an integer in \[0, 2\*\*32\)"),
        ({"seed": 2**40}, "seed = 1099511627776 must be an integer"),
        ({"calibrate.max_hessian_mb": float("inf")}, "calibrate.max_hessian_mb = inf must be"),
        ({"prune.rel_damp": float("inf")}, "prune.rel_damp = inf must be a finite number"),
        ({"model.language": "klingon"}, "model.language = 'klingon' is not a Whisper language"),
        ({"model.language": 7}, "model.language = 7 must be a non-empty string"),
        ({"mlflow.tracking_uri": 123}, "mlflow.tracking_uri = 123 must be a non-empty string"),
        ({"prune.pattern": {"n": 2}}, "prune.pattern = {'n': 2} must be 'unstructured' or an"),
        ({"prune.pattern": 24}, "prune.pattern = 24 must be"),
        ({"data.evaluation.split": 3}, "data.evaluation.split = 3 must be a non-empty string"),
        ({"model": ["a"]}, "model must be a mapping"),
        ({"prune.targets.include": []}, "include = \\[\\] selects no layer"),
        ({"model.id": "x" * 2000}, r"model.id = 'xxxx.*\.\.\. is too long"),
    ],
)
def test_wrong_types_and_ranges_are_refused_naming_the_key(tmp_path, over, message):
    """Issue 16: these ended in tracebacks (AttributeError, numpy/linalg errors, OSError)."""
    with pytest.raises(ParamsError, match=message):
        load_params(write_params(tmp_path, over))


def test_params_not_utf8_is_refused(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_bytes(b"seed: 0\nmodel:\n  id: \xff\xfe\n")
    with pytest.raises(ParamsError, match="is not UTF-8"):
        load_params(path)


def _edit_manifest(d: Path, edit) -> None:
    m = json.loads((d / "manifest.json").read_text())
    m = edit(m) or m
    (d / "manifest.json").write_text(json.dumps(m))


def test_swapped_manifest_entries_are_refused(hessian_set, tmp_path):
    """Issue 16: two same-shaped layers' entries swapped were pruned with each other's H."""
    d = copy_set(hessian_set, tmp_path / "h")
    a, b = "model.encoder.layers.0.fc2", "model.encoder.layers.1.fc2"

    def swap(m):
        m["layers"][a], m["layers"][b] = m["layers"][b], m["layers"][a]

    _edit_manifest(d, swap)
    with pytest.raises(ArtifactError, match="was written for layer 'model.encoder.layers.1.fc2'"):
        load_hessian(d, read_manifest(d), a)


@pytest.mark.parametrize("damage", ["no_shape", "list", "layers_list", "no_fingerprint"])
def test_damaged_manifest_is_refused_clearly(hessian_set, tmp_path, tiny, damage):
    d = copy_set(hessian_set, tmp_path / "h")
    name = "model.decoder.layers.2.fc2"
    edits = {
        "no_shape": lambda m: m["layers"][name].pop("shape") and None,
        "list": lambda m: [m],
        "layers_list": lambda m: {**m, "layers": list(m["layers"].values())},
        "no_fingerprint": lambda m: m.pop("model_fingerprint") and None,
    }
    _edit_manifest(d, edits[damage])
    model = tiny[0]
    with pytest.raises(ArtifactError, match="damaged|not a whisper-obs|another model"):
        check_hessian_set(
            d, model, targets_of(model), model_fingerprint(model, list(linear_layers(model)))
        )


def test_sigterm_during_multipass_calibration_leaves_nothing_behind(tmp_path):
    """Issue 16: SIGTERM left a temp Hessian dir and an encoder cache; the old set survives."""
    import signal
    import time

    params = write_params(
        tmp_path,
        {
            "data.calibration.max_samples": 8,
            "calibrate.max_hessian_mb": 8,
            "calibrate.batch_size": 2,
            "model.device": "cpu",
        },
    )
    out = tmp_path / "art" / "hessians"
    out.mkdir(parents=True)
    (out / "manifest.json").write_text("{}")  # stands for the previous set
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = {
        **os.environ,
        "TMPDIR": str(tmpdir),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "stages/calibrate.py"),
            "--params",
            str(params),
            "--no-progress",
            "--out",
            str(out),
            "--metrics",
            str(tmp_path / "cal.json"),
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline and not list(out.parent.glob(".hessians.*.tmp")):
        time.sleep(0.2)
    time.sleep(3)  # well inside the passes
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    assert proc.returncode == 143, proc.stdout.read()[-2000:]
    assert sorted(p.name for p in out.parent.iterdir()) == ["hessians"]
    assert (out / "manifest.json").read_text() == "{}"
    assert [p.name for p in tmpdir.iterdir() if p.name.startswith("whisper-obs")] == []


def test_oserror_is_reported_as_one_line_with_the_path():
    """The CLI's OSError line (full disk, read-only folder) names the path, never a traceback."""
    import errno

    from whisper_obs_pruning.pipeline.cli import error_line

    exc = OSError(errno.ENOSPC, "No space left on device", "/data/artifacts/hessians/000.st")
    line = error_line("calibrate", exc)
    assert line == "[calibrate] error: No space left on device (/data/artifacts/hessians/000.st)"


def test_unusable_tracking_store_fails_the_stage_before_its_work(tmp_path):
    """Issue 16: a garbage mlflow.db failed calibrate only after its work was done."""
    params = write_params(tmp_path, {"data.calibration.max_samples": 1, "model.device": "cpu"})
    db = tmp_path / "garbage.db"
    db.write_bytes(b"this is not a sqlite database" * 100)
    env_uri = f"sqlite:///{db}"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "stages/calibrate.py"),
            "--params",
            str(params),
            "--no-progress",
            "--out",
            str(tmp_path / "h"),
            "--metrics",
            str(tmp_path / "m.json"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "MLFLOW_TRACKING_URI": env_uri},
        timeout=600,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "cannot use MLflow store" in proc.stderr
    assert not (tmp_path / "h").exists()  # nothing was calibrated


def _read_only_folder(tmp_path: Path) -> Path:
    """A folder this process cannot write: chmod for a normal user; as root (which ignores
    permissions) a folder under sysfs, where even root cannot create files."""
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        (ro / "calibrate.json").write_text('{"old": true}')
        ro.chmod(0o555)
        return ro
    ro = Path("/sys/whisper-obs-read-only")
    try:
        ro.mkdir()
    except OSError:
        return ro
    ro.rmdir()
    pytest.skip("no folder here refuses root's writes")


def test_read_only_output_folder_fails_before_the_work(tmp_path):
    """Issue 16: a read-only output folder surfaced as a raw OSError after the calibration."""
    params = write_params(tmp_path, {"data.calibration.max_samples": 1, "model.device": "cpu"})
    ro = _read_only_folder(tmp_path)
    started = time.monotonic()
    proc = run_stage(
        "calibrate", params, "--out", str(tmp_path / "h"), "--metrics", str(ro / "calibrate.json")
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1 and "--metrics" in lines[0] and str(ro) in lines[0], lines
    assert time.monotonic() - started < 60  # refused before loading the model and audio
    assert not (tmp_path / "h").exists()  # no work was done
    if os.geteuid() != 0:
        assert (ro / "calibrate.json").read_text() == '{"old": true}'  # old output kept


def test_check_writable_names_the_output_and_accepts_a_writable_one(tmp_path):
    from whisper_obs_pruning.atomic import check_writable

    check_writable({"--out": tmp_path / "new" / "deep" / "hessians"})
    assert list(tmp_path.iterdir()) == []  # probed where it will be created; nothing made
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match=r"cannot write the output --state"):
        check_writable({"--state": blocker / "state"})


def test_long_experiment_name_is_logged_and_read_back(tmp_path, monkeypatch):
    """Issue 16: a 500-character experiment name failed the stage after its work; it now
    works end to end against the sqlite store (and any failure would come before the work)."""
    from whisper_obs_pruning.pipeline.tracking import setup

    name = "e" * 500
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow = setup(name)
    with mlflow.start_run(run_name="long") as run:
        mlflow.log_metric("wer", 0.5)
    got = mlflow.get_run(run.info.run_id)
    assert mlflow.get_experiment(got.info.experiment_id).name == name
    assert got.data.metrics["wer"] == 0.5


def test_locked_tracking_store_fails_before_the_work(tmp_path, monkeypatch):
    """Issue 16: a locked mlflow.db (another writer holding an exclusive transaction) fails the
    tracking check, naming the store, instead of failing after the stage's work."""
    import sqlite3

    from whisper_obs_pruning.pipeline.tracking import setup

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    setup("first")  # a real store with MLflow's tables
    holder = sqlite3.connect(tmp_path / "mlflow.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(TrackingError, match="cannot use MLflow store"):
            setup("second")
    finally:
        holder.execute("ROLLBACK")
        holder.close()


# ------------------------------------------------------------------ one stage per sweep point
def test_a_bad_point_or_a_missing_one_is_one_error_line(tmp_path):
    """The matrix stages take their point on the command line: a wrong one is refused like a
    wrong params value; the gathering stage names the points nobody computed."""
    params = write_params(tmp_path, {"sweep.methods": ["obs"], "sweep.patterns": []})
    bad = run_stage("sweep_point", params, "--method", "nosuch", "--sparsity", "0.5", "--out", "o")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    assert "error:" in bad.stderr and "'nosuch' is not allowed" in bad.stderr
    assert not (tmp_path / "o").exists()
    (tmp_path / "points").mkdir()
    gather = run_stage("sweep", params, "--points", "points", "--out", "m")
    assert gather.returncode == 2 and "Traceback" not in gather.stderr, gather.stderr
    assert "no result for dense@dense@0.0000, obs@unstructured@0.5000" in gather.stderr
    assert not (tmp_path / "m").exists()
