"""The blind-test study file and API: creation errors, tokens, blinding, validation, idempotence."""
from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from lorafit.blind import create_study, create_study_from_run, make_app
from lorafit.blind.app import page_language
from lorafit.blind.store import DIMENSIONS
from lorafit.errors import DataError, RunError

RUN_ID = "run-7f3a9c"
SET = "heldout"


def write_preds(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def preds(model: str, n: int = 6) -> list[dict]:
    word = {"a": "alpha", "b": "omega"}[model]
    return [{"prompt": f"Question {i}: what is {i} + {i}?", "predict": f"Reply {word} {i}: {2 * i}.",
             "label": f"REFERENCE-LABEL-{i}"} for i in range(n)]


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    run = tmp_path / RUN_ID
    write_preds(run / "eval" / f"predictions-base-{SET}.jsonl", preds("a"))
    write_preds(run / "eval" / f"predictions-tuned-{SET}.jsonl", preds("b"))
    return run


@pytest.fixture
def study(run_dir: Path, tmp_path: Path):
    info = create_study_from_run(run_dir, SET, raters=3, out=tmp_path / "study.db")
    return info, TestClient(make_app(info.db))


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def rating(a1: int = 3, a2: int = 4, pref: str = "2", comment: str = "") -> dict:
    return {"answer1": {d: a1 for d in DIMENSIONS}, "answer2": {d: a2 for d in DIMENSIONS},
            "preference": pref, "comment": comment}


def item_ids(client: TestClient, token: str) -> list[str]:
    return [it["item_id"] for it in client.get("/api/rater/state", headers=auth(token)).json()["items"]]


# --- creating a study -------------------------------------------------------------------------

def test_create_hands_out_distinct_secret_links_and_stores_only_hashes(study):
    info, _ = study
    assert len(info.links) == 3 and info.n_items == 6
    assert len(set(info.tokens + [info.admin_token])) == 4
    assert all(link.endswith("/r/" + t) and len(t) >= 40 for link, t in zip(info.links, info.tokens))
    raw = Path(info.db).read_bytes()
    assert not any(t.encode() in raw for t in info.tokens + [info.admin_token])
    conn = sqlite3.connect(info.db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("SELECT value FROM meta WHERE key='name_b'").fetchone()[0] == "tuned"


def test_create_matches_reordered_prompts_by_prompt(tmp_path):
    a = write_preds(tmp_path / "a.jsonl", preds("a"))
    b = write_preds(tmp_path / "b.jsonl", preds("b")[::-1])
    info = create_study(a, b, 1, tmp_path / "s.db")
    rows = sqlite3.connect(info.db).execute("SELECT pos, line_b, answer_a, answer_b FROM items").fetchall()
    for pos, line_b, ans_a, ans_b in rows:
        assert line_b == 7 - pos and ans_a.split(":")[0][-1] == ans_b.split(":")[0][-1]


@pytest.mark.parametrize("mutate, needle", [
    (lambda b: b[:-1], "has 5 predictions but file A has 6"),
    (lambda b: b[:2] + [{**b[2], "prompt": "something else"}] + b[3:], "prompt differs"),
])
def test_create_rejects_mismatched_files(tmp_path, mutate, needle):
    a = write_preds(tmp_path / "a.jsonl", preds("a"))
    b = write_preds(tmp_path / "b.jsonl", mutate(preds("b")))
    with pytest.raises(DataError, match=needle) as e:
        create_study(a, b, 2, tmp_path / "s.db")
    assert e.value.file == str(b)
    if "prompt" in needle:
        assert (e.value.line, e.value.field) == (3, "prompt")
    assert not (tmp_path / "s.db").exists()


@pytest.mark.parametrize("line, field, msg", [
    ("{not json", None, "not valid JSON"),
    ('{"prompt": "q"}', "predict", "missing"),
    ('{"prompt": "q", "predict": 3}', "predict", "expected a string"),
    ("[1, 2]", None, "expected a JSON object"),
    ('{"prompt": "q", "predict": "p", "label": [1]}', "label", "list of strings"),
])
def test_create_names_file_line_and_field_of_a_bad_record(tmp_path, line, field, msg):
    b = tmp_path / "b.jsonl"
    b.write_text(json.dumps(preds("b")[0]) + "\n\n" + line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=msg) as e:
        create_study(write_preds(tmp_path / "a.jsonl", preds("a", 2)), b, 1, tmp_path / "s.db")
    assert (e.value.file, e.value.line, e.value.field) == (str(b), 3, field)


def test_create_reads_what_lorafit_eval_writes(tmp_path):
    """Chat-templated prompts, a list of references as label, a BOM, a set name with a space."""
    chatml = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"
    run = tmp_path / "run"
    for model in ("base", "tuned"):
        rows = [{"prompt": chatml.format(q=f"名字 {i}?"), "predict": f"{model[0]}{i}", "label": ["x", "y"]}
                for i in range(3)]
        path = write_preds(run / "eval" / f"predictions-{model}-e2e_test.jsonl", rows)
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    info = create_study_from_run(run, "e2e test", 1, tmp_path / "s.db")
    assert "admin token: " + info.admin_token in info.format("http://host:9/")
    assert f"rater 1: http://host:9/r/{info.tokens[0]}" in info.format("http://host:9/")
    client = TestClient(make_app(info.db))
    item = client.get(f"/api/rater/items/{item_ids(client, info.tokens[0])[0]}", headers=auth(info.tokens[0]))
    assert item.json()["prompt"].startswith("[system]\nBe brief.\n\n[user]\n名字 ")
    assert "<|im_start|>" not in item.text


def test_create_refuses_bad_arguments(tmp_path, run_dir, study):
    info, _ = study
    a = write_preds(tmp_path / "a.jsonl", preds("a"))
    with pytest.raises(DataError, match="already exists"):
        create_study(a, a, 1, info.db)
    with pytest.raises(DataError) as e:
        create_study(a, a, 0, tmp_path / "x.db")
    assert e.value.field == "raters"
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no predictions"):
        create_study(tmp_path / "empty.jsonl", a, 1, tmp_path / "x.db")
    with pytest.raises(RunError, match="no predictions for set 'other'"):
        create_study_from_run(run_dir, "other", 1, tmp_path / "x.db")
    with pytest.raises(RunError, match="not found"):
        create_study_from_run(tmp_path / "nope", SET, 1, tmp_path / "x.db")
    assert create_study_from_run(run_dir, None, 1, tmp_path / "auto.db").n_items == 6  # the only set
    with pytest.raises(DataError, match="not a lorafit blind study"):
        (tmp_path / "junk.db").write_bytes(b"x" * 100)
        make_app(tmp_path / "junk.db")


def test_layout_is_counterbalanced_and_fixed(study):
    info, client = study
    for tok in info.tokens:
        ids = item_ids(client, tok)
        firsts = [client.get(f"/api/rater/items/{i}", headers=auth(tok)).json()["answers"][0]["text"]
                  for i in ids]
        assert sum("alpha" in t for t in firsts) == 3  # A shown first on half the items
        again = [client.get(f"/api/rater/items/{i}", headers=auth(tok)).json()["answers"][0]["text"]
                 for i in ids]
        assert again == firsts and item_ids(client, tok) == ids


# --- tokens and blinding ----------------------------------------------------------------------

def test_nothing_answers_without_a_valid_token(study):
    info, client = study
    iid = item_ids(client, info.tokens[0])[0]
    calls = [("GET", "/api/rater/state"), ("GET", f"/api/rater/items/{iid}"),
             ("PUT", f"/api/rater/items/{iid}/rating"), ("GET", "/api/admin/results"),
             ("GET", "/api/admin/results.md"), ("GET", "/api/admin/results.png"),
             ("GET", "/api/admin/export"), ("GET", "/api/admin/progress")]
    for headers in ({}, auth("wrong"), {"Authorization": info.tokens[0]}, auth("")):
        for method, path in calls:
            r = client.request(method, path, headers=headers, content=json.dumps(rating()))
            assert r.status_code == 401, (method, path, headers)
    for method, path in calls[3:]:  # a rater token is not an admin token
        assert client.request(method, path, headers=auth(info.tokens[0])).status_code == 401
    assert client.get("/r/" + info.admin_token).status_code == 404
    assert client.get("/r/not-a-token").status_code == 404
    for path in ("/", "/docs", "/openapi.json", "/redoc", "/static/app.js"):
        assert client.get(path).status_code == 404


def test_a_rater_sees_and_changes_only_their_own_ratings(study):
    info, client = study
    t1, t2 = info.tokens[:2]
    iid = item_ids(client, t1)[0]
    assert client.put(f"/api/rater/items/{iid}/rating", headers=auth(t1), json=rating(5, 1, "1")).status_code == 200
    assert client.get(f"/api/rater/items/{iid}", headers=auth(t1)).json()["rating"]["answer1"]["logic"] == 5
    assert client.get(f"/api/rater/items/{iid}", headers=auth(t2)).json()["rating"] is None
    assert client.get("/api/rater/state", headers=auth(t2)).json()["done"] == 0
    client.put(f"/api/rater/items/{iid}/rating", headers=auth(t2), json=rating(2, 2, "tie"))
    assert client.get(f"/api/rater/items/{iid}", headers=auth(t1)).json()["rating"]["preference"] == "1"


def test_no_rater_response_reveals_the_models(study, run_dir):
    """Every byte a rater can get (page in both languages, state, items, saves, errors, headers)
    is free of model names, file names and paths, the run id, the set name and the labels."""
    info, client = study
    responses = []
    for tok, link in zip(info.tokens, info.links):
        path = link.split("8765", 1)[1]
        responses += [client.get(path), client.get(path + "?lang=zh"),
                      client.get(path, headers={"Accept-Language": "zh-CN"})]
        responses.append(client.get("/api/rater/state", headers=auth(tok)))
        for iid in item_ids(client, tok):
            responses.append(client.put(f"/api/rater/items/{iid}/rating", headers=auth(tok), json=rating()))
            responses.append(client.get(f"/api/rater/items/{iid}", headers=auth(tok)))
        responses.append(client.put(f"/api/rater/items/{iid}/rating", headers=auth(tok), json={"x": 1}))
        responses.append(client.get("/api/rater/items/nope", headers=auth(tok)))
    forbidden = [str(run_dir), RUN_ID, SET, "predictions", "tuned", "REFERENCE-LABEL", "source",
                 "answer_a", "answer_b", "name_a", "name_b", "a_slot", str(Path(info.db).name)]
    for r in responses:
        text = r.text + json.dumps(dict(r.headers))
        assert r.status_code < 500
        for word in forbidden:
            assert word.lower() not in text.lower(), (word, r.request.url)
        assert not re.search(r"\bbase\b", text, re.I), r.request.url
    # answers are identified by slot only, and ids carry no model information
    item = client.get(f"/api/rater/items/{iid}", headers=auth(info.tokens[0])).json()
    assert [a["slot"] for a in item["answers"]] == [1, 2] and set(item) == {
        "item_id", "index", "total", "prompt", "answers", "rating"}


# --- validation and idempotence ---------------------------------------------------------------

@pytest.mark.parametrize("body, code", [
    (rating(a1=0), 422), (rating(a2=6), 422), ({**rating(), "preference": "3"}, 422),
    ({**rating(), "answer1": {**rating()["answer1"], "logic": 3.5}}, 422),
    ({**rating(), "answer1": {**rating()["answer1"], "logic": "3"}}, 422),
    ({**rating(), "answer1": {**rating()["answer1"], "logic": True}}, 422),
    ({**rating(), "answer2": {"accuracy": 3}}, 422), ({**rating(), "model": "a"}, 422),
    ({**rating(), "comment": "x" * 4001}, 422), ([1, 2], 400), ("{not json", 400), ("", 400),
])
def test_bad_ratings_get_a_clear_4xx_and_store_nothing(study, body, code):
    info, client = study
    iid = item_ids(client, info.tokens[0])[0]
    content = body if isinstance(body, str) else json.dumps(body)
    r = client.put(f"/api/rater/items/{iid}/rating", headers=auth(info.tokens[0]), content=content)
    assert r.status_code == code and r.json()["error"]
    assert sqlite3.connect(info.db).execute("SELECT COUNT(*) FROM ratings").fetchone()[0] == 0


def test_unknown_item_and_oversized_body(study):
    info, client = study
    h = auth(info.tokens[0])
    assert client.get("/api/rater/items/deadbeef", headers=h).status_code == 404
    assert client.put("/api/rater/items/deadbeef/rating", headers=h, json=rating()).status_code == 404
    iid = item_ids(client, info.tokens[0])[0]
    r = client.put(f"/api/rater/items/{iid}/rating", headers=h, content="x" * 70_000)
    assert r.status_code == 413


def test_repeated_submit_keeps_one_row_and_maps_slots_to_models(study):
    info, client = study
    tok = info.tokens[0]
    iid = item_ids(client, tok)[0]
    for body in (rating(2, 5, "2"), rating(2, 5, "2"), rating(1, 4, "2", "second thoughts")):
        r = client.put(f"/api/rater/items/{iid}/rating", headers=auth(tok), json=body)
        assert r.status_code == 200 and r.json()["done"] == 1
    rows = sqlite3.connect(info.db).execute(
        "SELECT a_accuracy, b_accuracy, preference, comment, submits FROM ratings").fetchall()
    first = client.get(f"/api/rater/items/{iid}", headers=auth(tok)).json()["answers"][0]["text"]
    a_first = "alpha" in first  # the answer texts tell us (the test) which slot held model A
    assert rows == [(1, 4, "b", "second thoughts", 3) if a_first else (4, 1, "a", "second thoughts", 3)]
    back = client.get(f"/api/rater/items/{iid}", headers=auth(tok)).json()["rating"]
    assert back == {**rating(1, 4, "2"), "comment": "second thoughts"}


def test_state_resumes_at_the_first_unrated_item(study):
    info, client = study
    tok = info.tokens[1]
    ids = item_ids(client, tok)
    for iid in ids[:2] + ids[3:4]:
        client.put(f"/api/rater/items/{iid}/rating", headers=auth(tok), json=rating())
    state = client.get("/api/rater/state", headers=auth(tok)).json()
    assert (state["done"], state["total"], state["next"]) == (3, 6, ids[2])
    assert [it["done"] for it in state["items"]] == [True, True, False, True, False, False]


# --- page and admin ---------------------------------------------------------------------------

def test_page_language_and_security_headers(study):
    info, client = study
    path = "/r/" + info.tokens[0]
    assert '<html lang="en">' in client.get(path).text
    assert '<html lang="zh">' in client.get(path, headers={"Accept-Language": "zh-CN,zh;q=0.9"}).text
    assert '<html lang="en">' in client.get(path + "?lang=en", headers={"Accept-Language": "zh"}).text
    r = client.get(path)
    assert "script-src 'nonce-" in r.headers["content-security-policy"]
    assert r.headers["cache-control"] == "no-store" and r.headers["referrer-policy"] == "no-referrer"
    assert "盲评对比" in r.text and "Blind comparison" in r.text  # both string tables ship
    assert page_language(None, "fr-FR, en;q=0.3, zh;q=0.5") == "zh"
    assert page_language(None, None) == "en" and page_language("zh", "en") == "zh"


def test_admin_gets_results_export_and_progress(study):
    info, client = study
    for tok in info.tokens[:2]:
        for k, iid in enumerate(item_ids(client, tok)):
            client.put(f"/api/rater/items/{iid}/rating", headers=auth(tok), json=rating(2 + k % 3, 4, "2"))
    h = auth(info.admin_token)
    res = client.get("/api/admin/results", headers=h).json()
    assert res["study"]["ratings"] == 12 and res["models"]["b"]["name"] == "tuned"
    assert "Human blind test" in client.get("/api/admin/results.md", headers=h).text
    assert client.get("/api/admin/results.png", headers=h).content[:8] == b"\x89PNG\r\n\x1a\n"
    lines = client.get("/api/admin/export", headers=h).text.splitlines()
    assert len(lines) == 12 and {"rater", "item", "a_slot", "b_fluency"} <= set(json.loads(lines[0]))
    prog = client.get("/api/admin/progress", headers=h).json()
    assert [r["done"] for r in prog["raters"]] == [6, 6, 0]
