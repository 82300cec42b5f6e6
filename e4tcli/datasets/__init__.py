"""Dataset loaders shared by all domains. Torch-free: PIL in, PIL out."""

from e4tcli.datasets.image_folder import IMAGE_SUFFIXES, ImageFolder, image_folder, load_rgb

__all__ = ["IMAGE_SUFFIXES", "ImageFolder", "image_folder", "load_rgb"]
