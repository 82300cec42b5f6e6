"""Write files and folders so that they are always complete or absent."""

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from e4tcli.io.destinations import as_os_error


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    A write the system refuses (disk full, no permission) is raised as an OSError naming ``path``,
    not the temporary file, and from safetensors too, which reports it in an error of its own."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        yield tmp
        os.replace(tmp, path)
    except OSError as error:
        temporary = error.filename is None or Path(str(error.filename)).name.startswith(f".{path.name}.")
        if error.errno is None or not temporary:
            raise
        raise OSError(error.errno, error.strerror, str(path)) from error
    except Exception as error:
        if type(error).__name__ != "SafetensorError":
            raise
        raise as_os_error(error, path) from error
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


@contextmanager
def atomic_folder(path: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; it replaces ``path`` only if the block succeeds.

    An existing ``path`` is moved aside first and deleted only after the new
    folder is in place, so a crash leaves either the old or the new folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
