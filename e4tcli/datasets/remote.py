"""Byte ranges of files served over HTTP(S), so tar shards can stay on their server.

Object stores (S3, GCS, Azure, R2, Hugging Face) and plain web servers answer
``Range: bytes=a-b`` requests, which gives random access without a copy on
disk: indexing a shard reads its member headers, and each training sample is
then one request for its bytes. Transient failures are retried; a server that
stays unreachable stops the run (resume it from its last checkpoint), rather
than letting every sample be skipped as unreadable.
"""

import http.client
import io
import re
import time
import urllib.error
import urllib.request
from typing import NamedTuple, Optional

from e4tcli.errors import RuntimeFailure, UsageError

RETRIES = 4
TIMEOUT_SECONDS = 60
_TOTAL = re.compile(r"bytes \d+-\d+/(\d+)")


def is_url(spec) -> bool:
    return str(spec).lower().startswith(("http://", "https://"))


class RemoteInfo(NamedTuple):
    size: int
    version: str
    """ETag or Last-Modified: a changed file gets a new index."""


def _request(url: str, first: int, last: int):
    request = urllib.request.Request(url, headers={"Range": f"bytes={first}-{last}", "User-Agent": "e4t"})
    return urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS)


def _retrying(url: str, action, what: str):
    """``action()``, retried with back-off on network errors and 5xx answers."""
    delay = 0.5
    for attempt in range(RETRIES + 1):
        try:
            return action()
        except urllib.error.HTTPError as error:
            if error.code == 404:
                raise UsageError(f"tar shard not found: {url} (HTTP 404)", hint="check the shard URL pattern") from None
            if error.code in (401, 403):
                raise UsageError(
                    f"access denied to {url} (HTTP {error.code})",
                    hint="use a public or pre-signed https URL for each shard",
                ) from None
            if error.code < 500 or attempt == RETRIES:
                raise RuntimeFailure(
                    f"{what} {url} failed: HTTP {error.code}",
                    hint="check the server, then continue with --resume latest",
                ) from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
            if attempt == RETRIES:
                reason = getattr(error, "reason", error)
                raise RuntimeFailure(
                    f"{what} {url} failed after {RETRIES + 1} tries: {reason}",
                    hint="check the network, then continue with --resume latest",
                ) from None
        time.sleep(delay)
        delay *= 2


def probe(url: str) -> RemoteInfo:
    """Size and version of ``url``; a UsageError when the server ignores byte ranges."""

    def ask():
        with _request(url, 0, 0) as response:
            status, headers = response.status, response.headers
        if status != 206:
            raise UsageError(
                f"{url} was sent whole instead of the byte range asked for (the server ignores Range requests)",
                hint="serve the shards from a server or object store that supports byte ranges, or download them",
            )
        match = _TOTAL.fullmatch(headers.get("Content-Range", "").strip())
        if match is None:
            raise UsageError(
                f"{url} answered without a Content-Range size", hint="serve the shards with byte-range support"
            )
        return RemoteInfo(int(match.group(1)), headers.get("ETag") or headers.get("Last-Modified") or "")

    return _retrying(url, ask, "reading")


def read_range(url: str, offset: int, size: int) -> bytes:
    """``size`` bytes of ``url`` from ``offset`` (fewer only at the end of the file)."""
    if size <= 0:
        return b""

    def ask():
        with _request(url, offset, offset + size - 1) as response:
            if response.status != 206:
                raise UsageError(f"{url} ignored a byte-range request", hint="serve the shards with byte-range support")
            return response.read()

    return _retrying(url, ask, "reading")


class RemoteFile(io.RawIOBase):
    """A read-only, seekable file over HTTP byte ranges (wrap it in ``io.BufferedReader``)."""

    def __init__(self, url: str, size: Optional[int] = None):
        super().__init__()
        self.url = url
        self.size = probe(url).size if size is None else size
        self.position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = max(0, base + offset)
        return self.position

    def readinto(self, buffer) -> int:
        wanted = min(len(buffer), self.size - self.position)
        if wanted <= 0:
            return 0
        data = read_range(self.url, self.position, wanted)
        buffer[: len(data)] = data
        self.position += len(data)
        return len(data)
