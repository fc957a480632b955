"""Loading the ECG images users bring (PNG/JPEG/BMP/TIFF first frame, a PDF's first page) as RGB; saving ours.

Why a module: user files are the untrusted edge of the system. Everything that is not a usable picture
(empty, truncated, corrupt, not an image, a decompression bomb) becomes one `ImageLoadError` line naming the
file and the problem, before any model sees it; camera EXIF orientation is applied so a phone photo is
upright; grey, palette, 16-bit, CMYK and transparent images are normalised to plain 8-bit RGB (transparent
areas on white paper).

PDF pages are rendered with pypdfium2 (PDFium, the engine of Chrome's viewer): Apache-2.0/BSD licensed,
manylinux/macOS/Windows wheels that carry PDFium itself (no system packages, no Poppler/Ghostscript),
actively maintained, and it renders a page at any chosen dpi.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from rag_ecg.errors import InputError
from rag_ecg.io import atomic_write_with

DEFAULT_MAX_PIXELS = 64_000_000  # 8000 x 8000: a 600 dpi A4 scan (35 Mpx) passes, a bomb does not
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".pdf")
_EXPECTED = "expected PNG, JPEG, BMP, TIFF or PDF"


class ImageLoadError(InputError):
    """A file that cannot be used as an ECG image; the message is one line naming the file and why."""


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, pdf_dpi: int = 200) -> Image.Image:
    """Open an image file (or a PDF's first page at `pdf_dpi`) as an upright 8-bit RGB PIL image.

    Raises ImageLoadError for missing, empty, corrupt, truncated, non-image and over-`max_pixels` files.
    """
    path = Path(path)
    name = path.name or str(path)
    if not path.exists():
        raise ImageLoadError(f"{name}: no such file")
    if not path.is_file():
        raise ImageLoadError(f"{name}: not a file (a folder?)")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(1024)
    except OSError as exc:
        raise ImageLoadError(f"{name}: cannot read ({exc.strerror or exc})") from None
    if size == 0:
        raise ImageLoadError(f"{name}: empty file")
    if head.startswith(b"%PDF"):
        return _load_pdf(path, name, max_pixels, pdf_dpi)
    return _load_raster(path, name, head, max_pixels)


def _load_raster(path: Path, name: str, head: bytes, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is checked below
            im = Image.open(path)
    except Image.DecompressionBombError:
        raise ImageLoadError(f"{name}: image too large (decompression bomb?); limit {max_pixels:,} pixels") from None
    except UnidentifiedImageError:
        raise ImageLoadError(f"{name}: not an image ({_guess_kind(path, head)}; {_EXPECTED})") from None
    except OSError as exc:
        raise ImageLoadError(f"{name}: unreadable image ({_short(exc)})") from None
    with im:
        w, h = im.size
        if w <= 0 or h <= 0:
            raise ImageLoadError(f"{name}: image has no pixels ({w}x{h})")
        if w * h > max_pixels:
            raise ImageLoadError(f"{name}: image too large ({w}x{h} = {w * h:,} pixels; limit {max_pixels:,})")
        try:
            im.seek(0)  # multi-page TIFF / animated files: the first frame
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im.load()
            out = to_rgb(ImageOps.exif_transpose(im))
            return im.copy() if out is im else out  # `im` is closed on leaving the with-block
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageLoadError(f"{name}: corrupt or truncated {im.format or 'image'} ({_short(exc)})") from None


def _load_pdf(path: Path, name: str, max_pixels: int, dpi: int) -> Image.Image:
    import pypdfium2 as pdfium

    try:
        pdf = pdfium.PdfDocument(str(path))
    except pdfium.PdfiumError as exc:
        raise ImageLoadError(f"{name}: unreadable PDF ({_short(exc)}; encrypted or corrupt?)") from None
    try:
        if len(pdf) == 0:
            raise ImageLoadError(f"{name}: PDF has no pages")
        page = pdf[0]
        try:
            w_pt, h_pt = page.get_size()
            w, h = int(round(w_pt * dpi / 72)), int(round(h_pt * dpi / 72))
            if w * h > max_pixels:
                raise ImageLoadError(f"{name}: PDF page at {dpi} dpi is {w}x{h} = {w * h:,} pixels "
                                     f"(limit {max_pixels:,}); use a lower pdf_dpi")
            bitmap = page.render(scale=dpi / 72, fill_color=(255, 255, 255, 255))
            try:
                return to_rgb(bitmap.to_pil())
            finally:
                bitmap.close()
        finally:
            page.close()
    except pdfium.PdfiumError as exc:
        raise ImageLoadError(f"{name}: PDF page cannot be rendered ({_short(exc)})") from None
    finally:
        pdf.close()


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB from any Pillow mode: transparency composited on white, 16-bit/float scaled, CMYK converted."""
    if im.mode == "RGB":
        return im
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I;16"):
            a = a / 257.0
        else:
            lo, hi = float(np.min(a)), float(np.max(a))
            a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        im = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def save_image(image: Image.Image, path: str | Path, **save_kwargs) -> Path:
    """Save atomically in the format the suffix names (`save_kwargs` go to Pillow): never half a PNG on disk."""
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise InputError(f"{path}: unknown image suffix (use .png, .jpg, .bmp, .tif or .webp)")
    return atomic_write_with(path, lambda tmp: image.save(tmp, format=fmt, **save_kwargs))


def _guess_kind(path: Path, head: bytes) -> str:
    """A hint for the error line: what the file seems to be instead."""
    if path.suffix.lower() in (".hea", ".dat", ".atr"):
        return "a WFDB record file: pass the record, not an image"
    if head[:2] == b"PK":
        return "a zip/Office file"
    if head[:5].lower() in (b"<html", b"<!doc") or head[:5] == b"<?xml":
        return "an HTML/XML document"
    if b"\x00" not in head:
        try:
            head.decode("utf-8")
            return "looks like text"
        except UnicodeDecodeError:
            pass
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return f"content does not match its {path.suffix} suffix"
    return "unknown binary format"


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:160]
