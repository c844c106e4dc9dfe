"""ROUGE-1/2/L and BLEU-4 of predictions against references, in two modes.

``llamafactory`` reproduces LLaMA-Factory's ``ComputeSimilarity`` (src/llamafactory/train/sft/metric.py)
number for number, so a lorafit run can be compared with a LLaMA-Factory run: jieba word segmentation,
rouge-chinese F-scores on the space-joined words, character-level nltk ``sentence_bleu`` with
smoothing method 3, each example rounded to 4 decimals (x100) before the mean. An empty prediction or
reference gets ROUGE 0, as there.

``standard`` is what papers outside that ecosystem report: sacrebleu corpus BLEU (``zh`` tokenizer for
Chinese, ``13a`` for English) and Google's rouge-score (per-example F-measure, mean x100). rouge-score's
default tokenizer drops every non-ASCII character, so Chinese text is first segmented by jieba
(lower-cased, space-joined) and split on whitespace.

Multiple references per prompt (E2E): ROUGE takes the best reference per metric in both modes; BLEU
counts n-grams against all references (nltk's and sacrebleu's own multi-reference rules). With one
reference per prompt the llamafactory numbers equal LLaMA-Factory's exactly.

Empty predictions score 0 and never raise.

``example_stats`` keeps what each prompt contributes to a score (its per-example value, or for corpus
BLEU its n-gram counts), so evaluate/stats.py can resample prompts and recompute the set's score
exactly as it is defined.
"""
from __future__ import annotations

import contextlib
import logging
import re
import sys
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..errors import ConfigError, DataError

KEYS = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")
MODES = ("llamafactory", "standard")
LANGS = ("en", "zh")
# A set is Chinese when at least this share of its letters are CJK ideographs. The threshold is low on
# purpose, because the two mistakes are not alike: Chinese tokenization handles English parts well
# (sacrebleu's zh tokenizer applies 13a to non-CJK text; jieba splits English words), while English
# tokenization drops every Chinese character from ROUGE. A mixed set (lorafit's demo: a third of the
# answers Chinese, about 9% of the letters) is therefore scored as Chinese; English text quoting a
# few Chinese words (a share of 1-3%) stays English.
CJK_SHARE = 0.05
_CJK = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f]")

Refs = Sequence[str | Sequence[str]]


def detect_lang(texts: Sequence[str]) -> str:
    """'zh' when CJK ideographs make up at least ``CJK_SHARE`` of the letters, else 'en'."""
    cjk = sum(len(_CJK.findall(t)) for t in texts)
    letters = sum(sum(c.isalpha() for c in t) for t in texts)
    return "zh" if letters and cjk / letters >= CJK_SHARE else "en"


@dataclass
class ExampleStats:
    """What each prompt contributes to one metric: the set's score is ``agg`` of the column sums of ``x``.

    A mean of per-example values is ``x = [[value, 1], ...]`` with ``agg = sum / count``; corpus BLEU is
    sacrebleu's n-gram counts per segment with its own formula as ``agg``. Resampling prompts is then a
    weighted column sum, and every resample's score is computed by the metric's own definition.
    """

    x: np.ndarray                                  # (n, k) per-prompt sufficient statistics
    agg: Callable[[np.ndarray], np.ndarray]        # (..., k) summed statistics -> (...) score
    point: float                                   # the set's score, computed as it always was

    @property
    def values(self) -> np.ndarray | None:
        """Per-prompt values of a mean metric (None for a corpus-level one such as sacrebleu BLEU)."""
        return self.x[:, 0] if self.x.shape[1] == 2 and self.agg is mean_agg else None


