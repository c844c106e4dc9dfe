"""Training: the loop, its LR schedules, crash-safe checkpoints and distributed glue."""
from .loop import TrainResult, evaluate_loss, train
from .schedule import lr_at

__all__ = ["TrainResult", "evaluate_loss", "lr_at", "train"]
