"""Creating a study from two prediction files (LLaMA-Factory generated_predictions format).

Each rater gets their own item order and, per item, a counterbalanced choice of which model is
Answer 1 (half of each rater's items show A first), so neither order nor position favours a
model. The layout is drawn from ``seed`` mixed with a random per-study salt kept in the file:
the seed alone (often the default 0, and this code is public) would let a rater who recognises a
few answers rebuild their whole layout. The drawn layout is stored, so it never changes.
"""
from __future__ import annotations

import json
import math
import os
import random
import secrets
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, DataError, LorafitError, RunError
from ..evaluation.predictions import iter_json_objects, label_field, string_field
from ..rundir import EVAL_DIR, predictions_name
from . import store


@dataclass
class Prediction:
    prompt: str
    predict: str
    label: str
    line: int


@dataclass
class StudyInfo:
    """What `create_study` hands out: print it once, the tokens are not stored in clear."""
    db: str
    links: list[str]                  # one secret link per rater, in rater order
    admin_token: str                  # for results and export (Authorization: Bearer ...)
    n_items: int
    tokens: list[str] = field(default_factory=list)   # the rater tokens inside `links`

    def format(self, base_url: str | None = None) -> str:
        """What the CLI prints: the study, one link per rater (built on ``base_url`` when given,
        e.g. the address `serve` will be reached at) and the admin token."""
        links = self.links if base_url is None else [f"{base_url.rstrip('/')}/r/{t}" for t in self.tokens]
        return "\n".join([f"study: {self.db} ({self.n_items} items)",
                          *(f"rater {k}: {link}" for k, link in enumerate(links, 1)),
                          f"admin token: {self.admin_token}",
                          "save these now: the study keeps only their hashes"])


def read_predictions(path: str | Path) -> list[Prediction]:
    """JSON lines with string ``prompt`` and ``predict``; ``label`` optional, a string or (as
    `lorafit eval` writes for multi-reference sets) a list of strings. Blank lines are skipped."""
    out: list[Prediction] = []
    for n, rec in iter_json_objects(path):
        prompt, predict = (string_field(rec, k, Path(path), n) for k in ("prompt", "predict"))
        label = label_field(rec, Path(path), n) if "label" in rec else ""
        if isinstance(label, list):
            label = json.dumps(label, ensure_ascii=False)
        out.append(Prediction(prompt, predict, label, n))
    return out


def match_predictions(a: list[Prediction], b: list[Prediction], file_b: str) -> list[tuple[Prediction, Prediction]]:
    """Pair by line; if the same unique prompts come in another order, pair by prompt."""
    if len(a) != len(b):
        raise DataError(f"has {len(b)} predictions but file A has {len(a)}; both must answer "
                        "the same prompts", file=file_b)
    if all(pa.prompt == pb.prompt for pa, pb in zip(a, b)):
        return list(zip(a, b))
    by_prompt = {p.prompt: p for p in b}
    if len(by_prompt) == len(b) == len({p.prompt for p in a}):
        if all(p.prompt in by_prompt for p in a):
            return [(p, by_prompt[p.prompt]) for p in a]
    pa, pb = next((pa, pb) for pa, pb in zip(a, b) if pa.prompt != pb.prompt)
    raise DataError(f"prompt differs from file A line {pa.line} (files are matched by line, or by "
                    "prompt when every prompt is unique)", file=file_b, line=pb.line, field="prompt")


