"""The verified on-disk Hessian store a DVC stage can trust (written with ``atomic``).

A Hessian set is a directory of one safetensors file per distinct layer input plus a
``manifest.json`` written last: no manifest, no Hessian set. Loading checks the manifest
against the model (layer names, shapes, model fingerprint) and every file (sha256, dtype,
shape, finiteness) before anything is pruned, and names the offending layer when it refuses.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..atomic import atomic_directory, save_tensors_atomic, sha256_file, write_json_atomic
from ..errors import WhisperObsError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class ArtifactError(WhisperObsError, ValueError):
    """An artifact is missing, corrupt, or does not belong to the model at hand."""


# ------------------------------------------------------------------ model fingerprint
def model_fingerprint(model: torch.nn.Module, layer_names: list[str]) -> str:
    """A short hash of the architecture and the target layers' weights (not the whole model).

    Hessians depend on every weight upstream of a layer; hashing the target Linears' weights
    (which cover almost all parameters) catches "Hessians of another checkpoint".
    """
    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    if cfg is not None:
        for key in ("model_type", "d_model", "encoder_layers", "decoder_layers", "vocab_size"):
            h.update(f"{key}={getattr(cfg, key, None)};".encode())
    modules = dict(model.named_modules())
    for name in layer_names:
        w = modules[name].weight.detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(str(tuple(w.shape)).encode())
        h.update(w.numpy().tobytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------ Hessian sets
class HessianSetWriter:
    """Writes a Hessian set one distinct input at a time, so a calibration never has to hold
    all of them: each ``add`` goes straight to its own verified file; ``finish`` writes the
    manifest, which readers require. Use through ``hessian_set_writer``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.files: dict[str, dict] = {}
        self.manifest: dict | None = None

    def add(self, name: str, H: torch.Tensor, n_samples: int) -> None:
        """Save the H of ``name``, the leader of the layers that read the same input."""
        if name in self.files:
            raise ArtifactError(f"Hessian of layer {name!r} was written twice")
        if not torch.isfinite(H).all():
            raise ArtifactError(f"Hessian of layer {name!r} has NaN/Inf; not saving it")
        fname = f"{len(self.files):03d}_{name.replace('.', '_')}.safetensors"
        digest = save_tensors_atomic(
            self.directory / fname, {"H": H.to(torch.float64).cpu()}, {"layer": name}
        )
        self.files[name] = {
            "file": fname,
            "sha256": digest,
            "shape": list(H.shape),
            "dtype": "float64",
            "n_samples": int(n_samples),
        }

    def finish(self, shared_with: dict[str, str], meta: dict) -> dict:
        """Write the manifest (``shared_with`` maps every other layer to its leader)."""
        missing = sorted({lead for lead in shared_with.values() if lead not in self.files})
        if missing:
            raise ArtifactError(f"layers share the input of {missing}, whose Hessian was not saved")
        layers = {name: {**info, "shared_with": None} for name, info in self.files.items()}
        for name, leader in shared_with.items():
            layers[name] = {**self.files[leader], "shared_with": leader}
        self.manifest = {"format_version": FORMAT_VERSION, **meta, "layers": layers}
        write_json_atomic(self.directory / MANIFEST, self.manifest)
        return self.manifest


@contextmanager
def hessian_set_writer(out_dir: str | Path) -> Iterator[HessianSetWriter]:
    """A writer into a temporary directory that replaces ``out_dir`` only once it is finished."""
    with atomic_directory(out_dir) as tmp:
        writer = HessianSetWriter(tmp)
        yield writer
        if writer.manifest is None:
            raise ArtifactError(f"Hessian set for {out_dir} was not finished; nothing replaced")


def save_hessian_set(
    out_dir: str | Path,
    hessians: dict[str, torch.Tensor],
    n_samples: dict[str, int],
    shared_with: dict[str, str],
    meta: dict,
) -> dict:
    """Write Hessians already in memory (leader name -> H float64) as a set; return the manifest."""
    with hessian_set_writer(out_dir) as writer:
        for name, H in hessians.items():
            writer.add(name, H, n_samples[name])
        return writer.finish(shared_with, meta)


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(
            f"no Hessian set at {path}: {MANIFEST} is missing (run the calibrate stage first, "
            "or the previous calibration was interrupted)"
        )
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{mpath} is not valid JSON: {exc}") from exc
    if (
        not isinstance(manifest, dict)
        or manifest.get("format_version") != FORMAT_VERSION
        or not isinstance(manifest.get("layers"), dict)
    ):
        raise ArtifactError(f"{mpath} is not a whisper-obs Hessian manifest (format_version 1)")
    for name, entry in manifest["layers"].items():
        _check_entry(mpath, name, entry)
    return manifest


