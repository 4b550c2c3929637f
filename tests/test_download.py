"""tlcourse.download against a real HTTP server on 127.0.0.1 (no internet needed).

The server misbehaves on purpose: it truncates bodies, drops connections, answers 503 or
404, so that the retry, checksum and no-partial-file promises are tested, not assumed.
"""

from __future__ import annotations

import hashlib
import io
import socket
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tlcourse import download as dl
from tlcourse.download import ChecksumError, DownloadError, UnsafeArchiveError

PAYLOAD = bytes(range(256)) * 400  # 100 KiB: several reads, small enough to be instant
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


class _Server:
    """What the handler serves, and how many requests each path received."""

    def __init__(self):
        self.hits: dict[str, int] = {}
        self.fail_first = 2  # /flaky-* fail this many requests, then succeed
        self.url = ""


def _handler(state: _Server):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep pytest output clean
            pass

        def _ok(self, body: bytes):
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            n = state.hits[self.path] = state.hits.get(self.path, 0) + 1
            if self.path == "/file.bin":
                self._ok(PAYLOAD)
            elif self.path == "/truncated":
                # Promise the whole payload, send half, close: a cut connection.
                self.send_response(200)
                self.send_header("Content-Length", str(len(PAYLOAD)))
                self.end_headers()
                self.wfile.write(PAYLOAD[: len(PAYLOAD) // 2])
                self.wfile.flush()
                self.close_connection = True
            elif self.path == "/flaky-503":
                if n <= state.fail_first:
                    self.send_error(503, "try later")
                else:
                    self._ok(PAYLOAD)
            elif self.path == "/flaky-drop":
                if n <= state.fail_first:
                    self.close_connection = True  # no response at all
                    self.connection.shutdown(socket.SHUT_RDWR)
                else:
                    self._ok(PAYLOAD)
            elif self.path == "/flaky-truncate":
                if n <= state.fail_first:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(PAYLOAD)))
                    self.end_headers()
                    self.wfile.write(PAYLOAD[:1000])
                    self.close_connection = True
                else:
                    self._ok(PAYLOAD)
            else:
                self.send_error(404, "no such file")

    return Handler


