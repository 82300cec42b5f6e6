"""Write a few real photos shipped with scikit-image into a folder (the demo's tiny dataset)."""

import sys
from pathlib import Path

import skimage.data
from PIL import Image

PHOTOS = ("chelsea", "cat", "astronaut", "coffee", "rocket", "immunohistochemistry")


def main(out: str) -> None:
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    for name in PHOTOS:
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(folder / f"{name}.png")
    print(folder)


if __name__ == "__main__":
    main(sys.argv[1])
