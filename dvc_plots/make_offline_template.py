"""Build ``dvc_plots/offline.html``: a DVC ``--html-template`` with vega inlined.

Why: ``dvc plots show`` writes ``<script src="https://cdn.jsdelivr.net/npm/vega...">`` into its
page, so offline (this project's machines, air-gapped reviewers) the plots are blank. DVC fills
a template's ``{scripts}`` placeholder with those CDN tags; this template has no ``{scripts}``
and carries the minified vega, vega-lite and vega-embed builds itself.

Usage (needs npm; run from the repository root)::

    python dvc_plots/make_offline_template.py            # fetches the pinned versions
    python dvc_plots/make_offline_template.py --from DIR # DIR holds unpacked npm packages

Placeholders DVC (dvc-render 1.x) substitutes with plain ``str.replace``: ``{plot_divs}``
(required), ``{refresh_tag}`` (optional), ``{scripts}`` (left out on purpose).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGES = {"vega": "5.33.1", "vega-lite": "5.23.0", "vega-embed": "6.29.0"}
BUILDS = {"vega": "vega.min.js", "vega-lite": "vega-lite.min.js", "vega-embed": "vega-embed.min.js"}
OUT = Path(__file__).resolve().parent / "offline.html"

HEAD = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {refresh_tag}
    <title>DVC Plot</title>
    <!--
    Offline DVC plots template (made by dvc_plots/make_offline_template.py).
    Inlined from npm: %(versions)s.
    Vega, Vega-Lite and Vega-Embed (University of Washington Interactive Data Lab) are
    BSD 3-Clause licensed; the vega-embed package's LICENSE reads:
%(license)s
    -->
"""
TAIL = """    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""
FORBIDDEN = ("</script", "<!--", "<script", "{plot_divs}", "{scripts}", "{refresh_tag}")


def _fetch(dest: Path) -> Path:
    specs = [f"{name}@{version}" for name, version in PACKAGES.items()]
    subprocess.run(["npm", "pack", "--silent", *specs], cwd=dest, check=True)
    for name, version in PACKAGES.items():
        with tarfile.open(dest / f"{name}-{version}.tgz") as tf:
            tf.extractall(dest / name, filter="data")
    return dest


def _build_js(root: Path, name: str) -> str:
    candidates = [
        root / name / "package" / "build",
        root / f"{name}-{PACKAGES[name]}" / "package" / "build",
    ]
    for build in candidates:
        path = build / BUILDS[name]
        if path.is_file():
            js = path.read_text(encoding="utf-8")
            break
    else:
        raise SystemExit(f"{BUILDS[name]} not found under {root}")
    lines = [ln for ln in js.splitlines() if not ln.startswith("//# sourceMappingURL=")]
    js = "\n".join(lines)
    for bad in FORBIDDEN:
        if bad.lower() in js.lower():
            raise SystemExit(f"{name}: {bad!r} inside the JS would break the inlined page")
    return js


def build(root: Path) -> str:
    license_path = root / "vega-embed" / "package" / "LICENSE"
    if not license_path.is_file():
        license_path = root / f"vega-embed-{PACKAGES['vega-embed']}" / "package" / "LICENSE"
    license_text = license_path.read_text(encoding="utf-8").replace("--", "- -")
    license_text = "\n".join(f"    {ln}".rstrip() for ln in license_text.splitlines())
    versions = ", ".join(f"{n} {v}" for n, v in PACKAGES.items())
    parts = [HEAD % {"versions": versions, "license": license_text}]
    for name in PACKAGES:
        parts.append(f'    <script type="text/javascript">/* {name} {PACKAGES[name]} */\n')
        parts.append(_build_js(root, name))
        parts.append("\n    </script>\n")
    parts.append(TAIL)
    return "".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from", dest="src", type=Path, help="dir with unpacked npm packages")
    ap.add_argument("-o", "--output", type=Path, default=OUT)
    args = ap.parse_args(argv)
    if args.src:
        html = build(args.src)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            html = build(_fetch(Path(tmp)))
    args.output.write_text(html, encoding="utf-8")
    print(f"wrote {args.output} ({len(html.encode()) / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
