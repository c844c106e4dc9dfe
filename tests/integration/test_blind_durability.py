"""The blind-test server as it runs for real: a uvicorn subprocess on loopback.

kill -9 mid-stream must lose no acknowledged rating; 20 concurrent raters submitting 1,000
ratings (plus repeats) must leave exactly 1,000 rows, each holding the last value sent.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from lorafit.blind import create_study
from lorafit.blind.store import DIMENSIONS

pytestmark = pytest.mark.timeout(120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(db: Path, token: str) -> Iterator[tuple[subprocess.Popen, str]]:
    """A real server in its own process; yields once it answers a rater request."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from lorafit.blind import serve; "
         "serve(sys.argv[1], '127.0.0.1', int(sys.argv[2]))", str(db), str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/api/rater/state", headers=auth(token), timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("server did not start: " + proc.stderr.read().decode(errors="replace"))
            time.sleep(0.1)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        proc.stderr.close()


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def body(k: int) -> dict:
    """A distinct, checkable rating for counter k."""
    return {"answer1": {d: 1 + (k + j) % 5 for j, d in enumerate(DIMENSIONS)},
            "answer2": {d: 1 + (k * 3 + j) % 5 for j, d in enumerate(DIMENSIONS)},
            "preference": ["1", "2", "tie"][k % 3], "comment": f"k={k}"}


def make(tmp_path: Path, n_items: int, n_raters: int):
    for m in "ab":
        (tmp_path / f"{m}.jsonl").write_text("".join(
            json.dumps({"prompt": f"prompt {i}", "predict": f"{m} {i}", "label": ""}) + "\n"
            for i in range(n_items)))
    return create_study(tmp_path / "a.jsonl", tmp_path / "b.jsonl", n_raters, tmp_path / "study.db")


def item_ids(url: str, token: str) -> list[str]:
    state = httpx.get(url + "/api/rater/state", headers=auth(token), timeout=10).json()
    return [it["item_id"] for it in state["items"]]


def stored(db: str) -> dict[tuple[str, str], tuple[str, int]]:
    """(rater_id, item_id) -> (comment, submits), after checking the file's integrity."""
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return {(r, i): (c, s) for r, i, c, s in
                conn.execute("SELECT rater_id, item_id, comment, submits FROM ratings")}
    finally:
        conn.close()


def comments(db: str) -> dict[tuple[int, str], str]:
    """Stored comments keyed by (rater number from 0, as in info.tokens, item_id)."""
    conn = sqlite3.connect(db)
    try:
        return {(idx - 1, item): c for idx, item, c in conn.execute(
            "SELECT raters.idx, item_id, comment FROM ratings JOIN raters USING (rater_id)")}
    finally:
        conn.close()


def test_acknowledged_ratings_survive_kill_9_and_restart(tmp_path):
    info = make(tmp_path, 40, 4)
    acked: dict[tuple[int, str], str] = {}
    lock = threading.Lock()
    with server(Path(info.db), info.tokens[0]) as (proc, url):
        ids = {r: item_ids(url, tok) for r, tok in enumerate(info.tokens)}

        def rater(r: int) -> None:
            with httpx.Client(base_url=url, headers=auth(info.tokens[r]), timeout=10) as c:
                for k, iid in enumerate(ids[r]):  # bounded: at most 40 submits, stops at the kill
                    b = body(100 * r + k)
                    try:
                        resp = c.put(f"/api/rater/items/{iid}/rating", json=b)
                    except httpx.TransportError:
                        return
                    if resp.status_code == 200:
                        with lock:
                            acked[(r, iid)] = b["comment"]

        threads = [threading.Thread(target=rater, args=(r,)) for r in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while len(acked) < 60 and time.monotonic() < deadline:  # kill while writes are in flight
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        for t in threads:
            t.join(timeout=30)
        assert not any(t.is_alive() for t in threads)
    assert 60 <= len(acked) < 160, "the kill should land mid-stream"

    after = comments(info.db)
    for key, comment in acked.items():
        assert after.get(key) == comment, key  # every acknowledged rating, with its value
    assert len(after) <= len(acked) + 4  # at most one in-flight, unacknowledged write per rater
    print(f"\nkilled after {len(acked)} acknowledged ratings; {len(after)} stored after restart")
    with server(Path(info.db), info.tokens[0]) as (_, url):  # restart: still serving, still there
        state = httpx.get(url + "/api/rater/state", headers=auth(info.tokens[1]), timeout=10).json()
        assert state["done"] == sum(1 for r, _ in after if r == 1)
        iid = state["next"] or ids[1][0]
        assert httpx.put(f"{url}/api/rater/items/{iid}/rating", headers=auth(info.tokens[1]),
                         json=body(7), timeout=10).status_code == 200
    assert comments(info.db)[(1, iid)] == "k=7"


def test_20_concurrent_raters_1000_ratings_each_stored_exactly_once(tmp_path):
    n_raters, n_items, repeats = 20, 50, 5
    info = make(tmp_path, n_items, n_raters)
    errors: list[str] = []
    with server(Path(info.db), info.tokens[0]) as (_, url):
        ids = {r: item_ids(url, tok) for r, tok in enumerate(info.tokens)}

        def rater(r: int) -> None:
            # each rater rates all 50 items, then re-submits the first 5 with new values
            plan = [(iid, 1000 * r + k) for k, iid in enumerate(ids[r])]
            plan += [(iid, 1000 * r + 500 + k) for k, iid in enumerate(ids[r][:repeats])]
            with httpx.Client(base_url=url, headers=auth(info.tokens[r]), timeout=30) as c:
                for iid, k in plan:
                    resp = c.put(f"/api/rater/items/{iid}/rating", json=body(k))
                    if resp.status_code != 200:
                        errors.append(f"{resp.status_code} {resp.text}")

        t0 = time.monotonic()
        threads = [threading.Thread(target=rater, args=(r,)) for r in range(n_raters)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=90)
        elapsed = time.monotonic() - t0
        assert not any(t.is_alive() for t in threads) and not errors, errors[:3]
    rows = stored(info.db)
    assert len(rows) == n_raters * n_items == 1000
    assert sorted(s for _, s in rows.values()).count(2) == n_raters * repeats
    final = comments(info.db)
    for r in range(n_raters):
        for k, iid in enumerate(ids[r]):
            assert final[(r, iid)] == f"k={1000 * r + (500 if k < repeats else 0) + k}"
    print(f"\n{n_raters * (n_items + repeats)} PUTs from {n_raters} raters in {elapsed:.1f} s")
