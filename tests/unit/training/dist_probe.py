"""Run under torchrun by tests/unit/training/test_dist_matrix.py and test_distributed.py: train several configs
in the same processes (one process-group start-up for the lot), optionally with faults injected on one rank.

    python -m torch.distributed.run --standalone --nproc_per_node N tests/unit/training/dist_probe.py SPEC.json

SPEC: a list of {"config": PATH, "nan_at": K | null, "hang_rank": R | null}. `nan_at`: the loss of the
run's micro-batch K is NaN on whichever rank computes it; `hang_rank`: that rank never arrives at its
first evaluation all-reduce (the watchdog must stop the run: put such a run last). Exits with lorafit's
CLI status. For each run, each rank writes PATH.start-RANK (time.time() as it starts the run) and, when the
run returns, PATH.exit-RANK (its CLI status).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from lorafit.data import batches
from lorafit.training import dist, loop


REAL = {"batch": {c: c.__dict__["batch"] for c in (batches.Stream, batches.PackedStream)},
        "loss_sum": loop.loss_sum, "all_sum": dist.all_sum}


def inject(nan_at: int | None, hang_rank: int | None) -> None:
    """Faults for the next run (each call starts from the real functions)."""
    for cls, fn in REAL["batch"].items():
        cls.batch = fn
    loop.loss_sum, dist.all_sum = REAL["loss_sum"], REAL["all_sum"]
    if nan_at is not None:
        current: dict[str, int | None] = {"k": None}
        for cls, real_batch in REAL["batch"].items():

            def batch(self, k, _real=real_batch):
                current["k"] = k
                return _real(self, k)

            cls.batch = batch
        real_loss = REAL["loss_sum"]

        def loss_sum(*a, **kw):
            loss, n = real_loss(*a, **kw)
            k, current["k"] = current["k"], None
            return (loss * float("nan"), n) if k == nan_at else (loss, n)

        loop.loss_sum = loss_sum
    if hang_rank is not None and dist.world()[0] == hang_rank:
        def never_arrives(values, device):
            time.sleep(3600)

        dist.all_sum = never_arrives  # its first all-reduce is the step-0 evaluation's


def main() -> int:
    from lorafit.cli import main as cli

    # One process group for all the runs: torchrun's rendezvous store is set up for one initialisation.
    real_cleanup, loop.dist.cleanup = loop.dist.cleanup, lambda: None
    status = 0
    rank = os.environ.get("RANK", "0")
    for run in json.loads(open(sys.argv[1]).read()):
        inject(run.get("nan_at"), run.get("hang_rank"))
        Path(f"{run['config']}.start-{rank}").write_text(repr(time.time()))
        code = cli(["train", run["config"], "--no-progress"])
        Path(f"{run['config']}.exit-{rank}").write_text(str(code))
        status = code or status
    real_cleanup()
    return status


if __name__ == "__main__":
    sys.exit(main())
