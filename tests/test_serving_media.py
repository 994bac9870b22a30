"""media.py on its own: http(s) fetching refuses redirects, caps sizes while downloading, and checks addresses."""
import asyncio
import http.server
import threading

import pytest

pytest.importorskip("httpx")

from videoxl.serving import media  # noqa: E402
from videoxl.serving.errors import APIError  # noqa: E402


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data")
            self.end_headers()
            return
        body = b"\0" * (3 << 20)  # 3 MiB, over a 1 MiB cap
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def local_http():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://localhost:{server.server_address[1]}"
    server.shutdown()


def fetch(url, tmp_path, **limits):
    return asyncio.run(media.resolve(url, "video_url", media.MediaLimits(**limits), str(tmp_path)))


def test_loopback_refused_before_any_connection(local_http, tmp_path):
    with pytest.raises(APIError, match="private or loopback") as e:
        fetch(local_http + "/big", tmp_path, allowed_domains=("localhost",))
    assert e.value.status == 403


@pytest.fixture
def pretend_public(monkeypatch):
    monkeypatch.setattr(media, "is_public", lambda address: True)  # the test server is on loopback


def test_redirects_refused(local_http, tmp_path, pretend_public):
    with pytest.raises(APIError, match="redirects are refused"):
        fetch(local_http + "/redirect", tmp_path, allowed_domains=("localhost",))
    assert not list(tmp_path.iterdir())  # nothing left behind


def test_size_cap_enforced_while_downloading(local_http, tmp_path, pretend_public):
    with pytest.raises(APIError, match="MiB cap") as e:
        fetch(local_http + "/big", tmp_path, allowed_domains=("localhost",), max_file_bytes=1 << 20)
    assert e.value.status == 413 and not list(tmp_path.iterdir())


@pytest.mark.parametrize("address,public", [("127.0.0.1", False), ("10.1.2.3", False), ("192.168.0.1", False),
                                            ("169.254.169.254", False), ("::1", False), ("::ffff:127.0.0.1", False),
                                            ("fd00::1", False), ("8.8.8.8", True), ("2606:4700::1111", True)])
def test_public_addresses(address, public):
    assert media.is_public(address) is public
