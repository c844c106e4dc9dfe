"""Cut the experiment datasets out of ../shared/data into experiments/data/ (ignored by git).

Deterministic (seeded) and written as alpaca JSON so every run reads the same files:
  bitext/train.json      400 examples of 23 intents
  bitext/seen.json       100 held-out examples of those same intents   (validation set 1)
  bitext/unseen.json     100 examples of 4 intents never seen in training (validation set 2)
  huatuo/train.json      400, huatuo/heldout.json 100 (Chinese medical QA)
  general/dolly.json     100 Dolly open_qa (general-domain English, forgetting check)
  general/belle.json     57 BELLE eval (of 100 drawn: those with a standard answer) (general-domain Chinese, forgetting check)
  general/alpaca_en.json 1000 Alpaca (general data mixed into training)
  e2e/train.json         E2E dev split (all rows), e2e/test.json test split (one row per reference)
Usage: python experiments/prepare.py [--shared ../shared/data] [--out experiments/data]
"""
from __future__ import annotations

import argparse
import csv
import json
import random
from pathlib import Path

UNSEEN_INTENTS = ["change_shipping_address", "check_refund_policy", "delete_account", "newsletter_subscription"]
E2E_PROMPT = "Write a short restaurant description that states exactly these facts: "


def dump(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=0), encoding="utf-8")


def jsonl(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "data"))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    src, out, rng = Path(a.shared), Path(a.out), random.Random(a.seed)

    # 1. Bitext: seen vs unseen intents
    with open(src / "domain/bitext-support-en/Bitext_Sample_Customer_Support_Training_Dataset.csv", encoding="utf-8") as f:
        rows = [{"instruction": r["instruction"], "input": "", "output": r["response"], "intent": r["intent"]} for r in csv.DictReader(f)]
    rng.shuffle(rows)
    seen = [r for r in rows if r["intent"] not in UNSEEN_INTENTS]
    unseen = [r for r in rows if r["intent"] in UNSEEN_INTENTS]
    dump(seen[:400], out / "bitext/train.json")
    dump(seen[400:500], out / "bitext/seen.json")
    dump(unseen[:100], out / "bitext/unseen.json")

    # 2. Huatuo (Chinese medical QA)
    hu = jsonl(src / "domain/huatuo-med-zh/llama_data.json")
    rng.shuffle(hu)
    dump(hu[:400], out / "huatuo/train.json")
    dump(hu[400:500], out / "huatuo/heldout.json")

    # 3. General-domain sets
    dolly = jsonl(src / "general/dolly-openqa-en/chinkara-open_qa.jsonl")
    rng.shuffle(dolly)
    dump(dolly[:100], out / "general/dolly.json")
    belle = jsonl(src / "general/belle-eval-zh/eval_set.json")
    rng.shuffle(belle)
    # Many BELLE eval items have no standard answer (open-ended tasks): those of the 100 drawn are dropped
    # (lorafit refuses an empty output field), which leaves 57.
    dump([{"instruction": b["question"], "input": "", "output": b["std_answer"]} for b in belle[:100]
          if str(b["std_answer"]).strip()], out / "general/belle.json")
    alpaca = json.loads((src / "general/alpaca-en/alpaca_data-0-3252.json").read_text(encoding="utf-8"))
    rng.shuffle(alpaca)
    dump(alpaca[:1000], out / "general/alpaca_en.json")

    # 4. E2E NLG: train on dev, test on test (all references per MR kept as separate rows; eval groups them)
    for split, name in (("devset.csv", "train"), ("testset_w_refs.csv", "test")):
        with open(src / "domain/e2e-nlg" / split, encoding="utf-8") as f:
            e2e = [{"instruction": E2E_PROMPT + r["mr"], "input": "", "output": r["ref"]} for r in csv.DictReader(f)]
        dump(e2e, out / f"e2e/{name}.json")
    n_mr = len({r["instruction"] for r in e2e})
    n_belle = len(json.loads((out / "general/belle.json").read_text(encoding="utf-8")))
    print(f"wrote {out}: bitext 400/100/100, huatuo 400/100, dolly 100, belle {n_belle}, alpaca 1000, e2e test {n_mr} MRs")


if __name__ == "__main__":
    main()
