"""Records in every supported format become the same chat messages (`data/formats.py`); bad ones
name file, line and field."""
import json
import logging
import re

import pytest

from lorafit.data import Example, group_references, read_examples
from lorafit.data.formats import tools_text
from lorafit.errors import DataError


def write(p, text):
    p.write_text(text, encoding="utf-8")
    return p


def test_alpaca_with_system_and_history(tmp_path):
    p = write(tmp_path / "a.json", json.dumps([{"instruction": "Q2", "input": "ctx", "output": "A2", "system": "S",
                                                "history": [["Q1", "A1"]]}]))
    (ex,) = read_examples(p)
    assert [m["role"] for m in ex.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert ex.messages[3]["content"] == "Q2\nctx" and ex.label == "A2"


def test_sharegpt_both_shapes_and_jsonl_lines(tmp_path):
    p = write(tmp_path / "s.jsonl",
              json.dumps({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}) + "\n\n"
              + json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}) + "\n")
    a, b = read_examples(p)
    assert a.messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert b.label == "a" and b.line == 3


def test_csv_with_column_mapping(tmp_path):
    p = write(tmp_path / "c.csv", "q,a,extra\nhello,world,x\n")
    (ex,) = read_examples(p, columns={"instruction": "q", "output": "a"})
    assert ex.messages[-2:] == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]


def test_dolly_text_format(tmp_path):
    p = write(tmp_path / "d.jsonl", json.dumps({"text": "### Human: Why? ### Assistant: Because."}) + "\n")
    assert read_examples(p)[0].messages[-1]["content"] == "Because."


def test_dataset_info(tmp_path):
    write(tmp_path / "d.json", json.dumps([{"q": "x", "r": "y"}]))
    write(tmp_path / "dataset_info.json", json.dumps({"mine": {"file_name": "d.json", "columns": {"prompt": "q", "response": "r"}}}))
    (ex,) = read_examples(f"{tmp_path}/dataset_info.json#mine")
    assert ex.label == "y"


