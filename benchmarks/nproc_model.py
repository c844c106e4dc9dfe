"""A cost model of `lorafit train --nproc 2` against one GPU at the same global batch, on real token counts.

    python benchmarks/nproc_model.py --data benchmarks/data-nproc/train.json

Why: a 2-GPU measurement costs minutes of GPU time; this says what a change can buy before one is spent.
The model (fitted to session 5's H200 measurements, docs/distributed.md): a micro-batch run at T bucketed
tokens takes ALPHA + BETA * T ms; an optimizer step OPT ms; the all-reduce ALLREDUCE ms. One GPU runs a
step's two micro-batches in turn; two GPUs run one each and wait for the larger. The examples are the
trainer's: the data encoded with SmolLM2's tokenizer and template, shuffled, four a step, dealt into two
micro-batches by `balanced_groups`. It reproduces the measured 1.87x; it is a model, not a measurement.
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
          even: bool = False, epochs: int = 20) -> float:
    from lorafit.data.batches import balanced_groups

    cost = lambda t: ALPHA + BETA * max(bucket, -(-int(t) // bucket) * bucket)  # noqa: E731
    rng, one, two = random.Random(0), 0.0, 0.0
    for _ in range(epochs):
        order = list(range(len(lens)))
        rng.shuffle(order)
        for s in range(0, len(order) - 3, 4):
            w = [lens[i] for i in order[s:s + 4]]
            t = [sum(w[i] for i in g) for g in balanced_groups(w, 2)]
            if even:
                t = [sum(t) / 2] * 2
            one += cost(t[0]) + cost(t[1]) + opt
            two += max(cost(t[0]), cost(t[1])) + opt + allreduce
    return one / two


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT / "benchmarks/data-nproc/train.json"))
    lens = lengths(Path(ap.parse_args().data))
    print(f"{len(lens)} examples, mean {sum(lens) / len(lens):.1f} tokens, max {max(lens)}")
    for name, kw in [("as measured (128-token buckets)", {}), ("64-token buckets", {"bucket": 64}),
                     ("32-token buckets", {"bucket": 32}), ("no all-reduce cost", {"allreduce": 0.0}),
                     ("optimizer step halved", {"opt": OPT / 2}),
                     ("session 7's tail (opt 0.45, all-reduce 0.3)", {"opt": 0.45, "allreduce": 0.3}),
                     ("even halves", {"even": True}),
                     ("even halves, no all-reduce cost", {"even": True, "allreduce": 0.0})]:
        print(f"{name:44} {ratio(lens, **kw):.3f}x")


if __name__ == "__main__":
    main()
