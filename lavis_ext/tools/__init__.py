"""Command-line tools: ``python -m lavis_ext.tools.plot_log`` (loss curves from run logs)."""
