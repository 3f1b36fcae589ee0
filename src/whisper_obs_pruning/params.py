"""``params.yaml``: loading and up-front validation with messages that name the key.

A typo in params.yaml must fail in the first second with the key, the bad value and the
allowed values, not an hour later inside a stage.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from .methods import METHODS, PruningError, parse_pattern
from .pruning import ALLOCATIONS

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "model": {"id": "bundled:tiny.en", "device": "auto", "language": "en"},
    "data": {
        "calibration": {"source": "embedded", "split": "calibration", "max_samples": None},
        "evaluation": {"source": "embedded", "split": "evaluation", "max_samples": None},
    },
    "calibrate": {
        "hessian": "full",
        "exclude_padding": False,
        "batch_size": 8,
        "max_hessian_mb": 2048,
    },
    "prune": {
        "method": "obs",
        "sparsity": 0.5,
        "pattern": "unstructured",
        "rel_damp": 0.01,
        "blocksize": 128,
        "scope": "row",
        "allocation": "uniform",
        "owl_lambda": 0.08,
        "sequential": False,
        "targets": {"include": [".*"], "exclude": ["proj_out"]},
    },
    "evaluate": {"batch_size": 16},
    "sweep": {
        "methods": ["magnitude", "diagonal", "sparsegpt", "obs"],
        "sparsities": [0.5, 0.7],
        "patterns": ["2:4"],
    },
    "mlflow": {"experiment": "whisper-obs", "tracking_uri": None},
}


class ParamsError(ValueError):
    """Invalid params.yaml; the message names the key."""


def _merge(base: dict, over: dict, prefix: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in (over or {}).items():
        path = f"{prefix}{key}"
        if key not in base:
            raise ParamsError(f"unknown key {path!r} in params (known: {', '.join(base)})")
        if isinstance(base[key], dict) and base[key] and isinstance(value, dict):
            out[key] = _merge(base[key], value, f"{path}.")
        elif isinstance(base[key], dict) and base[key] and value is not None:
            raise ParamsError(f"{path!r} must be a mapping, got {value!r}")
        else:
            out[key] = value
    return out


def _yaml12() -> YAML:
    """A YAML 1.2 reader, as DVC writes params.yaml (``dvc exp run -S``).

    PyYAML reads YAML 1.1, where an unquoted ``2:4`` is the sexagesimal integer 124 and
    ``1e-4`` is a string; DVC rewrites params.yaml unquoted, so those must read as 1.2.
    """
    return YAML(typ="safe", pure=True)


def load_params(path: str | Path = "params.yaml") -> dict:
    """Read params.yaml, fill defaults, validate; raise ParamsError naming the bad key."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file not found: {path}")
    try:
        raw = _yaml12().load(path.read_text(encoding="utf-8")) or {}
    except YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ParamsError(f"{path} must hold a mapping at the top level")
    params = _merge(DEFAULTS, raw)
    validate(params)
    return params


def _choice(key: str, value: object, allowed: tuple | list) -> None:
    if value not in allowed:
        raise ParamsError(f"{key} = {value!r} is not allowed; choose one of {list(allowed)}")


def _sparsity(key: str, value: object) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or math.isnan(value)
        or not (0 <= value < 1)
    ):
        raise ParamsError(f"{key} = {value!r} must be a number in [0, 1)")


def _pattern(key: str, value: object) -> None:
    try:
        parse_pattern(value)
    except PruningError as exc:
        raise ParamsError(f"{key}: {exc}") from exc


