"""Images stored in an LMDB database, the format LSUN (e.g. LSUN-Cat) is distributed in.

Each record's key is an image id and its value the encoded image (JPEG or
WebP). The keys are listed once at construction (LSUN-Cat: 1.66 M keys, a few
seconds) and kept in one numpy byte-string array rather than a list of Python
bytes objects, which stays small and is not copied page by page into forked
data-loader workers.
"""

import os
from pathlib import Path
from typing import Union

from e4tcli.errors import UsageError


def looks_like_lmdb(path: Union[str, Path]) -> bool:
    """A folder holding ``data.mdb``, or the ``data.mdb`` file itself."""
    path = Path(path)
    return (path.is_dir() and (path / "data.mdb").is_file()) or (path.is_file() and path.name == "data.mdb")


class LmdbImages:
    """Every record of an LMDB database as an RGB image; undecodable records are skipped and counted.

    ``skipped`` holds the keys (bytes) of records that failed to decode; each is
    replaced by the next readable record, as ImageFolder does. The object holds
    no LMDB handle: each process opens the environment once, on first read, so
    the dataset can be pickled or forked into data-loader workers (LMDB
    handles must not cross a fork).
    """

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        if not looks_like_lmdb(self.path):
            raise UsageError(
                f"no LMDB database at {self.path} (expected a folder holding data.mdb)",
                hint="pass --data the extracted LSUN folder, e.g. cat/ holding data.mdb",
            )
        if self.path.is_file():
            self.path = self.path.parent  # one environment per folder, however it was named
        self.skipped: list[bytes] = []
        with _open_environment(self.path).begin() as txn:
            keys = list(txn.cursor().iternext(keys=True, values=False))
        if not keys:
            raise UsageError(f"the LMDB database at {self.path} is empty", hint="check the dataset files")
        self.keys = _compact(keys)

    def __len__(self) -> int:
        return len(self.keys)

    def key(self, index: int) -> bytes:
        return bytes(self.keys[index % len(self.keys)])

    def _readable(self, index: int):
        import io

        from e4tcli.datasets.image_folder import load_rgb

        count = len(self.keys)
        with _open_environment(self.path).begin(buffers=False) as txn:
            for offset in range(count):
                i = (index + offset) % count
                key = self.key(i)
                try:
                    data = txn.get(key)
                    if data is None:
                        raise KeyError(key)
                    return i, load_rgb(io.BytesIO(data))
                except Exception:
                    if key not in self.skipped:
                        self.skipped.append(key)
        raise UsageError(
            f"no record of the LMDB database at {self.path} could be decoded", hint="check the dataset files"
        )

    def __getitem__(self, index: int):
        return self._readable(index)[1]

    def metadata(self, index: int) -> dict:
        return {"key": self.key(index).decode("utf-8", errors="replace")}

    def sample(self, index: int) -> tuple:
        """``(image, metadata)`` of one record, both from the same record when one is substituted."""
        i, image = self._readable(index)
        return image, self.metadata(i)


_ENVIRONMENTS: dict = {}
"""Open read-only environments by (path, process): LMDB refuses to open one path twice in a process."""


def _open_environment(path: Path):
    key = (str(path.resolve()), os.getpid())
    if key not in _ENVIRONMENTS:
        for other in [k for k in _ENVIRONMENTS if k[0] == key[0]]:
            _ENVIRONMENTS.pop(other).close()  # inherited through a fork: this process needs its own
        try:
            import lmdb
        except ImportError:
            raise UsageError("reading an LMDB dataset needs the lmdb package", hint="pip install lmdb") from None
        try:
            _ENVIRONMENTS[key] = lmdb.open(
                key[0], readonly=True, lock=False, readahead=False, meminit=False, max_readers=256
            )
        except lmdb.Error as error:
            raise UsageError(
                f"cannot open the LMDB database at {path}: {error}", hint="check the dataset files"
            ) from None
    return _ENVIRONMENTS[key]


def _compact(keys: list):
    """Keys as one fixed-width numpy byte array; a list when a key ends in NUL (numpy would strip it)."""
    import numpy as np

    if any(k.endswith(b"\x00") for k in keys):
        return keys
    return np.array(keys, dtype=f"S{max(len(k) for k in keys)}")


def lmdb_images(path: Union[str, Path]) -> LmdbImages:
    """Dataset factory: an LMDB database of encoded images (LSUN's format)."""
    return LmdbImages(path)
