"""The tuning loss mask: the face, not the flat background around it.

A reference portrait shows one identity on one background. Tuned on the whole
image, the few steps also learn that background, which the prompt is meant to
choose. The mask keeps the loss on the pixels that differ from the border's
colour (the face and hair), grown by two pixels so that the face's edge counts.
"""

BACKGROUND_TOLERANCE = 24
"""Summed absolute RGB difference under which a pixel counts as the background colour."""
UNIFORM_BORDER_SHARE = 0.5
"""The most common border colour must cover this share of the border, else the background is not flat."""
LEAST_FACE_SHARE = 0.02
"""A mask covering less than this share of the image is taken for a misreading: the whole image is kept."""
GROW_PIXELS = 2


def face_region(image):
    """``image`` (PIL RGB) -> PIL "L" mask: 255 on the face, 0 on the flat background. An image without a
    flat background (or where nearly nothing differs from it) gets an all-white mask: the plain loss."""
    import numpy as np
    from PIL import Image, ImageFilter

    pixels = np.asarray(image.convert("RGB"), dtype=np.int32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    colours, counts = np.unique(border, axis=0, return_counts=True)
    everything = Image.new("L", image.size, 255)
    if counts.max() < UNIFORM_BORDER_SHARE * len(border):
        return everything
    background = colours[counts.argmax()]
    face = np.abs(pixels - background).sum(axis=-1) > BACKGROUND_TOLERANCE
    if face.mean() < LEAST_FACE_SHARE:
        return everything
    mask = Image.fromarray((face * 255).astype(np.uint8))
    return mask.filter(ImageFilter.MaxFilter(2 * GROW_PIXELS + 1))
