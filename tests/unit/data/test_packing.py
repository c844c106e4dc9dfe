"""Batch layouts (`data/packing.py`). That a pack trains as its examples alone: tests/unit/kernels/test_accelerate.py
and tests/unit/training/test_train.py."""
from lorafit.data.packing import pack_batch, plan_packs


def test_pack_batch_layout() -> None:
    b = pack_batch([[5, 6, 7], [8, 9]], [[-100, 6, 7], [8, 9]])
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert b["labels"].tolist() == [[-100, 6, 7, -100, 9]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert b["cu_seq_lens_q"].tolist() == [0, 3, 5] and b["max_length_q"] == 3
    assert plan_packs([3, 4, 2, 5, 1], 6) == [[0], [1, 2], [3, 4]]
