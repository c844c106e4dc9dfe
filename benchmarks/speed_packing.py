"""Padding-free packing against padded batches on real variable-length data (bench_speed.py
--packing-data; `--make-packing-data CSV` tokenizes the data on CPU first)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lorafit.kernels import (accelerate_model, causal_lm_loss, pack_batch, pad_batch, plan_packs,  # noqa: E402
                             restore_model)

from speed_common import guarded, load_lora, time_steps  # noqa: E402

def make_packing_data(path: str, out: str, max_length: int = 1024) -> None:
    """Tokenize a data file as lorafit trains on it (SmolLM2's tokenizer and chat template)."""
    from lorafit.data import encode, ensure_template, read_examples
    from lorafit.model import builtin_model_path, load_tokenizer

    tok = ensure_template(load_tokenizer(builtin_model_path()))
    ids, labels = [], []
    for ex in read_examples(path):
        i, lab, _ = encode(tok, ex.messages, max_length=max_length)
        if any(x != -100 for x in lab):
            ids.append(i)
            labels.append(lab)
    Path(out).write_text(json.dumps({"source": str(path), "tokenizer": "SmolLM2-135M-Instruct", "max_length": max_length,
                                     "input_ids": ids, "labels": labels}))
    print(f"{len(ids)} examples, {sum(map(len, ids))} tokens -> {out}")


def packing_benchmark(model: Any, init: dict, path: str, steps: int) -> dict[str, Any]:
    """Epoch time on real examples: padded batches of 2 (baseline, and ours) against packs of <= 2048 tokens.

    One shuffled epoch is planned in full; step times are measured on its first batches (a uniform
    sample) and multiplied by the epoch's number of steps. The loss function is the same: the mean over
    the same supervised tokens, checked below in eval mode (no dropout) on the first examples.
    """
    import random

    data = json.loads(Path(path).read_text())
    ids, labels = data["input_ids"], data["labels"]
    order = random.Random(0).sample(range(len(ids)), len(ids))
    padded = [order[i:i + 2] for i in range(0, len(order), 2)]
    packs = [[order[j] for j in p] for p in plan_packs([len(ids[i]) for i in order], 2048)]

    def cuda(b: dict) -> dict:
        return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in b.items()}

    def pad(idx: list[int]) -> dict:
        return cuda(pad_batch([ids[i] for i in idx], [labels[i] for i in idx]))

    def pack(idx: list[int]) -> dict:
        return cuda(pack_batch([ids[i] for i in idx], [labels[i] for i in idx]))

    res: dict[str, Any] = {"data": data.get("source"), "examples": len(ids), "tokens": sum(map(len, ids)),
                           "padded_steps_per_epoch": len(padded), "packed_steps_per_epoch": len(packs)}
    segments = max(len(p) for p in packs) + 1

    def pack_static(idx: list[int]) -> dict:  # fixed shapes for the captured step
        return cuda(pack_batch([ids[i] for i in idx], [labels[i] for i in idx], pad_to_tokens=2048,
                               pad_to_segments=segments))

    plans = {"baseline:padded": ("baseline", padded, pad, 2 * steps), "ours:padded": ("ours", padded, pad, 2 * steps),
             "baseline:packed": ("baseline", packs, pack, steps), "ours:packed": ("ours", packs, pack, steps),
             "ours:packed+graph": ("ours", packs, pack_static, steps)}
    def measure(side: str, plan: list[list[int]], make: Callable, n: int, graph: bool) -> dict[str, float]:
        restore_model(model) if side == "baseline" else accelerate_model(model)
        load_lora(model, init)
        batches = [make(b) for b in plan[:n + 2]]
        run = time_steps(model, batches, n, 2, graph=graph)
        step = sum(run["step_s_all"]) / len(run["step_s_all"])
        toks = sum(len(ids[j]) for i in run["timed_batches"] for j in plan[i])
        return {"step_ms_mean": 1000 * step, "epoch_s": step * len(plan), "tokens_per_s": toks / sum(run["step_s_all"]),
                "peak_gib": run["peak_gib"]}

    for name, (side, plan, make, n) in plans.items():
        rec = guarded(res, name, lambda: measure(side, plan, make, n, name.endswith("graph")))
        if "epoch_s" in rec:
            print(f"  packing {name:<18} {rec['epoch_s']:8.1f} s/epoch  {rec['tokens_per_s']:10,.0f} tok/s", flush=True)
    for ours in ("ours:packed", "ours:packed+graph"):
        if "epoch_s" in res.get(ours, {}) and "epoch_s" in res.get("baseline:padded", {}):
            res[f"epoch_speedup_{ours}_vs_baseline:padded"] = res["baseline:padded"]["epoch_s"] / res[ours]["epoch_s"]
    res["loss_check"] = _packed_loss_check(model, pad, pack, order[:16])
    restore_model(model)
    load_lora(model, init)
    return res


@torch.no_grad()
def _packed_loss_check(model: Any, pad: Callable, pack: Callable, idx: list[int]) -> dict[str, float]:
    """Token-mean loss of the same examples: baseline padded (pairs) vs ours packed (one pack)."""
    model.eval()
    restore_model(model)
    total = count = 0.0
    for i in range(0, len(idx), 2):
        b = pad(idx[i:i + 2])
        n = float((b["labels"][:, 1:] != -100).sum())
        total += float(causal_lm_loss(model, b)) * n
        count += n
    accelerate_model(model)
    packed = float(causal_lm_loss(model, pack(idx)))
    model.train()
    return {"baseline_padded": total / count, "ours_packed": packed}


