"""One image file decoded as hostile input: sniffed format, bounded memory, RGB, center crop.

:func:`read_image` decodes only with the PIL plugins of :data:`IMAGE_EXTENSIONS` (by content,
whatever a file's name says; never EPS, which PIL hands to Ghostscript), within PIL's
decompression-bomb limit and the memory budget (checked from the header, before any pixel is
decoded), and resizes at a cost bounded by the output size.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..errors import DataError
from ..guard import check_memory
from .safe_files import open_regular

__all__ = ["ALPHA_BACKGROUND", "IMAGE_EXTENSIONS", "read_image", "resized_bytes"]

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".pbm", ".pgm", ".png", ".ppm",
                    ".tif", ".tiff", ".webp")
#: The colour transparent pixels are composited onto (alpha blending, as a viewer shows them on a page).
ALPHA_BACKGROUND = (255, 255, 255)
#: The PIL decoders an image folder may use: the formats of IMAGE_EXTENSIONS, sniffed by content.
#: Never EPS (PIL runs Ghostscript on it), nor any other plugin, whatever a file's name says.
_PIL_FORMATS = ("BMP", "GIF", "JPEG", "PPM", "PNG", "TIFF", "WEBP")
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}  # PIL: else 4


def _decode_bytes(w: int, h: int, mode: str) -> int:
    """Estimated peak bytes of decoding a ``w x h`` PIL image of ``mode`` and turning it into 8-bit
    RGB (:func:`_to_rgb8`): the decoded pixels plus at most four 4-byte-per-pixel copies."""
    return w * h * (_MODE_BYTES.get(mode, 4) + 16)


def resized_bytes(size: int) -> int:
    """Estimated bytes of one image's final ``size x size`` RGB (PIL's, its resize pass, numpy's, torch's)."""
    return 16 * size * size


def _to_rgb8(im: Any) -> Any:
    """8-bit RGB of a decoded PIL image, whatever its mode.

    16-bit samples (``I;16*``, and ``I``, which PIL gives 16-bit PGM/TIFF) are scaled by
    ``round(v * 255 / 65535)`` -- PIL's own conversion clips them at 255, i.e. white; ``F`` keeps
    PIL's 0..255 scale (rounded, clipped, NaN as 0); an alpha channel or a transparent colour
    (``RGBA``, ``LA``, ``PA``, ``La``, ``RGBa``, palette or grey ``transparency``) is composited onto
    :data:`ALPHA_BACKGROUND`, so hidden colours never show; everything else (``1``, ``L``, ``P``,
    ``CMYK``, ``YCbCr``, ...) is PIL's conversion.
    """
    if im.mode.startswith("I;16") or im.mode == "I":
        v = np.asarray(im)
        v = (np.clip(v, 0, 65535) if im.mode == "I" else v).astype(np.uint32)
        v *= 255
        v += 32767
        v //= 65535
        im = Image.fromarray(v.astype(np.uint8), "L")
    elif im.mode == "F":
        v = np.nan_to_num(np.asarray(im, dtype=np.float32), nan=0.0)
        im = Image.fromarray(np.clip(np.rint(v), 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
        im = (im.convert("LA") if im.mode == "La" else im).convert("RGBA")
        background = Image.new("RGBA", im.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, im).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def read_image(path: Path, size: int) -> Tensor:
    """uint8 (3, size, size): RGB (:func:`_to_rgb8`), the center square of the shorter side resized
    to ``size`` (bilinear, antialiased) -- what resizing the shorter side and cropping the center
    gives, computed on the crop alone, so a 1 x 100000 image costs what a square one does.

    Refused: a file that is not a regular file, or not one of the formats of ``IMAGE_EXTENSIONS``
    (by content, whatever its name), an image above PIL's decompression-bomb limit
    (``PIL.Image.MAX_IMAGE_PIXELS``: an error here, not PIL's warning), an image whose decoding
    would need more than the memory budget (:class:`~sepconv.errors.ResourceError`, checked from
    its header before any pixel is decoded), a truncated or malformed file (:class:`DataError`).
    """
    f, _ = open_regular(path)
    with f, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(f, formats=_PIL_FORMATS) as im:
                w, h = im.size
                check_memory(_decode_bytes(w, h, im.mode), f"{path}: decoding its {w}x{h} {im.mode} pixels")
                im.load()
                im = _to_rgb8(im)
            scale = size / min(w, h)
            new = (max(size, round(w * scale)), max(size, round(h * scale)))
            left, top = (new[0] - size) // 2, (new[1] - size) // 2
            if new == (w, h):
                im = im.crop((left, top, left + size, top + size))
            else:  # the crop of the resized image as a box in the original: the same pixels, up to +-1
                sx, sy = w / new[0], h / new[1]
                im = im.resize((size, size), Image.Resampling.BILINEAR,
                               box=(left * sx, top * sy, (left + size) * sx, (top + size) * sy))
            pixels = np.asarray(im, dtype=np.uint8)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
            raise DataError(f"{path}: refused as a decompression bomb ({e}; the limit is "
                            f"PIL.Image.MAX_IMAGE_PIXELS)") from None
        except Exception as e:  # noqa: BLE001 -- a malformed image can make a decoder raise almost anything
            if isinstance(e, (DataError, MemoryError)):
                raise
            raise DataError(f"{path}: cannot read image ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:200]})") from None
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)