def mean_agg(t: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return t[..., 0] / t[..., 1]


def mean_stats(values: Sequence[float]) -> ExampleStats:
    v = np.asarray(values, dtype=float).reshape(-1)
    return ExampleStats(np.stack([v, np.ones_like(v)], axis=1), mean_agg,
                        float(np.mean(list(values))) if len(v) else 0.0)


def _check(preds: Sequence[str], refs: Refs, mode: str, lang: str | None) -> list[list[str]]:
    if mode not in MODES:
        raise ConfigError(f"unknown metric mode {mode!r}; expected one of {MODES}", field="mode")
    if lang is not None and lang not in LANGS:
        raise ConfigError(f"unknown language {lang!r}; expected one of {LANGS}", field="lang")
    if len(preds) != len(refs):
        raise DataError(f"{len(preds)} predictions but {len(refs)} references: counts must match")
    ref_lists = [[r] if isinstance(r, str) else list(r) for r in refs]
    if any(not rs for rs in ref_lists):
        raise DataError("every prediction needs at least one reference", field="label")
    return ref_lists


def example_stats(preds: Sequence[str], refs: Refs, mode: str = "llamafactory",
                  lang: str | None = None) -> dict[str, ExampleStats]:
    """Per-prompt statistics of every metric in ``KEYS`` (see ``ExampleStats``); ``point`` equals
    ``score_predictions``. One row per prompt, so a prompt with several references counts once."""
    ref_lists = _check(preds, refs, mode, lang)
    if not preds:
        return {k: ExampleStats(np.zeros((0, 2)), mean_agg, 0.0) for k in KEYS}
    if mode == "llamafactory":
        return {k: mean_stats(v) for k, v in _llamafactory(list(preds), ref_lists).items()}
    lang = lang or detect_lang([r for rs in ref_lists for r in rs])
    return _standard(list(preds), ref_lists, lang)


def score_predictions(preds: Sequence[str], refs: Refs, mode: str = "llamafactory",
                      lang: str | None = None) -> dict[str, float]:
    """Scores 0-100 for ``KEYS``; ``refs[i]`` is one reference or a list of references.

    ``lang`` (None: detected from the references) matters in ``standard`` mode only; llamafactory
    mode is language-agnostic by construction (jieba also splits English on spaces and punctuation).
    """
    return {k: st.point for k, st in example_stats(preds, refs, mode, lang).items()}


# ------------------------------------------------------------------------------------------------
# llamafactory mode
# ------------------------------------------------------------------------------------------------
def _llamafactory(preds: list[str], refs: list[list[str]]) -> dict[str, list[float]]:
    """Per-example scores (x100, rounded to 4 decimals as LLaMA-Factory does); the set's score is their mean."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu  # heavy: keep CLI start fast
    from rouge_chinese import Rouge

    cut = _jieba_cut()
    smooth = SmoothingFunction().method3
    scores: dict[str, list[float]] = {k: [] for k in KEYS}
    with _deep_recursion(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nltk warns on zero n-gram overlaps; they score 0, as intended
        for pred, rs in zip(preds, refs):
            hyp = " ".join(cut(pred))
            best = {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
            for ref in rs:
                ref_words = " ".join(cut(ref))
                if not hyp.split() or not ref_words.split():
                    continue  # LLaMA-Factory's rule: empty side -> ROUGE 0 (rouge-chinese would raise)
                result = Rouge().get_scores(hyp, ref_words)[0]
                for k in best:
                    best[k] = max(best[k], result[k]["f"])
            for k, v in best.items():
                scores[k].append(round(v * 100, 4))
            bleu = sentence_bleu([list(r) for r in rs], list(pred), smoothing_function=smooth)
            scores["bleu-4"].append(round(bleu * 100, 4))
    return scores


@contextlib.contextmanager
def _deep_recursion(limit: int = 100_000) -> Iterator[None]:
    """rouge-chinese rebuilds the LCS recursively (depth ~ len(hyp) + len(ref)); long answers would
    exceed Python's default limit of 1000 and crash where LLaMA-Factory reports a number."""
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, limit))
    try:
        yield
    finally:
        sys.setrecursionlimit(old)


@lru_cache(maxsize=1)
def _jieba_cut() -> Any:
    import jieba

    jieba.setLogLevel(logging.CRITICAL)  # as LLaMA-Factory does: no "Building prefix dict" chatter
    return lambda text: list(jieba.cut(text))


# ------------------------------------------------------------------------------------------------
# standard mode
# ------------------------------------------------------------------------------------------------
class WhitespaceTokenizer:
    """rouge-score tokenizer for text already segmented into space-separated words."""

    def tokenize(self, text: str) -> list[str]:
        return text.split()


def segment_zh(text: str) -> str:
    """jieba words, lower-cased, joined by spaces: Chinese text rouge-score can count."""
    return " ".join(w for w in _jieba_cut()(text.lower()) if w.strip())


def _standard(preds: list[str], refs: list[list[str]], lang: str) -> dict[str, ExampleStats]:
    import sacrebleu
    from rouge_score import rouge_scorer, tokenizers  # heavy: keep CLI start fast
    from sacrebleu.metrics import BLEU

    # sacrebleu wants reference *streams*; None pads prompts that have fewer references.
    n_streams = max(len(rs) for rs in refs)
    streams = [[rs[i] if i < len(rs) else None for rs in refs] for i in range(n_streams)]
    tokenize = "zh" if lang == "zh" else "13a"
    bleu = sacrebleu.corpus_bleu(preds, streams, tokenize=tokenize).score
    # Per-segment n-gram counts: corpus BLEU of any resample is BLEU of their sums (sacrebleu's own rule).
    metric = BLEU(tokenize=tokenize)
    counts = np.asarray(metric._extract_corpus_statistics(preds, streams), dtype=float)

    def bleu_agg(t: np.ndarray) -> np.ndarray:
        flat = t.reshape(-1, t.shape[-1])
        return np.array([metric._compute_score_from_stats(list(row)).score for row in flat]).reshape(t.shape[:-1])

    # English: rouge-score's own default tokenizer, passed explicitly only to skip its log line.
    tokenizer = WhitespaceTokenizer() if lang == "zh" else tokenizers.DefaultTokenizer(use_stemmer=False)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=tokenizer)
    prep = segment_zh if lang == "zh" else str
    rouge: dict[str, list[float]] = {"rouge1": [], "rouge2": [], "rougeL": []}
    for pred, rs in zip(preds, refs):
        s = scorer.score_multi([prep(r) for r in rs], prep(pred))  # best reference per metric
        for k in rouge:
            rouge[k].append(s[k].fmeasure)
    out = {}
    for key, k in (("rouge-1", "rouge1"), ("rouge-2", "rouge2"), ("rouge-l", "rougeL")):
        out[key] = mean_stats([100 * f for f in rouge[k]])
        out[key].point = 100 * float(np.mean(rouge[k]))  # the set's score exactly as before
    out["bleu-4"] = ExampleStats(counts, bleu_agg, float(bleu))
    return out