def create_study(pred_a: str | Path, pred_b: str | Path, raters: int, out: str | Path,
                 seed: int = 0, *, base_url: str = "http://127.0.0.1:8765",
                 names: tuple[str, str] | None = None) -> StudyInfo:
    """Write a new study file ``out`` comparing model A (``pred_a``) and model B (``pred_b``).

    ``names`` label the models in results only (default: the file names). Refuses to overwrite:
    an existing study may hold ratings."""
    if isinstance(raters, bool) or not isinstance(raters, int) or not 1 <= raters <= 1000:
        raise DataError(f"must be an integer from 1 to 1000, got {raters!r}", field="raters")
    out = Path(out)
    if out.exists():
        raise DataError("already exists; refusing to overwrite a study (it may hold ratings)",
                        file=str(out))
    pairs = match_predictions(read_predictions(pred_a), read_predictions(pred_b), str(pred_b))
    name_a, name_b = names or (Path(pred_a).name, Path(pred_b).name)
    salt = secrets.token_hex(16)
    meta = {"schema": store.SCHEMA_VERSION, "created_at": store.now(), "seed": str(seed),
            "salt": salt, "name_a": name_a, "name_b": name_b,
            "source_a": str(Path(pred_a).resolve()), "source_b": str(Path(pred_b).resolve())}
    admin_token = secrets.token_urlsafe(32)
    meta["admin_token_hash"] = store.hash_token(admin_token)
    tokens = [secrets.token_urlsafe(32) for _ in range(raters)]
    item_ids = [secrets.token_hex(8) for _ in pairs]
    rater_ids = [secrets.token_hex(8) for _ in tokens]

    tmp = out.with_name(f".{out.name}.{secrets.token_hex(4)}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        conn = store.connect(tmp, create=True)
    except (OSError, sqlite3.Error) as e:
        raise ConfigError(f"cannot be created ({getattr(e, 'strerror', None) or e})", file=str(out),
                          field="--out") from None
    try:
        store.create_schema(conn)
        with store.transaction(conn):
            conn.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
            conn.executemany("INSERT INTO items VALUES (?, ?, ?, ?, ?, ?, ?)",
                             [(iid, pa.line, pb.line, pa.prompt, pa.predict, pb.predict, pa.label)
                              for iid, (pa, pb) in zip(item_ids, pairs)])
            conn.executemany("INSERT INTO raters VALUES (?, ?, ?)",
                             [(rid, k + 1, store.hash_token(t))
                              for k, (rid, t) in enumerate(zip(rater_ids, tokens))])
            conn.executemany("INSERT INTO layout VALUES (?, ?, ?, ?)",
                             _draw_layout(rater_ids, item_ids, random.Random(f"{seed}:{salt}")))
        store.enable_wal(conn)
        conn.close()  # the last close checkpoints the WAL into the file, so the rename moves it all
        os.replace(tmp, out)
    except (OSError, sqlite3.Error) as e:  # disk full, a read-only mount, ...: one line naming the file
        conn.close()
        _remove_tmp(tmp)
        raise LorafitError(f"cannot write the study ({getattr(e, 'strerror', None) or e}); nothing was kept",
                           file=str(out), field="--out") from None
    except BaseException:
        conn.close()
        _remove_tmp(tmp)
        raise
    base = base_url.rstrip("/")
    return StudyInfo(str(out), [f"{base}/r/{t}" for t in tokens], admin_token, len(pairs), tokens)


def _remove_tmp(tmp: Path) -> None:
    for p in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm"), Path(f"{tmp}-journal")):
        p.unlink(missing_ok=True)


def _draw_layout(rater_ids: list[str], item_ids: list[str], rng: random.Random) -> list[tuple]:
    """Per rater: a shuffled item order and A in slot 1 for half the items (raters alternate
    who gets the odd one)."""
    rows, n = [], len(item_ids)
    for k, rid in enumerate(rater_ids):
        order = item_ids[:]
        rng.shuffle(order)
        ones = math.ceil(n / 2) if k % 2 == 0 else n // 2
        slots = [1] * ones + [2] * (n - ones)
        rng.shuffle(slots)
        rows += [(rid, iid, rank, slot) for rank, (iid, slot) in enumerate(zip(order, slots))]
    return rows


def prediction_sets(run_dir: str | Path) -> list[str]:
    """Sets in RUN/eval that have both a base and a tuned predictions file."""
    ev = Path(run_dir) / EVAL_DIR
    def sets(model: str) -> set[str]:
        prefix = f"predictions-{model}-"
        return {p.name[len(prefix):-len(".jsonl")] for p in ev.glob(f"{prefix}*.jsonl")}
    return sorted(sets("base") & sets("tuned"))


def create_study_from_run(run_dir: str | Path, set_name: str | None, raters: int, out: str | Path,
                          seed: int = 0, *, base_url: str = "http://127.0.0.1:8765") -> StudyInfo:
    """Base vs tuned on one prompt set, from RUN/eval/predictions-{base,tuned}-<set>.jsonl as
    written by `lorafit eval`. ``set_name=None`` picks the only set there is."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError("run folder not found", file=str(run_dir))
    sets = prediction_sets(run_dir)
    if set_name is None:
        if len(sets) != 1:
            raise RunError(f"choose a prompt set; available: {', '.join(sets) or 'none'} "
                           "(run `lorafit eval` to write predictions)", file=str(run_dir / EVAL_DIR))
        set_name = sets[0]
    paths = [run_dir / EVAL_DIR / predictions_name(m, set_name) for m in ("base", "tuned")]
    for p in paths:
        if not p.is_file():
            raise RunError(f"no predictions for set '{set_name}' (available: {', '.join(sets) or 'none'};"
                           " run `lorafit eval` first)", file=str(p))
    return create_study(paths[0], paths[1], raters, out, seed, base_url=base_url,
                        names=("base", "tuned"))
