"""Multiple-choice benchmarks (MMLU / CMMLU layout), base vs tuned: forgetting on a standard scale.

A general set's loss says *that* the model moved; accuracy on MMLU / CMMLU says how much general
knowledge it lost, in a unit every paper reports. Scoring is lm-evaluation-harness's ``mmlu`` / ``cmmlu``
tasks, reimplemented (lm-eval as a dependency would bring ``datasets``, ``evaluate`` and a task registry
for four lines of prompt): the same prompt text (task description, ``question.strip()``, lettered
choices, ``Answer:`` / ``答案：``), the same first-n dev exemplars for k-shot, and the prediction is the
letter whose continuation (" A", " B", ...) has the highest log-likelihood under lm-eval's tokenization
(``_encode_pair``: context and context+continuation encoded, the continuation = the extra tokens).

Fast path: when every letter's continuation is one token, one forward per batch of prompts gives all
answers, reading log_softmax at each prompt's last position; ``loglikelihood_reference`` (one sequence,
full forward) is the plain reference beside it and the fallback for multi-token continuations.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from ..errors import ConfigError, DataError
from ..rundir import benchmark_name
from .metrics import detect_lang, mean_stats
from .predictions import iter_json_objects
from .stats import bootstrap_weights, paired_summary, percentile_ci, resampled

LETTERS = "ABCDEFGHIJ"
log = logging.getLogger("lorafit")

# lm-eval's cmmlu task names each subject in Chinese in its description (lm_eval/tasks/cmmlu/_generate_configs.py).
CMMLU_SUBJECTS_ZH = {
    "agronomy": "农学", "anatomy": "解剖学", "ancient_chinese": "古汉语", "arts": "艺术学", "astronomy": "天文学",
    "business_ethics": "商业伦理", "chinese_civil_service_exam": "中国公务员考试", "chinese_driving_rule": "中国驾驶规则",
    "chinese_food_culture": "中国饮食文化", "chinese_foreign_policy": "中国外交政策", "chinese_history": "中国历史",
    "chinese_literature": "中国文学", "chinese_teacher_qualification": "中国教师资格", "clinical_knowledge": "临床知识",
    "college_actuarial_science": "大学精算学", "college_education": "大学教育学",
    "college_engineering_hydrology": "大学工程水文学", "college_law": "大学法律", "college_mathematics": "大学数学",
    "college_medical_statistics": "大学医学统计", "college_medicine": "大学医学", "computer_science": "计算机科学",
    "computer_security": "计算机安全", "conceptual_physics": "概念物理学", "construction_project_management": "建设工程管理",
    "economics": "经济学", "education": "教育学", "electrical_engineering": "电气工程", "elementary_chinese": "小学语文",
    "elementary_commonsense": "小学常识", "elementary_information_and_technology": "小学信息技术",
    "elementary_mathematics": "初等数学", "ethnology": "民族学", "food_science": "食品科学", "genetics": "遗传学",
    "global_facts": "全球事实", "high_school_biology": "高中生物", "high_school_chemistry": "高中化学",
    "high_school_geography": "高中地理", "high_school_mathematics": "高中数学", "high_school_physics": "高中物理学",
    "high_school_politics": "高中政治", "human_sexuality": "人类性行为", "international_law": "国际法学",
    "journalism": "新闻学", "jurisprudence": "法理学", "legal_and_moral_basis": "法律与道德基础", "logical": "逻辑学",
    "machine_learning": "机器学习", "management": "管理学", "marketing": "市场营销", "marxist_theory": "马克思主义理论",
    "modern_chinese": "现代汉语", "nutrition": "营养学", "philosophy": "哲学", "professional_accounting": "专业会计",
    "professional_law": "专业法学", "professional_medicine": "专业医学", "professional_psychology": "专业心理学",
    "public_relations": "公共关系", "security_study": "安全研究", "sociology": "社会学", "sports_science": "体育学",
    "traditional_chinese_medicine": "中医中药", "virology": "病毒学", "world_history": "世界历史",
    "world_religions": "世界宗教",
}


@dataclass(frozen=True)
class MCQuestion:
    subject: str
    question: str
    choices: tuple[str, ...]
    answer: int  # index into choices
    line: int


@dataclass
class Benchmark:
    """One benchmark folder: ``test.jsonl`` (scored) and, for k-shot, ``dev.jsonl`` (exemplars)."""
    name: str
    path: Path
    lang: str  # 'zh' -> CMMLU's Chinese prompt, else MMLU's English one
    test: list[MCQuestion]
    dev: dict[str, list[MCQuestion]]  # subject -> exemplars in file order (lm-eval's first_n sampler)
    shots: tuple[int, ...] = (0,)


# --- reading ----------------------------------------------------------------------------------------

def load_benchmark(path: str | Path, shots: Sequence[int] = (0,)) -> Benchmark:
    """Read and check a benchmark folder before any model is loaded; errors name file, line and field."""
    root = Path(path)
    if not root.is_dir():
        raise ConfigError("benchmark folder not found", file=str(root), field="benchmarks")
    if not (root / "test.jsonl").is_file():
        raise ConfigError("benchmark folder has no test.jsonl (MMLU/CMMLU layout: test.jsonl, dev.jsonl)",
                          file=str(root), field="benchmarks")
    shots = tuple(sorted(set(int(k) for k in shots)))
    if not shots or shots[0] < 0:
        raise ConfigError(f"shots must be numbers >= 0, got {list(shots)}", field="shots")
    test = _read_questions(root / "test.jsonl")
    dev: dict[str, list[MCQuestion]] = {}
    if (root / "dev.jsonl").is_file():
        for q in _read_questions(root / "dev.jsonl"):
            dev.setdefault(q.subject, []).append(q)
    k = max(shots)
    if k:
        for subject in dict.fromkeys(q.subject for q in test):
            have = len(dev.get(subject, []))
            if have < k:
                raise DataError(f"{k}-shot needs {k} dev exemplars of subject {subject!r}, found {have}",
                                file=str(root / "dev.jsonl"), field="subject")
    lang = detect_lang([q.question for q in test])
    return Benchmark(root.name, root, lang, test, dev, shots)


def _read_questions(path: Path) -> list[MCQuestion]:
    """A benchmark's JSON lines, read by the one JSONL reader (bad bytes, bad JSON, non-objects: DataError
    naming the file and line), then checked field by field."""
    out = []
    for i, rec in iter_json_objects(path, what="questions"):
        for key in ("subject", "question"):
            if not isinstance(rec.get(key), str) or not rec[key].strip():
                raise DataError("missing or empty string", file=str(path), line=i, field=key)
        choices = rec.get("choices")
        if (not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS)
                or not all(isinstance(c, str) for c in choices)):
            raise DataError(f"expected a list of 2-{len(LETTERS)} strings", file=str(path), line=i, field="choices")
        letters = LETTERS[:len(choices)]
        answer = rec.get("answer")
        if not (isinstance(answer, str) and len(answer) == 1 and answer in letters):
            raise DataError(f"expected one of {', '.join(letters)}, got {answer!r}", file=str(path), line=i,
                            field="answer")
        out.append(MCQuestion(rec["subject"], rec["question"], tuple(choices), letters.index(answer), i))
    return out


# --- prompts (lm-eval's mmlu / cmmlu task templates) --------------------------------------------------

def description(subject: str, lang: str) -> str:
    if lang == "zh":
        return f"以下是关于{CMMLU_SUBJECTS_ZH.get(subject, subject.replace('_', ' '))}的单项选择题，请直接给出正确答案的选项。\n\n"
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def question_text(q: MCQuestion, lang: str) -> str:
    """lm-eval's doc_to_text: the question stripped, the choices verbatim, then the answer cue."""
    lines = [q.question.strip()] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(q.choices)]
    return "\n".join(lines) + ("\n答案：" if lang == "zh" else "\nAnswer:")


