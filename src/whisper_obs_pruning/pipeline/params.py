"""``params.yaml`` as typed, validated specs, parsed once (pydantic v2, ``extra="forbid"``).

A typo in params.yaml must fail in the first second with the dotted key, the bad value and the
allowed values, not an hour later inside a stage. The defaults live here, in the models, and
nowhere else in the code; the committed ``params.yaml`` spells them out because DVC needs every
declared key present (a test keeps the two equal). Stage bodies receive a :class:`Params` and
read typed fields (``p.prune.pattern_tuple`` is parsed once), never the raw dict.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from ..errors import PruningError, WhisperObsError
from ..sparsity import Pattern, parse_pattern

MAX_QUOTED = 80  # longest value repr quoted in an error message


class ParamsError(WhisperObsError, ValueError):
    """Invalid params.yaml; the message names the key."""


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= MAX_QUOTED else text[: MAX_QUOTED - 3] + "..."


def _bad(message: str, value: object) -> PydanticCustomError:
    """An error whose text follows the key: ``<key> = <value> <message>``."""
    return PydanticCustomError("whisper_obs", "= {value} " + message, {"value": _short(value)})


# ------------------------------------------------------------------ reusable field checks
def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise TypeError
    return float(value)


def _sparsity(value: object) -> float:
    try:
        v = _number(value)
    except TypeError:
        v = -1.0
    if not 0 <= v < 1:
        raise _bad("must be a number in [0, 1)", value)
    return v


def _positive_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _bad("must be a positive integer", value)
    return value


def _optional_positive_int(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _bad("must be a positive integer or null (all)", value)
    return value


def _finite_non_negative(value: object, message: str) -> float:
    try:
        v = _number(value)
    except TypeError:
        v = -1.0
    if not (0 <= v < math.inf):
        raise _bad(message, value)
    return v


def _non_negative(value: object) -> float:
    return _finite_non_negative(value, "must be a finite number >= 0")


def _max_mb(value: object) -> float | None:
    if value is None:
        return None
    return _finite_non_negative(value, "must be a number >= 0 (MiB) or null (no limit)")


def _registry() -> dict:
    """The method registry, imported when a method is validated (not at import: calibrate's
    code, and so its DVC deps, must not include the methods)."""
    from ..methods import REGISTRY

    return REGISTRY


def _method(value: object) -> str:
    registry = _registry()
    if not isinstance(value, str) or value not in registry:
        raise _bad(f"is not allowed; choose one of {list(registry)}", value)
    return value


def _allocation(value: object) -> str:
    from ..pruning.allocation import ALLOCATIONS

    if value not in ALLOCATIONS:
        raise _bad(f"is not allowed; choose one of {list(ALLOCATIONS)}", value)
    return value


def _pattern(value: object) -> str:
    if value is not None and not isinstance(value, str):
        raise _bad("must be 'unstructured' or an 'N:M' string such as '2:4'", value)
    try:
        parse_pattern(value)
    except PruningError as exc:
        raise PydanticCustomError("whisper_obs", ": {msg}", {"msg": str(exc)}) from None
    return value or "unstructured"


def _nm_pattern(value: object) -> str:
    value = _pattern(value)
    if parse_pattern(value) is None:
        raise _bad(
            "is not N:M; sweep.patterns lists N:M patterns (unstructured: sparsities)", value
        )
    return value


def _text(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise _bad("must be a non-empty string", value)
    if len(value) > 1024:
        raise _bad("is too long (at most 1024 characters)", value)
    return value


def _count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _bad("must be an integer >= 0", value)
    return value


def _seed(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32:
        raise _bad("must be an integer in [0, 2**32)", value)
    return value


def _name_list(value: object) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise PydanticCustomError("whisper_obs", "must be a list of layer names or regexes")
    return value


Sparsity = Annotated[float, BeforeValidator(_sparsity)]
PositiveInt = Annotated[int, BeforeValidator(_positive_int)]
OptionalPositiveInt = Annotated[int | None, BeforeValidator(_optional_positive_int)]
NonNegativeInt = Annotated[int, BeforeValidator(_count)]
NonNegative = Annotated[float, BeforeValidator(_non_negative)]
Text = Annotated[str, BeforeValidator(_text)]
MethodName = Annotated[str, BeforeValidator(_method)]
PatternName = Annotated[str, BeforeValidator(_pattern)]
NMPattern = Annotated[str, BeforeValidator(_nm_pattern)]
NameList = Annotated[list[str] | None, BeforeValidator(_name_list)]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


# ------------------------------------------------------------------ sections
def _device(value: str) -> str:
    if value == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise _bad("but this machine has no usable CUDA GPU; use auto or cpu", value)
    return value


def _language(value: str) -> str:
    from transformers.models.whisper.tokenization_whisper import LANGUAGES, TO_LANGUAGE_CODE

    lang = value.strip().lower().removeprefix("<|").removesuffix("|>")
    if lang not in LANGUAGES and lang not in TO_LANGUAGE_CODE:
        raise _bad("is not a Whisper language (e.g. en, de, english)", value)
    return value


class ModelSpec(_Spec):
    id: Text = "bundled:tiny.en"
    device: Annotated[Literal["auto", "cpu", "cuda"], AfterValidator(_device)] = "auto"
    language: Annotated[Text, AfterValidator(_language)] = "en"


class SplitSpec(_Spec):
    source: Text = "embedded"
    split: Text
    max_samples: OptionalPositiveInt = None


def _split_name(value: object) -> str:
    if not isinstance(value, str) or not value.isidentifier():
        raise _bad("must be a short identifier (letters, digits, _), e.g. real", value)
    return value


class NamedSplitSpec(SplitSpec):
    """A further evaluation split, scored at every sweep point as ``wer_<name>``."""

    name: Annotated[str, BeforeValidator(_split_name)]


class DataSpec(_Spec):
    calibration: SplitSpec = SplitSpec(split="calibration")
    evaluation: SplitSpec = SplitSpec(split="evaluation")
    extra_evaluation: list[NamedSplitSpec] = [
        NamedSplitSpec(name="real", source="embedded", split="real/evaluation")
    ]


class CalibrateSpec(_Spec):
    hessian: Literal["full", "diagonal"] = "full"
    exclude_padding: bool = False
    batch_size: PositiveInt = 8
    max_hessian_mb: Annotated[float | None, BeforeValidator(_max_mb)] = 2048

    @property
    def max_hessian_bytes(self) -> int | None:
        return None if self.max_hessian_mb is None else int(self.max_hessian_mb * 2**20)


class TargetsSpec(_Spec):
    include: NameList = [".*"]
    exclude: NameList = ["proj_out"]

    @model_validator(mode="after")
    def _not_empty(self) -> TargetsSpec:
        if self.include == []:
            raise PydanticCustomError(
                "whisper_obs", "include = [] selects no layer; use ['.*'] for all Linears"
            )
        return self


class PruneSpec(_Spec):
    """What one prune does; ``method_kwargs()`` is what every method and allocation read."""

    method: MethodName = "obs"
    sparsity: Sparsity = 0.5
    pattern: PatternName = "unstructured"
    rel_damp: NonNegative = 0.01
    blocksize: PositiveInt = 128
    scope: Literal["row", "layer"] = "row"
    allocation: Annotated[str, BeforeValidator(_allocation)] = "uniform"
    owl_lambda: Annotated[float, Field(ge=0, lt=0.5)] = 0.08
    obs_rows: Literal["uniform", "global"] = "uniform"
    sequential: bool = False
    targets: TargetsSpec = TargetsSpec()

    @property
    def pattern_tuple(self) -> Pattern:
        return parse_pattern(self.pattern)

    @property
    def target_sparsity(self) -> float:
        pat = self.pattern_tuple
        return self.sparsity if pat is None else pat[0] / pat[1]

    def method_kwargs(self) -> dict[str, Any]:
        return {
            "rel_damp": self.rel_damp,
            "blocksize": self.blocksize,
            "scope": self.scope,
            "allocation": self.allocation,
            "owl_lambda": self.owl_lambda,
            "obs_rows": self.obs_rows,
        }

    @model_validator(mode="after")
    def _consistent(self) -> PruneSpec:
        if self.allocation != "uniform" and self.pattern_tuple is not None:
            raise PydanticCustomError(
                "whisper_obs", "allocation must be 'uniform' with an N:M pattern"
            )
        if self.sequential and self.allocation != "uniform":
            raise PydanticCustomError(
                "whisper_obs", "sequential = true needs allocation = 'uniform'"
            )
        if not _registry()[self.method].supports(self.pattern_tuple):
            raise PydanticCustomError(
                "whisper_obs",
                "method '{m}' does not support pattern {p}",
                {"m": self.method, "p": self.pattern},
            )
        return self


class EvaluateSpec(_Spec):
    batch_size: PositiveInt = 16
    # torch: our batched greedy decoder; ct2: CTranslate2 float32 on the model converted in
    # memory (token-for-token the same, tests/test_ct2_export.py; less CPU per clip)
    backend: Literal["torch", "ct2"] = "torch"


def _scheme(value: object, *, ct2: bool = True, same: bool = False) -> str:
    from ..quant.grid import QuantError, parse_scheme
    from ..whisper.ct2_export import CT2ExportError, ct2_quantization

    examples = "'int8', 'int4-g128', 'int4-g64-asym'" + (", 'ct2-int8'" if ct2 else "")
    if not isinstance(value, str):
        raise _bad(f"must be 'none' or a scheme such as {examples}", value)
    text = value.strip().lower()
    if same and text == "same":
        return text
    try:
        if ct2_quantization(text) is not None:
            if not ct2:
                raise QuantError(f"{value!r}: a CTranslate2 export is a sweep point, not a layer")
            return text
        parse_scheme(text)
    except (QuantError, CT2ExportError) as exc:
        raise PydanticCustomError("whisper_obs", ": {msg}", {"msg": str(exc)}) from None
    return text


def _quantizer(value: object) -> str:
    from ..quant.registry import QUANTIZERS

    if value not in QUANTIZERS:
        raise _bad(f"is not allowed; choose one of {list(QUANTIZERS)}", value)
    return value


class QuantSection(_Spec):
    """How quantized sweep points are made (``sweep.quant`` lists the schemes)."""

    method: Annotated[str, BeforeValidator(_quantizer)] = "gptq"
    other_dtype: Literal["float16", "float32"] = (
        "float16"  # non-quantized tensors in the checkpoint
    )
    # the token embedding (tied to proj_out): a scheme of its own (GPTQ through proj_out's
    # Hessian) | same (the point's scheme) | none (other_dtype)
    embedding: Annotated[str, BeforeValidator(lambda v: _scheme(v, ct2=False, same=True))] = "int6"


class SweepSpec(_Spec):
    methods: Annotated[list[MethodName], Field(min_length=1)] = [
        "magnitude",
        "diagonal",
        "sparsegpt",
        "obs",
    ]
    sparsities: list[Sparsity] = [0.5, 0.7]
    patterns: Annotated[list[NMPattern], BeforeValidator(lambda v: [] if v is None else v)] = [
        "2:4"
    ]
    quant: Annotated[list[Annotated[str, BeforeValidator(_scheme)]], Field(min_length=1)] = ["none"]
    extra_splits: bool = False  # also score every point on data.extra_evaluation
    latency_clips: NonNegativeInt = 0  # clips timed per point against dense PyTorch (0: none)


class MlflowSpec(_Spec):
    experiment: Text = "whisper-obs"
    tracking_uri: Annotated[str | None, BeforeValidator(lambda v: v if v is None else _text(v))] = (
        None
    )
    log_model: bool = True  # the prune stage logs its model folder (~150 MB for tiny.en)


class Params(_Spec):
    """The whole params.yaml."""

    seed: Annotated[int, BeforeValidator(_seed)] = 0
    model: ModelSpec = ModelSpec()
    data: DataSpec = DataSpec()
    calibrate: CalibrateSpec = CalibrateSpec()
    prune: PruneSpec = PruneSpec()
    evaluate: EvaluateSpec = EvaluateSpec()
    sweep: SweepSpec = SweepSpec()
    frontier: SweepSpec = SweepSpec(
        methods=["obs"],
        sparsities=[0.5],
        patterns=[],
        quant=["none", "int8", "int4-g128", "ct2-int8"],
        extra_splits=True,
        latency_clips=12,
    )
    quant: QuantSection = QuantSection()
    mlflow: MlflowSpec = MlflowSpec()

    @model_validator(mode="after")
    def _statistics_available(self) -> Params:
        if self.calibrate.hessian == "full":
            return self
        if _registry()[self.prune.method].needs_full_hessian:
            raise PydanticCustomError(
                "whisper_obs",
                "prune.method = '{m}' needs calibrate.hessian = 'full' (it is 'diagonal')",
                {"m": self.prune.method},
            )
        for m in [*self.sweep.methods, *self.frontier.methods]:
            if _registry()[m].needs_full_hessian:
                raise PydanticCustomError(
                    "whisper_obs",
                    "sweep.methods has '{m}', which needs calibrate.hessian = 'full'",
                    {"m": m},
                )
        return self

    def updated(self, changes: dict[str, object]) -> Params:
        """A validated copy with dotted keys changed: ``p.updated({"prune.sparsity": 0.7})``."""
        raw = self.model_dump()
        for dotted, value in changes.items():
            node = raw
            *parents, last = dotted.split(".")
            for key in parents:
                node = node[key]
            if last not in node:
                raise ParamsError(f"unknown key {dotted!r} in params")
            node[last] = value
        return parse_params(raw)

    def flat(self) -> dict[str, object]:
        """{"prune.method": ...}; lists comma-joined (MLflow params)."""
        return flatten(self.model_dump())


# ------------------------------------------------------------------ reading
def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += "[]"
        elif isinstance(part, str) and not part.startswith(("function-", "list[", "lambda")):
            out += ("." if out else "") + part
    return out


def _message(exc: ValidationError) -> str:
    err = exc.errors(include_url=False)[0]
    key, kind = _dotted(err["loc"]), err["type"]
    if kind == "extra_forbidden":
        return f"unknown key {key!r} in params"
    if kind == "whisper_obs":
        msg = err["msg"]
        if not key:
            return msg
        if msg.startswith(("=", "must")):
            return f"{key} {msg}"
        return f"{key}{msg}" if msg.startswith(":") else f"{key}: {msg}"
    if kind == "literal_error":
        allowed = err["ctx"]["expected"].replace(" or ", ", ")
        return f"{key} = {_short(err['input'])} is not allowed; choose one of [{allowed}]"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{key or 'params'} must be a mapping, got {_short(err['input'])}"
    return f"{key} = {_short(err['input'])}: {err['msg']}"


def parse_params(raw: object) -> Params:
    """Validate a mapping (as read from YAML) into :class:`Params`; ParamsError names the key."""
    if not isinstance(raw, dict):
        raise ParamsError("params must hold a mapping at the top level")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ParamsError(_message(exc)) from None


def _yaml12() -> YAML:
    """A YAML 1.2 reader, as DVC writes params.yaml (``dvc exp run -S``).

    PyYAML reads YAML 1.1, where an unquoted ``2:4`` is the sexagesimal integer 124 and
    ``1e-4`` is a string; DVC rewrites params.yaml unquoted, so those must read as 1.2.
    """
    return YAML(typ="safe", pure=True)


def _refuse_aliases(text: str, path: Path) -> None:
    """YAML aliases (``*name``) are refused: a few hundred bytes of nested aliases ("billion
    laughs") expand to gigabytes, and params files have no use for them."""
    from ruamel.yaml.events import AliasEvent

    for event in YAML(typ="safe", pure=True).parse(text):
        if isinstance(event, AliasEvent):
            line = event.start_mark.line + 1 if event.start_mark else "?"
            raise ParamsError(
                f"{path}, line {line}: YAML aliases (*{event.anchor}) are not allowed"
            )


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read params.yaml, fill defaults, validate; raise ParamsError naming the bad key."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ParamsError(f"{path} is not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    try:
        _refuse_aliases(text, path)
        raw = _yaml12().load(text) or {}
    except YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path} must hold a mapping at the top level")
    return parse_params(raw)


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
