"""`streamrl dashboard RUN_DIR [RUN_DIR ...] [--export FILE]`: serve runs' dashboard, or export it to a file."""

from __future__ import annotations

import sys
from pathlib import Path

RUN_FILES = ("metrics.jsonl", "status.json", "timeline.jsonl")


def dashboard(run_dirs: list[str], host: str, port: int, export: str | None = None) -> int:
    """Serve the page for `run_dirs` (several: their curves overlaid) until Ctrl-C, or write it to `export`."""
    dirs = [Path(d) for d in run_dirs]
    for run_dir in dirs:
        if not run_dir.is_dir():
            raise FileNotFoundError(f"run directory not found: {run_dir}")
    empty = [d for d in dirs if not any((d / name).exists() for name in RUN_FILES)]
    if export:
        if empty:
            raise FileNotFoundError(f"nothing to export in {', '.join(map(str, empty))}: no {', '.join(RUN_FILES)}")
        from rl.dashboard.export import export_html

        size = export_html(dirs, Path(export))
        print(f"wrote {export} ({size / 1e6:.1f} MB): open it in a browser, no server needed", flush=True)
        return 0
    for run_dir in empty:
        print(f"streamrl: {run_dir} has no {', '.join(RUN_FILES)} yet; serving it anyway "
              "(the page fills in as a run writes them)", file=sys.stderr)
    from rl.dashboard.server import DashboardServer

    try:
        server = DashboardServer(dirs, host, port)
    except OSError as exc:
        raise ConnectionError(f"cannot listen on {host}:{port} ({exc}); pick another --port (0: any free one)") from None
    print(f"dashboard of {', '.join(map(str, dirs))}: {server.url}  (Ctrl-C stops it)", flush=True)
    server.serve_forever()
    return 0
