"""Save a pruned Whisper in a compressed sparse form and load it back bit for bit.

Why: ``save_pretrained`` writes every zero of a pruned model, so a 50%-sparse checkpoint is as
big as the dense one. This format stores only what pruning kept and reconstructs exactly the
same weights (same bits, ``-0.0`` and NaN payloads included).

Directory layout (``format_version`` 1)::

    sparse_config.json          format, version, per-tensor format/shape/dtype/nnz/sha256
    model.sparse.safetensors    the tensors below
    config.json, generation_config.json, tokenizer/feature-extractor files

Per 2-D weight ``W[rows, cols]`` (key ``k`` of ``model.state_dict()``), one of:

- ``dense``: ``k`` as is (every non-pruned tensor: biases, norms, embeddings, convs).
- ``bitmask``: ``k::values``, the non-zero entries in row-major order, in W's dtype, and
  ``k::mask``, ``np.packbits`` (big bit order) of the row-major non-zero mask. "Zero" means an
  all-zero bit pattern (``+0.0``); ``-0.0`` is stored as a value so it survives.
- ``2:4``: when every group of 4 consecutive inputs of a row has at least 2 zeros:
  ``k::values`` ``[rows, cols/2]``, the 2 kept entries per group (in input order), and
  ``k::idx``, their 2-bit positions in the group, 4 positions per byte (position ``j`` of the
  flat index stream sits in bits ``2*(j%4)..2*(j%4)+1`` of byte ``j//4``). That is
  ``cols/2`` values + ``cols/8`` bytes per row: NVIDIA's 2:4 layout with 2-bit metadata.

Tensors that share storage (Whisper ties ``proj_out.weight`` to the token embedding) are
stored once and listed under ``aliases``. Each reconstructed tensor is checked against the
sha256 of the original's bytes, so a corrupt file fails loudly instead of loading garbage.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..atomic import atomic_directory
from ..errors import WhisperObsError
from ..format_config import read_format_config

if TYPE_CHECKING:
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "SparseFormatError",
    "save_sparse",
    "load_sparse",
    "load_sparse_state_dict",
    "sparse_size_report",
    "encode_tensor",
    "decode_tensor",
]

FORMAT_NAME = "whisper-obs-sparse"
FORMAT_VERSION = 1
CONFIG_NAME = "sparse_config.json"
WEIGHTS_NAME = "model.sparse.safetensors"
SEP = "::"
# Files a WhisperProcessor needs (those that exist are copied from the model's directory).
PROCESSOR_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "normalizer.json",
    "added_tokens.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
    "processor_config.json",
)
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class SparseFormatError(WhisperObsError, ValueError):
    """A sparse directory is missing, truncated, corrupt or of an unknown format version."""


# --------------------------------------------------------------------------- encoding


def _int_view(w: torch.Tensor) -> np.ndarray:
    """The tensor's bits as a numpy integer array of the same element size (no copy)."""
    return w.detach().contiguous().cpu().view(_INT_VIEW[w.element_size()]).numpy()


def _from_ints(arr: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr)).view(dtype)


def _sha256(w: torch.Tensor) -> str:
    arr = w.detach().contiguous().cpu().view(torch.uint8).numpy()
    return hashlib.sha256(memoryview(arr).cast("B")).hexdigest()


# For each 4-bit non-zero pattern of a group (bit i = position i kept): the two positions
# stored, non-zeros first then the lowest zero positions, ascending; -1 for > 2 non-zeros.
_PAIR_LUT = np.full((16, 2), -1, dtype=np.int64)
for _pat in range(16):
    _kept = [i for i in range(4) if _pat >> i & 1]
    if len(_kept) <= 2:
        _kept += [i for i in range(4) if not _pat >> i & 1][: 2 - len(_kept)]
        _PAIR_LUT[_pat] = sorted(_kept)
del _pat, _kept


def _group_patterns(nz: np.ndarray) -> np.ndarray:
    """``nz`` [rows, cols] bool -> 4-bit pattern per group of 4 inputs, flat uint8."""
    g = nz.reshape(-1, 4).view(np.uint8)
    return g[:, 0] | (g[:, 1] << 1) | (g[:, 2] << 2) | (g[:, 3] << 3)


def _is_24(nz: np.ndarray, nnz: int) -> bool:
    if nz.shape[1] % 4 or 2 * nnz > nz.size:
        return False
    return bool((_PAIR_LUT[_group_patterns(nz), 0] >= 0).all())


