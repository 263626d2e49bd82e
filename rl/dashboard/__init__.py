"""The live dashboard of a run (docs/dashboard.md): a small HTTP server over run directories' files (one run,
or several overlaid), and its offline export to one self-contained HTML file (rl.dashboard.export)."""

from rl.dashboard.server import DashboardServer, node_ip, plotly_js

__all__ = ["DashboardServer", "node_ip", "plotly_js"]
