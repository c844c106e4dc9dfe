"""The human blind test: raters compare two models' answers without knowing which is which.

`create_study` writes a study file (SQLite) from two prediction files and hands out one secret
link per rater plus an admin token; `serve` runs the rating page; `results` turns the ratings
into means with intervals, win rates, paired tests and inter-rater agreement. See
docs/blind-test.md.
"""
from __future__ import annotations

from .app import make_app, serve
from .stats import results, results_markdown, results_plot
from .study import StudyInfo, create_study, create_study_from_run, prediction_sets, read_predictions

__all__ = ["StudyInfo", "create_study", "create_study_from_run", "make_app", "prediction_sets",
           "read_predictions", "results", "results_markdown", "results_plot", "serve"]
