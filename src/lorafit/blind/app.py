"""The rating server: one HTML page per rater link plus a small JSON API, over the study file.

Blinding is enforced here: every rater-facing response is built from slot space (Answer 1/2,
opaque item ids) and never touches ``name_*``/``source_*``/``answer_a|b`` columns directly.
Nothing answers without a token: the page needs a rater token in its path (``/r/<token>``), the
API a rater or admin token in ``Authorization: Bearer``. The page then keeps the token out of
every other URL, and the server writes no access log, so links do not end up in log files.
"""
from __future__ import annotations

import hmac
import io
import json
import re
import secrets
import socket
import sys
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ConfigError
from . import stats, store

MAX_BODY = 64 * 1024  # a rating is < 1 KiB; the cap keeps a bad client from filling memory
_HEADERS = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer",
            "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY"}

Score = Annotated[int, Field(strict=True, ge=1, le=5)]


class AnswerScores(BaseModel):
    model_config = ConfigDict(extra="forbid")
    accuracy: Score
    completeness: Score
    logic: Score
    fluency: Score


class RatingIn(BaseModel):
    """A rating in the rater's terms: Answer 1, Answer 2 and which one is better."""
    model_config = ConfigDict(extra="forbid")
    answer1: AnswerScores
    answer2: AnswerScores
    preference: Literal["1", "2", "tie"]
    comment: str = Field("", max_length=4000)


_CHATML_TURN = re.compile(r"<\|im_start\|>(\w+)\n(.*?)(?:<\|im_end\|>|\Z)", re.S)


def readable_prompt(prompt: str) -> str:
    """`lorafit eval` stores the prompt as the model saw it, chat template included. Raters get
    the turns without the ChatML markup (SmolLM2, Qwen); other formats are shown as they are."""
    turns = [(role, text.strip()) for role, text in _CHATML_TURN.findall(prompt)]
    if not turns:
        return prompt
    if turns[-1][0] == "assistant" and not turns[-1][1]:
        turns.pop()  # the generation prompt
    if len(turns) == 1:
        return turns[0][1]
    return "\n\n".join(f"[{role}]\n{text}" for role, text in turns)


def _static(name: str) -> str:
    return resources.files(__package__).joinpath("static", name).read_text(encoding="utf-8")


def page_language(query: str | None, accept_language: str | None) -> str:
    """``?lang=`` wins; else the first of zh/en in Accept-Language by q-value; else English."""
    if query in ("zh", "en"):
        return query
    best, best_q = "en", -1.0
    for part in (accept_language or "").split(","):
        tag, _, params = part.strip().partition(";")
        q = 1.0
        if params.strip().startswith("q="):
            try:
                q = float(params.strip()[2:])
            except ValueError:
                q = 0.0
        lang = tag.strip().lower().split("-")[0]
        if lang in ("zh", "en") and q > best_q:
            best, best_q = lang, q
    return best


def _error_message(exc: RequestValidationError) -> tuple[int, str]:
    errs = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errs):
        return 400, "request body is not valid JSON"
    if any(e.get("type") == "model_type" and not e.get("loc") for e in errs):
        return 400, "request body must be a JSON object"
    parts = []
    for e in errs:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    return 422, "invalid rating: " + "; ".join(parts)


