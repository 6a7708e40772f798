"""A fake OpenAI-compatible server on loopback for tests: chat and text completions, each reply
written by a function of the request, every request kept."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

# (path, request body, requests so far including this one) -> the reply's text
Reply = Callable[[str, dict[str, Any], int], str]


@contextmanager
def fake_openai(reply: Reply) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """The server's base URL and the requests it received (path, auth header, body fields)."""
    seen: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
            text = reply(self.path, body, len(seen))
            if self.path.endswith("/chat/completions"):
                kind = "chat.completion"
                choice: dict[str, Any] = {"message": {"role": "assistant", "content": text}}
            else:
                kind, choice = "text_completion", {"text": text, "logprobs": None}
            payload = {
                "id": "x",
                "object": kind,
                "created": 0,
                "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop", **choice}],
            }
            data = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/v1", seen
    finally:
        server.shutdown()
        server.server_close()
