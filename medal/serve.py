"""The labelling page: a local web page for one exported round folder.

``medal labels serve ROUND_FOLDER`` shows the round's images one at a time and writes every
decision straight into the folder's labels file, so the folder stays the contract between medal
and the radiologist::

    round-001/
      manifest.csv           which images, in rank order (read; never written)
      labels.csv             file,label[,comment]: written by the page (or labels_<name>.csv
                             with --annotator NAME), exactly the format ``medal ingest`` reads
      001_3fa2c4e1b07d.dcm   the images the page shows (only files listed in manifest.csv)

The round folder's images and labels file are :class:`medal.labelling.book.RoundBook`'s, the
pixels the page shows :mod:`medal.labelling.pixels`'; this module is the web app around them.

Each decision rewrites the labels file atomically (temporary file, fsync, ``os.replace``): a
stopped server or a closed browser loses nothing, and reopening resumes from the file. Rows and
columns the page does not own (an ``annotator`` column, rows typed in a spreadsheet) are kept.

Concurrency: every save re-reads the labels file and rewrites it while holding an OS lock
(``flock`` on ``.labels.csv.lock`` beside it), so several servers (processes) and tabs on one
round folder lose no decision; the OS drops a killed server's lock. Each answer carries the
file's version; a tab whose view is stale is told so and gets all labels (the page also polls).
Readers with ``--annotator NAME`` write ``labels_NAME.csv`` each, independently.

Ingested rounds: once the workspace's ledger says the round was ingested (asked on every save
and state request, so also when ``medal ingest`` runs while the page is open) saves are refused
(409) and the page turns read-only: a change would not reach the ledger.

The page counts a decision, and moves on, only after the server confirmed it; an unsaved one is
marked NOT SAVED and retried.

Safety: the server binds 127.0.0.1 unless told otherwise; every request must carry the random
token printed in the address (as Jupyter does), else it gets 403; it reads only files that
manifest.csv lists, inside the round folder; the page loads nothing from the internet (the
HTML, CSS and JavaScript are one packaged file, and a Content-Security-Policy forbids anything
else).

Pixels: the browser receives full-depth values (DICOM: the modality values after the modality
LUT, e.g. Hounsfield units, as float32; other images: their stored values) and applies the
window, inversion, zoom and pan itself on a canvas; the 8-bit previews are not used.

The web stack (the ``serve`` extra) is Starlette with uvicorn: a maintained, small ASGI toolkit
and server; the page needs no template engine or ORM.
"""

from __future__ import annotations

import json
import secrets
import shlex
import socket
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any


from .errors import ImageReadError, MedalError
from .scan import short
from .labelling.book import MAX_COMMENT, RoundBook, RoundImage, RoundIngested, check_annotator
from .labelling.pixels import (
    CT_PRESETS,
    PROJECTION_MODALITIES,
    encode_pixels,
    read_pixels,
    window_presets,
)

__all__ = [
    "CT_PRESETS",
    "INSTALL_HINT",
    "MAX_BODY",
    "MAX_COMMENT",
    "PROJECTION_MODALITIES",
    "LabellingServer",
    "RoundBook",
    "RoundImage",
    "RoundIngested",
    "TokenGate",
    "build_app",
    "check_annotator",
    "decision",
    "encode_pixels",
    "ingest_command",
    "page_html",
    "read_pixels",
    "serve",
    "window_presets",
]

INSTALL_HINT = "pip install 'medal-al[serve]'"
MAX_BODY = 64 * 1024
"""Largest ``POST /api/label`` body (bytes): a file name, a label and a comment fit easily."""


def page_html() -> str:
    """The page: one packaged file with its CSS and JavaScript inline (nothing from the web)."""
    return (resources.files("medal") / "static" / "labelling.html").read_text(encoding="utf-8")


def _require_stack() -> tuple[Any, Any]:
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise MedalError(
            f"the labelling page needs the serve extra ({e.name} is missing): {INSTALL_HINT}"
        ) from None
    return starlette, uvicorn


