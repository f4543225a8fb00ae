"""A static server on 127.0.0.1 for the browser tests: this folder (the page, node_modules) at /, a
models folder at /models/, and the cross-origin isolation headers that let onnxruntime-web use wasm
threads (SharedArrayBuffer).

    python tests/web/web_server.py MODELS_DIR [--port 8000]    # then open http://127.0.0.1:8000/
"""

from __future__ import annotations

import argparse
import functools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HERE = Path(__file__).resolve().parent


class _Handler(SimpleHTTPRequestHandler):
    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, ".mjs": "text/javascript",
                      ".wasm": "application/wasm", ".onnx": "application/octet-stream"}

    def __init__(self, *args, models: Path, **kwargs):
        self.models = models
        super().__init__(*args, directory=str(HERE), **kwargs)

    def translate_path(self, path: str) -> str:
        if path.startswith("/models/"):
            return str(self.models / Path(path.split("?", 1)[0]).name)
        return super().translate_path(path)

    def end_headers(self) -> None:
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, format: str, *args) -> None:  # quiet: pytest shows failures, not requests
        pass


def serve(models: Path, port: int = 0) -> ThreadingHTTPServer:
    """Start serving in a daemon thread; the URL is http://127.0.0.1:{server.server_port}/."""
    server = ThreadingHTTPServer(("127.0.0.1", port), functools.partial(_Handler, models=Path(models)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", type=Path, help="folder of .onnx files served at /models/")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    srv = serve(args.models, args.port)
    print(f"serving http://127.0.0.1:{srv.server_port}/ (Ctrl-C stops)")
    threading.Event().wait()
