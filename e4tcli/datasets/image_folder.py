"""A folder of images, searched recursively, that never crashes on a bad file."""

import json
from pathlib import Path
from typing import Union

from e4tcli.errors import UsageError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp"})
METADATA_NAME = "metadata.jsonl"


def load_rgb(path: Union[str, Path]):
    """Open an image file as RGB with its EXIF orientation applied."""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        return image.convert("RGB")


class ImageFolder:
    """Every jpg/png/webp under ``root``; unreadable files are skipped and counted.

    Files whose header cannot be read are dropped while scanning. A file that
    fails later, while decoding, is counted in ``skipped`` and replaced by the
    next readable image, so a long training run never dies on one bad file.

    An optional ``metadata.jsonl`` at the root (one JSON object per line, its
    ``file_name`` relative to the root, the convention of HuggingFace's
    imagefolder) gives images fields for the domain's prompt templates:
    ``{"file_name": "a/001.png", "background": "red"}``.
    """

    def __init__(self, root: Union[str, Path]):
        from PIL import Image

        self.root = Path(root)
        if not self.root.is_dir():
            raise UsageError(f"dataset folder not found: {self.root}", hint="pass --data a folder of images")
        self.skipped: list[Path] = []
        self.paths: list[Path] = []
        for path in sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
            try:
                with Image.open(path):
                    pass
            except Exception:
                self.skipped.append(path)
                continue
            self.paths.append(path)
        self.fields = read_metadata(self.root)
        if not self.paths:
            raise UsageError(
                f"no readable images (jpg, png, webp) under {self.root}"
                + (f"; {len(self.skipped)} unreadable files skipped" if self.skipped else ""),
                hint="point --data at a folder of images",
            )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        return self.sample(index)[0]

    def metadata(self, index: int) -> dict:
        return self._fields_of(self.paths[index])

    def sample(self, index: int) -> tuple:
        """``(image, metadata)`` of the image actually read (the next readable one if ``index``'s fails)."""
        for offset in range(len(self.paths)):
            path = self.paths[(index + offset) % len(self.paths)]
            try:
                return load_rgb(path), self._fields_of(path)
            except Exception:
                if path not in self.skipped:
                    self.skipped.append(path)
        raise UsageError(f"no image under {self.root} could be decoded", hint="check the dataset files")

    def _fields_of(self, path: Path) -> dict:
        return dict(self.fields.get(path.relative_to(self.root).as_posix(), {}))


def read_metadata(root: Path) -> dict[str, dict]:
    """``metadata.jsonl`` as ``{file_name: fields}`` (empty when there is none)."""
    source = root / METADATA_NAME
    if not source.is_file():
        return {}
    fields = {}
    for number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name = Path(row.pop("file_name")).as_posix()
        except (ValueError, KeyError, AttributeError, TypeError):
            raise UsageError(
                f"{source}, line {number}: not a JSON object with a 'file_name'",
                hint='write one object per line, e.g. {"file_name": "001.png", "style": "cubism"}',
            ) from None
        fields[name] = row
    return fields


def image_folder(path: Union[str, Path]) -> ImageFolder:
    """The default dataset factory: a folder of images, recursively."""
    return ImageFolder(path)
