"""`streamrl dashboard RUN_DIR... --export FILE`: the dashboard of finished runs as one self-contained HTML file.

The file is the live page (static/index.html) with its stylesheet, plotly.js, the page's script and the
runs' data inlined, so it opens from disk (file://) with no server and no network, and can be mailed or
attached to an issue. The data is what the live page would get as its first snapshot of each run, plus the
newest EXPORT_SAMPLES samples of each, which the page's search box filters in the browser.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rl.dashboard.reader import RunReader
from rl.dashboard.server import STATIC, plotly_js

EXPORT_SAMPLES = 1000  # newest samples per run kept in the file for the table and its search
_ESCAPED = "<\\/"


def export_data(run_dirs: list[Path]) -> dict[str, Any]:
    """Each run's snapshot (as the /events stream's first event) and its newest samples."""
    runs, samples = [], []
    for i, run_dir in enumerate(run_dirs):
        reader = RunReader(run_dir)
        reader.refresh()
        runs.append({**reader.snapshot(), "run": i, "runs": len(run_dirs)})
        samples.append(reader.search_samples("", EXPORT_SAMPLES))
    return {"runs": runs, "samples": samples}


def export_html(run_dirs: list[Path], out: Path) -> int:
    """Write the page with everything inlined to `out`; returns its size in bytes."""
    page = (STATIC / "index.html").read_text()
    data = json.dumps(export_data(run_dirs), allow_nan=False, separators=(",", ":"))
    inline = {  # each tag of index.html that loads a file, and what replaces it
        '<link rel="stylesheet" href="/static/style.css">': f"<style>\n{(STATIC / 'style.css').read_text()}</style>",
        '<script src="/static/plotly.min.js"></script>': _script(plotly_js().read_text(), "plotly.min.js"),
        '<script src="/static/app.js"></script>':
            # "</" inside the JSON would end the <script> element early; "<\/" is the same string to JS
            f"<script>window.STREAMRL_EXPORT = {data.replace('</', _ESCAPED)};</script>\n"
            + _script((STATIC / "app.js").read_text(), "app.js"),
    }
    for tag, replacement in inline.items():
        if tag not in page:
            raise ValueError(f"{STATIC / 'index.html'} no longer has {tag}; update rl/dashboard/export.py to match")
        page = page.replace(tag, replacement)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    return len(page.encode())


def _script(code: str, name: str) -> str:
    if "</script" in code.lower():
        raise ValueError(f"{name} contains '</script', which would end its inlined <script> element early")
    return f"<script>\n{code}\n</script>"
