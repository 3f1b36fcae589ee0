"""The package's shape: no import cycles, DVC deps that match the code, a registry that rules.

These read the source and dvc.yaml; nothing is mocked.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from _imports import REPO, SRC, closure, graph

# stage in dvc.yaml -> its script under stages/ (a matrix stage: one script, many points)
STAGES = {
    "calibrate": "calibrate",
    "prune": "prune",
    "evaluate": "evaluate",
    "sweep": "sweep",
    "frontier": "sweep",
    "sweep-dense": "sweep_point",
    "sweep-point": "sweep_point",
    "sweep-nm": "sweep_point",
    "frontier-point": "sweep_point",
}


def _dvc() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _dep_paths(stage: str) -> list[Path]:
    return [REPO / str(d).split()[0] for d in _dvc()[stage]["deps"]]


def test_no_import_cycle_in_the_package():
    g = graph()
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(g.get(node, ())):
            # a package's __init__ importing its own submodules is how packages work
            if nxt.startswith(node + "."):
                continue
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path, node, nxt]))
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [])


def test_each_stage_depends_on_exactly_the_code_it_imports():
    for stage, script in STAGES.items():
        deps = _dep_paths(stage)
        code = {p for p in deps if p.is_relative_to(SRC)}
        used = closure(REPO / "stages" / f"{script}.py")
        for f in used:
            assert any(f == d or f.is_relative_to(d) for d in code), (
                f"{stage}: imports {f.relative_to(REPO)}, which is not among its DVC deps"
            )
        # loaded lazily by the model loader when a bundled CT2 model is converted, and by the
        # decoder for `evaluate.backend: ct2`
        used.add(SRC / "whisper_obs_pruning/whisper/ct2_import.py")
        used.add(SRC / "whisper_obs_pruning/whisper/ct2_export.py")
        for d in code:
            assert any(f == d or f.is_relative_to(d) for f in used), (
                f"{stage}: depends on {d.relative_to(REPO)}, which its code never imports"
            )
        assert (REPO / "stages" / f"{script}.py") in deps


def test_calibrate_does_not_depend_on_methods_or_mlflow():
    """Editing a pruning method, or where results are logged, must never re-run calibration."""
    stage = _dvc()["calibrate"]
    methods = SRC / "whisper_obs_pruning" / "methods"
    for d in _dep_paths("calibrate"):
        assert not (d == methods or d.is_relative_to(methods)), d
        assert d != SRC / "whisper_obs_pruning" and d != SRC, "the whole package is too wide"
    for stage_name, spec in _dvc().items():
        params = [str(p) for p in spec.get("params", [])]
        assert not any(p == "mlflow" or p.startswith("mlflow.") for p in params), stage_name
    assert "prune" not in [str(p).split(".")[0] for p in stage["params"]]


def test_stage_commands_name_their_paths():
    """Paths in `cmd`, as iterative/example-get-started does: outs/deps are visible there."""
    for stage, spec in _dvc().items():
        cmd = spec["cmd"]
        for out in spec.get("outs", []):
            name = next(iter(out)) if isinstance(out, dict) else out
            if not name.endswith(".csv"):
                assert name in cmd or name.split("/")[0] in cmd, (stage, name)


def test_every_user_facing_error_is_one_class_the_cli_catches():
    """Bug (issue 10): the CLI kept a hand list of error classes and missed some
    (SparseFormatError, the CT2 reader's ValueErrors). Now every error class subclasses
    WhisperObsError, which is what the CLI catches."""
    import importlib
    import inspect
    import pkgutil

    import whisper_obs_pruning
    from whisper_obs_pruning.errors import WhisperObsError

    control_flow = {"StopForward", "_Cancelled"}  # early exits that never reach a user
    found = []
    for info in pkgutil.walk_packages(whisper_obs_pruning.__path__, "whisper_obs_pruning."):
        module = importlib.import_module(info.name)
        for name, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, Exception) and obj.__module__ == info.name:
                found.append(name)
                if name not in control_flow:
                    assert issubclass(obj, WhisperObsError), f"{info.name}.{name}"
    assert {"SparseFormatError", "CT2FormatError", "ParamsError", "PruningError"} <= set(found)


def test_exported_function_is_not_replaced_by_its_module():
    """Bug (issue 11): `from whisper_obs_pruning import transcribe` gave the submodule once
    any module had imported `.transcribe`."""
    import importlib

    import whisper_obs_pruning

    importlib.import_module("whisper_obs_pruning.whisper.decoding")
    from whisper_obs_pruning import transcribe

    assert callable(transcribe) and transcribe.__name__ == "transcribe"
    for name in whisper_obs_pruning.__all__:
        assert not inspect_is_module(getattr(whisper_obs_pruning, name)), name


def inspect_is_module(obj) -> bool:
    import types

    return isinstance(obj, types.ModuleType)


def test_a_point_stage_never_depends_on_the_grid_it_belongs_to():
    """Issue 11: a point is one DVC stage, so adding a sparsity (or a method) must not change
    the other points' params: their deps name what a point reads, never the grid's lists."""
    stages = _dvc()
    for name in ("sweep-dense", "sweep-point", "sweep-nm", "frontier-point"):
        params = [str(p).split()[0] for p in stages[name]["params"]]
        for grid in ("sweep", "frontier"):
            assert grid not in params, name
            for axis in ("methods", "sparsities", "patterns", "quant"):
                assert f"{grid}.{axis}" not in params, (name, axis)
        assert "matrix" in stages[name]
