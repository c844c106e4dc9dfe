"""A rater's whole session in a real browser (Debian's Chromium via Playwright): keyboard and
mouse, reload and resume, language switch; then the stored ratings and the results."""
from __future__ import annotations

import json
import socket
import sqlite3
import threading
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.timeout(120)]
CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
if not CHROMIUM.exists():
    pytest.skip("Debian's chromium is not installed (make browser-deps)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")

import uvicorn  # noqa: E402

from lorafit.blind import create_study, make_app, results, results_markdown  # noqa: E402
from lorafit.blind.store import DIMENSIONS  # noqa: E402


@pytest.fixture
def live(tmp_path):
    """A 4-item study served by uvicorn on loopback, in a thread of this process."""
    for m, word in (("a", "alpha"), ("b", "omega")):
        (tmp_path / f"{m}.jsonl").write_text("".join(
            json.dumps({"prompt": f"Prompt number {i}", "predict": f"{word} says {i}", "label": ""}) + "\n"
            for i in range(4)))
    info = create_study(tmp_path / "a.jsonl", tmp_path / "b.jsonl", 2, tmp_path / "study.db")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(make_app(info.db), host="127.0.0.1", port=port,
                                        log_level="warning", access_log=False))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.started
    yield info, info.links[0].replace("8765", str(port))
    srv.should_exit = True
    thread.join(timeout=10)


def read_form(page) -> dict:
    """What the page shows: answers, and the rating the rater has entered so far (slot space)."""
    checked = {}
    for name in [f"f-{s}-{d}" for s in "12" for d in DIMENSIONS] + ["preference"]:
        el = page.query_selector(f'input[name="{name}"]:checked')
        checked[name] = el.get_attribute("value") if el else None
    return {"answers": [page.text_content("#answer-1"), page.text_content("#answer-2")],
            "prompt": page.text_content("#prompt"), "checked": checked}


def expect_rated(page, n: int) -> None:
    # locator waits, not wait_for_function: the page's CSP (rightly) forbids eval
    sync_api.expect(page.locator("#progress")).to_contain_text(f"{n} rated", timeout=10_000)


def test_rating_session_in_chromium(live):
    info, link = live
    entered = {}  # prompt -> (answer texts in slot order, answer1 scores, answer2 scores, preference)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        page = browser.new_context(locale="en-US").new_page()
        problems: list[str] = []
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.goto(link)
        page.wait_for_selector("#rating:not([hidden])")
        assert page.text_content("h1") == "Blind comparison"

        # item 1, keyboard only: digits score and advance, 1 prefers Answer 1, c/Esc comment, Enter saves
        shown = read_form(page)
        for key in "45342332":
            page.keyboard.press(key)
        page.keyboard.press("1")
        page.keyboard.press("c")
        page.keyboard.type("clear and short")
        page.keyboard.press("Escape")
        page.keyboard.press("Enter")
        expect_rated(page, 1)
        entered[shown["prompt"]] = (shown["answers"], [4, 5, 3, 4], [2, 3, 3, 2], "1")

        # item 2, mouse only
        item2 = read_form(page)
        for s, scores in (("1", [2, 2, 2, 2]), ("2", [5, 4, 5, 4])):
            for d, v in zip(DIMENSIONS, scores):
                page.check(f'input[name="f-{s}-{d}"][value="{v}"]')
        page.check('input[name="preference"][value="tie"]')
        page.click("#submit")
        expect_rated(page, 2)
        entered[item2["prompt"]] = (item2["answers"], [2, 2, 2, 2], [5, 4, 5, 4], "tie")

        # reload: resumes at item 3; going back shows item 2 in the same order with its rating
        page.reload()
        page.wait_for_selector("#rating:not([hidden])")
        assert "Item 3 of 4" in page.text_content("#progress")
        page.keyboard.press("PageUp")
        sync_api.expect(page.locator("#progress")).to_contain_text("Item 2 of 4")
        back = read_form(page)
        assert back["answers"] == item2["answers"] and back["checked"]["preference"] == "tie"
        assert back["checked"]["f-2-accuracy"] == "5"
        page.keyboard.press("PageDown")
        sync_api.expect(page.locator("#progress")).to_contain_text("Item 3 of 4")

        # item 3, arrow keys: the first → or ← picks 3, then → raises, ← lowers; ↓ next row; 0 is a tie
        item3 = read_form(page)
        for key in ["ArrowRight", "ArrowRight", "ArrowDown", "ArrowLeft", "ArrowLeft", "ArrowDown",
                    "5", "1", "3", "3", "3", "3", "0"]:
            page.keyboard.press(key)
        page.keyboard.press("Enter")
        expect_rated(page, 3)
        entered[item3["prompt"]] = (item3["answers"], [4, 2, 5, 1], [3, 3, 3, 3], "tie")

        # item 4: Enter with nothing entered saves nothing; then in Chinese
        item4 = read_form(page)
        page.keyboard.press("Enter")
        assert "Please rate" in page.text_content("#status")
        page.click("#lang-switch")
        assert page.text_content("h1") == "盲评对比" and "第 4 / 4 题" in page.text_content("#progress")
        for key in "555555552":
            page.keyboard.press(key)
        page.keyboard.press("Enter")
        page.wait_for_selector("#finished:not([hidden])")
        assert "全部评完" in page.text_content("#finished")
        entered[item4["prompt"]] = (item4["answers"], [5] * 4, [5] * 4, "2")
        assert not problems, problems  # no script errors, no CSP violations
        browser.close()

    conn = sqlite3.connect(info.db)
    conn.row_factory = sqlite3.Row
    rows = {r["prompt"]: r for r in conn.execute(
        "SELECT ratings.*, items.prompt FROM ratings JOIN items USING (item_id)")}
    assert len(rows) == 4
    for prompt, (answers, one, two, pref) in entered.items():
        a_first = answers[0].startswith("alpha")
        a, b = (one, two) if a_first else (two, one)
        r = rows[prompt]
        assert [r[f"a_{d}"] for d in DIMENSIONS] == a and [r[f"b_{d}"] for d in DIMENSIONS] == b
        assert r["preference"] == ("tie" if pref == "tie" else "a" if (pref == "1") == a_first else "b")
    assert [r["comment"] for r in rows.values()].count("clear and short") == 1

    res = results(info.db)
    assert res["study"]["ratings"] == 4 and res["study"]["items_rated"] == 4
    assert "| accuracy |" in results_markdown(res)
