"""The Python API that the CLI wraps: one function per command, importable by users.

    import lorafit
    run = lorafit.train("configs/support.yaml", ["--learning_rate=5e-5"])
    lorafit.evaluate(run.run_dir); lorafit.diagnose(run.run_dir); lorafit.report(run.run_dir)
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .config import TrainConfig, load_config
from .errors import RunError

log = logging.getLogger("lorafit")


def _config(config: TrainConfig | str | Path | dict, overrides: list[str] | dict | None) -> TrainConfig:
    """Any way a user may hold a config -> a validated TrainConfig (overrides applied last)."""
    if isinstance(overrides, (list, tuple)):
        from .config import parse_override

        overrides = dict(parse_override(o) for o in overrides)
    if isinstance(config, TrainConfig):
        from .config import FIELDS

        config = {k: v for k, v in config.to_dict().items() if not FIELDS[k].metadata.get("resolved")}
    if isinstance(config, dict):
        return load_config(None, {**config, **(overrides or {})})
    return load_config(config, overrides)


def train(config: TrainConfig | str | Path | dict, overrides: list[str] | dict | None = None, *,
          progress: bool = True, plot: bool = True, config_path: str | Path | None = None) -> Any:
    """Train (or resume) a run, then draw its loss curves with the diagnosis marked."""
    from .training import train as _train

    cfg = _config(config, overrides)
    result = _train(cfg, progress=progress, config_path=config_path or (config if isinstance(config, (str, Path)) else None))
    from .training.dist import is_main

    if plot and is_main():
        try:
            findings = diagnose(result.run_dir, quiet=True)
        except Exception as e:  # a plot must never cost the user a finished run
            log.warning("diagnosis after training failed: %s", e)
            findings = None
        try:
            from .reporting import plot_loss

            plot_loss(result.run_dir, findings)
        except Exception as e:  # a plot must never cost the user a finished run
            log.warning("loss plot failed: %s", e)
    return result


def generate(run: str | Path, prompt: str, *, max_new_tokens: int = 256, base_only: bool = False,
             device: str = "auto") -> str:
    """Greedy answer of the tuned model (or the base) to one user prompt, chat template applied."""
    import torch

    from .data import ensure_template, render_prompt
    from .evaluation.generate import decoded_text
    from .model import load_run_model
    from .rundir import read_config

    _counts(**{"--max-new-tokens": max_new_tokens})
    cfg = read_config(run)  # parsed once: the model loads from it too
    model, tok = load_run_model(run, with_adapter=not base_only, device=device, purpose="generate", cfg=cfg)
    ensure_template(tok, cfg.template)
    text = render_prompt(tok, [{"role": "user", "content": prompt}], cfg.system_prompt)
    enc = tok(text, return_tensors="pt", add_special_tokens=False).to(next(model.parameters()).device)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return decoded_text(tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))


def merge(run: str | Path, out: str | Path) -> Path:
    """Merge the adapter into the base: a full safetensors model that from_pretrained loads."""
    from .model import merge as _merge

    return _merge(_run_dir(run), out)


def evaluate(run: str | Path, *, checkpoints: bool = False, select: bool = False, **kwargs: Any) -> dict:
    """ROUGE/BLEU before and after on every validation set (and the general set): see evaluate.

    ``checkpoints``: evaluate every kept checkpoint and the best/final adapters instead (eval/checkpoints.*);
    ``select``: pick one within the forgetting budget and export RUN/selected-adapter/. Both return that table."""
    _counts(**{f"--{k.replace('_', '-')}": kwargs.get(k) for k in ("max_new_tokens", "batch_size", "max_samples")})
    if checkpoints or select:
        from .evaluation import checkpoints_and_select
        from .reporting import plot_checkpoints

        kwargs.pop("flips", None)
        kwargs.pop("shots", None)
        if kwargs.pop("benchmarks", None):
            from .errors import ConfigError

            raise ConfigError("benchmarks are scored by a plain `lorafit eval RUN`, not per checkpoint",
                              field="--benchmarks")
        table = checkpoints_and_select(_run_dir(run), evaluate=checkpoints, choose=select, **kwargs)
        plot_checkpoints(run)
        return table
    from .evaluation import evaluate_run
    from .model import check_adapter
    from .rundir import ADAPTER

    check_adapter(_run_dir(run) / ADAPTER, "evaluate")  # before minutes of loading and generating with the base
    return evaluate_run(_run_dir(run), **kwargs)


def score(predictions: str | Path, *, mode: str = "llamafactory", lang: str | None = None) -> dict:
    """The four scores of a predictions file, plus its generation health under "health"."""
    from .evaluation import health_file, score_file

    return {**score_file(predictions, mode=mode, lang=lang), "health": health_file(predictions)}


def diagnose(run: str | Path, *, write_config: str | Path | None = None, quiet: bool = False,
             config: str | Path | None = None) -> list:
    """Findings for a lorafit run folder, a LLaMA-Factory or HF Trainer output folder, or one of their log
    files; `config` is the launch YAML when it is not in the folder (LLaMA-Factory's, for its runs)."""
    from .diagnosis import diagnose_run

    return diagnose_run(run, write_config=None if write_config is None else str(write_config), config=config)


def evaluate_adapter(model: str, adapter: str | Path, val: dict[str, str | Path], out: str | Path, *,
                     general: str | Path | None = None, **kwargs: Any) -> dict:
    """Base vs base+adapter for any PEFT adapter (LLaMA-Factory, HF Trainer, Unsloth), no run folder needed."""
    from .evaluation.foreign import evaluate_adapter as _evaluate_adapter

    return _evaluate_adapter(model, adapter, val, out, general=general, **kwargs)


def report(run: str | Path, *, study: str | Path | None = None) -> tuple[Path, Path]:
    from .reporting import write_report

    study_res = None
    if study is not None:
        from .blind import results

        study_res = results(study)
    if not Path(run).is_dir():   # a lorafit run folder, or another tool's output folder (diagnose reads both)
        raise RunError("not a folder: pass a run folder or a LLaMA-Factory / HF Trainer output folder", file=str(run))
    from .diagnosis.sources import load_source

    load_source(run)  # the same checks as `diagnose`: an empty, binary or foreign-less log is exit 2, not a report
    return write_report(Path(run), study=study_res)


def demo(out: str | Path = "runs/demo", *, progress: bool = True) -> dict:
    """The built-in default: write the demo set, fine-tune SmolLM2, evaluate, diagnose, report."""
    from .demoset import demo_overrides

    out = Path(out)
    result = train(load_config(None, demo_overrides(out)), progress=progress)
    metrics = evaluate(result.run_dir)
    findings = diagnose(result.run_dir)
    html, md = report(result.run_dir)
    return {"run_dir": result.run_dir, "metrics": metrics, "findings": findings, "report": html}


def _counts(**options: int | None) -> None:
    """Command-line counts (--max-new-tokens, --max-samples, ...) are >= 1 when given: -1 must not
    quietly mean 'all but one' or 'generate nothing'."""
    from .config import INT_MAX
    from .errors import ConfigError

    for name, value in options.items():
        if value is not None and not 1 <= value <= INT_MAX:
            raise ConfigError(f"must be a whole number from 1 to {INT_MAX:,}, got {value}", field=name)


def _run_dir(run: str | Path) -> Path:
    from .rundir import run_config_path

    return run_config_path(run).parent