@pytest.mark.parametrize("content,line,field", [
    ('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": ""}\n', 2, "output"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "a"\n', 2, None),
    ('{"instruction": 3.5, "output": ["x"]}\n', 1, "output"),
    ('[{"instruction": "a", "output": "b"},\n {"output": "c"}]', 2, "instruction"),
])
def test_bad_records_name_file_line_field(tmp_path, content, line, field):
    p = write(tmp_path / "bad.jsonl", content)
    with pytest.raises(DataError) as e:
        read_examples(p)
    assert e.value.file == str(p) and e.value.line == line and e.value.field == field


def test_group_references():
    exs = [Example([{"role": "user", "content": "mr1"}, {"role": "assistant", "content": r}]) for r in ("a", "b")]
    (g,) = group_references(exs)
    assert g.references == ["a", "b"]


def test_sharegpt_must_start_with_a_user_turn(tmp_path):
    """An assistant turn first has no prompt before it (chat.encode used to crash on it, exit 1)."""
    turns = [{"from": "gpt", "value": "Hello!"}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Sure"}]
    for conv, field in [(turns, "conversations[0]"), ([{"from": "system", "value": "S"}] + turns, "conversations[1]")]:
        p = write(tmp_path / "s.jsonl", "\n" + json.dumps({"conversations": conv}) + "\n")
        with pytest.raises(DataError, match="must start with a user turn") as e:
            read_examples(p)
        assert (e.value.file, e.value.line, e.value.field) == (str(p), 2, field)


def test_dolly_text_with_several_turns(tmp_path):
    p = write(tmp_path / "d.jsonl", json.dumps({"text": "### Human: Hi ### Assistant: Hello! ### Human: What is 2+2? "
                                                        "### Assistant: 4"}) + "\n")
    (ex,) = read_examples(p)
    assert ex.messages == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                           {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]


@pytest.mark.parametrize("text,fragment", [
    ("### Human: a ### Human: b ### Assistant: c", "turn 2 is '### Human:' where '### Assistant:' belongs"),
    ("### Human: a ### Assistant: b ### Assistant: c", "turn 3 is '### Assistant:' where '### Human:' belongs"),
    ("### Assistant: a ### Human: b ### Assistant: c", "turn 1 is '### Assistant:'"),
    ("### Human: a ### Assistant:  ### Human: b ### Assistant: c", "turn 2 ('### Assistant:') is empty"),
    ("### Human:   ### Assistant: c", "turn 1 ('### Human:') is empty"),
    ("Intro ### Human: a ### Assistant: c", "must start with '### Human:'"),
    ("### Human: a ### Assistant: b ### Human: c", "must end with an '### Assistant:' answer"),
])
def test_dolly_text_malformed_turns(tmp_path, text, fragment):
    p = write(tmp_path / "d.jsonl", json.dumps({"text": text}) + "\n")
    with pytest.raises(DataError, match=re.escape(fragment)) as e:
        read_examples(p)
    assert (e.value.line, e.value.field) == (1, "text")


def test_dataset_info_sharegpt_system_column(tmp_path):
    write(tmp_path / "s.json", json.dumps([{"conversations": [{"from": "human", "value": "Hi"},
                                                              {"from": "gpt", "value": "Bonjour"}],
                                            "system_prompt": "Answer in French."}]))
    write(tmp_path / "dataset_info.json", json.dumps({"fr": {"file_name": "s.json", "formatting": "sharegpt", "columns": {
        "messages": "conversations", "system": "system_prompt"}}}))
    (ex,) = read_examples(f"{tmp_path}/dataset_info.json#fr")
    assert ex.messages[0] == {"role": "system", "content": "Answer in French."}


def test_dataset_info_custom_role_tags_system_included(tmp_path):
    """LLaMA-Factory's `tags` name each role's value, the system's too (system_tag)."""
    conv = [{"speaker": "sys", "text": "Be brief."}, {"speaker": "customer", "text": "Hi"},
            {"speaker": "agent", "text": "Hello"}]
    write(tmp_path / "c.json", json.dumps([{"dialog": conv}]))
    write(tmp_path / "dataset_info.json", json.dumps({"cs": {"file_name": "c.json", "formatting": "sharegpt",
        "columns": {"messages": "dialog"}, "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "customer",
                                                    "assistant_tag": "agent", "system_tag": "sys"}}}))
    (ex,) = read_examples(f"{tmp_path}/dataset_info.json#cs")
    assert [m["role"] for m in ex.messages] == ["system", "user", "assistant"] and ex.messages[0]["content"] == "Be brief."


@pytest.mark.parametrize("tools", ['[{"name": "weather", "parameters": {}}]', [{"name": "weather", "parameters": {}}],
                                   [{"type": "function", "function": {"name": "weather", "parameters": {}}}]])
def test_tool_definitions_join_the_system_turn(tmp_path, tools):
    """LLaMA-Factory's `tools` column (a JSON string), a list, or OpenAI's typed list: the definitions the calls
    refer to become system text (dropped, they would teach calls to functions the model never saw)."""
    conv = [{"from": "human", "value": "Weather?"}, {"from": "function_call", "value": '{"name": "weather"}'},
            {"from": "observation", "value": "20C"}, {"from": "gpt", "value": "20C"}]
    want = tools_text([{"name": "weather", "parameters": {}}])
    p = write(tmp_path / "t.jsonl", json.dumps({"conversations": conv, "tools": tools}) + "\n")
    (ex,) = read_examples(p)
    assert ex.messages[0] == {"role": "system", "content": want, "only_tools": True}
    assert ex.messages[2]["content"] == '{"name": "weather"}'
    p = write(tmp_path / "t.jsonl", json.dumps({"instruction": "q", "output": "a", "system": "Be brief.", "tools": tools}) + "\n")
    (ex,) = read_examples(p)
    assert ex.messages[0]["content"] == "Be brief.\n\n" + want  # after the record's own system text
    # Through dataset_info.json's columns.tools: the mapped field is the one read.
    write(tmp_path / "f.json", json.dumps([{"conversations": conv, "funcs": tools}]))
    write(tmp_path / "dataset_info.json", json.dumps({"fn": {"file_name": "f.json", "formatting": "sharegpt",
                                                             "columns": {"messages": "conversations", "tools": "funcs"}}}))
    (ex,) = read_examples(f"{tmp_path}/dataset_info.json#fn")
    assert ex.messages[0]["content"] == want


@pytest.mark.parametrize("tools,field,said", [
    ("[{name: weather}]", "tools", "tools must be a JSON list"),
    ('{"name": "weather"}', "tools", "tools must be a list of function definitions, got dict"),
    ('[{"description": "no name"}]', "tools[0]", 'each tool must be an object with a non-empty "name"'),
    ('["weather"]', "tools[0]", "each tool must be an object"),
])
def test_malformed_tools_name_the_field(tmp_path, tools, field, said):
    p = write(tmp_path / "t.jsonl", json.dumps({"instruction": "q", "output": "a", "tools": tools}) + "\n")
    with pytest.raises(DataError, match=re.escape(said)) as e:
        read_examples(p)
    assert (e.value.line, e.value.field) == (1, field)


def test_openai_tool_calls_and_text_parts(tmp_path):
    """OpenAI's chat format: content as text parts, assistant tool_calls (arguments a JSON string), tool results."""
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Weather "}, {"type": "text", "text": "in Paris?"}]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "20C"},
            {"role": "assistant", "content": "Checking again.", "tool_calls": [
                {"id": "c2", "type": "function", "function": {"name": "weather", "arguments": {"city": "Nice"}}}]},
            {"role": "tool", "tool_call_id": "c2", "content": "22C"},
            {"role": "assistant", "content": "20C in Paris, 22C in Nice."}]
    (ex,) = read_examples(write(tmp_path / "o.jsonl", json.dumps({"messages": msgs}) + "\n"))
    assert [m["role"] for m in ex.messages] == ["user", "assistant", "user", "assistant", "user", "assistant"]
    assert ex.messages[0]["content"] == "Weather in Paris?"
    assert ex.messages[1]["content"] == '{"name": "weather", "arguments": {"city": "Paris"}}'
    assert ex.messages[3]["content"] == 'Checking again.\n{"name": "weather", "arguments": {"city": "Nice"}}'
    # OpenAI's older shape: one `function_call` on the assistant turn, the result in a `function` turn
    old = [msgs[0], {"role": "assistant", "content": None, "function_call": {"name": "weather", "arguments": "{}"}},
           {"role": "function", "name": "weather", "content": "20C"}, {"role": "assistant", "content": "20C."}]
    (ex,) = read_examples(write(tmp_path / "f.jsonl", json.dumps({"messages": old}) + "\n"))
    assert [m["role"] for m in ex.messages] == ["user", "assistant", "user", "assistant"]
    assert ex.messages[1]["content"] == '{"name": "weather", "arguments": {}}'


