"""The one preprocessing truth, in numpy and Pillow: decode → RGB → resize → (normalise).

Training caches images through `load_rgb`, and every later stage (export checks, validate, classify)
uses the same functions, so a model never sees pixels prepared differently from the ones it learnt on.
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
RESIZE_METHOD = "bilinear"  # Pillow's bilinear resize (antialiased when shrinking), straight to S×S
# JPEG draft mode lets libjpeg decode at 1/2, 1/4 or 1/8 scale (7x faster on a 12 MP photo). It is used
# only while the decoded image keeps at least DRAFT_MARGIN times the model's input on each side, so the
# antialiased resize still decides the pixels. Measured with the 8-block int8 student on 1,200 Intel photos
# upscaled to 1024 and 1600 px: pixels move by 0.12-0.14 (of 255) on average, 99.6-99.8% of labels stay
# (re-saving those JPEGs at quality 89 instead of 90 keeps 99.7%); accuracy at 1024 px 92.7% -> 92.5%. Drafting to
# the input size itself (margin 1) keeps only 98.2%. Photos under 2 x 4 x input per side (the 150 px Intel
# photos at 64 px) are never drafted: classify then sees exactly the pixels training saw.
DRAFT_MARGIN = 4


class ImageDecodeError(ValueError):
    """A file that is not a readable image."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode (L, LA, P, RGBA, CMYK, I;16, I, F) to 8-bit RGB; transparency over white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or pixels.max() > 255 else 255.0
        image = Image.fromarray(np.clip(pixels * (255.0 / top), 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


_BOMB_FILTER = ("error", None, Image.DecompressionBombWarning, None, 0)  # as warnings.simplefilter stores it
_bomb_filter_lock = threading.Lock()


def _refuse_decompression_bomb_warnings() -> None:
    """Pillow only warns between its pixel limit and twice it; make that an error, so such images are refused.

    Process-wide and never removed, because warnings.catch_warnings is not thread-safe: it replaces the
    global filter list and puts the old one back on exit, so threads decoding side by side could restore
    each other's lists and decode a bomb unguarded. Installed again if something reset the filters.
    """
    if _BOMB_FILTER not in warnings.filters:
        with _bomb_filter_lock:
            if _BOMB_FILTER not in warnings.filters:
                warnings.simplefilter("error", Image.DecompressionBombWarning)


def open_image(path: str | Path, draft_to: int | None = None) -> Image.Image:
    """Decode a whole file (so truncation is caught here), apply EXIF orientation, return RGB.

    With `draft_to`, a JPEG may be decoded at a reduced scale that keeps both sides >= draft_to.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageDecodeError("a broken or looping symlink" if path.is_symlink() and not path.exists() else
                               "no such file" if not path.exists() else "not a file")
    _refuse_decompression_bomb_warnings()
    try:
        with Image.open(path) as image:
            if draft_to:
                image.draft("RGB", (draft_to, draft_to))  # a no-op for other formats and small JPEGs
            image.load()
            return to_rgb(ImageOps.exif_transpose(image))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"refused: larger than Pillow's decompression-bomb limit ({exc})") from exc
    except PermissionError as exc:
        raise ImageDecodeError("cannot be read (permission denied)") from exc
    except UnidentifiedImageError as exc:
        kind = "an empty file" if path.stat().st_size == 0 else "not an image Pillow can read"
        raise ImageDecodeError(kind) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"corrupt or truncated image ({exc})") from exc


def resize_rgb(image: Image.Image, size: int) -> np.ndarray:
    """An RGB image as a (size, size, 3) uint8 array."""
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    return np.array(image, dtype=np.uint8)  # a writable copy: torch.from_numpy warns on read-only arrays


def load_rgb(path: str | Path, size: int, draft: bool = False) -> np.ndarray:
    """A file as a (size, size, 3) uint8 array; `draft` allows JPEG draft decoding (see DRAFT_MARGIN)."""
    return resize_rgb(open_image(path, size * DRAFT_MARGIN if draft else None), size)


def normalize(pixels: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(N, H, W, 3) uint8 → (N, 3, H, W) float32, (x/255 − mean)/std per channel."""
    x = pixels.astype(np.float32).transpose(0, 3, 1, 2) / np.float32(255)
    m = np.asarray(mean, np.float32).reshape(1, 3, 1, 1)
    s = np.asarray(std, np.float32).reshape(1, 3, 1, 1)
    return (x - m) / s
