"""WikiArt as distributed: ``wikiart/<Style>/<artist>_<title>.jpg``, plus the CSV splits when present.

The CSV metadata that comes with the common WikiArt release (``wikiart_csv/``)
lists ``<Style>/<file>.jpg,<class id>`` per line in ``style_train.csv`` and
``style_val.csv``, and ``style_class.txt`` maps ``<class id> <Style>``. When
that folder is found (inside the WikiArt folder or beside it) only the
images of the requested split are used, so the validation paintings stay
unseen; without it every image under the folder is used and the style is the
name of its top folder.
"""

from pathlib import Path
from typing import Optional, Union

from e4tcli.errors import UsageError


def find_csv_folder(root: Path) -> Optional[Path]:
    """``wikiart_csv`` inside ``root`` or beside it, if it holds style CSVs."""
    for folder in (root / "wikiart_csv", root.parent / "wikiart_csv"):
        if (folder / "style_class.txt").is_file():
            return folder
    return None


def read_style_classes(path: Path) -> dict[int, str]:
    """``style_class.txt``: one ``<id> <Style>`` per line."""
    classes = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        number, _, name = line.strip().partition(" ")
        if number.isdigit() and name.strip():
            classes[int(number)] = name.strip()
    return classes


def read_split(path: Path) -> list[tuple[str, int]]:
    """``style_<split>.csv``: ``<relative path>,<class id>`` per line (the path may contain commas)."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        relative, _, number = line.strip().rpartition(",")
        if relative and number.strip().isdigit():
            rows.append((relative, int(number)))
    return rows


class WikiArt:
    """WikiArt paintings with the style name of each; unreadable files are skipped and counted.

    ``split`` ("train", "val") picks ``style_<split>.csv`` when the CSV folder
    is found; ``split=None`` ignores the CSVs. ``metadata(i)`` gives ``style``,
    ``artist`` (the file name up to the first ``_``) and ``path``, plus
    ``style_id`` when it comes from the CSV.
    """

    def __init__(
        self, root: Union[str, Path], split: Optional[str] = "train", csv_folder: Union[str, Path, None] = None
    ):
        self.root = Path(root)
        if (self.root / "wikiart").is_dir() and (self.root / "wikiart_csv").is_dir():
            self.root = self.root / "wikiart"  # given the folder the release unpacks to
        if not self.root.is_dir():
            raise UsageError(
                f"WikiArt folder not found: {self.root}", hint="pass --data the wikiart/ folder of style folders"
            )
        self.csv_folder = Path(csv_folder) if csv_folder else (find_csv_folder(self.root) if split else None)
        self.skipped: list[Path] = []
        self.style_ids: Optional[list[int]] = None
        if self.csv_folder is not None:
            split_file = self.csv_folder / f"style_{split}.csv"
            if not split_file.is_file():
                raise UsageError(f"WikiArt split file not found: {split_file}", hint="use split 'train' or 'val'")
            self.classes = read_style_classes(self.csv_folder / "style_class.txt")
            self.paths, self.style_ids = [], []
            for relative, number in read_split(split_file):
                path = self.root / relative
                if path.is_file():
                    self.paths.append(path)
                    self.style_ids.append(number)
                else:
                    self.skipped.append(path)
        else:
            from e4tcli.datasets.image_folder import ImageFolder

            folder = ImageFolder(self.root)
            self.paths, self.skipped = folder.paths, folder.skipped
            self.classes = {}
        if not self.paths:
            raise UsageError(
                f"no WikiArt images under {self.root}" + (f" listed in {self.csv_folder}" if self.csv_folder else ""),
                hint="pass --data the wikiart/ folder holding the style folders",
            )

    def __len__(self) -> int:
        return len(self.paths)

    def _readable(self, index: int):
        from e4tcli.datasets.image_folder import load_rgb

        count = len(self.paths)
        for offset in range(count):
            i = (index + offset) % count
            try:
                return i, load_rgb(self.paths[i])
            except Exception:
                if self.paths[i] not in self.skipped:
                    self.skipped.append(self.paths[i])
        raise UsageError(f"no image under {self.root} could be decoded", hint="check the dataset files")

    def __getitem__(self, index: int):
        return self._readable(index)[1]

    def style(self, index: int) -> str:
        index %= len(self.paths)
        if self.style_ids is not None and self.style_ids[index] in self.classes:
            return self.classes[self.style_ids[index]]
        relative = self.paths[index].relative_to(self.root)
        return relative.parts[0] if len(relative.parts) > 1 else ""

    def metadata(self, index: int) -> dict:
        index %= len(self.paths)
        path = self.paths[index]
        out = {
            "style": self.style(index),
            "artist": path.stem.partition("_")[0],
            "path": str(path.relative_to(self.root)),
        }
        if self.style_ids is not None:
            out["style_id"] = self.style_ids[index]
        return out

    def sample(self, index: int) -> tuple:
        """``(image, metadata)`` of one painting, both from the same file when one is substituted."""
        i, image = self._readable(index)
        return image, self.metadata(i)


def wikiart(path: Union[str, Path]) -> WikiArt:
    """Dataset factory: the WikiArt folder, its training split when the CSVs are present."""
    return WikiArt(path)