@pytest.fixture
def server():
    state = _Server()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01},
                              daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield state
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def closed_port_url():
    """A localhost URL nobody listens on: connection refused, like being offline."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/file.bin"


def _leftovers(folder, keep=()):
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def test_sha256sum(tmp_path):
    f = tmp_path / "x"
    f.write_bytes(PAYLOAD)
    assert dl.sha256sum(f) == PAYLOAD_SHA


def test_download_verifies_and_leaves_only_the_file(server, tmp_path):
    dest = tmp_path / "sub" / "file.bin"
    got = dl.download(server.url + "/file.bin", dest, sha256=PAYLOAD_SHA.upper(), progress=False)
    assert got == dest and dest.read_bytes() == PAYLOAD
    assert _leftovers(dest.parent) == ["file.bin"]  # no temp file left beside it


def test_present_file_with_right_checksum_needs_no_network(closed_port_url, tmp_path):
    dest = tmp_path / "file.bin"
    dest.write_bytes(PAYLOAD)
    assert dl.download(closed_port_url, dest, sha256=PAYLOAD_SHA, progress=False) == dest


def test_checksum_mismatch_is_rejected_and_removed(server, tmp_path):
    dest = tmp_path / "file.bin"
    wrong = "0" * 64
    with pytest.raises(ChecksumError) as err:
        dl.download(server.url + "/file.bin", dest, sha256=wrong, progress=False)
    msg = str(err.value)
    assert "file.bin" in msg and wrong in msg and PAYLOAD_SHA in msg and "deleted" in msg
    assert _leftovers(tmp_path) == []
    assert server.hits["/file.bin"] == 1  # a wrong file is not fetched again


def test_checksum_mismatch_keeps_the_previous_file_untouched(server, tmp_path):
    dest = tmp_path / "file.bin"
    dest.write_bytes(b"previous good version")
    with pytest.raises(ChecksumError):
        dl.download(server.url + "/file.bin", dest, sha256="1" * 64, progress=False)
    assert dest.read_bytes() == b"previous good version"
    assert _leftovers(tmp_path) == ["file.bin"]


def test_truncated_body_is_retried_then_reported(server, tmp_path):
    dest = tmp_path / "file.bin"
    url = server.url + "/truncated"
    with pytest.raises(DownloadError) as err:
        dl.download(url, dest, retries=2, backoff=0, progress=False)
    assert url in str(err.value) and "2 attempt" in str(err.value)
    assert "of 102400 bytes" in err.value.reason
    assert server.hits["/truncated"] == 2
    assert _leftovers(tmp_path) == []  # the half file is gone


@pytest.mark.parametrize("path", ["/flaky-503", "/flaky-drop", "/flaky-truncate"])
def test_retry_succeeds_after_transient_failures(server, tmp_path, path):
    dest = tmp_path / "file.bin"
    dl.download(server.url + path, dest, sha256=PAYLOAD_SHA, retries=3, backoff=0, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert server.hits[path] == 3
    assert _leftovers(tmp_path) == ["file.bin"]


def test_retries_run_out(server, tmp_path):
    server.fail_first = 5
    with pytest.raises(DownloadError, match="flaky-503"):
        dl.download(server.url + "/flaky-503", tmp_path / "f", retries=3, backoff=0, progress=False)
    assert server.hits["/flaky-503"] == 3
    assert _leftovers(tmp_path) == []


def test_404_is_not_retried(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        dl.download(server.url + "/missing.zip", tmp_path / "f", retries=3, backoff=0,
                    progress=False)
    assert server.hits["/missing.zip"] == 1


def test_offline_raises_download_error_naming_the_url(closed_port_url, tmp_path):
    with pytest.raises(DownloadError) as err:
        dl.download(closed_port_url, tmp_path / "f", retries=2, backoff=0, progress=False)
    assert closed_port_url in str(err.value)
    assert "Connection" in err.value.reason or "refused" in err.value.reason
    assert _leftovers(tmp_path) == []


def test_interrupt_mid_transfer_leaves_no_partial_file(server, tmp_path, monkeypatch):
    """Ctrl-C after the first chunk has been written: nothing may remain."""

    class CtrlCAfterFirstChunk:
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            raise KeyboardInterrupt

    monkeypatch.setattr(dl, "tqdm", CtrlCAfterFirstChunk)
    dest = tmp_path / "file.bin"
    with pytest.raises(KeyboardInterrupt):
        dl.download(server.url + "/file.bin", dest, progress=False)
    assert _leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- extract


def _zip(path, members: dict[str, bytes]):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _tar(path, members: dict[str, bytes]):
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


MEMBERS = {"top/a/1.txt": b"one", "top/b/2.txt": b"two", "__MACOSX/top/._1.txt": b"junk"}


@pytest.mark.parametrize("make", [_zip, _tar], ids=["zip", "tar.gz"])
def test_extract_subdir_atomically(tmp_path, make):
    archive = make(tmp_path / "archive.bin", MEMBERS)  # format found from content, not name
    dest = tmp_path / "out" / "data"
    assert dl.extract(archive, dest, subdir="top") == dest
    assert (dest / "a" / "1.txt").read_bytes() == b"one"
    assert (dest / "b" / "2.txt").read_bytes() == b"two"
    assert _leftovers(dest.parent) == ["data"]  # temp folder and __MACOSX gone


@pytest.mark.parametrize("make", [_zip, _tar], ids=["zip", "tar.gz"])
@pytest.mark.parametrize("bad", ["../evil.txt", "top/../../evil.txt", "/tmp/tlcourse-evil.txt"])
def test_extract_refuses_escaping_members(tmp_path, make, bad):
    archive = make(tmp_path / "a.arc", {"top/ok.txt": b"ok", bad: b"evil"})
    dest = tmp_path / "x" / "out"
    with pytest.raises(UnsafeArchiveError) as err:
        dl.extract(archive, dest)
    assert bad in str(err.value)
    assert not dest.exists() and _leftovers(dest.parent) == []
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "x" / "evil.txt").exists()


def test_extract_existing_dest_needs_overwrite(tmp_path):
    archive = _zip(tmp_path / "a.zip", MEMBERS)
    dest = tmp_path / "out"
    (dest / "old").mkdir(parents=True)
    with pytest.raises(FileExistsError):
        dl.extract(archive, dest, subdir="top")
    dl.extract(archive, dest, subdir="top", overwrite=True)
    assert sorted(p.name for p in dest.iterdir()) == ["a", "b"]
    assert _leftovers(tmp_path, keep={"a.zip"}) == ["out"]


def test_extract_rejects_non_archives_and_missing_subdir(tmp_path):
    page = tmp_path / "page.zip"
    page.write_text("<html>404</html>")
    with pytest.raises(ValueError, match="neither a zip nor a tar"):
        dl.extract(page, tmp_path / "out")
    archive = _zip(tmp_path / "a.zip", MEMBERS)
    with pytest.raises(ValueError, match="no top folder 'nope'"):
        dl.extract(archive, tmp_path / "out", subdir="nope")
    assert _leftovers(tmp_path, keep={"a.zip", "page.zip"}) == []
