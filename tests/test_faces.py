"""The faces domain: detect, align and crop a face; the face loss mask; domains still register lightly."""

import subprocess
import sys

import numpy as np
import pytest
import skimage.data
from e4t_faces.faces import align_face, detect_face, face_mask
from PIL import Image
from typer.testing import CliRunner

from e4tcli.errors import UsageError


@pytest.fixture(scope="module")
def astronaut():
    return Image.fromarray(skimage.data.astronaut())


def eye_tilt(face) -> float:
    (x0, y0), (x1, y1) = face.eyes
    return float(np.degrees(np.arctan2(y1 - y0, x1 - x0)))


def test_astronaut_face_is_found_where_it_is(astronaut):
    face = detect_face(astronaut)
    assert face is not None and face.eyes is not None
    x, y, w, h = face.box
    # Eileen Collins' face in the 512x512 photo: upper middle, about a fifth of the width
    assert 150 < x + w / 2 < 300 and 60 < y + h / 2 < 170 and 60 < w < 140
    assert abs(face.tilt) < 8


def test_astronaut_crop_is_square_and_framed_like_ffhq(astronaut):
    crop = align_face(astronaut)
    assert crop.mode == "RGB" and crop.width == crop.height and 110 <= crop.width <= 260
    again = detect_face(crop)  # the crop holds the same face, centred, filling about the middle 60%
    assert again is not None
    x, y, w, h = again.box
    assert abs((x + w / 2) / crop.width - 0.5) < 0.1 and abs((y + h / 2) / crop.height - 0.45) < 0.1
    assert 0.45 < w / crop.width < 0.8
    # cut from the photo at the photo's scale: the crop's middle is the photo's face middle (tilt ~2 degrees)
    fx, fy, fw, fh = detect_face(astronaut).box
    cx, cy, r = round(fx + fw / 2), round(fy + fh / 2 + 0.08 * fh), 20
    photo_patch = np.asarray(astronaut, np.float32)[cy - r : cy + r, cx - r : cx + r]
    m = crop.width // 2
    crop_patch = np.asarray(crop, np.float32)[m - r : m + r, m - r : m + r]
    assert np.abs(photo_patch - crop_patch).mean() < 12
    assert (
        np.abs(photo_patch - np.asarray(astronaut, np.float32)[cy - r : cy + r, cx - r + 30 : cx + r + 30]).mean() > 25
    )


@pytest.mark.parametrize("turn", [-20, 15])
def test_tilted_face_is_levelled(astronaut, turn):
    photo = astronaut.rotate(turn, resample=Image.BICUBIC)
    before = detect_face(photo)
    assert before is not None and abs(before.tilt + turn) < 10  # rotate() turns counter-clockwise
    after = detect_face(align_face(photo, before))
    assert after is not None and after.eyes is not None and abs(eye_tilt(after)) < 5


@pytest.mark.parametrize("name", ["coffee", "rocket"])
def test_photo_without_a_face_is_a_usage_error(name):
    with pytest.raises(UsageError) as caught:
        align_face(Image.fromarray(getattr(skimage.data, name)()))
    assert caught.value.message.startswith("no face found in")
    assert caught.value.hint == "use a photo where the face is clearly visible and frontal"
    assert caught.value.exit_code == 2


@pytest.mark.parametrize("size", [(153, 153), (512, 512), (300, 200)])
def test_mask_is_white_on_the_face_and_black_in_the_corners(size):
    mask = face_mask(Image.new("RGB", size))
    assert mask.mode == "L" and mask.size == size
    pixels = np.asarray(mask)
    w, h = size
    assert pixels[h // 2, w // 2] == 255 and pixels[int(h * 0.3), w // 2] == 255
    for corner in (pixels[0, 0], pixels[0, -1], pixels[-1, 0], pixels[-1, -1], pixels[h // 2, 0], pixels[h // 2, -1]):
        assert corner == 0
    assert 0.35 < (pixels > 127).mean() < 0.65  # an ellipse of ~0.7 x 0.9 covers about half the square


def test_domains_register_with_their_loaders_and_list():
    from e4t_faces import faces

    from e4tcli.cli import app
    from e4tcli.cli.output import reset_registry
    from e4tcli.datasets import any_images
    from e4tcli.plugins import load_registry

    registry = load_registry()
    assert registry.problems == []
    domains = {name: registry.get(name).domain for name in ("faces", "cats", "art")}
    assert domains["faces"].preprocess is faces.align_face and domains["faces"].loss_mask is faces.face_mask
    assert domains["faces"].dataset is any_images and domains["cats"].dataset is any_images
    assert domains["art"].dataset.__name__ == "wikiart_or_shards"
    reset_registry()
    try:
        result = CliRunner().invoke(app, ["domains"])
    finally:
        reset_registry()
    assert result.exit_code == 0
    assert {line.split()[0] for line in result.stdout.splitlines()[1:]} == {"art", "cats", "faces", "minifaces"}


def test_registering_domains_imports_no_cv2_lmdb_or_torch():
    code = (
        "import sys; from e4tcli.plugins import load_registry; r = load_registry(); "
        "assert {'faces', 'cats', 'art'} <= set(r.names()), r.problems; "
        "print(sorted(m for m in ('cv2', 'lmdb', 'torch', 'numpy', 'PIL') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
