"""lorafit: LoRA fine-tuning that tells you, with evidence, whether the fine-tune worked.

The public API (what the `lorafit` command wraps): train, generate, merge, evaluate, score,
diagnose, report, demo; the config schema is `lorafit.config.TrainConfig`.
"""
# `lorafit.evaluate`, `lorafit.diagnose` and `lorafit.report` name both an API function and the
# subpackage behind it. Python binds a subpackage onto its parent the first time it is imported, so
# the subpackages are imported here, before the API names are bound; later imports find them loaded
# and leave `lorafit.evaluate` etc. as the functions users call.
from . import diagnose as _diagnose_pkg  # noqa: F401
from . import evaluate as _evaluate_pkg  # noqa: F401
from . import report as _report_pkg  # noqa: F401
from . import training as _training_pkg  # noqa: F401
from .api import demo, diagnose, evaluate, generate, merge, report, score, train
from .config import TrainConfig, load_config
from .errors import ConfigError, DataError, LorafitError, RunError, TrainingError

__version__ = "0.1.0"
__all__ = ["ConfigError", "DataError", "LorafitError", "RunError", "TrainConfig", "TrainingError", "demo",
           "diagnose", "evaluate", "generate", "load_config", "merge", "report", "score", "train"]
