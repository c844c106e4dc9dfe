"""lorafit: LoRA fine-tuning that tells you, with evidence, whether the fine-tune worked.

The public API (what the `lorafit` command wraps): train, generate, merge, evaluate, score,
diagnose, report, demo; the config schema is `lorafit.config.TrainConfig`.
"""
from .api import demo, diagnose, evaluate, generate, merge, report, score, train
from .config import TrainConfig, load_config
from .errors import ConfigError, DataError, LorafitError, RunError, TrainingError

__version__ = "0.1.0"
__all__ = ["ConfigError", "DataError", "LorafitError", "RunError", "TrainConfig", "TrainingError", "demo",
           "diagnose", "evaluate", "generate", "load_config", "merge", "report", "score", "train"]
