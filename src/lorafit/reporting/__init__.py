"""`lorafit report`: the loss plot and a one-page report (HTML + Markdown) for a run folder."""
from __future__ import annotations

from .plots import draw_checkpoints, draw_loss, plot_checkpoints, plot_loss
from .render import study_tables, write_report

__all__ = ["draw_checkpoints", "draw_loss", "plot_checkpoints", "plot_loss", "study_tables", "write_report"]
