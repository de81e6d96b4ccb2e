"""The one image decoder. Every path that reads an image file goes through `open_image`: training
and evaluation data (`engine.data`), `Engine.infer(path)`, `offramp run` and the app's image and
folder sources (`engine.media`), so a file means the same pixels everywhere. Video and camera
frames, which OpenCV hands out as BGR arrays, are converted by the same rules (`from_opencv`).

The rules, in one place:
- Pillow decodes; the EXIF orientation is applied (an upright phone photo is upright everywhere).
- The result is 8-bit RGB. Grey, 1-bit, palette, CMYK and YCbCr images are converted by Pillow.
- 16-bit samples keep their high byte: value >> 8, so 1000 -> 3 and 65535 -> 255. This is what
  Pillow itself does to 16-bit colour PNG and TIFF, so 16-bit grey is scaled the same way and the
  colour layout of a file never changes its brightness. 32-bit integer images above 255 are taken
  as 16-bit; float images in 0..1 are scaled to 0..255, others clipped.
- Transparency is composited on white (integer arithmetic, the same for files and frames).
- At most `MAX_PIXELS` pixels (width x height), checked from the header before any decoding.
- Truncated files are refused (Pillow's LOAD_TRUNCATED_IMAGES is left off), as is anything Pillow
  calls a decompression bomb; only regular files are opened (never a FIFO or a device).
Every failure is an `ImageError` naming the file, with a short `reason`.
"""
from __future__ import annotations

import io
import logging
import os
import re
import stat
import warnings
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

# the files a folder's listing reads as images, everywhere (training data, `offramp run`, the app's
# folder source): torchvision's list and GIF (its first frame, as a single GIF file is read)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
MAX_PIXELS = 80_000_000  # 80 megapixels: above the default output of any common camera; 240 MB as RGB

# Our limit is below Pillow's warning threshold, so every image Pillow would warn about is refused
# here anyway (with our message); its warning would only add a second, different line.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

ImageSource = str | os.PathLike | bytes | bytearray | BinaryIO