class _BodyLimit:
    """Pure ASGI middleware: refuse bodies over MAX_BODY, declared or streamed.

    The token comes first (as docs/blind-test.md says): a request without a valid one gets 401 whatever
    its size, so the 413 tells nobody without a token anything. `authorized(authorization header)`
    decides; a streamed body over the limit is refused by the route, after its own token check."""

    def __init__(self, app: Any, authorized: Any = None) -> None:
        self.app = app
        self.authorized = authorized

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY):
            if self.authorized is not None and not self.authorized(headers.get(b"authorization", b"")):
                return await JSONResponse({"error": "missing or invalid token"}, 401, _HEADERS)(scope, receive, send)
            return await JSONResponse({"error": "request body too large"}, 413, _HEADERS)(scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            msg = await receive()
            seen += len(msg.get("body", b""))
            if seen > MAX_BODY:
                raise HTTPException(413, "request body too large")
            return msg

        await self.app(scope, limited, send)


class _Access:
    """Who a request comes from: a rater or the admin, by token (compared as hashes, in constant time)."""

    def __init__(self, study: store.Study) -> None:
        self.study = study
        self.admin_hash = study.meta["admin_token_hash"]

    def rater_for(self, token: str | None) -> str | None:
        """Compares against every rater (no early exit), so timing says nothing about tokens."""
        if not token:
            return None
        h = store.hash_token(token)
        found = None
        for stored, rid in self.study.token_hashes:
            if hmac.compare_digest(stored, h):
                found = rid
        return found

    def require_rater(self, request: Request) -> str:
        rid = self.rater_for(_bearer(request))
        if rid is None:
            raise HTTPException(401, "missing or invalid token")
        return rid

    def require_admin(self, request: Request) -> None:
        token = _bearer(request)
        if token is None or not hmac.compare_digest(store.hash_token(token), self.admin_hash):
            raise HTTPException(401, "missing or invalid admin token")

    def any_token(self, authorization: bytes) -> bool:
        """A raw Authorization header carries a rater's or the admin's token (for `_BodyLimit`)."""
        scheme, _, value = authorization.decode("latin-1").partition(" ")
        token = value.strip() if scheme.lower() == "bearer" else ""
        return bool(token) and (self.rater_for(token) is not None
                                or hmac.compare_digest(store.hash_token(token), self.admin_hash))

    def own_slot(self, rid: str, item_id: str) -> int:
        """The slot (1 or 2) of answer A in this rater's copy of the item."""
        slot = self.study.a_slot(rid, item_id)
        if slot is None:  # unknown and someone else's look the same: no probing for ids
            raise HTTPException(404, "unknown item")
        return slot


def _bearer(request: Request) -> str | None:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def make_app(db_path: str | Path) -> FastAPI:
    """The app for one study file; the items and layout are read once, ratings on each request."""
    study = store.load_study(db_path)
    access = _Access(study)
    app = FastAPI(title="lorafit blind test", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_BodyLimit, authorized=access.any_token)
    _add_response_rules(app)
    _add_rater_routes(app, study, access)
    _add_admin_routes(app, study, access)
    return app


def _add_response_rules(app: FastAPI) -> None:
    """Every answer, errors included, is JSON `{"error": ...}` with the security headers; a bug says
    nothing but "internal server error"."""

    @app.exception_handler(StarletteHTTPException)  # also catches routing's 404/405
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": exc.detail}, exc.status_code, _HEADERS)

    @app.exception_handler(Exception)  # a bug: 500, with the same headers as every other answer
    async def _server_error(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": "internal server error"}, 500, _HEADERS)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        code, msg = _error_message(exc)
        return JSONResponse({"error": msg}, code, _HEADERS)

    @app.middleware("http")
    async def _security_headers(request: Request, call_next: Any) -> Response:
        response = await call_next(request)
        for k, v in _HEADERS.items():
            response.headers.setdefault(k, v)
        return response


def _add_rater_routes(app: FastAPI, study: store.Study, access: _Access) -> None:
    """The rater's page and API: progress, one item in slot space (Answer 1/2), and the rating of it."""
    db = study.path

    @app.get("/r/{token}", response_class=HTMLResponse)
    def rater_page(token: str, request: Request, lang: str | None = None) -> HTMLResponse:
        if access.rater_for(token) is None:
            raise HTTPException(404, "not found")
        nonce = secrets.token_urlsafe(16)
        html = (_static("index.html").replace("{{LANG}}", page_language(lang, request.headers.get("accept-language")))
                .replace("{{NONCE}}", nonce).replace("{{CSS}}", _static("style.css"))
                .replace("{{JS}}", _static("app.js")))
        csp = (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
               "connect-src 'self'; img-src data:; form-action 'none'; frame-ancestors 'none'")
        return HTMLResponse(html, headers={**_HEADERS, "Content-Security-Policy": csp})

    @app.get("/api/rater/state")
    def rater_state(request: Request) -> dict[str, Any]:
        rid = access.require_rater(request)
        conn = store.connect(db)
        try:
            done = store.rated_items(conn, rid)
        finally:
            conn.close()
        items = [{"item_id": iid, "done": iid in done} for iid, _ in study.layout[rid]]
        nxt = next((it["item_id"] for it in items if not it["done"]), None)
        return {"total": len(items), "done": len(done), "next": nxt, "items": items}

    @app.get("/api/rater/items/{item_id}")
    def rater_item(item_id: str, request: Request) -> dict[str, Any]:
        rid = access.require_rater(request)
        a_slot = access.own_slot(rid, item_id)
        item = study.items[item_id]
        first, second = (item.answer_a, item.answer_b) if a_slot == 1 else (item.answer_b, item.answer_a)
        conn = store.connect(db)
        try:
            row = store.get_rating(conn, rid, item_id)
        finally:
            conn.close()
        index = next(k for k, (iid, _) in enumerate(study.layout[rid]) if iid == item_id)
        return {"item_id": item_id, "index": index + 1, "total": len(study.layout[rid]),
                "prompt": readable_prompt(item.prompt),
                "answers": [{"slot": 1, "text": first}, {"slot": 2, "text": second}],
                "rating": None if row is None else store.to_slot_space(a_slot, row)}

    @app.put("/api/rater/items/{item_id}/rating")
    async def rate_item(item_id: str, request: Request) -> dict[str, Any]:
        # Parsed here, not as a body parameter, so that the token and the item are checked
        # before anything about the body is said to the client.
        rid = access.require_rater(request)
        a_slot = access.own_slot(rid, item_id)
        try:
            rating = RatingIn.model_validate_json(await request.body())
        except ValidationError as e:
            raise RequestValidationError(e.errors()) from None
        row = store.to_model_space(a_slot, rating.answer1.model_dump(), rating.answer2.model_dump(),
                                   rating.preference)
        done = await run_in_threadpool(_save_rating, db, rid, item_id, row, rating.comment)
        return {"ok": True, "item_id": item_id, "done": done, "total": len(study.layout[rid])}


def _save_rating(db: Path, rid: str, item_id: str, row: dict[str, Any], comment: str) -> int:
    """Store one rating (in model space); returns how many items this rater has rated."""
    conn = store.connect(db)
    try:
        store.upsert_rating(conn, rid, item_id, row, comment)
        return len(store.rated_items(conn, rid))
    finally:
        conn.close()


def _add_admin_routes(app: FastAPI, study: store.Study, access: _Access) -> None:
    """The admin's API (admin token only): results as JSON, Markdown and a plot, the ratings export,
    and each rater's progress."""
    db = study.path

    @app.get("/api/admin/results")
    def admin_results(request: Request) -> dict[str, Any]:
        access.require_admin(request)
        return stats.results(db)

    @app.get("/api/admin/results.md", response_class=PlainTextResponse)
    def admin_results_md(request: Request) -> PlainTextResponse:
        access.require_admin(request)
        return PlainTextResponse(stats.results_markdown(stats.results(db)), media_type="text/markdown")

    @app.get("/api/admin/results.png")
    def admin_results_png(request: Request) -> Response:
        access.require_admin(request)
        buf = io.BytesIO()
        stats.results_plot(stats.results(db), buf)
        return Response(buf.getvalue(), media_type="image/png")

    @app.get("/api/admin/export")
    def admin_export(request: Request) -> Response:
        """Every rating in model space, one JSON object per line."""
        access.require_admin(request)
        lines = [json.dumps(r, ensure_ascii=False) for r in store.all_ratings(db)]
        return Response("".join(line + "\n" for line in lines), media_type="application/x-ndjson")

    @app.get("/api/admin/progress")
    def admin_progress(request: Request) -> dict[str, Any]:
        access.require_admin(request)
        conn = store.connect(db)
        try:
            counts = dict(conn.execute("SELECT rater_id, COUNT(*) FROM ratings GROUP BY rater_id").fetchall())
        finally:
            conn.close()
        return {"items": len(study.items),
                "raters": [{"rater": idx, "done": counts.get(rid, 0), "total": len(study.layout[rid])}
                           for rid, idx in study.raters.items()]}


def serve(db_path: str | Path, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve a study until interrupted. No TLS: beyond loopback, put it behind an HTTPS proxy.

    The socket is bound here, before uvicorn starts: a port out of range or in use is a ConfigError
    (one line, exit status 2) instead of uvicorn's log line and its exit status 3."""
    if isinstance(port, bool) or not 1 <= port <= 65535:
        raise ConfigError(f"must be a port number from 1 to 65535, got {port}", field="--port")
    app = make_app(db_path)
    sock = _listen(host, port)
    print(f"lorafit blind: serving {db_path} on http://{host}:{port}/r/<rater token>",
          file=sys.stderr, flush=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print("lorafit blind: warning: plain HTTP beyond loopback sends rater tokens in clear; "
              "put an HTTPS reverse proxy in front", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, access_log=False, log_level="warning", timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()


def _listen(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise ConfigError(f"cannot resolve host {host!r} ({e.strerror or e})", field="--host") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror or e})", field="--port") from None
    return sock
