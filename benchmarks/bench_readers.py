"""Reader speed: a JSON array against JSON lines, both must be linear in the number of records.

    .venv/bin/python benchmarks/bench_readers.py [--sizes 10000,20000,40000,100000]

For each size it writes the same alpaca records as JSONL, as a pretty-printed JSON array and as a
one-line JSON array, and times `lorafit.data.read_examples` (best of 3). Then it breaks the record
at 7/9 of the way (record 77,777 of 100k: its `output` becomes a list) and times the error, which
must name the record's line and its position in the array. Before the fix (issue 19) the array
reader counted newlines from the start of the file for every record: 40k records took 27.8 s.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from lorafit.data import read_examples
from lorafit.errors import DataError


def records(n: int, bad: int | None = None) -> list[dict]:
    out = [{"instruction": f"question {i}: how do I reset my password?", "input": "",
            "output": f"answer {i}: open settings, choose 'security' and follow the link."} for i in range(n)]
    if bad is not None:
        out[bad - 1]["output"] = ["not", "a", "string"]
    return out


def write(folder: Path, name: str, recs: list[dict]) -> dict[str, Path]:
    paths = {"jsonl": folder / f"{name}.jsonl", "array (pretty)": folder / f"{name}-pretty.json",
             "array (one line)": folder / f"{name}-line.json"}
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    paths["array (pretty)"].write_text(json.dumps(recs, indent=2), encoding="utf-8")
    paths["array (one line)"].write_text(json.dumps(recs), encoding="utf-8")
    return paths


def best_of(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,20000,40000,100000")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"python {sys.version.split()[0]}; seconds, best of 3")
    print("| records | " + " | ".join(["jsonl", "array (pretty)", "array (one line)"]) + " |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for n in sizes:
            paths = write(folder, f"n{n}", records(n))
            row = [best_of(lambda p=p: read_examples(p)) for p in paths.values()]
            print(f"| {n:,} | " + " | ".join(f"{t:.2f}" for t in row) + " |", flush=True)
        n = max(sizes)
        bad = n * 7 // 9
        print(f"\nerror at record {bad:,} of {n:,}:")
        for kind, p in write(folder, "bad", records(n, bad)).items():
            t0 = time.perf_counter()
            try:
                read_examples(p)
                raise SystemExit(f"{kind}: the bad record was accepted")
            except DataError as e:
                msg = str(e).replace(str(folder) + "/", "")
            print(f"  {kind}: {time.perf_counter() - t0:.2f} s  {msg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
