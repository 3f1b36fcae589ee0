"""Atomic, verified artifacts: Hessian sets and JSON files a DVC stage can trust.

Every file is written to a temporary name in the same directory, fsync'ed, then renamed over
the target, so a stage killed at any moment leaves the old file or the new one, never half of
one. A Hessian set is a directory of one safetensors file per distinct layer input plus a
``manifest.json`` written last: no manifest, no Hessian set. Loading checks the manifest
against the model (layer names, shapes, model fingerprint) and every file (sha256, dtype,
shape, finiteness) before anything is pruned, and names the offending layer when it refuses.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class ArtifactError(ValueError):
    """An artifact is missing, corrupt, or does not belong to the model at hand."""


# ------------------------------------------------------------------ atomic primitives
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success fsync it and rename into place."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; artifacts are shared
        os.replace(tmp_path, target)
        _fsync_dir(target.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, obj: object) -> None:
    write_text_atomic(
        path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n"
    )


def _json_default(o: object) -> object:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def save_tensors_atomic(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> str:
    """Save safetensors atomically; return the file's sha256."""
    with atomic_path(path) as tmp:
        save_file(
            {k: v.contiguous() for k, v in tensors.items()},
            str(tmp),
            metadata={k: str(v) for k, v in meta.items()},
        )
        digest = sha256_file(tmp)
    return digest


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Build a directory in a temporary sibling, then swap it in for ``target``.

    The swap is two renames (old aside, new in place); the old copy is removed afterwards.
    Readers of a Hessian set also require its manifest, which is written last.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _recover_directory(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        _fsync_dir(tmp)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _recover_directory(target: Path) -> None:
    """Undo what a kill between the two renames of a swap left: the old copy set aside."""
    if target.exists():
        return
    aside = sorted(target.parent.glob(f".{target.name}.old-*"))
    if aside:
        os.replace(aside[-1], target)


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
    if manifest.get("format_version") != FORMAT_VERSION or "layers" not in manifest:
        raise ArtifactError(f"{mpath} is not a whisper-obs Hessian manifest (format_version 1)")
    return manifest


def hessian_set_bytes(manifest: dict) -> int:
    """Bytes of all distinct Hessians of a set once loaded (float64; shared ones counted once)."""
    distinct = {e["file"]: e["shape"] for e in manifest["layers"].values()}
    return sum(8 * math.prod(shape) for shape in distinct.values())


def check_hessian_set(
    path: str | Path, model: torch.nn.Module, layer_names: list[str], fingerprint: str | None
) -> dict:
    """Refuse a Hessian set that does not match the model, before any pruning happens."""
    manifest = read_manifest(path)
    if fingerprint is not None and manifest.get("model_fingerprint") not in (None, fingerprint):
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
        H = load_file(str(fpath))["H"]
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
    return H
