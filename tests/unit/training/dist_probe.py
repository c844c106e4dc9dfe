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

from lorafit.training import dist, loop


REAL = {"launch": loop.Trainer.launch, "loss_sum": loop.loss_sum, "all_sum": dist.all_sum}


def inject(nan_at: int | None, hang_rank: int | None) -> None:
    """Faults for the next run (each call starts from the real functions). `nan_at` names the run's micro-batch
    index k = step x micro-batches a step + rank + j x processes for rank's j-th micro-batch of the step (the
    loop's own numbering, the one its dropout seeds use), so 1 process with N-fold accumulation and N processes
    poison the same examples."""
    loop.Trainer.launch, loop.loss_sum, dist.all_sum = REAL["launch"], REAL["loss_sum"], REAL["all_sum"]
    if nan_at is not None:
        current: dict[str, int | None] = {"k": None}
        real_launch, real_loss = REAL["launch"], REAL["loss_sum"]

        def launch(self, step):
            plan = self.plan
            current.update(k=step * plan.micro_batches_per_step + self.rank, stride=plan.world_size)
            try:
                return real_launch(self, step)
            finally:
                current["k"] = None  # evaluation's loss_sum calls are not micro-batches

        def loss_sum(*a, **kw):
            loss, n = real_loss(*a, **kw)
            k = current["k"]
            if k is not None:
                current["k"] = k + current["stride"]
            return (loss * float("nan"), n) if k is not None and k == nan_at else (loss, n)

        loop.Trainer.launch, loop.loss_sum = launch, loss_sum
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
