"""Which of a reference portrait's attributes generated images keep, as the world's attribute reader reads them.

    python -m e4t_minifaces.read domains/minifaces/e4t_minifaces/examples/mira.png outputs/red/*.png

The reference is read by the same reader, so any portrait works, not only the world's own identities.
"""

import argparse
import sys
from pathlib import Path

from e4t_minifaces import WEIGHTS, world


def kept_attributes(reference, images: list) -> tuple[dict[str, str], list[dict[str, str]]]:
    """The reference's identity attributes, and each image's (choice names, ``world.IDENTITY_CHOICES``)."""
    from e4t_minifaces.reader import load_reader, read_images

    reader, _ = load_reader(WEIGHTS / "reader.safetensors")
    read = read_images(reader, [reference, *images])
    named = [
        {name: world.IDENTITY_CHOICES[name][int(read[name][i])] for name in world.IDENTITY_LABELS}
        for i in range(len(images) + 1)
    ]
    return named[0], named[1:]


def main(argv=None) -> int:
    from PIL import Image

    parser = argparse.ArgumentParser(prog="python -m e4t_minifaces.read", description=__doc__.split("\n\n")[0])
    parser.add_argument("reference", type=Path)
    parser.add_argument("images", type=Path, nargs="+")
    args = parser.parse_args(argv)
    for path in [args.reference, *args.images]:
        if not path.is_file():
            print(f"error: image not found: {path}", file=sys.stderr)
            return 2
    reference, images = kept_attributes(Image.open(args.reference), [Image.open(p) for p in args.images])
    shown = world.Identity(**reference).visible()
    print("attribute    reference  kept  each image ('.': the reference's, else what it shows)")
    for name in shown:
        marks = " ".join(image[name] if image[name] != reference[name] else "." for image in images)
        kept = sum(image[name] == reference[name] for image in images)
        print(f"{name:<12} {reference[name]:<10} {kept}/{len(images)}  {marks}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