def _positive_int(key: str, value: object, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ParamsError(
            f"{key} = {value!r} must be a positive integer"
            + (" or null (all)" if allow_none else "")
        )


def validate(p: dict) -> None:
    """Check every value a stage reads. Data paths are checked when loaded (clear DataError)."""
    if isinstance(p["seed"], bool) or not isinstance(p["seed"], int):
        raise ParamsError(f"seed = {p['seed']!r} must be an integer")
    if not isinstance(p["model"]["id"], str) or not p["model"]["id"]:
        raise ParamsError("model.id must be a non-empty string (e.g. bundled:tiny.en)")
    _choice("model.device", p["model"]["device"], ("auto", "cpu", "cuda"))
    for split in ("calibration", "evaluation"):
        d = p["data"][split]
        if not isinstance(d["source"], str) or not d["source"]:
            raise ParamsError(f"data.{split}.source must be 'embedded', a folder or 'hf:<name>'")
        _positive_int(f"data.{split}.max_samples", d["max_samples"], allow_none=True)
    _choice("calibrate.hessian", p["calibrate"]["hessian"], ("full", "diagonal"))
    _choice("calibrate.exclude_padding", p["calibrate"]["exclude_padding"], (True, False))
    _positive_int("calibrate.batch_size", p["calibrate"]["batch_size"])
    mb = p["calibrate"]["max_hessian_mb"]
    if mb is not None and (
        isinstance(mb, bool) or not isinstance(mb, (int, float)) or math.isnan(mb) or mb < 0
    ):
        raise ParamsError(
            f"calibrate.max_hessian_mb = {mb!r} must be a number >= 0 (MiB) or null (no limit)"
        )
    pr = p["prune"]
    _choice("prune.method", pr["method"], METHODS)
    _sparsity("prune.sparsity", pr["sparsity"])
    _pattern("prune.pattern", pr["pattern"])
    if (
        not isinstance(pr["rel_damp"], (int, float))
        or isinstance(pr["rel_damp"], bool)
        or (pr["rel_damp"] < 0 or math.isnan(pr["rel_damp"]))
    ):
        raise ParamsError(f"prune.rel_damp = {pr['rel_damp']!r} must be a number >= 0")
    _positive_int("prune.blocksize", pr["blocksize"])
    _choice("prune.scope", pr["scope"], ("row", "layer"))
    _choice("prune.allocation", pr["allocation"], ALLOCATIONS)
    if pr["allocation"] != "uniform" and parse_pattern(pr["pattern"]) is not None:
        raise ParamsError("prune.allocation must be 'uniform' with an N:M prune.pattern")
    _choice("prune.sequential", pr["sequential"], (True, False))
    if pr["sequential"] and pr["allocation"] != "uniform":
        raise ParamsError("prune.sequential = true needs prune.allocation = 'uniform'")
    if not (isinstance(pr["owl_lambda"], (int, float)) and 0 <= pr["owl_lambda"] < 0.5):
        raise ParamsError(f"prune.owl_lambda = {pr['owl_lambda']!r} must be in [0, 0.5)")
    for key in ("include", "exclude"):
        v = pr["targets"][key]
        if v is not None and (not isinstance(v, list) or not all(isinstance(x, str) for x in v)):
            raise ParamsError(f"prune.targets.{key} must be a list of layer names or regexes")
    needs_full = pr["method"] in ("sparsegpt", "obs")
    if needs_full and p["calibrate"]["hessian"] == "diagonal":
        raise ParamsError(
            f"prune.method = {pr['method']!r} needs calibrate.hessian = 'full' (it is 'diagonal')"
        )
    _positive_int("evaluate.batch_size", p["evaluate"]["batch_size"])
    sw = p["sweep"]
    if not isinstance(sw["methods"], list) or not sw["methods"]:
        raise ParamsError("sweep.methods must be a non-empty list")
    for m in sw["methods"]:
        _choice("sweep.methods[]", m, METHODS)
        if m in ("sparsegpt", "obs") and p["calibrate"]["hessian"] == "diagonal":
            raise ParamsError(f"sweep.methods has {m!r}, which needs calibrate.hessian = 'full'")
    if not isinstance(sw["sparsities"], list):
        raise ParamsError("sweep.sparsities must be a list of numbers in [0, 1)")
    for s in sw["sparsities"]:
        _sparsity("sweep.sparsities[]", s)
    if not isinstance(sw["patterns"] or [], list):
        raise ParamsError("sweep.patterns must be a list of 'N:M' strings (or empty)")
    for pat in sw["patterns"] or []:
        _pattern("sweep.patterns[]", pat)
        if parse_pattern(pat) is None:
            raise ParamsError(
                "sweep.patterns lists N:M patterns; unstructured uses sweep.sparsities"
            )
    if not isinstance(p["mlflow"]["experiment"], str) or not p["mlflow"]["experiment"]:
        raise ParamsError("mlflow.experiment must be a non-empty string")


def flatten(d: dict, prefix: str = "") -> dict[str, object]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists become comma-joined strings (for MLflow params)."""
    out: dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        elif isinstance(v, list):
            out[key] = ",".join(str(x) for x in v)
        else:
            out[key] = v
    return out
