"""Checksummed, atomic, retried downloads and safe archive extraction.

Standard library (``urllib``) plus ``tqdm.auto`` for the progress bar, so it works the same
in a terminal, in JupyterLab and on Colab::

    path = download(url, Path("data/archive.zip"), sha256="9f86d0...")
    folder = extract(path, Path("data/archive"), subdir="archive")

Guarantees, because learners interrupt cells and lose Wi-Fi half-way:

- the destination only ever holds a complete, verified file: bytes stream to a temp file in
  the same folder and are moved into place with :func:`os.replace` (atomic on one filesystem);
- a checksum mismatch raises :class:`ChecksumError` and deletes what was downloaded;
- network errors and truncated bodies are retried with exponential backoff, then raise
  :class:`DownloadError` naming the URL;
- ``KeyboardInterrupt`` or any other exception leaves no partial file behind.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import socket
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath, PureWindowsPath

from tqdm.auto import tqdm

__all__ = [
    "DownloadError",
    "ChecksumError",
    "UnsafeArchiveError",
    "sha256sum",
    "download",
    "extract",
]

_CHUNK = 1 << 20  # 1 MiB: large enough for speed, small enough for a smooth progress bar
# Some servers (and CDNs) refuse Python's default "Python-urllib/x.y" agent.
_USER_AGENT = "tlcourse (+https://github.com/tlcourse/tlcourse)"
# Worth another try: the server or the network may recover. A 404 or 403 will not.
_RETRY_HTTP_CODES = {408, 425, 429, 500, 502, 503, 504}


class DownloadError(OSError):
    """A download failed after all retries (or could not be attempted).

    ``str(err)`` is the full message for people; ``url`` and ``reason`` (the last error,
    short) are there for code that words its own message, like :mod:`tlcourse.datasets`.
    """

    def __init__(self, message: str, *, url: str | None = None, reason: str | None = None):
        super().__init__(message)
        self.url, self.reason = url, reason


class ChecksumError(DownloadError):
    """The downloaded bytes are not the file the registry expects."""


class UnsafeArchiveError(ValueError):
    """An archive member would land outside the extraction folder."""


class _Truncated(Exception):
    """The body ended before the Content-Length the server promised (retryable)."""


def sha256sum(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in chunks (a multi-GB archive never sits in memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def download(
    url: str,
    dest: str | os.PathLike,
    sha256: str | None = None,
    retries: int = 3,
    timeout: float = 60,
    progress: bool = True,
    *,
    backoff: float = 1.0,
) -> Path:
    """Download ``url`` to the file ``dest`` and return ``dest`` as a :class:`Path`.

    Args:
        url: what to fetch (``http(s)://`` or ``file://``).
        dest: the final file path; its folder is created if needed.
        sha256: expected hex digest. When given, a file already at ``dest`` with this digest
            is kept (no network), and a download that does not match raises
            :class:`ChecksumError`. When ``None`` the bytes are not checked (say why at the
            call site).
        retries: attempts in all (``>= 1``) for network errors and truncated bodies.
        timeout: seconds a connect or a single read may stall before it counts as failed.
        progress: show a ``tqdm`` bar (bytes, rate, ETA).
        backoff: seconds before the 2nd attempt; doubled before each later one.

    Raises:
        ChecksumError: the file arrived whole but is not the expected one (not retried:
            the same URL would serve the same wrong bytes).
        DownloadError: every attempt failed; the message names the URL and the last error.
    """
    dest = Path(dest)
    if retries < 1:
        raise ValueError(f"retries must be at least 1, got {retries}")
    if sha256 is not None:
        sha256 = sha256.lower()
        if dest.is_file() and sha256sum(dest) == sha256:
            return dest
    dest.parent.mkdir(parents=True, exist_ok=True)

    # The temp file lives beside dest so that os.replace is a rename on one filesystem
    # (atomic), and its dotted name keeps it out of globs and ImageFolder.
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        last_error: BaseException | None = None
        for attempt in range(1, retries + 1):
            try:
                _fetch_once(url, tmp, timeout=timeout, progress=progress, desc=dest.name)
                break
            except urllib.error.HTTPError as exc:
                if exc.code not in _RETRY_HTTP_CODES:
                    raise DownloadError(
                        f"Downloading {url} failed: HTTP {exc.code} {exc.reason}. "
                        "Check the address; retrying will not help.",
                        url=url, reason=f"HTTP {exc.code} {exc.reason}",
                    ) from exc
                last_error = exc
            except (urllib.error.URLError, http.client.HTTPException, socket.timeout,
                    ConnectionError, TimeoutError, _Truncated) as exc:
                last_error = exc
            if attempt < retries:
                time.sleep(backoff * 2 ** (attempt - 1))
        else:
            raise DownloadError(
                f"Downloading {url} failed after {retries} attempt(s): {_describe(last_error)}. "
                "Check your internet connection (or proxy) and try again, or download the file "
                f"by hand and save it as {dest}.",
                url=url, reason=_describe(last_error),
            ) from last_error

        if sha256 is not None:
            got = sha256sum(tmp)
            if got != sha256:
                raise ChecksumError(
                    f"Checksum mismatch for {dest.name} from {url}: expected sha256 {sha256}, "
                    f"got {got}. The download was deleted. Try again; if it fails the same way, "
                    "the file on the server has changed or a proxy altered it: download it by "
                    "hand and compare, or report it to the course maintainers.",
                    url=url, reason=f"checksum mismatch (expected sha256 {sha256}, got {got})",
                )
        os.replace(tmp, dest)
        return dest
    finally:
        # Reached with tmp still present only on failure (success renamed it away):
        # any exception, KeyboardInterrupt included, leaves no partial file behind.
        tmp.unlink(missing_ok=True)


def _fetch_once(url: str, tmp: Path, *, timeout: float, progress: bool, desc: str) -> None:
    """One attempt: stream ``url`` into ``tmp`` (truncating it), checking Content-Length."""
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    with urllib.request.urlopen(request, timeout=timeout) as response, open(tmp, "wb") as out:
        length = response.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        received = 0
        with tqdm(total=expected, unit="B", unit_scale=True, unit_divisor=1024,
                  desc=desc, disable=not progress, leave=False) as bar:
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
        # http.client returns b"" (no error) when the server closes early, so a cut
        # connection would otherwise look like a complete, shorter file.
        if expected is not None and received < expected:
            raise _Truncated(f"connection closed after {received} of {expected} bytes")


def _describe(exc: BaseException | None) -> str:
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        return f"{type(exc.reason).__name__}: {exc.reason}"
    return f"{type(exc).__name__}: {exc}"


def extract(
    archive: str | os.PathLike,
    dest: str | os.PathLike,
    subdir: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Unpack a zip or tar archive (``.tar``, ``.tar.gz``, ...) into the folder ``dest``.

    Atomic: members are unpacked into a temp folder beside ``dest`` which is then renamed
    to ``dest``, so an interrupted extraction never leaves a half-filled ``dest``.

    Args:
        archive: the archive file; its format is detected from its content, not its name.
        dest: the folder to create.
        subdir: most archives wrap everything in one top folder (``hymenoptera_data/...``);
            name it here and its *contents* become ``dest``. Anything else in the archive
            (e.g. the ``__MACOSX/`` folder that macOS zips add) is discarded.
        overwrite: replace an existing ``dest``; otherwise an existing ``dest`` raises
            :class:`FileExistsError`.

    Raises:
        UnsafeArchiveError: a member has an absolute path or ``..`` (it could write
            anywhere on disk); nothing is extracted.
        ValueError: not a zip or tar archive, or ``subdir`` is not in it.
    """
    archive, dest = Path(archive), Path(dest)
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest} already exists; remove it or pass overwrite=True.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.extract-"))
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                _check_members(archive, zf.namelist())
                zf.extractall(tmp)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                _check_members(archive, tf.getnames())
                # The "data" filter (Python 3.12, backported to 3.8.17+) also refuses links
                # pointing outside and device files; without it, our own check above stands.
                kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tf.extractall(tmp, **kwargs)
        else:
            raise ValueError(f"{archive} is neither a zip nor a tar archive (a partial or "
                             "HTML error page download?). Delete it and download again.")

        source = tmp / subdir if subdir else tmp
        if not source.is_dir():
            found = ", ".join(sorted(p.name for p in tmp.iterdir())) or "nothing"
            raise ValueError(f"{archive} has no top folder {subdir!r} (it holds: {found}).")
        if dest.exists():
            if not overwrite:  # someone else (a second notebook) got there while we unpacked
                raise FileExistsError(f"{dest} already exists; remove it or pass overwrite=True.")
            # Move the old tree aside first: os.replace cannot replace a non-empty folder.
            trash = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.old-"))
            os.replace(dest, trash / "old")
            try:
                os.replace(source, dest)
            except BaseException:
                os.replace(trash / "old", dest)  # put the old copy back rather than lose both
                raise
            finally:
                shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(source, dest)
        return dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_members(archive: Path, names: list[str]) -> None:
    for name in names:
        posix, windows = PurePosixPath(name), PureWindowsPath(name)
        if posix.is_absolute() or windows.is_absolute() or windows.drive:
            raise UnsafeArchiveError(
                f"{archive} contains a member with an absolute path ({name!r}); refusing to "
                "extract it. The archive is corrupt or malicious: delete it."
            )
        if ".." in posix.parts or ".." in windows.parts:
            raise UnsafeArchiveError(
                f"{archive} contains a member that climbs out of the folder ({name!r}); "
                "refusing to extract it. The archive is corrupt or malicious: delete it."
            )
