"""Did the fine-tune work? Base vs tuned answers on every validation set, scored as LLaMA-Factory does.

Public API: ``evaluate_run`` (``lorafit eval RUN``), ``score_file`` (``lorafit score FILE``),
``score_predictions``, ``generate_batched``, ``metrics_table_md``; ``checkpoints_and_select``
(``lorafit eval RUN --checkpoints --select``), ``health_file``. See docs/evaluation.md.
"""
from .checkpoints import checkpoints_and_select, select
from .generate import generate_batched, generate_sequential
from .loss import reference_loss
from .metrics import KEYS, MODES, detect_lang, score_predictions
from .predictions import health_file, read_predictions, score_file, write_predictions
from .run import evaluate_run
from .table import metrics_table_md

__all__ = [
    "KEYS", "MODES", "checkpoints_and_select", "detect_lang", "evaluate_run", "generate_batched",
    "generate_sequential", "health_file", "metrics_table_md", "read_predictions", "reference_loss", "score_file",
    "score_predictions", "select", "write_predictions",
]
