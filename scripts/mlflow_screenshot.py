"""Screenshot the MLflow UI's overlaid WER-vs-sparsity chart of a sweep, in headless Chromium.

    python scripts/mlflow_screenshot.py --store mlflow.db --out docs/mlflow_overlay.png

Starts ``mlflow server`` on the store (read as it is), opens the route the sweep stored in its
parent run's ``overlay_chart`` tag, and writes a PNG. Needs a ``chromium`` binary (Debian:
``apt-get install chromium``); nothing in the pipeline or the tests depends on it. The REST
check of the same chart is ``tests/test_pipeline.py::test_mlflow_overlay_chart_through_rest``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # this checkout's code
from whisper_obs_pruning.pipeline.tracking import local_server  # noqa: E402


def overlay_route(uri: str) -> str:
    """The newest sweep run's ``overlay_chart`` route, read through the REST client."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exps = client.search_experiments()
    runs = client.search_runs(
        [e.experiment_id for e in exps],
        "tags.overlay_chart LIKE '/metric%'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        raise SystemExit("error: no run with an overlay_chart tag in the store (run the sweep)")
    return runs[0].data.tags["overlay_chart"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", type=Path, default=Path("mlflow.db"), help="sqlite store")
    ap.add_argument("--out", type=Path, default=Path("docs/mlflow_overlay.png"))
    ap.add_argument("--size", default="1900,950", help="window width,height")
    ap.add_argument("--wait-ms", type=int, default=20000, help="time the page gets to draw")
    args = ap.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("error: no chromium on PATH (apt-get install chromium)", file=sys.stderr)
        return 2
    if not args.store.is_file():
        print(f"error: --store {args.store}: no such file", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with local_server(f"sqlite:///{args.store.resolve()}") as uri:
        url = f"{uri}/#{overlay_route(uri)}"
        subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                f"--window-size={args.size}",
                f"--virtual-time-budget={args.wait_ms}",
                f"--screenshot={args.out.resolve()}",
                url,
            ],
            check=True,
            capture_output=True,
            timeout=300,
        )
    print(f"{args.out}: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
