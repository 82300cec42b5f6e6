"""Tar shards in the webdataset layout, indexed for random access.

A shard is an uncompressed ``.tar`` whose members are grouped into samples by
key: ``dir/000123.jpg`` and ``dir/000123.json`` both belong to sample
``dir/000123`` (the key is the member path up to the first dot of its file
name). A sample is kept when it has a ``jpg``, ``jpeg``, ``png`` or ``webp``
member; its ``json`` and ``txt`` members become its metadata.

The training loop draws ``dataset[random index]``, so the shards are indexed
once at construction: only the 512-byte member headers are read (tarfile seeks
over the data), and each item is later one ``seek`` + ``read`` of its bytes.
Compressed shards (``.tar.gz``) cannot be read at an offset and are refused.

Shards too big for the disk stay on their server: ``https://.../shards-{000..999}.tar``
is read with HTTP byte ranges (``remote``), the same way. A ``.txt`` file may
list shards (paths, URLs, patterns), e.g. one pre-signed URL per shard. Indexing a remote
shard reads its headers in 64 KiB ranges, in parallel over shards, and the
index is kept in ``$E4T_CACHE`` (default ``~/.cache/e4t``) until the shard
changes (size, ETag), so a resumed run or another process starts at once.
Random access keeps what the training loop promises: the batch of a step is
the same for any number of processes, and a resumed run repeats exactly.
"""

import glob
import hashlib
import io
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple, Optional, Union
from urllib.parse import urlparse

from e4tcli.datasets.remote import RemoteFile, is_url, probe, read_range
from e4tcli.errors import E4TError, UsageError

Shard = Union[Path, str]
"""A local shard file, or the URL of a remote one."""

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SHARD_LIST_SUFFIXES = (".txt",)
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{000..009}`` (zero-padded ranges) and ``{a,b}`` like a shell does, in order."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end() :]
    numeric = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if numeric:
        first, last = numeric.groups()
        width = max(len(first), len(last)) if first.startswith("0") or last.startswith("0") else 0
        step = 1 if int(last) >= int(first) else -1
        choices = [str(n).zfill(width) for n in range(int(first), int(last) + step, step)]
    elif "," in body:
        choices = body.split(",")
    else:  # a literal brace, e.g. "{x}": keep it and expand what follows
        return [head + "{" + body + "}" + rest for rest in expand_braces(tail)]
    return [head + choice + rest for choice in choices for rest in expand_braces(tail)]


def looks_like_shards(spec: Union[str, Path]) -> bool:
    """Whether ``spec`` names tar shards: a brace/glob pattern, a ``.tar`` file, a folder holding
    ``.tar`` files, a ``.txt`` list of shards, or an http(s) URL (the only thing read over HTTP)."""
    if is_url(spec):
        return True
    path = Path(spec)
    if path.is_file():
        return path.suffix.lower() in (".tar", *SHARD_LIST_SUFFIXES)
    if path.is_dir():
        return any(p.suffix.lower() == ".tar" and p.is_file() for p in path.iterdir())
    text = str(spec)
    return bool(_BRACE.search(text)) or any(c in text for c in "*?[") or text.lower().endswith(".tar")


def shard_name(shard: Shard) -> str:
    return Path(urlparse(shard).path).name if isinstance(shard, str) else shard.name


def listed_shards(path: Path) -> list[Shard]:
    """The shards a list file names, one path, URL or pattern per line (``#`` comments).

    Pre-signed object-store URLs differ per shard, so no pattern can name
    them; relative paths are relative to the list file.
    """
    shards: list[Shard] = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            if not is_url(line) and not Path(line).is_absolute():
                line = str(path.parent / line)
            shards.extend(shard_paths(line))
    return shards