def _check_entry(mpath: Path, name: str, entry: object) -> None:
    """Every field a reader uses, with its type: a damaged manifest names the layer."""
    ok = (
        isinstance(entry, dict)
        and isinstance(entry.get("file"), str)
        and "/" not in entry["file"]
        and isinstance(entry.get("sha256"), str)
        and isinstance(entry.get("shape"), list)
        and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in entry["shape"])
        and len(entry["shape"]) in (1, 2)
        and isinstance(entry.get("n_samples"), int)
        and (entry.get("shared_with") is None or isinstance(entry["shared_with"], str))
    )
    if not ok:
        raise ArtifactError(
            f"{mpath}: the entry of layer {name!r} is damaged (needs file, sha256, shape, "
            "n_samples, shared_with); re-run calibrate"
        )


def hessian_set_bytes(manifest: dict) -> int:
    """Bytes of all distinct Hessians of a set once loaded (float64; shared ones counted once)."""
    distinct = {e["file"]: e["shape"] for e in manifest["layers"].values()}
    return sum(8 * math.prod(shape) for shape in distinct.values())


def check_hessian_set(
    path: str | Path, model: torch.nn.Module, layer_names: list[str], fingerprint: str | None
) -> dict:
    """Refuse a Hessian set that does not match the model, before any pruning happens."""
    manifest = read_manifest(path)
    if fingerprint is not None and manifest.get("model_fingerprint") != fingerprint:
        raise ArtifactError(
            f"Hessians in {path} were computed for another model "
            f"(model {manifest.get('model_id')!r}, fingerprint {manifest.get('model_fingerprint')}"
            f" != {fingerprint}); re-run calibrate for this model"
        )
    modules = dict(model.named_modules())
    for name in layer_names:
        entry = manifest["layers"].get(name)
        if entry is None:
            raise ArtifactError(f"Hessian set {path} has no Hessian for layer {name!r}")
        d = modules[name].weight.shape[1]
        want = [d] if manifest.get("hessian") == "diagonal" else [d, d]
        if list(entry["shape"]) != want:
            raise ArtifactError(
                f"Hessian of layer {name!r} has shape {entry['shape']}, the model's layer needs "
                f"{want}: the Hessian set belongs to another model"
            )
    return manifest


def load_hessian(path: str | Path, manifest: dict, name: str) -> torch.Tensor:
    """Load and verify one layer's H (sha256, dtype, shape, finite)."""
    entry = manifest["layers"].get(name)
    if entry is None:
        raise ArtifactError(f"Hessian set {path} has no Hessian for layer {name!r}")
    fpath = Path(path) / entry["file"]
    if not fpath.is_file():
        raise ArtifactError(f"Hessian file for layer {name!r} is missing: {fpath}")
    if sha256_file(fpath) != entry["sha256"]:
        raise ArtifactError(
            f"Hessian file for layer {name!r} is corrupt or truncated (sha256 mismatch): {fpath}"
        )
    try:
        with safe_open(str(fpath), framework="pt") as fh:
            written_for = (fh.metadata() or {}).get("layer")
            H = fh.get_tensor("H")
    except (SafetensorError, KeyError, OSError) as exc:
        raise ArtifactError(f"cannot read Hessian of layer {name!r} from {fpath}: {exc}") from exc
    if H.dtype != torch.float64:
        raise ArtifactError(f"Hessian of layer {name!r} has dtype {H.dtype}, expected float64")
    if list(H.shape) != list(entry["shape"]):
        raise ArtifactError(
            f"Hessian of layer {name!r} has shape {list(H.shape)}, manifest says {entry['shape']}"
        )
    if not torch.isfinite(H).all():
        raise ArtifactError(f"Hessian of layer {name!r} contains NaN or Inf: {fpath}")
    leader = entry.get("shared_with") or name
    if written_for != leader:
        raise ArtifactError(
            f"Hessian file {fpath.name} was written for layer {written_for!r}, but the manifest "
            f"gives it to {name!r} (input of {leader!r}): the manifest was edited or mixed up"
        )
    return H


HessianGetter = Callable[[str], torch.Tensor]


def open_hessians(
    path: str | Path, model: torch.nn.Module, targets: list[str], fingerprint: str
) -> tuple[dict, HessianGetter]:
    """Verify the set against the model; return a loader that keeps the last file read."""
    manifest = check_hessian_set(path, model, targets, fingerprint)
    cache: dict[str, torch.Tensor] = {}

    def get(name: str) -> torch.Tensor:
        key = manifest["layers"][name]["file"]
        if key not in cache:
            cache.clear()
            cache[key] = load_hessian(path, manifest, name)
        return cache[key]

    return manifest, get


def reusable_hessians(
    path: str | Path,
    model: torch.nn.Module,
    targets: list[str],
    fingerprint: str,
    budget_bytes: int | None,
) -> tuple[dict, HessianGetter]:
    """For callers that prune many times (the sweep): every target's H loaded and verified once
    when the set fits in ``budget_bytes``, else read from disk one at a time."""
    manifest, load_one = open_hessians(path, model, targets, fingerprint)
    if budget_bytes is not None and hessian_set_bytes(manifest) > budget_bytes:
        return manifest, load_one
    by_file: dict[str, torch.Tensor] = {}
    for name in targets:
        f = manifest["layers"][name]["file"]
        if f not in by_file:
            by_file[f] = load_hessian(path, manifest, name)
    return manifest, lambda name: by_file[manifest["layers"][name]["file"]]