@pytest.mark.parametrize("turn,field,said", [
    ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, "messages[0].content[0]",
     "only text content parts are supported, got 'image_url'"),
    ({"role": "user", "content": "hi", "tool_calls": [{"function": {"name": "f"}}]}, "messages[0].tool_calls",
     "tool_calls must be a non-empty list, on an assistant turn"),
])
def test_unsupported_openai_turns_name_the_field(tmp_path, turn, field, said):
    msgs = [turn, {"role": "assistant", "content": "ok"}]
    with pytest.raises(DataError, match=re.escape(said)) as e:
        read_examples(write(tmp_path / "o.jsonl", json.dumps({"messages": msgs}) + "\n"))
    assert (e.value.line, e.value.field) == (1, field)


def test_tool_call_arguments_must_be_json(tmp_path):
    msgs = [{"role": "user", "content": "w?"}, {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "weather", "arguments": "{city: Paris"}}]},
        {"role": "tool", "content": "20C"}, {"role": "assistant", "content": "20C"}]
    with pytest.raises(DataError, match="arguments must be JSON") as e:
        read_examples(write(tmp_path / "o.jsonl", json.dumps({"messages": msgs}) + "\n"))
    assert e.value.field == "messages[1].tool_calls[0].function.arguments"


def test_empty_tools_and_tool_roles_are_kept(tmp_path):
    conv = [{"from": "human", "value": "Weather?"}, {"from": "function_call", "value": '{"name": "w"}'},
            {"from": "observation", "value": "20C"}, {"from": "gpt", "value": "20C"}]
    p = write(tmp_path / "t.jsonl", "".join(json.dumps({"conversations": conv, "tools": t}) + "\n" for t in ("[]", "", [])))
    for ex in read_examples(p):
        assert [m["role"] for m in ex.messages] == ["user", "assistant", "user", "assistant"]


