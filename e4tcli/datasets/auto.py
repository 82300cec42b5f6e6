"""Pick a dataset loader from what is on disk."""

from pathlib import Path
from typing import Callable, Union

from e4tcli.datasets.image_folder import image_folder
from e4tcli.datasets.lmdb_images import LmdbImages, looks_like_lmdb
from e4tcli.datasets.tar_shards import TarShards, looks_like_shards


def any_images(path: Union[str, Path], folder: Callable = image_folder):
    """The dataset at ``path``, whatever its format.

    - a folder holding ``data.mdb`` (or that file): an LMDB database (LSUN);
    - a ``.tar`` file, a folder holding ``.tar`` files, or a pattern such as
      ``shards-{000..009}.tar``: webdataset tar shards;
    - anything else: ``folder(path)``, by default a folder of images searched
      recursively (FFHQ, CelebA-HQ...).
    """
    if looks_like_lmdb(path):
        return LmdbImages(path)
    if looks_like_shards(path):
        return TarShards(path)
    return folder(path)
