"""A minimal Hugging Face hub on 127.0.0.1 for download tests (real HTTP, real huggingface_hub client).

Serves ``HEAD``/``GET /{repo_id}/resolve/{revision}/{filename}`` with the headers the client
needs (``X-Repo-Commit``, ``ETag``, ``Content-Length``). ``drop_after`` makes GETs send only that
many bytes and then cut the connection (a server gone mid-download).
"""
from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote


class FakeHub:
    def __init__(self, repo_id: str, files: dict[str, bytes], commit: str = "a" * 40):
        self.repo_id = repo_id
        self.files = dict(files)
        self.commit = commit
        self.drop_after: int | None = None
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def _lookup(self):
                path = unquote(self.path.split("?")[0])
                prefix = f"/{hub.repo_id}/resolve/"
                if not path.startswith(prefix):
                    return None
                rev, _, name = path[len(prefix):].partition("/")
                return hub.files.get(name)

            def _headers(self, body: bytes | None):
                if body is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.end_headers()
                    return False
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("X-Repo-Commit", hub.commit)
                self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                return True

            def do_HEAD(self):
                hub.requests.append(("HEAD", self.path))
                self._headers(self._lookup())

            def do_GET(self):
                hub.requests.append(("GET", self.path))
                body = self._lookup()
                if not self._headers(body):
                    return
                if hub.drop_after is not None:
                    self.wfile.write(body[: hub.drop_after])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def gets(self) -> int:
        return sum(1 for m, _ in self.requests if m == "GET")

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