def shard_paths(spec: Union[str, Path]) -> list[Shard]:
    """The shards ``spec`` names, in order; a UsageError names the first local one missing."""
    text = str(spec)
    path = Path(text)
    if not is_url(text) and path.is_file() and path.suffix.lower() in SHARD_LIST_SUFFIXES:
        paths = listed_shards(path)
    elif is_url(text):
        paths = expand_braces(text)
        if not all(urlparse(url).path.lower().endswith(".tar") for url in paths):
            raise UsageError(
                f"only .tar shards can be read over HTTP, not {paths[0]}",
                hint="pass a URL pattern such as 'https://host/shards-{000..099}.tar'",
            )
    elif path.is_dir():
        paths = sorted(p for p in path.iterdir() if p.suffix.lower() == ".tar" and p.is_file())
    elif path.is_file():
        paths = [path]
    else:
        paths = []
        for name in expand_braces(text):
            matches = sorted(glob.glob(name)) if any(c in name for c in "*?[") else [name]
            paths.extend(Path(m) for m in matches)
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise UsageError(
                f"tar shard not found: {missing[0]}"
                + (f" ({len(missing)} of {len(paths)} missing)" if len(missing) > 1 else ""),
                hint="check the shard pattern, e.g. 'shards-{000..009}.tar'",
            )
    if not paths:
        raise UsageError(
            f"no tar shards found for {text}", hint="pass a .tar, a folder of .tar files or 'shards-{000..009}.tar'"
        )
    compressed = [p for p in paths if shard_name(p).lower().endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar.xz"))]
    if compressed:
        raise UsageError(
            f"compressed shard {compressed[0]} cannot be read at random offsets", hint="use uncompressed .tar shards"
        )
    return paths


class Member(NamedTuple):
    shard: int
    offset: int
    size: int


Samples = dict[str, dict[str, tuple[int, int]]]
"""key -> extension -> (offset, size) of the member's bytes."""


def scan(archive_source) -> tuple[Samples, Optional[str]]:
    """The samples of one tar (a path or a file object), and the error that ended the scan early, if any."""
    import tarfile

    samples: Samples = {}
    try:
        if isinstance(archive_source, Path):
            archive = tarfile.open(archive_source, mode="r:")
        else:
            archive = tarfile.open(fileobj=archive_source, mode="r:")
        with archive:
            for info in archive:
                if info.isfile():
                    folder, _, name = info.name.rpartition("/")
                    stem, dot, extension = name.partition(".")
                    if dot:
                        key = f"{folder}/{stem}" if folder else stem
                        samples.setdefault(key, {})[extension.lower()] = (info.offset_data, info.size)
    except (tarfile.TarError, OSError) as error:
        return samples, f"{type(error).__name__}: {error}"
    return samples, None


def index_cache_folder() -> Path:
    root = os.environ.get("E4T_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "e4t"
    )
    return Path(root) / "tar-index"


def scan_remote(url: str) -> tuple[Samples, Optional[str]]:
    """``scan`` of a shard on an HTTP server, through the index cache."""
    from e4tcli.io.atomic import atomic_file

    info = probe(url)
    where = url.split("?", 1)[0]  # a pre-signed URL's signature changes, the shard does not
    path = index_cache_folder() / (hashlib.sha256(where.encode()).hexdigest()[:32] + ".json")
    stamp = {"url": where, "size": info.size, "version": info.version}
    try:
        cached = json.loads(path.read_text())
        if cached.get("stamp") == stamp:
            return {k: {e: tuple(m) for e, m in v.items()} for k, v in cached["samples"].items()}, cached["error"]
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    samples, error = scan(io.BufferedReader(RemoteFile(url, info.size), buffer_size=64 * 1024))
    try:
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps({"stamp": stamp, "samples": samples, "error": error}))
    except OSError:
        pass  # a read-only cache only costs the next start another scan
    return samples, error


def scan_all(shards: list[Shard]) -> list[tuple[Samples, Optional[str]]]:
    if not any(isinstance(shard, str) for shard in shards):
        return [scan(shard) for shard in shards]
    with ThreadPoolExecutor(max_workers=min(16, len(shards))) as pool:
        return list(pool.map(lambda shard: scan_remote(shard) if isinstance(shard, str) else scan(shard), shards))


