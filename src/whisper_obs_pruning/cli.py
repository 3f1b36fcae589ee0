"""Shared command-line plumbing for the stage scripts: ``--params``, logging, clear failures."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def stage_main(
    name: str,
    body: Callable[[dict, argparse.Namespace], None],
    add_args: Callable[[argparse.ArgumentParser], None] | None = None,
) -> None:
    """Parse ``--params FILE`` (default params.yaml), validate, run ``body``; exit 2 on bad input.

    Known input errors (bad params, data, artifacts, models) print one clear line instead of a
    traceback, and exit non-zero so DVC marks the stage failed and keeps its previous outputs.
    """
    from .artifacts import ArtifactError
    from .data import DataError
    from .methods import PruningError
    from .models import ModelLoadError
    from .params import ParamsError, load_params
    from .tracking import TrackingError

    parser = argparse.ArgumentParser(prog=f"stages/{name}.py", description=body.__doc__)
    parser.add_argument(
        "--params", default="params.yaml", help="params file (default: %(default)s)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    if add_args:
        add_args(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format=f"[{name}] %(levelname)s %(message)s")
    for noisy in ("alembic", "mlflow", "httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        params = load_params(args.params)
        body(params, args)
    except (
        ParamsError,
        DataError,
        ArtifactError,
        PruningError,
        ModelLoadError,
        TrackingError,
    ) as exc:
        print(f"[{name}] error: {exc}", file=sys.stderr)
        sys.exit(2)
