"""A small checkpoint of a quantized (and possibly pruned) Whisper, loading back bit for bit.

Directory layout (``format_version`` 1)::

    quant_config.json          format, version, sha256 of the weights file, per-tensor table
    model.quant.safetensors    the tensors below (uint8 / float16 / float32)
    config.json, generation_config.json (+ processor files when a processor is given)

Per quantized ``nn.Linear`` weight ``k`` (``[rows, cols]``, spec ``bits``/``group_size``/
``symmetric``), whichever of the two layouts is smaller:

- ``q-dense``: ``k::codes``, all ``rows*cols`` codes row-major, ``bits`` bits each, packed
  (int8 one per byte, int4 two per byte; see ``packing.py``).
- ``q-bitmask``: ``k::mask``, packed bits of ``codes != zero`` (i.e. weight != 0) row-major,
  and ``k::codes``, only those codes, packed. Unstored codes are the zero point (weight 0.0).

plus ``k::scale`` (float16 ``[rows, n_groups]``) and, for asymmetric grids, ``k::zero``
(packed ``bits``-bit zero points); symmetric grids have the fixed zero ``2**(bits-1)``.
Loading rebuilds the codes and calls the same ``grid.dequantize`` that produced the evaluated
weight, so the weight is bit-identical (float32). Other tensors (embeddings, convs, norms,
biases, non-quantized Linears) are stored in ``other_dtype`` (float16 by default; float32 is
lossless); with float16 they load as ``t.half().float()``. Tied tensors (``proj_out`` =
``embed_tokens``) are stored once and listed under ``aliases``.

Integrity: the weights file's sha256 is checked before it is parsed (a truncated or edited
file is refused with ``QuantCheckpointError``), each reconstructed tensor is checked against
the sha256 of its bytes, and saving refuses a model whose Linear weight is not exactly the
quantized result (the checkpoint must hold the weights that were evaluated).

Why not ``compressed-tensors`` (PyPI 0.20.0, inspected): its ``pack-quantized`` compressor
packs int4/int8 (into int32) for ``nn.Linear`` but 0.20.0 no longer ships any sparse
compressor: ``sparse-bitmask`` / ``sparse-24-bitmask`` survive only as config classes, the
ModelCompressor rejects sparsity configs ("Sparse24 ... no longer supported as of >0.14.0"),
so bitmask-sparse + packed codes in one tensor is not possible. Its compressor also
*re-quantizes* the float weight from ``weight_scale`` (no path to store our own codes), needs
``loguru`` (not in our environment) and a quantization-scheme lifecycle on the model. A format
of our own is ~200 lines, has no dependency, and its exactness is tested here.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import atomic_directory, sha256_file
from ..errors import WhisperObsError
from ..format_config import read_format_config
from .grid import QuantResult, QuantSpec, dequantize
from .packing import pack_codes, pack_mask, packed_nbytes, unpack_codes, unpack_mask

FORMAT_NAME = "whisper-obs-quant"
FORMAT_VERSION = 1
CONFIG_NAME = "quant_config.json"
WEIGHTS_NAME = "model.quant.safetensors"
SEP = "::"
_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


class QuantCheckpointError(WhisperObsError, ValueError):
    """A quantized checkpoint is missing, truncated, edited, or inconsistent with its model."""


def _sha256(t: torch.Tensor) -> str:
    arr = t.detach().contiguous().cpu().view(torch.uint8).numpy()
    return hashlib.sha256(memoryview(arr).cast("B")).hexdigest()


# ---------------------------------------------------------------- one quantized tensor
def encode_quantized(key: str, res: QuantResult) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and table entry of one quantized weight (the smaller of dense / bitmask)."""
    spec = res.spec
    rows, cols = res.codes.shape
    codes = res.codes.reshape(-1)
    zero_full = res.zero[:, spec.group_index(cols)].reshape(-1)
    nz = codes != zero_full
    nnz = int(nz.sum())
    n = rows * cols
    dense_bytes = packed_nbytes(n, spec.bits)
    sparse_bytes = packed_nbytes(nnz, spec.bits) + packed_nbytes(n, 1)
    tensors: dict[str, torch.Tensor] = {f"{key}{SEP}scale": res.scale.half().contiguous()}
    if sparse_bytes < dense_bytes:
        fmt = "q-bitmask"
        tensors[f"{key}{SEP}mask"] = pack_mask(nz)
        tensors[f"{key}{SEP}codes"] = pack_codes(codes[nz], spec.bits)
    else:
        fmt = "q-dense"
        tensors[f"{key}{SEP}codes"] = pack_codes(codes, spec.bits)
    if not spec.symmetric:
        tensors[f"{key}{SEP}zero"] = pack_codes(res.zero, spec.bits)
    meta = {
        "format": fmt,
        "shape": [rows, cols],
        "dtype": "float32",
        "bits": spec.bits,
        "group_size": spec.group_size,
        "symmetric": spec.symmetric,
        "nnz": nnz,
        "sha256": _sha256(res.weight.float()),
    }
    return tensors, meta


