"""Small test servers on 127.0.0.1: a TLS server with a self-signed certificate (shared by the
tests of the client's https paths, the Slicer logic and the job service's own TLS) and a JSON
answering request handler."""
import contextlib
import http.server
import ssl
import threading
from pathlib import Path

# A self-signed certificate for 127.0.0.1/localhost (EC P-256, valid until 2126), test use only.
TEST_KEY = """-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgA4svM6nMGdnNXOXv
z+3BNtHRvyE3Cgno/gG9i1q8s/6hRANCAAQLEwWi07SgegxCJ+V0HTr6PWuIKnD1
I9znvZcPms8bY356dYipAIctBRWlepjjlWGMbhLsRF5l/QMG0AFy8DnW
-----END PRIVATE KEY-----
"""
TEST_CERT = """-----BEGIN CERTIFICATE-----
MIIBmDCCAT6gAwIBAgIUEtJEgnIczBJ+WQ624FfgtfUsPQ0wCgYIKoZIzj0EAwIw
FDESMBAGA1UEAwwJbG9jYWxob3N0MCAXDTI2MTIwMzA3NDkwNVoYDzIxMjYxMTA5
MDc0OTA1WjAUMRIwEAYDVQQDDAlsb2NhbGhvc3QwWTATBgcqhkjOPQIBBggqhkjO
PQMBBwNCAAQLEwWi07SgegxCJ+V0HTr6PWuIKnD1I9znvZcPms8bY356dYipAIct
BRWlepjjlWGMbhLsRF5l/QMG0AFy8DnWo2wwajAdBgNVHQ4EFgQUMsHTtCxc9Ppu
ju5m63b0cGcwV4IwHwYDVR0jBBgwFoAUMsHTtCxc9Ppuju5m63b0cGcwV4IwGgYD
VR0RBBMwEYIJbG9jYWxob3N0hwR/AAABMAwGA1UdEwEB/wQCMAAwCgYIKoZIzj0E
AwIDSAAwRQIhAI8wMpoxKPDDow5yUIKRPrF6nKI7hmBaywr2n6Q9ILuMAiBBHp5A
dbIXmsKsWwZM2PYmeQDjJQ87vjfJTsGsj8s/jw==
-----END CERTIFICATE-----
"""


def write_cert(folder: Path) -> tuple[Path, Path]:
    """(cert.pem, key.pem) in ``folder``; the key file is 0600."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    cert.write_text(TEST_CERT)
    key.write_text(TEST_KEY)
    key.chmod(0o600)
    return cert, key


@contextlib.contextmanager
def https_server(folder: Path, handler: type):
    """A threading HTTPS server for ``handler`` on a free 127.0.0.1 port; yields its base URL."""
    cert, key = write_cert(folder)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"https://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def json_handler(answer) -> type:
    """A request handler class whose GET answers ``answer(handler) -> (status, JSON-able body)``."""
    import json

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):  # noqa: N802 - http.server's name
            status, doc = answer(self)
            body = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    return Handler
