"""Where commands write, checked before any work: nothing of the user's is replaced by surprise.

A concept file or a run folder that exists is replaced only with ``--force``;
generated images never replace older ones unless ``--force``: a run whose
names are taken writes ``NAME-runK.png`` instead. What cannot be written at
all (a full disk, no permission) becomes one plain line (``os_error_message``).
"""

import errno
import os
import re
from pathlib import Path
from typing import Optional

from e4tcli.errors import E4TError, RuntimeFailure, UsageError

FORCE_HINT = "pass --force to replace it, or choose another --out"


def check_new_file(path: Path, force: bool) -> None:
    """``path`` may be written: not a folder, nothing under a file, and absent unless ``force``."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"--out {path} is a folder", hint="pass a file name, e.g. --out NAME.safetensors")
    _check_parent_is_not_a_file(path)
    if path.exists() and not force:
        raise UsageError(f"{path} already exists", hint=FORCE_HINT)


def check_output_folder(folder: Path) -> None:
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--out {folder} is a file, not a folder", hint="pass a folder for the images")
    _check_parent_is_not_a_file(folder)


def _check_parent_is_not_a_file(path: Path) -> None:
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"cannot write {path}: {parent} is a file", hint="choose another --out")
            return


def free_names(folder: Path, names: list[str], force: bool) -> tuple[list[str], bool]:
    """``names`` if none is taken in ``folder`` (or ``force``); otherwise each as ``STEM-runK.SUFFIX``,
    with the smallest K >= 2 for which all are free. Returns the names and whether they changed."""
    folder = Path(folder)
    if force or not any((folder / name).exists() for name in names):
        return names, False
    run = 2
    while True:
        renamed = [f"{Path(name).stem}-run{run}{Path(name).suffix}" for name in names]
        if not any((folder / name).exists() for name in renamed):
            return renamed, True
        run += 1


def check_run_folder(folder: Path, resume: Optional[str], force: bool) -> None:
    """A pre-training ``--out``: a folder that is new, empty, being resumed, or given up with ``force``."""
    folder = Path(folder)
    check_output_folder(folder)
    if resume or force or not folder.exists() or not any(folder.iterdir()):
        return
    raise UsageError(
        f"--out {folder} already holds files (a previous run?)",
        hint="pass --resume latest to continue that run, --force to start over in it, or choose another --out",
    )


_ADVICE = {
    errno.ENOSPC: "free some disk space or choose another --out",
    errno.EDQUOT: "free some of your disk quota or choose another --out",
    errno.EFBIG: "the file system or a size limit (ulimit -f) allows no file this large; choose another --out",
    errno.EACCES: "choose a folder you may write to with --out",
    errno.EPERM: "choose a folder you may write to with --out",
    errno.EROFS: "the file system is read-only; choose another --out",
    errno.EEXIST: "choose another --out",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another --out",
    errno.EISDIR: "that is a folder, not a file; choose another --out",
    errno.ENAMETOOLONG: "choose a shorter --out",
}


def os_error_message(error: OSError) -> Optional[E4TError]:
    """One line for a write that the operating system refused, or None for errors of another kind."""
    if error.errno not in _ADVICE:
        return None
    where = f" {error.filename}" if error.filename else ""
    reason = error.strerror or os.strerror(error.errno)
    return RuntimeFailure(f"could not write{where}: {reason[0].lower()}{reason[1:]}", hint=_ADVICE[error.errno])


_OS_ERROR_CODE = re.compile(r"(?:os error |code: )(\d+)")


def as_os_error(error: Exception, path: Path) -> Exception:
    """safetensors reports a failed write as its own error with the OS code in the text: an OSError
    for ``path`` when the code is there, else ``error`` itself."""
    match = _OS_ERROR_CODE.search(str(error))
    if not match:
        return error
    code = int(match.group(1))
    return OSError(code, os.strerror(code), str(path))