def build_prompt(bench: Benchmark, q: MCQuestion, shots: int) -> str:
    """Description, then k solved dev exemplars of the same subject (each followed by a blank line), then the question."""
    solved = "".join(f"{question_text(ex, bench.lang)} {LETTERS[ex.answer]}\n\n" for ex in bench.dev.get(q.subject, [])[:shots])
    return description(q.subject, bench.lang) + solved + question_text(q, bench.lang)


# --- scoring ------------------------------------------------------------------------------------------

def encode_pair(tok: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's ``_encode_pair`` for causal models: trailing context spaces move to the continuation;
    the continuation's tokens are what encoding context+continuation adds after the context's."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tok(context + continuation)["input_ids"]
    ctx = tok(context)["input_ids"]
    return ctx, whole[len(ctx):]


@torch.inference_mode()
def loglikelihood_reference(model: Any, ctx: list[int], cont: list[int]) -> float:
    """Plain reference: one full forward over context+continuation, log_softmax, summed over the continuation."""
    device = next(model.parameters()).device
    ids = torch.tensor([ctx + cont], device=device)
    logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    pos = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1, device=device)
    return float(logp[pos, torch.tensor(cont, device=device)].sum())


def choice_loglikelihoods(model: Any, tok: Any, contexts: Sequence[str], n_choices: Sequence[int], *,
                          groups: Sequence[str] | None = None, batch_size: int = 16) -> list[list[float]]:
    """Log-likelihood of " A", " B", ... after each context (lm-eval's multiple_choice scoring).

    Contexts with the same ``groups`` label (one subject: the same description and exemplars) share the
    forward pass over their common token prefix."""
    ctx_ids = _encode(tok, [c.rstrip() for c in contexts])
    conts = [[c[len(c.rstrip()):] + f" {LETTERS[j]}" for j in range(n)] for c, n in zip(contexts, n_choices)]
    whole = _encode(tok, [c.rstrip() + x for c, xs in zip(contexts, conts) for x in xs])
    enc, k = [], 0
    for ctx, xs in zip(ctx_ids, conts):  # lm-eval's _encode_pair: continuation = what the whole adds
        enc.append([(ctx, w[len(ctx):]) for w in whole[k:k + len(xs)]])
        k += len(xs)
    if not all(len(cont) == 1 for e in enc for _, cont in e):
        # e.g. a tokenizer that merges ":" and " A": score each continuation in full, one sequence at a time
        return [[loglikelihood_reference(model, ctx, cont) for ctx, cont in e] for e in enc]
    letter_ids = [[cont[0] for _, cont in e] for e in enc]
    return last_token_logprobs(model, ctx_ids, letter_ids, groups=groups, pad_id=tok.pad_token_id or 0,
                               batch_size=batch_size)


