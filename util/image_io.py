"""The one image loader shared by the detector (process_images.py) and test.py.

Both sides see exactly the same pixels: :func:`load_image` returns a PIL image in mode 'RGB',
8 bits per channel, EXIF orientation applied. The file on disk is only ever opened for reading;
every normalisation happens in memory:

- EXIF orientation is applied (a photo shot in portrait comes out upright);
- grayscale, bilevel and palette images are expanded to RGB; CMYK and YCbCr are converted
  by PIL's standard formulas (no colour management, embedded ICC profiles are ignored);
- transparency (RGBA, LA, PA, palette with a transparent colour) is composited over
  :data:`ALPHA_BACKGROUND` (white);
- 16-bit images are reduced to 8 bits by ``round(v / 257)`` (65535 -> 255); 32-bit integer
  images ('I') are taken as 16-bit data; float images ('F') are taken as [0, 1] when their
  maximum is <= 1, else as [0, 255], and clipped;
- multi-frame files (GIF, TIFF, animated WebP) give their first frame.

Files that cannot be used raise :class:`ImageLoadError` whose ``reason`` is one of
:data:`LOAD_REASONS`.
"""
from __future__ import annotations

import contextlib
import os
import stat
import struct
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from util.detections_io import DETECTIONS_DIR, LANDMARKS_DIR

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# Pillow decoders tried on a file, whatever its extension says. Restricting them keeps a
# stray PostScript file named .jpg from reaching an external interpreter. (JPEG covers MPO.)
PIL_FORMATS = ("JPEG", "PNG", "BMP", "DIB", "WEBP", "TIFF", "GIF")
ALPHA_BACKGROUND = (255, 255, 255)
DEBUG_VIS_DIR = "debug_vis"
# Folders written by process_images.py; never listed as photo folders, at any depth.
OUTPUT_DIRS = (DETECTIONS_DIR, LANDMARKS_DIR, DEBUG_VIS_DIR)

LOAD_REASONS = {
    "missing": "the file does not exist (or is a broken symbolic link)",
    "not_a_file": "the path is a folder or a special file, not a regular file",
    "permission_denied": "the file cannot be opened for reading",
    "empty_file": "the file is 0 bytes long",
    "not_an_image": "the content is not a JPEG/PNG/BMP/WebP/TIFF/GIF image",
    "truncated": "the image data ends early (incomplete download or copy)",
    "corrupt": "the image data cannot be decoded",
    "too_large": "the image has more pixels than Pillow's decompression-bomb limit",
}


class ImageLoadError(ValueError):
    """An input file could not be read as an image.

    Args:
        path: the file (attribute ``path``).
        reason: a short machine-friendly tag, a key of :data:`LOAD_REASONS` (attribute ``reason``).
        detail: the underlying error's text, may be '' (attribute ``detail``).

    ``str(err)`` is ``"<path>: <reason>"`` plus ``" (<detail>)"`` when there is one.
    """

    def __init__(self, path: str, reason: str, detail: str = ""):
        self.path, self.reason, self.detail = path, reason, detail
        super().__init__(f"{path}: {reason}" + (f" ({detail})" if detail else ""))


def is_image_file(name: str) -> bool:
    """Whether a file name has a photo's extension.

    Args:
        name: a file name or path.

    Returns:
        True when ``name`` ends with one of :data:`IMAGE_EXTENSIONS`, in any letter case.
    """
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_images(folder: str, recursive: bool = False) -> list[str]:
    """Photos under ``folder`` as sorted relative paths (``/``-separated on every OS).

    Skips hidden entries (names starting with '.'), non-image extensions and the output folders
    :data:`OUTPUT_DIRS` at any depth: a photo put inside ``detections/`` (or ``landmarks/``,
    ``debug_vis/``) is never listed, read or touched. Symbolic links to files are listed (and
    read through); with ``recursive``, links to folders are followed once each (cycles are cut).
    Entries with an image extension that are not files are listed too (a FIFO, a device, a
    broken link, and without ``recursive`` a folder named ``x.jpg``), so that the caller reports
    them (:func:`load_image` says ``not_a_file`` or ``missing``) rather than leaving them out in
    silence; with ``recursive`` such a folder is searched like any other.

    Args:
        folder: the folder to list.
        recursive: also list sub-folders (except :data:`OUTPUT_DIRS`).

    Returns:
        Sorted paths relative to ``folder``, ``/``-separated.

    Raises:
        NotADirectoryError: ``folder`` is not a folder.
        OSError: a folder cannot be listed (permissions).
    """
    if not os.path.isdir(folder):
        raise NotADirectoryError(f"not a folder: {folder}")
    found: list[str] = []
    seen_dirs = {os.path.realpath(folder)}
    pending = [""]
    while pending:
        rel_dir = pending.pop()
        with os.scandir(os.path.join(folder, rel_dir)) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            if e.name.startswith("."):
                continue
            rel = f"{rel_dir}/{e.name}" if rel_dir else e.name
            try:
                is_dir = e.is_dir()  # follows links
            except OSError:
                is_dir = False
            if is_dir and recursive:
                if e.name not in OUTPUT_DIRS:
                    real = os.path.realpath(e.path)
                    if real not in seen_dirs:
                        seen_dirs.add(real)
                        pending.append(rel)
            elif is_image_file(e.name):
                found.append(rel)
    return sorted(found)