@pytest.mark.parametrize("rec,user", [
    ({"instruction": "Translate", "query": "Bonjour", "response": "Hello"}, "Translate\nBonjour"),
    ({"instruction": "Translate", "input": "", "query": "Bonjour", "output": "Hello"}, "Translate\nBonjour"),
    ({"query": "Only a query", "response": "ok"}, "Only a query"),  # query is the instruction when alone
])
def test_alpaca_input_aliases(tmp_path, caplog, rec, user):
    p = write(tmp_path / "a.jsonl", json.dumps(rec) + "\n")
    with caplog.at_level(logging.WARNING, logger="lorafit.data.formats"):
        (ex,) = read_examples(p)
    assert ex.messages[0]["content"] == user
    assert not caplog.records  # nothing left unread (category is not content)


def test_alpaca_two_inputs_refused(tmp_path):
    p = write(tmp_path / "a.jsonl", json.dumps({"instruction": "q", "input": "x", "query": "y", "output": "a"}) + "\n")
    with pytest.raises(DataError, match="fields 'input' and 'query' both hold the input") as e:
        read_examples(p)
    assert (e.value.line, e.value.field) == (1, "query")


def test_context_is_not_an_input_alias_but_is_not_dropped_unseen(tmp_path, caplog):
    """dolly-15k's context is the passage; Bitext's is the label 'customer support' on every row: no guess,
    a warning, and `columns: {input: context}` where it is the input."""
    rec = {"instruction": "When?", "context": "In 2000.", "response": "2000", "category": "closed_qa"}
    p = write(tmp_path / "a.jsonl", json.dumps(rec) + "\n")
    with caplog.at_level(logging.WARNING, logger="lorafit.data.formats"):
        (ex,) = read_examples(p)
    assert ex.messages[0]["content"] == "When?" and "context" in caplog.records[0].getMessage()
    (mapped,) = read_examples(p, columns={"input": "context", "output": "response"})
    assert mapped.messages[0]["content"] == "When?\nIn 2000."


def test_unread_text_fields_warn_once_per_file(tmp_path, caplog):
    p = write(tmp_path / "a.jsonl", "".join(json.dumps(r) + "\n" for r in [
        {"instruction": "Summarize", "text": "Long article.", "output": "Short.", "id": "1", "source": "web"},
        {"prompt": "P", "question": "Q", "answer": "A", "lang": "en"},
        {"instruction": "q", "text": "more", "output": "a", "score": 3, "note": ""}]))
    with caplog.at_level(logging.WARNING, logger="lorafit.data.formats"):
        assert len(read_examples(p)) == 3
    (rec,) = caplog.records
    assert str(p) in rec.getMessage() and "field(s) question, text," in rec.getMessage()


@pytest.mark.parametrize("history,field", [([["q1", ""]], "history[0][1]"), ([["q1", "r1"], ["", "r"]], "history[1][0]"),
                                           ([["q1", "  "]], "history[0][1]")])
def test_empty_history_turn_refused(tmp_path, history, field):
    p = write(tmp_path / "h.jsonl", json.dumps({"instruction": "q2", "output": "a2", "history": history}) + "\n")
    with pytest.raises(DataError, match="empty field") as e:
        read_examples(p)
    assert (e.value.file, e.value.line, e.value.field) == (str(p), 1, field)


@pytest.mark.parametrize("formatting", ["openai", 5])
def test_dataset_info_bad_formatting_names_the_info_file(tmp_path, formatting):
    write(tmp_path / "d.json", json.dumps([{"instruction": "q", "output": "a"}]))
    info = write(tmp_path / "dataset_info.json", json.dumps({"mine": {"file_name": "d.json", "formatting": formatting}}))
    with pytest.raises(DataError, match="unknown formatting") as e:
        read_examples(f"{info}#mine")
    assert (e.value.file, e.value.field) == (str(info), "mine.formatting")


def test_a_configured_system_prompt_goes_before_tool_definitions():
    from lorafit.data.chat import _with_system

    tools = {"role": "system", "content": tools_text([{"name": "weather"}]), "only_tools": True}
    msgs = [tools, {"role": "user", "content": "w?"}, {"role": "assistant", "content": "20C"}]
    assert _with_system(msgs, "Be brief.")[0]["content"] == "Be brief.\n\n" + tools["content"]
    own = [{"role": "system", "content": "Mine.\n\n" + tools["content"]}] + msgs[1:]  # merged: no only_tools
    assert _with_system(own, "Be brief.") == own  # the record's own system text wins, as without tools
