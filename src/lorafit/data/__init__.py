"""Training data: files of any supported format -> chat examples -> token ids, loss mask, batches.

One module a step, imports flowing one way (readers -> formats -> datasets, chat):
  readers   the bytes of a file -> (line, record) pairs: JSON, JSON lines, CSV, in linear time
  formats   records -> `Example` (alpaca, ShareGPT, text, dataset_info.json), errors naming file/line/field
  datasets  a run's training and validation sets: split, augment, mix in general data
  chat      the chat template, the loss mask and truncation, built together (`encode`)
  packing   batch layouts: padded (`collate`) and padding-free (`pack_batch`, `plan_packs`)
  batches   the trainer's micro-batches as pure functions of (seed, k): `Stream`, `PackedStream`
The names below are re-exported so that callers write `from lorafit.data import encode` or `D.encode`.
"""
from .chat import CHATML_TEMPLATE, Encoded, encode, encode_all, ensure_template, render_prompt
from .datasets import Datasets, augment_example, build_datasets
from .formats import Example, group_references, read_examples
from .batches import PackedStream, Stream
from .packing import collate

__all__ = ["CHATML_TEMPLATE", "Datasets", "Encoded", "Example", "PackedStream", "Stream", "augment_example", "build_datasets", "collate",
           "encode", "encode_all", "ensure_template", "group_references", "read_examples", "render_prompt"]