def _encode(tok: Any, texts: list[str]) -> list[list[int]]:
    """Token ids with the tokenizer's own special-token default (lm-eval's tok_encode), in one batched call."""
    return [list(x) for x in tok(texts)["input_ids"]] if texts else []


@torch.inference_mode()
def last_token_logprobs(model: Any, ids: Sequence[list[int]], targets: Sequence[list[int]], *, pad_id: int,
                        groups: Sequence[str] | None = None, batch_size: int = 16) -> list[list[float]]:
    """log_softmax at each sequence's last position, read at its target ids: one forward per batch.

    Rows of one group are run after their longest common token prefix, computed once and its key/value
    cache repeated over the batch (a 5-shot prompt is ~85% shared exemplars). The rest is sorted by
    length (longest first: an out-of-memory error shows at once) and padded on the right, so every real
    token keeps its position and, causal attention being blind to later tokens, sees exactly what it
    sees alone. Only the last few positions go through the output head.
    """
    device = next(model.parameters()).device
    params = _forward_params(model)
    keep_arg = "logits_to_keep" in params
    cache_arg = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.x
    by_group: dict[Any, list[int]] = {}
    for i, g in enumerate(groups if groups is not None else [None] * len(ids)):
        by_group.setdefault(g, []).append(i)
    out: list[list[float]] = [[] for _ in ids]
    for members in by_group.values():
        # The shared prefix leaves at least one token per row to run (the one whose logits we read).
        p = min(_common_prefix([ids[i] for i in members]), min(len(ids[i]) for i in members) - 1)
        prefix = None
        if p > 0:
            kw = {"logits_to_keep": 1} if keep_arg else {}
            out_p = model(input_ids=torch.tensor([ids[members[0]][:p]], device=device), use_cache=True, **kw)
            prefix = getattr(out_p, "cache", None)
            prefix = out_p.past_key_values if prefix is None else prefix
        order = sorted(members, key=lambda i: -len(ids[i]))
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            lens = [len(ids[i]) - p for i in rows]
            width = lens[0]
            batch = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), p + width), dtype=torch.long)
            for r, i in enumerate(rows):
                batch[r, :lens[r]] = torch.tensor(ids[i][p:])
                mask[r, :p + lens[r]] = 1
            keep = width - lens[-1] + 1  # positions from the shortest row's last token to the end
            kw = {"logits_to_keep": keep} if keep_arg else {}
            if prefix is not None:
                cache = copy.deepcopy(prefix)
                cache.batch_repeat_interleave(len(rows))
                kw[cache_arg] = cache
            logits = model(input_ids=batch.to(device), attention_mask=mask.to(device), **kw).logits[:, -keep:]
            last = torch.tensor([n - 1 - (width - keep) for n in lens], device=device)
            logp = torch.log_softmax(logits[torch.arange(len(rows), device=device), last].float(), dim=-1)
            for r, i in enumerate(rows):
                out[i] = logp[r, torch.tensor(targets[i], device=device)].tolist()
    return out


