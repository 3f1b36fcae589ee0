"""Shared command-line plumbing for the stage scripts: ``--params``, logging, clear failures."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MAX_MESSAGE = 2000  # an error line never quotes an unbounded value
# the stage flags that name outputs (checked writable before the work)
OUTPUT_FLAGS = ("out", "metrics", "utterances", "state", "scores")


def error_line(name: str, exc: BaseException) -> str:
    """``[stage] error: ...`` on one line, bounded in length."""
    if isinstance(exc, OSError) and exc.filename:
        text = f"{exc.strerror or exc} ({exc.filename})"
    else:
        text = str(exc)
    text = " ".join(text.split())
    if len(text) > MAX_MESSAGE:
        text = text[: MAX_MESSAGE - 3] + "..."
    return f"[{name}] error: {text}"


def exit_cleanly_on_sigterm() -> None:
    """SIGTERM (``kill``, a CI timeout, DVC stopping a queue) unwinds like Ctrl-C: every
    ``atomic_directory`` and temp cache is removed by its ``finally``, the old outputs stay."""
    import signal

    def _term(signum, frame):  # noqa: ARG001
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, _term)


def setup_logging(name: str, level: int) -> None:
    """``[name] LEVEL message`` lines; the libraries' INFO chatter stays quiet."""
    logging.basicConfig(level=level, format=f"[{name}] %(levelname)s %(message)s")
    for noisy in ("alembic", "mlflow", "httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def check_output_flags(args: argparse.Namespace) -> None:
    """Fail before the work when a destination given by an output flag cannot be written."""
    from ..atomic import check_writable

    check_writable({f"--{k}": getattr(args, k) for k in OUTPUT_FLAGS if getattr(args, k, None)})


def stage_main(
    name: str,
    body: Callable[..., None],
    add_args: Callable[[argparse.ArgumentParser], None] | None = None,
) -> None:
    """Parse ``--params FILE`` (default params.yaml), validate, run ``body``; exit 2 on bad input.

    Every user-facing failure is a ``WhisperObsError`` (bad params, data, artifacts, models,
    tracking) or an ``OSError`` (a full disk, a read-only folder): one clear line instead of a
    traceback, and a non-zero exit so DVC marks the stage failed and keeps its old outputs.
    """
    from ..errors import WhisperObsError
    from .params import load_params

    parser = argparse.ArgumentParser(prog=f"stages/{name}.py", description=body.__doc__)
    parser.add_argument(
        "--params", default="params.yaml", help="params file (default: %(default)s)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    if add_args:
        add_args(parser)
    args = parser.parse_args()
    exit_cleanly_on_sigterm()
    setup_logging(name, logging.INFO)
    try:
        params = load_params(args.params)
        check_output_flags(args)
        body(params, args)
    except (WhisperObsError, OSError) as exc:
        print(error_line(name, exc), file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"[{name}] interrupted; previous outputs are kept", file=sys.stderr)
        sys.exit(130)