class TarShards:
    """The images of webdataset-style tar shards; unreadable records are skipped and counted.

    ``skipped`` lists ``"shard.tar:key"`` of samples whose image failed to decode
    (replaced by the next readable one, as ImageFolder does) and
    ``"shard.tar: ..."`` for a shard that is truncated or not a tar (the samples
    before the damage are kept).
    """

    def __init__(self, spec: Union[str, Path]):
        self.shards = shard_paths(spec)
        self.skipped: list[str] = []
        self.keys: list[str] = []
        self.images: list[Member] = []
        self.extras: list[dict[str, Member]] = []
        for number, (shard, (samples, error)) in enumerate(zip(self.shards, scan_all(self.shards))):
            if error is not None:
                self.skipped.append(f"{shard_name(shard)}: {error} (kept the {len(samples)} samples before it)")
            for key, found in samples.items():
                members = {extension: Member(number, *where) for extension, where in found.items()}
                image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
                if image is not None:
                    self.keys.append(key)
                    self.images.append(image)
                    self.extras.append({e: m for e, m in members.items() if e in ("json", "txt")})
        if not self.images:
            raise UsageError(
                f"no jpg, png or webp members in {len(self.shards)} tar shard(s) of {spec}",
                hint="shards hold <key>.jpg|png|webp members (webdataset layout)",
            )

    def __len__(self) -> int:
        return len(self.images)

    def _read(self, member: Member) -> bytes:
        # Opening per read keeps the object fork- and pickle-safe and never
        # holds thousands of descriptors; the open costs microseconds.
        shard = self.shards[member.shard]
        if isinstance(shard, str):
            data = read_range(shard, member.offset, member.size)
        else:
            with open(shard, "rb") as handle:
                handle.seek(member.offset)
                data = handle.read(member.size)
        if len(data) != member.size:
            raise OSError("shard ends inside this member")
        return data

    def _readable(self, index: int):
        """``(i, image)`` for the first decodable sample at or after ``index``."""
        from e4tcli.datasets.image_folder import load_rgb

        count = len(self.images)
        for offset in range(count):
            i = (index + offset) % count
            try:
                return i, load_rgb(io.BytesIO(self._read(self.images[i])))
            except E4TError:
                raise  # an unreachable server is not a bad image
            except Exception:
                name = f"{shard_name(self.shards[self.images[i].shard])}:{self.keys[i]}"
                if name not in self.skipped:
                    self.skipped.append(name)
        raise UsageError(f"no image in the tar shards could be decoded ({count} tried)", hint="check the shard files")

    def __getitem__(self, index: int):
        return self._readable(index)[1]

    def metadata(self, index: int) -> dict:
        """``key``, ``shard``, the fields of the sample's ``.json`` (an object) and its ``.txt`` as ``txt``."""
        index %= len(self.images)
        out: dict = {}
        extras = self.extras[index]
        if "json" in extras:
            try:
                value = json.loads(self._read(extras["json"]))
                out.update(value if isinstance(value, dict) else {"json": value})
            except (ValueError, OSError):
                pass
        if "txt" in extras:
            try:
                out["txt"] = self._read(extras["txt"]).decode("utf-8", errors="replace")
            except OSError:
                pass
        out.update(key=self.keys[index], shard=shard_name(self.shards[self.images[index].shard]))
        return out

    def sample(self, index: int) -> tuple:
        """``(image, metadata)`` of one sample, both from the same record when one is substituted."""
        i, image = self._readable(index)
        return image, self.metadata(i)


def tar_shards(spec: Union[str, Path]) -> TarShards:
    """Dataset factory: webdataset tar shards (a .tar, a folder of them, or ``shards-{000..009}.tar``)."""
    return TarShards(os.fspath(spec))
