"""``qwen35-mobile serve ARTIFACT``: a small chat page for a webgpu artifact.

The page (``static/``: index.html, chat.js, a service worker) loads the artifact's
``model.wasm`` with tvmjs, its weights with tvmjs's tensor-cache loader (kept in the
browser's Cache API), the tokenizer with ``@mlc-ai/web-tokenizers``, and generates
on WebGPU, streaming tokens and showing tokens/s; once loaded it works offline (the
service worker keeps the page and model.wasm, tvmjs keeps the weights).

Served paths: ``/`` and the static files, ``/tvmjs.bundle.js`` (the web runtime's,
bindings/web_runtime), ``/tokenizers.js`` (npm ``@mlc-ai/web-tokenizers``, installed
by ``scripts/setup_emulators.sh browser``), and ``/model/NAME`` for the artifact's
manifest and the files it lists (nothing else of the file system).
"""

from __future__ import annotations

import json
import os
import threading
from functools import partial
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

from ...errors import UserError
from .. import web_runtime

STATIC = Path(__file__).resolve().parent / "static"
TOKENIZERS_ENV = "QWEN35_WEB_TOKENIZERS"
BROWSER_MODULES = web_runtime.ROOT / ".emulators" / "browser" / "node_modules"
SETUP = "scripts/setup_emulators.sh web-runtime browser"
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".json": "application/json",
    ".wasm": "application/wasm",
    ".png": "image/png",
}


def tokenizers_js() -> Path:
    """The page's tokenizer library (UMD build of @mlc-ai/web-tokenizers)."""
    if os.environ.get(TOKENIZERS_ENV):
        return Path(os.environ[TOKENIZERS_ENV])
    return BROWSER_MODULES / "@mlc-ai" / "web-tokenizers" / "lib" / "index.js"


def page_files(artifact: Path) -> dict[str, Path]:
    """URL path -> file, for everything the page may fetch; UserError when the
    artifact is not a linked web build or a runtime piece is missing."""
    artifact = Path(artifact)
    try:
        manifest = json.loads((artifact / "manifest.json").read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{artifact}: no readable manifest.json ({err})") from None
    if manifest.get("target") != "webgpu" or not manifest.get("wasm"):
        raise UserError(
            f"{artifact}: `serve` needs a webgpu artifact with model.wasm (target "
            f"'{manifest.get('target')}', wasm {manifest.get('wasm')}); compile with --target webgpu "
            f"after `{SETUP}`"
        )
    if not (artifact / "tensor-cache.json").exists():
        raise UserError(f"{artifact}: no weights (compiled without a checkpoint)")
    bundle = web_runtime.tvmjs_bundle()
    if bundle is None:
        raise UserError(f"tvmjs is not built here: run `{SETUP}`")
    tokenizers = tokenizers_js()
    if not tokenizers.is_file():
        raise UserError(f"the page's tokenizer ({tokenizers}) is not installed: run `{SETUP}`")
    files = {f"/{p.name}": p for p in STATIC.iterdir() if p.is_file()}
    files["/"] = STATIC / "index.html"
    files["/tvmjs.bundle.js"] = bundle
    files["/tokenizers.js"] = tokenizers
    for name in ["manifest.json", *manifest["files"]]:
        files[f"/model/{name}"] = artifact / name
    return files


class _Handler(SimpleHTTPRequestHandler):
    def __init__(self, *args, files: dict[str, Path], quiet: bool, **kwargs):
        self.files, self.quiet = files, quiet
        super().__init__(*args, **kwargs)

    def _file(self) -> Path | None:
        return self.files.get(unquote(urlparse(self.path).path))

    def send_head(self):
        path = self._file()
        if path is None or not path.is_file():
            self.send_error(HTTPStatus.NOT_FOUND, "not part of this page or artifact")
            return None
        f = open(path, "rb")  # noqa: SIM115 (copyfile closes it, as SimpleHTTPRequestHandler does)
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", TYPES.get(path.suffix, "application/octet-stream"))
        self.send_header("Content-Length", str(path.stat().st_size))
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        return f

    def log_message(self, fmt, *args):
        if not self.quiet:
            super().log_message(fmt, *args)


def make_server(artifact: Path, host: str = "127.0.0.1", port: int = 8000, quiet=False):
    """An HTTP server for the page of ``artifact`` (port 0: any free port)."""
    handler = partial(_Handler, files=page_files(artifact), quiet=quiet)
    try:
        return ThreadingHTTPServer((host, port), handler)
    except OSError as err:
        raise UserError(f"cannot listen on {host}:{port}: {err.strerror}") from None


def serve_in_background(artifact: Path, host: str = "127.0.0.1") -> tuple[str, ThreadingHTTPServer]:
    """(URL, server) of a page served from a thread (tests); ``server.shutdown()`` stops it."""
    server = make_server(artifact, host, 0, quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://{host}:{server.server_address[1]}/", server