def _encode_bitmask(key: str, w: torch.Tensor, bits: np.ndarray, nz: np.ndarray) -> dict:
    return {
        f"{key}{SEP}values": _from_ints(bits.reshape(-1)[nz.reshape(-1)], w.dtype),
        f"{key}{SEP}mask": torch.from_numpy(np.packbits(nz.reshape(-1))),
    }


def _encode_24(key: str, w: torch.Tensor, bits: np.ndarray, nz: np.ndarray) -> dict:
    rows, cols = w.shape
    pairs = _PAIR_LUT[_group_patterns(nz)]  # [groups, 2], ascending positions
    groups = bits.reshape(-1, 4)
    ar = np.arange(groups.shape[0])
    values = np.stack([groups[ar, pairs[:, 0]], groups[ar, pairs[:, 1]]], axis=1)
    nib = (pairs[:, 0] | (pairs[:, 1] << 2)).astype(np.uint8)
    if nib.size % 2:
        nib = np.append(nib, np.uint8(0))
    packed = nib[0::2] | (nib[1::2] << 4)
    return {
        f"{key}{SEP}values": _from_ints(values.reshape(rows, cols // 2), w.dtype),
        f"{key}{SEP}idx": torch.from_numpy(np.ascontiguousarray(packed)),
    }


def _sparse_nbytes(fmt: str, n: int, size: int, nnz: int) -> int:
    """Encoded size of an ``n``-element tensor of ``size``-byte elements with ``nnz`` kept."""
    if fmt == "2:4":
        return n // 2 * size + (n // 2 + 3) // 4
    return nnz * size + (n + 7) // 8


def encode_tensor(
    key: str, w: torch.Tensor, *, sparse: bool | None = None, force: str | None = None
) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
    """Encode one tensor: ``(format, tensors to store, metadata)``.

    ``sparse=None`` picks the smallest of dense / 2:4 / bitmask for 2-D floating tensors;
    ``True`` forces a sparse form (the smaller of 2:4, when it fits, and bitmask); ``False``
    keeps it dense. ``force="2:4"`` / ``"bitmask"`` picks that sparse form (codec tests).
    """
    w = w.detach().contiguous().cpu()
    meta: dict[str, Any] = {
        "shape": list(w.shape),
        "dtype": str(w.dtype).removeprefix("torch."),
        "sha256": _sha256(w),
    }
    fmt = "dense"
    if sparse is not False and w.dim() == 2 and w.is_floating_point() and w.numel() > 0:
        bits = _int_view(w)
        nz = bits != 0  # bit pattern, so -0.0 is a kept value
        nnz = int(np.count_nonzero(nz))
        size = w.element_size()
        cand = "bitmask"
        if _is_24(nz, nnz) and _sparse_nbytes("2:4", w.numel(), size, nnz) <= _sparse_nbytes(
            "bitmask", w.numel(), size, nnz
        ):
            cand = "2:4"  # only when it is the smaller of the two (not at very high sparsity)
        if force is not None:
            if force not in ("2:4", "bitmask") or (force == "2:4" and not _is_24(nz, nnz)):
                raise SparseFormatError(f"{key}: cannot store it as {force!r}")
            cand = force
        if (
            sparse
            or _sparse_nbytes(cand, w.numel(), w.element_size(), nnz) < w.numel() * w.element_size()
        ):
            fmt = cand
            meta["nnz"] = nnz
    elif sparse:
        raise SparseFormatError(
            f"{key}: only 2-D floating tensors can be stored sparse, got {w.dtype} {tuple(w.shape)}"
        )
    meta["format"] = fmt
    if fmt == "dense":
        return fmt, {key: w}, meta
    enc = (_encode_24 if fmt == "2:4" else _encode_bitmask)(key, w, bits, nz)
    return fmt, enc, meta


def _need(tensors: dict[str, torch.Tensor], name: str, where: str) -> torch.Tensor:
    if name not in tensors:
        raise SparseFormatError(f"{where}: tensor {name!r} is missing")
    return tensors[name]


def decode_tensor(
    key: str, meta: dict[str, Any], tensors: dict[str, torch.Tensor], where: str = ""
) -> torch.Tensor:
    """Inverse of :func:`encode_tensor` with shape/dtype/count checks (no hash check)."""
    where = f"{where}: {key}" if where else key
    fmt, shape = meta.get("format"), tuple(meta.get("shape", ()))
    dtype = getattr(torch, str(meta.get("dtype")), None)
    if not isinstance(dtype, torch.dtype):
        raise SparseFormatError(f"{where}: unknown dtype {meta.get('dtype')!r}")
    if fmt == "dense":
        w = _need(tensors, key, where)
        if tuple(w.shape) != shape or w.dtype != dtype:
            raise SparseFormatError(
                f"{where}: stored {w.dtype} {tuple(w.shape)}, config says {dtype} {shape}"
            )
        return w
    if len(shape) != 2:
        raise SparseFormatError(f"{where}: sparse tensor must be 2-D, config says {shape}")
    rows, cols = shape
    n = rows * cols
    values = _need(tensors, f"{key}{SEP}values", where)
    if values.dtype != dtype:
        raise SparseFormatError(f"{where}: values are {values.dtype}, config says {dtype}")
    vals = _int_view(values).reshape(-1)
    if fmt == "bitmask":
        packed = _need(tensors, f"{key}{SEP}mask", where)
        if packed.dtype != torch.uint8 or packed.numel() != (n + 7) // 8:
            raise SparseFormatError(
                f"{where}: mask has {packed.numel()} bytes ({packed.dtype}), "
                f"expected {(n + 7) // 8}"
            )
        mask = np.unpackbits(packed.numpy(), count=n).view(bool)
        nnz = int(np.count_nonzero(mask))
        if nnz != vals.size or nnz != meta.get("nnz", nnz):
            raise SparseFormatError(
                f"{where}: mask marks {nnz} non-zeros but {vals.size} values are stored "
                f"(config nnz {meta.get('nnz')}); the file is corrupt"
            )
        out = np.zeros(n, dtype=vals.dtype)
        out[mask] = vals
        return _from_ints(out, dtype).view(rows, cols)
    if fmt == "2:4":
        if cols % 4:
            raise SparseFormatError(f"{where}: 2:4 needs cols divisible by 4, got {cols}")
        packed = _need(tensors, f"{key}{SEP}idx", where)
        n_groups = n // 4
        if tuple(values.shape) != (rows, cols // 2):
            raise SparseFormatError(
                f"{where}: 2:4 values have shape {tuple(values.shape)}, "
                f"expected {(rows, cols // 2)}"
            )
        if packed.dtype != torch.uint8 or packed.numel() != (n_groups + 1) // 2:
            raise SparseFormatError(
                f"{where}: 2:4 index has {packed.numel()} bytes, expected {(n_groups + 1) // 2}"
            )
        p = packed.numpy()
        nib = np.stack([p & 15, p >> 4], axis=1).reshape(-1)[:n_groups]
        i0, i1 = (nib & 3).astype(np.int64), (nib >> 2).astype(np.int64)
        if not bool((i0 < i1).all()):
            raise SparseFormatError(f"{where}: 2:4 index is corrupt (positions not increasing)")
        out = np.zeros((n_groups, 4), dtype=vals.dtype)
        ar = np.arange(n_groups)
        pairs = vals.reshape(n_groups, 2)
        out[ar, i0] = pairs[:, 0]
        out[ar, i1] = pairs[:, 1]
        return _from_ints(out, dtype).view(rows, cols)
    raise SparseFormatError(f"{where}: unknown tensor format {fmt!r}")


# --------------------------------------------------------------------------- save


def _linear_weight_keys(model: nn.Module, targets: Iterable[str] | None) -> set[str]:
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if targets is None:
        return {f"{n}.weight" for n in linears}
    keys = set()
    for t in targets:
        name = t.removesuffix(".weight")
        if name not in linears:
            raise ValueError(f"target {t!r} is not an nn.Linear of the model")
        keys.add(f"{name}.weight")
    return keys


def _storage_key(t: torch.Tensor) -> tuple:
    return (
        t.device.type,
        t.untyped_storage().data_ptr(),
        t.storage_offset(),
        tuple(t.shape),
        tuple(t.stride()),
        t.dtype,
    )


def _write_processor_files(model: nn.Module, tmp: Path, processor: WhisperProcessor | None) -> None:
    if processor is not None:
        processor.save_pretrained(str(tmp))
        return
    src = Path(str(getattr(model, "name_or_path", "") or ""))
    found = [src / f for f in PROCESSOR_FILES if src.is_dir() and (src / f).is_file()]
    for f in found:
        shutil.copyfile(f, tmp / f.name)
    try:
        from transformers import WhisperProcessor

        WhisperProcessor.from_pretrained(str(tmp))
    except Exception as exc:
        raise ValueError(
            f"save_sparse: no usable processor files next to the model (name_or_path="
            f"{str(src)!r}, found {[f.name for f in found]}); pass processor=...: {exc}"
        ) from exc


def _dir_bytes(path: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in Path(path).rglob(pattern) if p.is_file())


def save_sparse(
    model: WhisperForConditionalGeneration,
    out_dir: str | os.PathLike,
    *,
    targets: list[str] | None = None,
    processor: WhisperProcessor | None = None,
    overwrite: bool = True,
) -> dict[str, Any]:
    """Write ``model`` to ``out_dir`` in the sparse format; return a summary.

    ``targets``: nn.Linear names (``model.encoder.layers.0.fc1``; a ``.weight`` suffix is
    accepted) stored sparse, 2:4 when every group of 4 inputs has >= 2 zeros, else bitmask.
    ``None``: every nn.Linear weight for which a sparse form is smaller than dense.
    Other tensors are stored dense. ``processor``: saved alongside; when ``None`` the processor
    files are copied from ``model.name_or_path``. The directory is built in a temp dir next
    to ``out_dir`` and renamed into place; ``overwrite=False`` refuses an existing ``out_dir``.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists (overwrite=False)")
    sparse_keys = _linear_weight_keys(model, targets)
    state = model.state_dict()

    canonical: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for key, t in state.items():
        sk = _storage_key(t)
        if sk in canonical:
            aliases[key] = canonical[sk]
        else:
            canonical[sk] = key
    forced = {aliases.get(k, k) for k in sparse_keys} if targets is not None else set()
    auto = {aliases.get(k, k) for k in sparse_keys} if targets is None else set()

    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict[str, Any]] = {}
    for key, t in state.items():
        if key in aliases:
            continue
        sparse = True if key in forced else (None if key in auto else False)
        fmt, enc, meta = encode_tensor(key, t, sparse=sparse)
        tensors.update(enc)
        entries[key] = meta

    with atomic_directory(out_dir) as tmp:
        from safetensors.torch import save_file

        save_file(
            tensors,
            str(tmp / WEIGHTS_NAME),
            metadata={
                "format": "pt",
                "sparse_format": FORMAT_NAME,
                "format_version": str(FORMAT_VERSION),
            },
        )
        del tensors
        model.config.save_pretrained(str(tmp))
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(str(tmp))
        _write_processor_files(model, tmp, processor)
        cfg = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "weights": WEIGHTS_NAME,
            "model_class": type(model).__name__,
            "tensors": entries,
            "aliases": aliases,
        }
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=1), encoding="utf-8")

    formats = {k: e["format"] for k, e in entries.items()}
    sparse_entries = {k: e for k, e in entries.items() if e["format"] != "dense"}
    return {
        "out_dir": str(out_dir),
        "formats": formats,
        "n_sparse": len(sparse_entries),
        "n_2_4": sum(e["format"] == "2:4" for e in sparse_entries.values()),
        "n_bitmask": sum(e["format"] == "bitmask" for e in sparse_entries.values()),
        "aliases": aliases,
        "weights_bytes": (out_dir / WEIGHTS_NAME).stat().st_size,
        "dir_bytes": _dir_bytes(out_dir),
    }


# --------------------------------------------------------------------------- load


def _read_config(out_dir: Path) -> dict[str, Any]:
    return read_format_config(
        out_dir,
        config_name=CONFIG_NAME,
        format_name=FORMAT_NAME,
        version=FORMAT_VERSION,
        error=SparseFormatError,
        what="sparse model directory",
    )


def _load_state(out_dir: Path, verify: bool) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    cfg = _read_config(out_dir)
    wpath = out_dir / cfg.get("weights", WEIGHTS_NAME)
    if not wpath.is_file():
        raise SparseFormatError(f"{wpath} is missing")
    try:
        tensors = load_file(str(wpath))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise SparseFormatError(
            f"{wpath} is truncated or corrupt ({wpath.stat().st_size} bytes): {exc}"
        ) from exc
    state: dict[str, torch.Tensor] = {}
    for key, meta in cfg["tensors"].items():
        w = decode_tensor(key, meta, tensors, where=str(wpath))
        if verify and _sha256(w) != meta.get("sha256"):
            raise SparseFormatError(
                f"{wpath}: {key} ({meta.get('format')}) does not match its sha256: "
                "the file is corrupt"
            )
        state[key] = w
    for alias, target in cfg.get("aliases", {}).items():
        if target not in state:
            raise SparseFormatError(
                f"{out_dir / CONFIG_NAME}: alias {alias!r} -> unknown {target!r}"
            )
        state[alias] = state[target]
    return cfg, state


def load_sparse_state_dict(
    out_dir: str | os.PathLike, *, verify: bool = True
) -> dict[str, torch.Tensor]:
    """Dense CPU state dict of a sparse directory (aliased keys share one tensor)."""
    return _load_state(Path(out_dir), verify)[1]


def load_sparse(
    out_dir: str | os.PathLike, device: str | torch.device = "cpu", *, verify: bool = True
) -> WhisperForConditionalGeneration:
    """Load a directory written by :func:`save_sparse` (eval mode, weights bit-identical).

    ``verify`` checks each reconstructed tensor against its stored sha256; ``device="auto"``
    picks cuda when available. ``WhisperProcessor.from_pretrained(out_dir)`` gives the
    matching processor.
    """
    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration

    from .loading import resolve_device

    out_dir = Path(out_dir)
    cfg, state = _load_state(out_dir, verify)
    try:
        config = WhisperConfig.from_pretrained(str(out_dir))
    except (OSError, ValueError) as exc:
        raise SparseFormatError(f"{out_dir}: missing or corrupt config.json: {exc}") from exc
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise SparseFormatError(f"{out_dir}: tensors do not fit the model config: {exc}") from exc
    for alias, target in cfg.get("aliases", {}).items():  # restore tied parameters
        mod_a, _, attr_a = alias.rpartition(".")
        mod_t, _, attr_t = target.rpartition(".")
        setattr(model.get_submodule(mod_a), attr_a, getattr(model.get_submodule(mod_t), attr_t))
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise SparseFormatError(f"{out_dir}: no data for {left[:5]}")
    if (out_dir / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(out_dir))
    model.config.name_or_path = str(out_dir)
    model.to(resolve_device(device))
    model.eval()
    return model


# --------------------------------------------------------------------------- sizes


def sparse_size_report(
    model_dir_dense: str | os.PathLike, sparse_dir: str | os.PathLike
) -> dict[str, Any]:
    """Bytes on disk of a ``save_pretrained`` directory vs a :func:`save_sparse` one.

    ``*_weights_bytes`` count only the weight files (``*.safetensors``/``*.bin``);
    ``*_dir_bytes`` every file. Ratios are sparse / dense. ``linear_*`` sum over the
    sparse-stored tensors only: their dense size vs their encoded size (from the config).
    """
    dense, sparse = Path(model_dir_dense), Path(sparse_dir)
    cfg = _read_config(sparse)
    dw = _dir_bytes(dense, "*.safetensors") + _dir_bytes(dense, "*.bin")
    sw = _dir_bytes(sparse, "*.safetensors")
    dd, sd = _dir_bytes(dense), _dir_bytes(sparse)
    lin_dense = lin_sparse = 0
    formats: dict[str, int] = {}
    for meta in cfg["tensors"].values():
        formats[meta["format"]] = formats.get(meta["format"], 0) + 1
        if meta["format"] == "dense":
            continue
        item = torch.empty((), dtype=getattr(torch, meta["dtype"])).element_size()
        n = int(np.prod(meta["shape"]))
        lin_dense += n * item
        lin_sparse += _sparse_nbytes(meta["format"], n, item, int(meta.get("nnz", 0)))
    return {
        "dense_weights_bytes": dw,
        "sparse_weights_bytes": sw,
        "weights_ratio": sw / dw if dw else float("nan"),
        "dense_dir_bytes": dd,
        "sparse_dir_bytes": sd,
        "dir_ratio": sd / dd if dd else float("nan"),
        "sparse_tensors_dense_bytes": lin_dense,
        "sparse_tensors_bytes": lin_sparse,
        "sparse_tensors_ratio": lin_sparse / lin_dense if lin_dense else float("nan"),
        "formats": formats,
    }
