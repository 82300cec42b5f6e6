"""Find, align and crop a face in an arbitrary photo; the face-region loss mask.

The detector is OpenCV's Haar cascades, whose weights ship inside the
``opencv-python-headless`` wheel (``cv2.data.haarcascades``), so it works
offline. Alignment follows the spirit of FFHQ's: rotate so that the eyes are
level (when both are found; a face found only in a turned copy of the photo is
turned back by that angle), then cut a square centred on the face in which
the face box fills about the middle 60%. Pixels beyond the photo's border are
mirrored. The output keeps the photo's scale; resizing is the caller's.

cv2 is imported inside the functions: importing this module stays cheap.
"""

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

from e4tcli.errors import UsageError

FACE_FRACTION = 0.6
"""Width of the detected face box as a fraction of the crop's side."""
CENTRE_DROP = 0.08
"""The crop centre sits this fraction of the face box below the box centre (chin and mouth in frame)."""
DETECT_SIDE = 800
"""Photos are detected on a copy whose longer side is at most this (speed; Haar needs no more)."""
MAX_EYE_TILT = 35.0
"""Degrees: an eye line steeper than this (in the upright view) is a false eye detection."""


ANGLES = (0.0, 25.0, -25.0)
"""Haar cascades find upright faces only: a photo without one is searched again rotated by these (degrees)."""


@dataclass(frozen=True)
class Face:
    """A face in photo coordinates: its box (x, y, width, height), its tilt and, when found, its eyes."""

    box: tuple[float, float, float, float]
    tilt: float = 0.0
    """Degrees the face is turned clockwise on screen (from the eye line when the eyes are found)."""
    eyes: Optional[tuple[tuple[float, float], tuple[float, float]]] = None
    """Centres of the eyes, the left one on screen first."""


@lru_cache(maxsize=None)
def _cascade(name: str):
    import cv2

    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + name)
    if cascade.empty():
        raise RuntimeError(f"OpenCV's {name} could not be loaded from {cv2.data.haarcascades}")
    return cascade


def _gray(image, limit: int):
    """The photo as an equalised grayscale array no larger than ``limit``, and its scale factor."""
    import cv2
    import numpy as np

    array = np.asarray(image.convert("L"))
    scale = min(1.0, limit / max(array.shape))
    if scale < 1.0:
        array = cv2.resize(
            array, (round(array.shape[1] * scale), round(array.shape[0] * scale)), interpolation=cv2.INTER_AREA
        )
    return cv2.equalizeHist(array), scale


def _find_eyes(gray, box):
    """The two eye centres inside the upper part of the face ``box`` (grayscale coordinates), or None."""
    x, y, w, h = box
    top = gray[y : y + int(h * 0.6), x : x + w]
    smallest = max(8, w // 10)
    for name in ("haarcascade_eye.xml", "haarcascade_eye_tree_eyeglasses.xml"):
        found = _cascade(name).detectMultiScale(top, scaleFactor=1.1, minNeighbors=5, minSize=(smallest, smallest))
        left = [e for e in found if e[0] + e[2] / 2 < w / 2]
        right = [e for e in found if e[0] + e[2] / 2 >= w / 2]
        if left and right:
            eyes = []
            for side in (left, right):
                ex, ey, ew, eh = max(side, key=lambda e: e[2] * e[3])
                eyes.append((x + ex + ew / 2, y + ey + eh / 2))
            return eyes
    return None


def _upright_face(gray):
    """The largest upright face box in a grayscale array and its eyes, or None."""
    smallest = max(24, min(gray.shape) // 12)
    faces = _cascade("haarcascade_frontalface_alt2.xml").detectMultiScale(
        gray, scaleFactor=1.1, minNeighbors=5, minSize=(smallest, smallest)
    )
    if len(faces) == 0:
        return None
    box = tuple(int(v) for v in max(faces, key=lambda f: f[2] * f[3]))
    return box, _find_eyes(gray, box)


def detect_face(image) -> Optional[Face]:
    """The largest frontal face in a PIL photo, upright or tilted up to ~35 degrees, or None."""
    import cv2
    import numpy as np

    gray, scale = _gray(image, DETECT_SIDE)
    height, width = gray.shape
    for angle in ANGLES:
        # Turning the photo counter-clockwise by `angle` makes a face tilted by `angle` upright.
        matrix = cv2.getRotationMatrix2D((width / 2, height / 2), angle, 1.0)
        turned = (
            gray if angle == 0 else cv2.warpAffine(gray, matrix, (width, height), borderMode=cv2.BORDER_REFLECT_101)
        )
        found = _upright_face(turned)
        if found is None:
            continue
        (x, y, w, h), eyes = found
        back = cv2.invertAffineTransform(matrix)

        def to_photo(px, py):
            u, v = back @ np.array([px, py, 1.0])
            return float(u / scale), float(v / scale)

        cx, cy = to_photo(x + w / 2, y + h / 2)
        box = (cx - w / scale / 2, cy - h / scale / 2, w / scale, h / scale)
        tilt = angle
        if eyes is not None:
            (x0, y0), (x1, y1) = eyes
            eye_tilt = math.degrees(math.atan2(y1 - y0, x1 - x0))
            if abs(eye_tilt) <= MAX_EYE_TILT:  # a steeper eye line is a false eye detection
                tilt = angle + eye_tilt
                eyes = (to_photo(x0, y0), to_photo(x1, y1))
            else:
                eyes = None
        return Face(box, tilt, eyes)
    return None


def align_face(image, face: Optional[Face] = None):
    """The face of a PIL photo: eyes levelled, cropped to a square the face fills ~60% of.

    Raises a UsageError when no face is found.
    """
    import cv2
    import numpy as np
    from PIL import Image

    face = face or detect_face(image)
    if face is None:
        name = getattr(image, "filename", "") or "the image"
        raise UsageError(
            f"no face found in {name} (the faces domain tunes on one clearly visible face)",
            hint="use a photo where the face is clearly visible and frontal",
        )
    x, y, w, h = face.box
    turn = math.radians(face.tilt)  # "down" for a face turned clockwise by `tilt` on screen
    centre = (x + w / 2 - CENTRE_DROP * h * math.sin(turn), y + h / 2 + CENTRE_DROP * h * math.cos(turn))
    side = max(1, round(max(w, h) / FACE_FRACTION))
    # Rotate about the face centre by the eye tilt, then move that centre to the crop's middle.
    matrix = cv2.getRotationMatrix2D(centre, face.tilt, 1.0)
    matrix[:, 2] += (side / 2 - centre[0], side / 2 - centre[1])
    pixels = cv2.warpAffine(
        np.asarray(image.convert("RGB")), matrix, (side, side), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT_101
    )
    return Image.fromarray(pixels)


def face_mask(image):
    """An "L" mask the size of an aligned face crop: a soft white ellipse over the face, black elsewhere.

    It relies on the framing ``align_face`` produces (``tune`` aligns the photo
    before asking for the mask), so it needs no second detection. The ellipse
    covers the face box with some forehead and chin, about 70% x 90% of the crop.
    """
    from PIL import Image, ImageDraw, ImageFilter

    width, height = image.size
    scale = 4  # draw large and shrink: smooth edges without a blur radius that eats a small mask
    mask = Image.new("L", (width * scale, height * scale), 0)
    cx, cy = width * scale / 2, height * scale * 0.5
    rx, ry = width * scale * 0.35, height * scale * 0.45
    ImageDraw.Draw(mask).ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=255)
    mask = mask.filter(ImageFilter.GaussianBlur(radius=width * scale * 0.02))
    return mask.resize((width, height), Image.BILINEAR)
