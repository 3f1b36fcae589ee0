"""The JSON config at the root of a checkpoint format this project writes (sparse, quantized).

Both formats refuse a folder the same way: a missing or corrupt config, another format's
config, an unsupported version, or a missing table each name the file, in the format's own
error class, so a damaged checkpoint is never loaded as wrong weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_format_config(
    out_dir: Path,
    *,
    config_name: str,
    format_name: str,
    version: int,
    error: type[Exception],
    what: str,
    tables: dict[str, type] | None = None,
) -> dict[str, Any]:
    """Read ``out_dir/config_name`` and check its format, version and ``tables`` (key -> type)."""
    path = out_dir / config_name
    if not path.is_file():
        raise error(f"{out_dir} is not a {what}: {config_name} is missing")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise error(f"{path}: unreadable or corrupt JSON: {exc}") from exc
    if not isinstance(cfg, dict) or cfg.get("format") != format_name:
        raise error(f"{path}: not a {format_name} config")
    if cfg.get("format_version") != version:
        raise error(
            f"{path}: format_version {cfg.get('format_version')!r} is not supported "
            f"(this code reads {version})"
        )
    for key, kind in (tables or {"tensors": dict}).items():
        if not isinstance(cfg.get(key), kind):
            raise error(f"{path}: no {key!r} table (a {kind.__name__}) in the config")
    return cfg
