"""The model card (``README.md``) written into every model directory the project saves.

A pruned folder copied out of ``artifacts/`` (or pushed to a hub) must still say what it is:
the base model, how it was compressed, on what audio it was calibrated, how it scored and the
command that made it. The metadata block at the top is the Hugging Face model-card header, so
the hub shows the base model and the task.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from .loading import BUNDLED, BUNDLED_PREFIX

CARD_NAME = "README.md"


def base_model_id(model_id: str) -> str:
    """The hub id a model came from: a bundled model names the checkpoint it converts."""
    if model_id.startswith(BUNDLED_PREFIX):
        bundled = BUNDLED.get(model_id[len(BUNDLED_PREFIX) :])
        if bundled is not None and bundled.hub_id:
            return bundled.hub_id
    return model_id


def _table(rows: Mapping[str, object]) -> str:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows.items() if v is not None]
    return "\n".join(lines)


def model_card(
    *,
    model_id: str,
    title: str,
    compression: Mapping[str, object],
    calibration: Mapping[str, object] | None,
    evaluation: Mapping[str, Mapping[str, float]] | None,
    command: str,
    how: str,
    language: str | None = "en",
    tags: tuple[str, ...] = (),
) -> str:
    """The card's text. ``evaluation``: split name -> {"wer", "cer", "clips"} (fractions);
    ``how``: one sentence from the caller on how the weights were chosen (it differs by method).
    """
    base = base_model_id(model_id)
    header = [
        "---",
        f"base_model: {base}",
        "library_name: transformers",
        "pipeline_tag: automatic-speech-recognition",
    ]
    if language:
        header.append(f"language: [{language}]")
    header += [f"tags: [{', '.join(('whisper', 'whisper-obs', *tags))}]", "---", ""]
    body = [
        f"# {title}",
        "",
        f"Compressed from `{base}` (loaded as `{model_id}`) by whisper-obs: {how}",
        "",
        "## Compression",
        "",
        _table(compression),
        "",
        "## Calibration",
        "",
        _table(calibration) if calibration else "None: this method reads no Hessians.",
        "",
        "## Evaluation",
        "",
    ]
    if evaluation:
        body += ["| split | WER % | CER % | clips |", "|---|---|---|---|"]
        body += [
            f"| {split} | {100 * m['wer']:.2f} | {100 * m['cer']:.2f} | {m.get('clips', '')} |"
            for split, m in evaluation.items()
        ]
    else:
        body.append(
            "Not scored in this folder. `dvc repro evaluate` (or `whisper-obs evaluate --model "
            "DIR --data FOLDER`) writes WER and CER, per split and per clip, to `metrics/`."
        )
    body += [
        "",
        "## Reproduce",
        "",
        "```",
        command,
        "```",
        "",
        "## Use",
        "",
        "```python",
        "from transformers import WhisperForConditionalGeneration, WhisperProcessor",
        "model = WhisperForConditionalGeneration.from_pretrained(DIR)",
        "processor = WhisperProcessor.from_pretrained(DIR)",
        "```",
        "",
    ]
    return "\n".join(header + body)


def write_model_card(model_dir: str | Path, text: str) -> Path:
    """Write the card into a model directory being built (an atomic directory's temp)."""
    path = Path(model_dir) / CARD_NAME
    path.write_text(text, encoding="utf-8")
    return path
