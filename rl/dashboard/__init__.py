"""The live dashboard of a run (docs/dashboard.md): a small HTTP server over the run directory's files."""

from rl.dashboard.server import DashboardServer, node_ip, plotly_js

__all__ = ["DashboardServer", "node_ip", "plotly_js"]
