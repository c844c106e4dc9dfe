"""The chat template, loss mask and truncation (`data/chat.py`) on SmolLM2's real tokenizer."""
import pytest

from lorafit.data import CHATML_TEMPLATE, encode, ensure_template


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from lorafit.model import load_tokenizer

    return ensure_template(load_tokenizer(tiny_model_dir))


def test_loss_mask_covers_exactly_the_answers(tok):
    msgs = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A one"},
            {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A two"}]
    ids, labels, trunc = encode(tok, msgs, max_length=1024)
    assert not trunc and len(ids) == len(labels)
    full = tok.apply_chat_template(msgs, tokenize=False)
    assert tok.decode(ids) == full  # segment-wise tokenisation reproduces the template exactly
    supervised = tok.decode([i for i, l in zip(ids, labels) if l != -100])
    assert "A one" in supervised and "A two" in supervised
    assert "Q1" not in supervised and "assistant" not in supervised and "system" not in supervised
    ids2, labels2, _ = encode(tok, msgs, max_length=1024, train_on_prompt=True)
    assert labels2 == ids2


def test_truncation_keeps_answer_start_and_prompt_end(tok):
    msgs = [{"role": "user", "content": "word " * 300 + "QUESTION?"}, {"role": "assistant", "content": "ANSWER " * 100}]
    ids, labels, trunc = encode(tok, msgs, max_length=64)
    assert trunc and len(ids) == 64
    text = tok.decode(ids)
    assert "QUESTION?" in text and "ANSWER" in text
    assert sum(l != -100 for l in labels) == 32  # response budget max(64 // 2, 64 - len(prompt))


def test_chatml_fallback(tok):
    import copy

    t = copy.deepcopy(tok)
    t.chat_template = None
    ensure_template(t)
    assert t.chat_template == CHATML_TEMPLATE


def test_conversation_not_starting_with_user_is_a_data_error(tok):
    """An assistant turn first used to raise ValueError (empty prefix) from apply_chat_template: a traceback."""
    from types import SimpleNamespace

    from lorafit.data import Example, encode_all
    from lorafit.errors import DataError

    msgs = [{"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Sure"}]
    for sys_msgs, system_prompt in [([], None), ([], "Be kind."), ([{"role": "system", "content": "S"}], None)]:
        with pytest.raises(DataError, match="must start with a user turn"):
            encode(tok, sys_msgs + msgs, max_length=64, system_prompt=system_prompt)
    cfg = SimpleNamespace(max_length=64, train_on_prompt=False, system_prompt=None)
    with pytest.raises(DataError, match="must start with a user turn") as e:
        encode_all(tok, [Example(msgs, "data.jsonl", 7)], cfg)
    assert (e.value.file, e.value.line) == ("data.jsonl", 7)


def test_an_assistant_turn_of_weight_0_is_context_not_trained(tok, tmp_path):
    """OpenAI's fine-tuning format: {"role": "assistant", "content": ..., "weight": 0}."""
    import json

    from lorafit.data import read_examples
    from lorafit.errors import DataError

    msgs = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "Bad answer", "weight": 0},
            {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "Good answer", "weight": 1}]
    p = tmp_path / "w.jsonl"
    p.write_text(json.dumps({"messages": msgs}) + "\n")
    (ex,) = read_examples(p)
    ids, labels, _ = encode(tok, ex.messages, max_length=1024)
    supervised = tok.decode([i for i, l in zip(ids, labels) if l != -100])
    assert "Good answer" in supervised and "Bad answer" not in supervised
    assert "Bad answer" in tok.decode(ids)  # still in the context
    for bad in ({"role": "assistant", "content": "x", "weight": 0.5}, {"role": "user", "content": "x", "weight": 0}):
        p.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, bad, {"role": "assistant", "content": "a"}]}) + "\n")
        with pytest.raises(DataError, match="weight must be 0 or 1") as e:
            read_examples(p)
        assert e.value.field == "messages[1].weight"