class ImageError(OSError, ValueError):
    """A file that is not a readable image, or too large. `str()` is one sentence naming the file;
    `reason` is the short cause ("does not exist", "unreadable", "not a regular file", "zero bytes",
    "not an image", "corrupt", "too large (...)", "unsupported colour mode ...")."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"cannot read image {name}: {reason}")
        self.name, self.reason = name, reason

    def __reduce__(self):  # picklable across DataLoader worker processes
        return type(self), (self.name, self.reason)


def too_large_reason(pixels: int, size: tuple[int, int] | None = None) -> str:
    dims = f"{size[0]}x{size[1]} = " if size else ""
    return (f"too large ({dims}{pixels:,} pixels; the limit is {MAX_PIXELS:,}, "
            f"{MAX_PIXELS / 1e6:g} megapixels): scale it down first")


# -- files ----------------------------------------------------------------------------------------
def open_image(src: ImageSource, *, name: str | None = None, draft: int | None = None) -> tuple[Image.Image, str]:
    """(8-bit RGB PIL image, the file's own mode) of an image file, bytes or file object.

    `name` is how errors name it (default: the path). `draft` lets JPEG decode at a reduced size
    (for quick checks; the size limit still applies to the full size). Raises ImageError."""
    if name is None:
        name = os.fspath(src) if isinstance(src, (str, os.PathLike)) else "<bytes>"
    if isinstance(src, (bytes, bytearray)):
        if not src:
            raise ImageError(name, "zero bytes")
        return _decode(io.BytesIO(src), name, draft)
    if isinstance(src, (str, os.PathLike)):
        with _open_file(src, name) as f:  # closed here even for multi-frame files Pillow would keep open
            return _decode(f, name, draft)
    return _decode(src, name, draft)


def load_image(src: ImageSource, *, name: str | None = None) -> Image.Image:
    """An image file, bytes or file object as an 8-bit RGB PIL image (see the module's rules).
    Raises ImageError naming the file."""
    return open_image(src, name=name)[0]


def read_rgb(src: ImageSource, *, name: str | None = None) -> np.ndarray:
    """An image file as an (h, w, 3) uint8 RGB array (see the module's rules). Raises ImageError."""
    return np.asarray(load_image(src, name=name))


def _open_file(path: str | os.PathLike, name: str) -> BinaryIO:
    try:
        st = os.stat(path)  # before open(): opening a FIFO would wait for a writer forever
    except FileNotFoundError:
        raise ImageError(name, "does not exist") from None
    except OSError as err:  # a link loop, a path through a file, no permission
        raise ImageError(name, f"unreadable ({err.strerror or err})") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(name, "is a folder, not an image file")
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(name, "not a regular file")
    if st.st_size == 0:
        raise ImageError(name, "zero bytes")
    try:
        return open(path, "rb")  # noqa: SIM115 - the caller's `with` closes it
    except OSError as err:
        raise ImageError(name, f"unreadable ({err.strerror or err})") from None


def _decode(fp: BinaryIO, name: str, draft: int | None) -> tuple[Image.Image, str]:
    try:
        img = Image.open(fp)
    except UnidentifiedImageError:
        raise ImageError(name, "not an image") from None
    except Image.DecompressionBombError as err:  # more than twice Pillow's own limit: the size is in its message
        m = re.search(r"\((\d+) pixels\)", str(err))
        raise ImageError(name, too_large_reason(int(m.group(1)) if m else 2 * MAX_PIXELS)) from None
    except Exception as err:  # noqa: BLE001 - a hostile header can raise anything inside Pillow
        log.debug("cannot open %s", name, exc_info=True)
        raise ImageError(name, "corrupt") from err
    mode = img.mode
    w, h = img.size
    if w * h > MAX_PIXELS:
        raise ImageError(name, too_large_reason(w * h, (w, h)))
    if w == 0 or h == 0:
        raise ImageError(name, f"corrupt (its size is {w}x{h} pixels)")
    try:
        if draft is not None and img.format == "JPEG":
            img.draft(None, (draft, draft))
        img.load()  # decode now: a truncated or corrupt file fails here, not later
    except Exception as err:  # noqa: BLE001 - any decoder failure: the file is damaged
        log.debug("cannot decode %s", name, exc_info=True)
        raise ImageError(name, "corrupt") from err
    try:
        ImageOps.exif_transpose(img, in_place=True)
    except Exception:  # noqa: BLE001 - unreadable EXIF: the pixels are still good, shown as stored
        log.debug("ignoring the unreadable EXIF orientation of %s", name, exc_info=True)
    if img.mode == "RGB":
        return img, mode
    try:
        return Image.fromarray(pil_to_rgb(img), "RGB"), mode
    except ImageError:
        raise
    except Exception as err:  # noqa: BLE001 - a mode Pillow cannot convert
        log.debug("cannot convert %s (mode %s)", name, mode, exc_info=True)
        raise ImageError(name, f"unsupported colour mode {mode}") from err


def pil_to_rgb(img: Image.Image) -> np.ndarray:
    """(h, w, 3) uint8 RGB of a decoded PIL image of any mode."""
    if img.mode == "RGB":
        return np.asarray(img)
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _grey_to_rgb(to_uint8(np.asarray(img)))
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = np.asarray(img.convert("RGBA"))
        return _on_white(rgba[..., :3], rgba[..., 3])
    return np.asarray(img.convert("RGB"))


# -- arrays: the depth, alpha and grey rules, shared by files and frames --------------------------
def to_uint8(a: np.ndarray) -> np.ndarray:
    """Samples of any depth as uint8 by the module's rules: 16-bit (and integer values above 255)
    keep their high byte, floats in 0..1 are scaled by 255, anything else is clipped."""
    if a.dtype == np.uint8:
        return a
    if np.issubdtype(a.dtype, np.floating):
        a = np.nan_to_num(a.astype(np.float32, copy=False), nan=0.0, posinf=255.0, neginf=0.0)
        peak = float(a.max(initial=0.0))
        if peak <= 1.0:
            return np.rint(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)
        a = np.clip(a, 0, 65535).astype(np.uint32)
    if a.dtype.itemsize == 2 or int(a.max(initial=0)) > 255:  # a 16-bit image: keep the high byte
        return np.clip(a.astype(np.int64) >> 8, 0, 255).astype(np.uint8)
    return np.clip(a, 0, 255).astype(np.uint8)


def _on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """`rgb` (h, w, 3 uint8) over a white background through `alpha` (h, w uint8), rounded."""
    a = alpha.astype(np.uint32)[..., None]
    out = (rgb.astype(np.uint32) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=2)


def from_opencv(frame: np.ndarray) -> np.ndarray:
    """A video or camera frame as OpenCV gives it (BGR, BGRA or grey; 8- or 16-bit, or float) as an
    (h, w, 3) uint8 RGB array, converted by the same rules as image files. Raises ValueError for an
    array that is no frame."""
    return np.ascontiguousarray(opencv_bgr(frame)[..., ::-1])


def opencv_bgr(frame: np.ndarray) -> np.ndarray:
    """`from_opencv` in OpenCV's channel order: (h, w, 3) uint8 BGR. An 8-bit BGR frame is returned
    as it is (no copy), so a camera loop pays nothing for the check."""
    if not isinstance(frame, np.ndarray) or frame.ndim not in (2, 3) or 0 in frame.shape[:2]:
        raise ValueError(f"a frame must be an HxW, HxWx3 or HxWx4 array, not {getattr(frame, 'shape', frame)!r}")
    if frame.ndim == 3 and frame.shape[2] == 1:
        frame = frame[..., 0]
    if frame.ndim == 3 and frame.shape[2] not in (3, 4):
        raise ValueError(f"a frame must be an HxW, HxWx3 or HxWx4 array, not shape {frame.shape}")
    frame = to_uint8(frame)
    if frame.ndim == 2:
        return _grey_to_rgb(frame)
    if frame.shape[2] == 4:
        return _on_white(frame[..., :3], frame[..., 3])
    return frame


def to_bgr(rgb: np.ndarray) -> np.ndarray:
    """An (h, w, 3) RGB array in OpenCV's BGR order (contiguous copy)."""
    return np.ascontiguousarray(rgb[..., ::-1])