def ingest_command(folder: Path, config: Path | None) -> str:
    """The command that ingests ``folder``, as the page's done banner shows it (``-c CONFIG``
    with the config's real path when the server was given one)."""
    cfg = shlex.quote(str(Path(config).absolute())) if config is not None else "CONFIG"
    return f"medal ingest -c {cfg} {shlex.quote(str(folder))}"


def headers(nonce: str | None = None) -> dict[str, str]:
    """Every answer's headers: a Content-Security-Policy that allows only the page's own inline
    script (``nonce``) and requests to the server itself, no caching, no sniffing, no referrer."""
    script = f"'nonce-{nonce}'" if nonce else "'none'"
    return {
        "Content-Security-Policy": f"default-src 'none'; script-src {script}; "
        "style-src 'unsafe-inline'; "
        f"connect-src 'self'; img-src 'self' data:; base-uri 'none'; "
        f"form-action 'none'; frame-ancestors 'none'",
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }


def pixel_bytes(book: RoundBook, file: str, frame: str | None) -> bytes:
    """``GET /api/pixels``: the encoded full-depth values of ``file`` (one of the round's) at
    ``frame`` (a number, or None for the file's own); :class:`MedalError` or
    :class:`ImageReadError` otherwise."""
    path = book.image_path(file)
    if frame is not None and not frame.isdigit():
        raise MedalError(f"frame must be a number, got {short(frame)}")
    meta, values = read_pixels(path, None if frame is None else int(frame))
    return encode_pixels(meta, values)


def build_app(
    book: RoundBook, token: str, *, show_predictions: bool = False, config: Path | None = None
) -> Any:
    """The ASGI app for ``book``; every request needs ``token`` (query ``?token=`` or header
    ``X-Medal-Token``), else 403. ``config``: the config file the server was started with."""
    _require_stack()
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    html = page_html()
    command = ingest_command(book.folder, config)

    async def index(request: Request) -> Response:
        nonce = secrets.token_urlsafe(16)
        return Response(
            html.replace("__NONCE__", nonce), media_type="text/html", headers=headers(nonce)
        )

    def state(request: Request) -> Response:  # sync: Starlette runs it in a thread
        try:
            return JSONResponse(
                {**book.state(show_predictions), "ingest_command": command}, headers=headers()
            )
        except MedalError as e:
            return _error(e, 409)

    async def label(request: Request) -> Response:
        return await _save_decision(book, request)

    def pixels(request: Request) -> Response:
        try:
            data = pixel_bytes(
                book, request.query_params.get("file", ""), request.query_params.get("frame")
            )
        except ImageReadError as e:
            return _error(MedalError(e.reason), 422)
        except MedalError as e:
            return _error(e, 404)
        return Response(data, media_type="application/octet-stream", headers=headers())

    app = Starlette(
        routes=[
            Route("/", index),
            Route("/api/state", state),
            Route("/api/label", label, methods=["POST"]),
            Route("/api/pixels", pixels),
        ]
    )
    return TokenGate(app, token)


def _error(e: MedalError, status: int = 400) -> Any:
    """The JSON response ``{"error": message}`` with HTTP ``status``."""
    from starlette.responses import JSONResponse

    return JSONResponse({"error": str(e)}, status_code=status, headers=headers())


async def _save_decision(book: RoundBook, request: Any) -> Any:
    """``POST /api/label``: save the decision in the request's body (:func:`decision`) to
    ``book`` in a worker thread; its JSON response, or 400 for a bad decision and 409 once the
    round is ingested."""
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse

    try:
        body = decision(await request.body())
    except MedalError as e:
        return _error(e)
    try:
        saved = await run_in_threadpool(
            book.save,
            body["file"],
            label=body.get("label"),
            comment=body.get("comment"),
            seen=body.get("version"),
        )
    except RoundIngested as e:
        return _error(e, 409)
    except MedalError as e:
        return _error(e)
    return JSONResponse(saved, headers=headers())


