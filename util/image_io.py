"""The one image loader shared by the detector (process_images.py) and test.py.

Both sides see exactly the same pixels: a PIL image in mode 'RGB', 8 bits per channel,
EXIF orientation applied. The file on disk is only ever read.
"""
from __future__ import annotations

import os

from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class ImageLoadError(ValueError):
    """An input file could not be read as an image; ``reason`` is a short machine-friendly tag."""

    def __init__(self, path: str, reason: str, detail: str = ""):
        self.path, self.reason, self.detail = path, reason, detail
        super().__init__(f"{path}: {reason}" + (f" ({detail})" if detail else ""))


def is_image_file(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def load_image(path: str) -> Image.Image:
    """Read ``path`` and return an RGB uint8 PIL image with EXIF orientation applied."""
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            return im.convert("RGB")
    except FileNotFoundError:
        raise ImageLoadError(path, "missing") from None
    except Exception as e:  # PIL raises many types for bad files
        raise ImageLoadError(path, "unreadable", str(e)) from None