def _need(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in tensors:
        raise QuantCheckpointError(f"tensor {name!r} is missing from the weights file")
    return tensors[name]


def decode_quantized(key: str, meta: dict, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Rebuild the float32 weight of one quantized tensor (raises QuantCheckpointError)."""
    try:
        spec = QuantSpec(int(meta["bits"]), bool(meta["symmetric"]), meta["group_size"])
        rows, cols = (int(v) for v in meta["shape"])
        n = rows * cols
        ng = spec.n_groups(cols)
        scale = _need(tensors, f"{key}{SEP}scale")
        if scale.dtype != torch.float16 or tuple(scale.shape) != (rows, ng):
            raise QuantCheckpointError(
                f"{key}: scale has dtype/shape {scale.dtype}/{tuple(scale.shape)}"
            )
        if spec.symmetric:
            zero = torch.full((rows, ng), 1 << (spec.bits - 1), dtype=torch.uint8)
        else:
            zero = unpack_codes(_need(tensors, f"{key}{SEP}zero"), spec.bits, rows * ng)
            zero = zero.reshape(rows, ng)
        zero_full = zero[:, spec.group_index(cols)].reshape(-1)
        packed = _need(tensors, f"{key}{SEP}codes")
        if meta["format"] == "q-dense":
            codes = unpack_codes(packed, spec.bits, n)
        elif meta["format"] == "q-bitmask":
            nz = unpack_mask(_need(tensors, f"{key}{SEP}mask"), n)
            nnz = int(nz.sum())
            if nnz != int(meta["nnz"]):
                raise QuantCheckpointError(
                    f"{key}: mask has {nnz} kept weights, table says {meta['nnz']}"
                )
            codes = zero_full.clone()
            codes[nz] = unpack_codes(packed, spec.bits, nnz)
        else:
            raise QuantCheckpointError(f"{key}: unknown format {meta['format']!r}")
        return dequantize(codes.reshape(rows, cols), scale, zero, spec)
    except QuantCheckpointError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise QuantCheckpointError(f"{key}: corrupt entry ({exc})") from exc


# ---------------------------------------------------------------- whole model
def _linear_names(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def save_quantized(
    model: nn.Module,
    results: dict[str, QuantResult],
    out_dir: str | os.PathLike,
    *,
    other_dtype: str = "float16",
    processor: Any = None,
) -> dict[str, Any]:
    """Write ``model`` with its quantized Linears (``results``: layer name -> result) to
    ``out_dir``; return a summary with the byte counts.

    Each result's weight must already be installed in the model bit for bit (refused
    otherwise). ``other_dtype``: storage of every other floating tensor.
    """
    if other_dtype not in _DTYPES:
        raise QuantCheckpointError(
            f"other_dtype must be one of {sorted(_DTYPES)}, got {other_dtype!r}"
        )
    odt = _DTYPES[other_dtype]
    linears = _linear_names(model)
    for name, res in results.items():
        lin = linears.get(name.removesuffix(".weight"))
        if lin is None:
            raise QuantCheckpointError(f"{name!r} is not an nn.Linear of the model")
        w = lin.weight.detach()
        if w.dtype != torch.float32 or not torch.equal(
            w.view(torch.int32), res.weight.view(torch.int32)
        ):
            raise QuantCheckpointError(
                f"{name}: the model's weight is not the quantized result (install result.weight "
                "in the model first; the checkpoint must hold the evaluated weights)"
            )
    qkeys = {f"{n.removesuffix('.weight')}.weight": res for n, res in results.items()}
    state = model.state_dict()
    seen: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    table: dict[str, dict] = {}
    tensors: dict[str, torch.Tensor] = {}
    # Quantized tensors first: a quantized proj_out makes the tied embedding its alias.
    order = sorted(state, key=lambda k: k not in qkeys)
    for key in order:
        t = state[key]
        sk = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if sk in seen and t.numel():
            aliases[key] = seen[sk]
            continue
        seen[sk] = key
        if key in qkeys:
            tens, meta = encode_quantized(key, qkeys[key])
            tensors.update(tens)
            table[key] = meta
            continue
        stored = t.detach().to(odt) if t.is_floating_point() else t.detach()
        stored = stored.contiguous().clone()
        back = stored.to(t.dtype)
        tensors[key] = stored
        table[key] = {
            "format": "plain",
            "shape": list(t.shape),
            "dtype": str(t.dtype).removeprefix("torch."),
            "stored_dtype": str(stored.dtype).removeprefix("torch."),
            "sha256": _sha256(back),
        }
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME))
        if hasattr(model, "config"):
            model.config.save_pretrained(str(tmp))
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(str(tmp))
        if processor is not None:
            processor.save_pretrained(str(tmp))
        cfg = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "weights": WEIGHTS_NAME,
            "weights_sha256": sha256_file(tmp / WEIGHTS_NAME),
            "other_dtype": other_dtype,
            "tensors": table,
            "aliases": aliases,
        }
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=1) + "\n", encoding="utf-8")
    return checkpoint_summary(out_dir)


def round_unquantized_(
    model: nn.Module, results: dict[str, QuantResult], other_dtype: str = "float16"
) -> nn.Module:
    """Round, in place, every floating tensor that is not a quantized weight to ``other_dtype``
    and back, so the in-memory model (the one evaluated) equals what the checkpoint loads,
    bit for bit, also with ``other_dtype="float16"``."""
    odt = _DTYPES[other_dtype]
    qkeys = {f"{n.removesuffix('.weight')}.weight" for n in results}
    state = model.state_dict()
    quantized = {state[k].data_ptr() for k in qkeys if k in state}  # and what is tied to them
    with torch.no_grad():
        for key, t in state.items():
            if key not in qkeys and t.is_floating_point() and t.data_ptr() not in quantized:
                t.copy_(t.to(odt).to(t.dtype))
    return model


def checkpoint_summary(out_dir: str | os.PathLike) -> dict[str, Any]:
    out_dir = Path(out_dir)
    cfg = _read_config(out_dir)
    formats: dict[str, int] = {}
    for meta in cfg["tensors"].values():
        formats[meta["format"]] = formats.get(meta["format"], 0) + 1
    return {
        "dir": str(out_dir),
        "weights_bytes": (out_dir / cfg["weights"]).stat().st_size,
        "total_bytes": sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file()),
        "formats": formats,
    }


def _read_config(out_dir: Path) -> dict[str, Any]:
    return read_format_config(
        out_dir,
        config_name=CONFIG_NAME,
        format_name=FORMAT_NAME,
        version=FORMAT_VERSION,
        error=QuantCheckpointError,
        what="quantized checkpoint",
        tables={"tensors": dict, "weights": str},
    )


def load_quantized_state_dict(out_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The verified state dict (dequantized float32 Linears, other tensors upcast)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    out_dir = Path(out_dir)
    cfg = _read_config(out_dir)
    wpath = out_dir / Path(cfg["weights"]).name
    if not wpath.is_file():
        raise QuantCheckpointError(f"{wpath} is missing")
    if sha256_file(wpath) != cfg.get("weights_sha256"):
        raise QuantCheckpointError(
            f"{wpath} is truncated or was modified ({wpath.stat().st_size} bytes; sha256 "
            "does not match quant_config.json): refusing to load it"
        )
    try:
        tensors = load_file(str(wpath))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise QuantCheckpointError(f"{wpath} is corrupt: {exc}") from exc
    state: dict[str, torch.Tensor] = {}
    for key, meta in cfg["tensors"].items():
        if meta.get("format") == "plain":
            t = _need(tensors, key)
            dtype = getattr(torch, str(meta.get("dtype")), None)
            if not isinstance(dtype, torch.dtype) or list(t.shape) != list(meta.get("shape", [])):
                raise QuantCheckpointError(f"{key}: shape or dtype does not match the table")
            w = t.to(dtype)
        else:
            w = decode_quantized(key, meta, tensors)
        if _sha256(w) != meta.get("sha256"):
            raise QuantCheckpointError(
                f"{wpath}: {key} ({meta.get('format')}) does not match its sha256: corrupt"
            )
        state[key] = w
    for alias, target in cfg.get("aliases", {}).items():
        if target not in state:
            raise QuantCheckpointError(f"alias {alias!r} -> unknown tensor {target!r}")
        state[alias] = state[target]
    return state


def load_quantized(out_dir: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Load into ``model`` (strict), or into a fresh ``WhisperForConditionalGeneration`` built
    from the directory's ``config.json``."""
    state = load_quantized_state_dict(out_dir)
    if model is None:
        from transformers import WhisperConfig, WhisperForConditionalGeneration

        model = WhisperForConditionalGeneration(WhisperConfig.from_pretrained(str(out_dir)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise QuantCheckpointError(
            f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model.eval()


def model_bytes(model: nn.Module, dtype_bytes: int) -> int:
    """Bytes of the model's distinct parameters and buffers at ``dtype_bytes`` per element."""
    seen: set = set()
    total = 0
    for t in model.state_dict().values():
        k = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if k in seen:
            continue
        seen.add(k)
        total += t.numel() * (dtype_bytes if t.is_floating_point() else t.element_size())
    return total


__all__ = [
    "QuantCheckpointError",
    "checkpoint_summary",
    "decode_quantized",
    "encode_quantized",
    "load_quantized",
    "load_quantized_state_dict",
    "model_bytes",
    "round_unquantized_",
    "save_quantized",
]