def load_image(path: str) -> Image.Image:
    """Read a photo as the run uses it; never modifies the file.

    Args:
        path: the photo (formats of :data:`PIL_FORMATS`).

    Returns:
        An RGB 8-bit PIL image (mode 'RGB', (width, height) = ``.size``) with the EXIF orientation
        applied (a broken EXIF block is ignored), other modes converted as the module docstring says.

    Raises:
        ImageLoadError: (reason in :data:`LOAD_REASONS`) for any file that is not a decodable image:
            missing, not a regular file, empty, permission denied, not an image, truncated, corrupt,
            too large.
    """
    _check_regular_file(path)
    with _load_errors(path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path, formats=PIL_FORMATS) as im:
                im.load()
                try:  # in place: no copy of the whole photo when it needs no turning (most photos)
                    ImageOps.exif_transpose(im, in_place=True)
                except Exception:  # a broken EXIF block must not make a good photo unusable
                    pass
                return _to_rgb8(im)  # the decoded image (the file is closed) or a converted one


def read_plain_jpeg(path: str) -> tuple[np.ndarray, tuple[int, int]] | None:
    """A JPEG whose decoded pixels need nothing of :func:`load_image`'s normalisation - 3-channel
    colour (PIL mode 'RGB'), no EXIF turn - and whose file ends with the end-of-image marker, as
    (its bytes, a (n,) uint8 array, and its (width, height)), read without decoding (for a decoder
    elsewhere, e.g. the GPU's); None for any other image, which :func:`load_image` must decode.

    A file cut short (a copy that stopped early) has no end marker: nvJPEG decodes such a file
    without a word, filling what is missing, where PIL reports it truncated; so it goes to PIL.
    So do files with bytes after the marker (PIL reads those as usual).

    Args:
        path: the photo.

    Returns:
        ((n,) uint8 array of the file's bytes, (width, height) from its header), or None.

    Raises:
        ImageLoadError: as :func:`load_image` does for files that are not images; other corrupt
            data is only found out by the decoder.
    """
    _check_regular_file(path)
    with _load_errors(path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path, formats=PIL_FORMATS) as im:
                if im.format != "JPEG" or im.mode != "RGB" or _exif_orientation(im) not in (None, 1):
                    return None
                size = im.size
        data = np.fromfile(path, dtype=np.uint8)
        if data.size < 2 or data[-2] != 0xFF or data[-1] != 0xD9:  # no end-of-image marker last
            return None
        return data, size


def _exif_orientation(im: Image.Image) -> int | None:
    """The EXIF orientation tag (1 = upright), None without one; a broken EXIF block reads as
    upright, as :func:`load_image` treats it."""
    try:
        return im.getexif().get(0x0112)
    except Exception:  # noqa: BLE001
        return None


@contextlib.contextmanager
def _load_errors(path: str):
    """Turn what opening or decoding ``path`` raises into :class:`ImageLoadError`."""
    try:
        yield
    except ImageLoadError:
        raise
    except FileNotFoundError:
        raise ImageLoadError(path, "missing") from None
    except PermissionError as e:
        raise ImageLoadError(path, "permission_denied", str(e)) from None
    except Image.DecompressionBombError as e:
        raise ImageLoadError(path, "too_large", str(e)) from None
    except UnidentifiedImageError:
        raise ImageLoadError(path, "not_an_image", LOAD_REASONS["not_an_image"]) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as e:
        raise ImageLoadError(path, decode_error_reason(e), str(e)) from None


def decode_error_reason(e: BaseException) -> str:
    """Classify a decoder's exception.

    Args:
        e: what a decoder (PIL, torchvision) raised.

    Returns:
        'truncated' (its text says truncated or ended prematurely, or an EOFError), else 'corrupt'
        (both keys of :data:`LOAD_REASONS`).
    """
    msg = str(e)
    return "truncated" if ("truncated" in msg or "ended prematurely" in msg or isinstance(e, EOFError)) else "corrupt"


def load_image_array(path: str) -> np.ndarray:
    """:func:`load_image` as an array.

    Args:
        path: the photo.

    Returns:
        A contiguous ``(H, W, 3)`` uint8 RGB array (row 0 = top).

    Raises:
        ImageLoadError: as :func:`load_image`.
    """
    return np.ascontiguousarray(np.asarray(load_image(path), dtype=np.uint8))


def _check_regular_file(path: str) -> None:
    try:
        st = os.stat(path)  # follows symbolic links
    except FileNotFoundError:
        detail = "broken symbolic link" if os.path.islink(path) else ""
        raise ImageLoadError(path, "missing", detail) from None
    except PermissionError as e:
        raise ImageLoadError(path, "permission_denied", str(e)) from None
    except OSError as e:
        raise ImageLoadError(path, "missing", str(e)) from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageLoadError(path, "not_a_file", "a folder named like a photo (--recursive processes the photos "
                                                 "inside it)")
    if not stat.S_ISREG(st.st_mode):
        raise ImageLoadError(path, "not_a_file", LOAD_REASONS["not_a_file"])
    if st.st_size == 0:
        raise ImageLoadError(path, "empty_file", LOAD_REASONS["empty_file"])


def _to_rgb8(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 'RGB' 8-bit, following the rules in the module docstring."""
    mode = im.mode
    if mode == "RGB":  # decoded into memory by load(): no copy (0.6 ms of ~6 a face), except an
        return im.copy() if im.readonly else im  # image mapped from its file (uncompressed formats)
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(im, dtype=np.float64)
        if mode == "F":
            a = a * 255.0 if np.nanmax(a, initial=0.0) <= 1.0 else a
        else:
            a = np.clip(a, 0, 65535) / 257.0
        g = np.clip(np.nan_to_num(np.round(a)), 0, 255).astype(np.uint8)
        return Image.fromarray(np.ascontiguousarray(np.repeat(g[..., None], 3, axis=2)), "RGB")
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    elif mode == "PA":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "RGBa"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(bg, im).convert("RGB")
    return im.convert("RGB")
