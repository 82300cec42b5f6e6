"""A folder of images, searched recursively, that never crashes on a bad file."""

from pathlib import Path
from typing import Union

from e4tcli.errors import UsageError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp"})


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
        if not self.paths:
            raise UsageError(
                f"no readable images (jpg, png, webp) under {self.root}"
                + (f"; {len(self.skipped)} unreadable files skipped" if self.skipped else ""),
                hint="point --data at a folder of images",
            )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        for offset in range(len(self.paths)):
            path = self.paths[(index + offset) % len(self.paths)]
            try:
                return load_rgb(path)
            except Exception:
                if path not in self.skipped:
                    self.skipped.append(path)
        raise UsageError(f"no image under {self.root} could be decoded", hint="check the dataset files")


def image_folder(path: Union[str, Path]) -> ImageFolder:
    """The default dataset factory: a folder of images, recursively."""
    return ImageFolder(path)