def _common_prefix(seqs: list[list[int]]) -> int:
    """Length of the longest token prefix all sequences share."""
    n, first = min(len(s) for s in seqs), seqs[0]
    for s in seqs[1:]:
        j = 0
        while j < n and s[j] == first[j]:
            j += 1
        n = j
    return n


def _forward_params(model: Any) -> set[str]:
    """Keyword names the underlying causal LM's forward takes (PEFT passes them through)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(base.forward).parameters)


def score_benchmark(model: Any, tok: Any, bench: Benchmark, shots: int, *, batch_size: int = 16) -> list[list[float]]:
    """Each test question's per-choice log-likelihoods under ``shots``-shot prompts."""
    prompts = [build_prompt(bench, q, shots) for q in bench.test]
    return choice_loglikelihoods(model, tok, prompts, [len(q.choices) for q in bench.test],
                                 groups=[q.subject for q in bench.test], batch_size=batch_size)


# --- accuracy and intervals ---------------------------------------------------------------------------

def accuracy_summary(correct: dict[str, Sequence[bool]], subjects: Sequence[str]) -> dict[str, Any]:
    """``{"overall": ..., "subjects": {...}}``: per block n, each model's accuracy (0-1) with its 95%
    bootstrap interval over questions, and for base vs tuned the paired delta with ``delta_ci95`` and
    ``p_value`` (evaluate/stats.py: the same bootstrap and permutation test as every other eval delta)."""
    hits = {m: np.asarray(v, dtype=float) for m, v in correct.items()}
    subj = np.asarray(subjects)

    def block(sel: np.ndarray) -> dict[str, Any]:
        st = {m: mean_stats(h[sel]) for m, h in hits.items()}
        w = bootstrap_weights(int(sel.sum()))
        row: dict[str, Any] = {"n": int(sel.sum())}
        for m, x in st.items():
            row[m], row[f"{m}_ci95"] = x.point, percentile_ci(resampled(x, w))
        if "base" in st and "tuned" in st:
            row.update(paired_summary(st["base"], st["tuned"]))
        return row

    return {"overall": block(np.ones(len(subj), dtype=bool)),
            "subjects": {s: block(subj == s) for s in dict.fromkeys(subjects)}}


# --- base vs tuned, one load --------------------------------------------------------------------------

