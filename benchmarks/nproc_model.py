"""A cost model of `lorafit train --nproc 2` against one GPU at the same global batch, on real token counts.

    python benchmarks/nproc_model.py --data benchmarks/data-nproc/train.json

Why: a 2-GPU measurement costs minutes of GPU time; this says what a change can buy before one is spent.
The model (fitted to session 5's H200 measurements, docs/distributed.md): a micro-batch run at T bucketed
tokens takes ALPHA + BETA * T ms; an optimizer step OPT ms; the all-reduce ALLREDUCE ms. One GPU runs a
step's two micro-batches in turn; two GPUs run one each and wait for the larger. The examples are the
trainer's: the data encoded with SmolLM2's tokenizer and template, shuffled, four a step, dealt into two
micro-batches by `balanced_groups`. It reproduced session 5's measured 1.87x; it is a model, not a measurement. `window` models `balance_steps`.
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ALPHA, BETA, OPT, ALLREDUCE = 5.1, 0.0546, 0.8, 0.6


def lengths(data: Path) -> list[int]:
    from transformers import AutoTokenizer

    import lorafit
    from lorafit import data as D

    cfg = lorafit.load_config(None, {"model": str(ROOT / "benchmarks/assets/smollm2-tokenizer"), "data": [str(data)],
                                     "output_dir": "/tmp/nproc-model"})
    tok = D.ensure_template(AutoTokenizer.from_pretrained(cfg.model), cfg.template)
    return [len(x) for x in D.encode_all(tok, D.build_datasets(cfg).train, cfg).input_ids]


def ratio(lens: list[int], bucket: int = 128, allreduce: float = ALLREDUCE, opt: float = OPT,
          even: bool = False, epochs: int = 20, window: int = 0) -> float:
    """window: the trainer's `balance_steps` (0: each step's two micro-batches as the shuffle cut them; >= 1: the
    examples of `window` steps dealt into micro-batches of near-equal tokens, two examples at most, as
    `Stream.step_groups` does; 1 is session 5-7's dealing within a step)."""
    from lorafit.data.batches import balanced_groups

    cost = lambda t: ALPHA + BETA * max(bucket, -(-int(t) // bucket) * bucket)  # noqa: E731
    rng, one, two = random.Random(0), 0.0, 0.0
    span = 4 * max(window, 1)
    for _ in range(epochs):
        order = list(range(len(lens)))
        rng.shuffle(order)
        for s in range(0, len(order) - span + 1, span):
            w = [lens[i] for i in order[s:s + span]]
            parts = balanced_groups(w, span // 2, cap=2) if window else [[j, j + 1] for j in range(0, span, 2)]
            loads = [sum(w[i] for i in g) for g in parts]
            for t in zip(loads[::2], loads[1::2]):
                if even:
                    t = (sum(t) / 2,) * 2
                one += cost(t[0]) + cost(t[1]) + opt
                two += max(cost(t[0]), cost(t[1])) + opt + allreduce
    return one / two


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT / "benchmarks/data-nproc/train.json"))
    lens = lengths(Path(ap.parse_args().data))
    print(f"{len(lens)} examples, mean {sum(lens) / len(lens):.1f} tokens, max {max(lens)}")
    tail = {"opt": 0.45, "allreduce": 0.3}  # session 7's measured optimizer step and exposed all-reduce
    for name, kw in [("as the shuffle cut them (session 5's tail)", {}),
                     ("dealt within each step (sessions 5-7)", {"window": 1}),
                     ("  + session 7's tail (opt 0.45, all-reduce 0.3)", {"window": 1, **tail}),
                     ("  + 64-token buckets", {"window": 1, "bucket": 64, **tail}),
                     ("  + even halves", {"window": 1, "even": True, **tail}),
                     ("dealt over 4 steps, session 7's tail", {"window": 4, **tail}),
                     ("dealt over 8 steps (balance_steps default)", {"window": 8, **tail}),
                     ("dealt over 16 steps", {"window": 16, **tail}),
                     ("even halves, no all-reduce cost", {"window": 1, "even": True, "allreduce": 0.0, "opt": 0.45})]:
        print(f"{name:50} {ratio(lens, **kw):.3f}x")


if __name__ == "__main__":
    main()