def decision(raw: bytes) -> dict[str, Any]:
    """The body of ``POST /api/label``: a JSON object ``{file, label?, comment?, version?}`` of
    strings; anything else is a :class:`MedalError` with a one-line reason."""
    if len(raw) > MAX_BODY:
        raise MedalError(f"the request body is {len(raw)} bytes; at most {MAX_BODY} are taken")
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:
        what = "nested too deeply" if isinstance(e, RecursionError) else "not JSON"
        raise MedalError(
            f"the request body is {what}; expected {{file, label?, comment?}}"
        ) from None
    if (
        not isinstance(body, dict)
        or not isinstance(body.get("file"), str)
        or not all(
            isinstance(body.get(k), (str, type(None))) for k in ("label", "comment", "version")
        )
    ):
        raise MedalError("expected {file, label?, comment?, version?} as strings")
    return body


class TokenGate:
    """ASGI middleware: a request without the right token gets 403 and reaches nothing."""

    def __init__(self, app: Any, token: str) -> None:
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and not self._allowed(scope):
            body = b"403: this page needs the token from the address medal printed\n"
            await send(
                {
                    "type": "http.response.start",
                    "status": 403,
                    "headers": [
                        (b"content-type", b"text/plain; charset=utf-8"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        if scope["type"] == "websocket":  # the page uses none
            await send({"type": "websocket.close", "code": 1008})
            return
        await self.app(scope, receive, send)

    def _allowed(self, scope: dict) -> bool:
        from urllib.parse import parse_qs

        given = [v for k, v in scope.get("headers", []) if k == b"x-medal-token"]
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        given += [v.encode() for v in query.get("token", [])]
        return any(secrets.compare_digest(g, self.token) for g in given)


class LabellingServer:
    """The labelling page for one round folder, bound to ``host:port`` (``port=0``: a free
    one). :attr:`url` (with the token) is known before :meth:`run` serves."""

    def __init__(
        self,
        folder: str | Path,
        *,
        classes: Sequence[str] | None = None,
        annotator: str | None = None,
        show_predictions: bool = False,
        host: str = "127.0.0.1",
        port: int = 0,
        workspace: Path | None = None,
        config: Path | None = None,
    ) -> None:
        _, self._uvicorn = _require_stack()
        self.book = RoundBook(folder, classes, annotator, workspace)
        self.token = secrets.token_urlsafe(24)
        self.app = build_app(
            self.book, self.token, show_predictions=show_predictions, config=config
        )
        self.host = host
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
            self.socket = socket.socket(family, socket.SOCK_STREAM)
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind((host, port))
            self.socket.listen(128)  # connections wait in the queue until run() serves them
        except OSError as e:
            raise MedalError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
        self.port = int(self.socket.getsockname()[1])
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{self.port}/?token={self.token}"
        self._server: Any = None

    @property
    def local_only(self) -> bool:
        return self.host in ("127.0.0.1", "localhost", "::1")

    def run(self) -> None:
        """Serve until interrupted (Ctrl-C); every decision is already on disk."""
        config = self._uvicorn.Config(
            self.app, log_level="warning", access_log=False, lifespan="off"
        )
        self._server = self._uvicorn.Server(config)
        self._server.run(sockets=[self.socket])

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True


def serve(
    folder: str | Path,
    cfg: Any = None,
    *,
    annotator: str | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
) -> LabellingServer:
    """A :class:`LabellingServer` for ``folder``; ``cfg`` (optional) gives the classes and
    ``labelling.show_predictions``, and its workspace's ledger tells whether the round was
    ingested (without it: the workspace the folder sits in, if any). Call ``.run()`` to
    serve."""
    return LabellingServer(
        folder,
        classes=None if cfg is None else cfg.classes,
        annotator=annotator,
        show_predictions=bool(cfg is not None and cfg.labelling.show_predictions),
        host=host,
        port=port,
        workspace=None if cfg is None else cfg.workspace,
        config=None if cfg is None else cfg.path,
    )