def load_benchmarks(paths: Iterable[str | Path], shots: Sequence[int] = (0,)) -> list[Benchmark]:
    """Every benchmark folder, checked up front (a bad one fails before the model is loaded)."""
    return [load_benchmark(p, shots) for p in paths]


def compare_benchmarks(model: Any, tok: Any, benches: Sequence[Benchmark], *, batch_size: int = 16,
                       out_dir: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Base (PEFT's ``disable_adapter()``) and tuned (adapter on) accuracy on every benchmark and shot count,
    from one loaded model: metrics.json's ``benchmarks`` entry. With ``out_dir``, per-question answers go
    to ``benchmark-<name>-<k>shot.jsonl``. A model without an adapter is scored as 'base' only."""
    # A bare model (no adapter) is its own base; PEFT's disable_adapter() skips the LoRA path exactly.
    passes = ({"base": model.disable_adapter, "tuned": contextlib.nullcontext} if hasattr(model, "disable_adapter")
              else {"base": contextlib.nullcontext})
    results: dict[str, Any] = {}
    for bench in benches:
        entry: dict[str, Any] = {"path": str(bench.path), "lang": bench.lang, "n": len(bench.test),
                                 "method": "lm-eval multiple_choice: log-likelihood of the answer letter"}
        for k in bench.shots:
            ll: dict[str, list[list[float]]] = {}
            for which, ctx in passes.items():
                t0 = time.perf_counter()
                with ctx():
                    ll[which] = score_benchmark(model, tok, bench, k, batch_size=batch_size)
                if progress:
                    log.info("benchmark %s %d-shot %s: %d questions in %.1f s", bench.name, k, which,
                             len(bench.test), time.perf_counter() - t0)
            preds = {m: [int(np.argmax(x)) for x in v] for m, v in ll.items()}
            correct = {m: [p == q.answer for p, q in zip(v, bench.test)] for m, v in preds.items()}
            entry[f"{k}-shot"] = accuracy_summary(correct, [q.subject for q in bench.test])
            if out_dir is not None:
                _write_answers(Path(out_dir) / benchmark_name(bench.name, k), bench, preds, ll)
        results[bench.name] = entry
    return results


def _write_answers(path: Path, bench: Benchmark, preds: dict[str, list[int]], ll: dict[str, list[list[float]]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for i, q in enumerate(bench.test):
            row: dict[str, Any] = {"subject": q.subject, "line": q.line, "answer": LETTERS[q.answer]}
            for m in preds:
                row[m] = LETTERS[preds[m][i]]
                row[f"loglik_{m}"] = [round(x, 4) for x in ll[m][i]]
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def benchmarks_table_md(results: dict[str, Any]) -> str:
    """Markdown of metrics.json's ``benchmarks``: accuracy (%) with 95% intervals, base / tuned / delta."""
    lines = ["## Standard benchmarks (forgetting)", "",
             "Multiple-choice accuracy (%) by the log-likelihood of the answer letter (lm-eval's MMLU/CMMLU "
             "prompt), [95% bootstrap interval over questions]; the delta's interval is paired, p from the "
             "paired permutation test.", "",
             "| benchmark | shots | n | base | tuned | delta (points) | p |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, entry in results.items():
        for key, block in entry.items():
            if not key.endswith("-shot"):
                continue
            o = block["overall"]
            cells = [_pct(o.get(m), o.get(f"{m}_ci95")) for m in ("base", "tuned")]
            cells.append(_pct(o.get("delta"), o.get("delta_ci95"), signed=True))
            p = o.get("p_value")
            lines.append(f"| {name} | {key[:-5]} | {o['n']} | " + " | ".join(cells) + f" | {'–' if p is None else f'{p:.3g}'} |")
    return "\n".join(lines) + "\n"


def _pct(v: float | None, ci: list[float] | None, signed: bool = False) -> str:
    if v is None:
        return "–"
    f = "{:+.1f}" if signed else "{:.1f}"
    return f.format(100 * v) + ("" if ci is None else f" [{f.format(100 * ci[0])}, {f.format(100 * ci[1])}]")
