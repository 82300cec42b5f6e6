"""Dataset loaders shared by all domains. Torch-free: PIL in, PIL out.

Every loader is ``factory(path) -> dataset`` with ``len(dataset)``,
``dataset[i]`` (an RGB PIL image, EXIF orientation applied) and
``dataset.skipped`` (what could not be read: skipped, counted and replaced by
the next readable item, never a crash). Optional: ``metadata(i) -> dict`` and
``sample(i) -> (image, metadata)``. Optional packages (lmdb) are imported only
when a dataset is opened.
"""

from e4tcli.datasets.auto import any_images
from e4tcli.datasets.image_folder import IMAGE_SUFFIXES, ImageFolder, image_folder, load_rgb
from e4tcli.datasets.lmdb_images import LmdbImages, lmdb_images, looks_like_lmdb
from e4tcli.datasets.tar_shards import TarShards, expand_braces, looks_like_shards, tar_shards
from e4tcli.datasets.wikiart import WikiArt, wikiart

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageFolder",
    "LmdbImages",
    "TarShards",
    "WikiArt",
    "any_images",
    "expand_braces",
    "image_folder",
    "lmdb_images",
    "load_rgb",
    "looks_like_lmdb",
    "looks_like_shards",
    "tar_shards",
    "wikiart",
]
