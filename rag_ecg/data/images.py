"""Loading the ECG pictures users bring (PNG/JPEG/BMP/TIFF/WebP, iPhone HEIC/HEIF, a GIF's or TIFF's first frame,
any page of a PDF) as RGB; saving ours. Every picture the project reads goes through `load_image` / `decode_image`.

Why a module: user files are the untrusted edge of the system. Everything that is not a usable picture
(empty, truncated, corrupt, not an image, a format we do not read, a decompression bomb, a shape no ECG page
has) becomes one `ImageLoadError` line naming the file and the problem, before any model sees it; camera EXIF
orientation is applied so a phone photo is upright; grey, palette, 16-bit, CMYK and transparent images are
normalised to plain 8-bit RGB (transparent areas on white paper).

Only the decoders in ALLOWED_FORMATS are ever asked to open a file (Pillow's `formats=`): content is
identified by its bytes, not its name, and without the restriction PostScript named `chart.png` would be
handed to Ghostscript (Pillow's EPS plugin), a whole interpreter exposed to user files. HEIC/HEIF (what
iPhones save) is decoded by pillow-heif's opener (libheif + libde265, inside its wheel), registered as Pillow's
"HEIF" format and allowed like the others; libheif applies the file's rotation (irot/imir, which phones write
with the EXIF orientation) and pillow-heif then resets the EXIF tag, so a photo is turned once, not twice.

PDF pages are rendered with pypdfium2 (PDFium, the engine of Chrome's viewer): Apache-2.0/BSD licensed,
manylinux/macOS/Windows wheels that carry PDFium itself (no system packages, no Poppler/Ghostscript),
actively maintained, and it renders a page at any chosen dpi. Every page counts (a cart's export is often one
ECG a page): `load_image(path, page=k)`, `pdf_page_count`; callers name page k+1 of a multi-page PDF
`file.pdf#page=N` (`page_name` / `split_page`, the PDF open-parameter form viewers understand) and read at most
MAX_PDF_PAGES pages of one file, so a huge PDF cannot keep a batch busy for ever.
"""
from __future__ import annotations

import io
import re
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pillow_heif import register_heif_opener

from rag_ecg.errors import InputError
from rag_ecg.io import atomic_write_with

DEFAULT_MAX_PIXELS = 64_000_000  # 8000 x 8000: a 600 dpi A4 scan (35 Mpx) passes, a bomb does not
MIN_SIDE = 32  # pixels: anything smaller is an icon, not a readable ECG page
MAX_ASPECT = 20.0  # longest side / shortest side: a long rhythm strip is ~10:1; a 100x640,000 sliver is not a page
ALLOWED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF", "HEIF")  # Pillow decoders (JPEG also opens MPO)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".heic", ".heif", ".pdf")
FORMATS = "PNG, JPEG, BMP, TIFF, WebP, GIF, HEIC/HEIF or PDF"  # what error lines say we read
_EXPECTED = f"expected {FORMATS}"
MAX_PDF_PAGES = 100  # pages of one PDF a batch reads; the rest get one error line
_HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1")
_PAGE = re.compile(r"(.+\.pdf)#page=([1-9][0-9]*)", re.IGNORECASE)

# Only the primary picture is ever wanted: no embedded thumbnails (a different, smaller picture), depth maps or
# auxiliary images are parsed.
register_heif_opener(thumbnails=False, depth_images=False, aux_images=False)


class ImageLoadError(InputError):
    """A file that cannot be used as an ECG image; the message is one line naming the file and why."""


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, pdf_dpi: int = 200,
               page: int = 0) -> Image.Image:
    """Open an image file (or page `page`, 0-based, of a PDF at `pdf_dpi`) as an upright 8-bit RGB PIL image.

    Raises ImageLoadError for missing, empty, corrupt, truncated, non-image, not-allowed-format,
    over-`max_pixels` and implausibly shaped (tiny, sliver) files, and for a page the file does not have.
    """
    path = Path(path)
    name = path.name or str(path)
    size, head = _head(path, name)
    if size == 0:
        raise ImageLoadError(f"{name}: empty file")
    if head.startswith(b"%PDF"):
        return _load_pdf(path, name, max_pixels, pdf_dpi, page)
    if page:
        raise ImageLoadError(f"{name}: no page {page + 1} (only a PDF has pages)")
    return _load_raster(path, name, head, max_pixels)


def pdf_page_count(path: str | Path) -> int:
    """How many pages a PDF has (1 for any other file), without rendering one: PDFium reads the page tree only.
    Raises ImageLoadError for a missing or unreadable file."""
    path = Path(path)
    name = path.name or str(path)
    if not _head(path, name)[1].startswith(b"%PDF"):
        return 1
    pdf = _open_pdf(path, name)
    try:
        return len(pdf)
    finally:
        pdf.close()


def page_name(name: str, page: int) -> str:
    """What page `page` (0-based) of a multi-page PDF is called: `scan.pdf#page=2` (1-based, as viewers count)."""
    return f"{name}#page={page + 1}"


def split_page(name: str) -> tuple[str, int]:
    """`scan.pdf#page=2` -> ("scan.pdf", 1); any other name -> (name, 0)."""
    m = _PAGE.fullmatch(name)
    return (m.group(1), int(m.group(2)) - 1) if m else (name, 0)


def _head(path: Path, name: str) -> tuple[int, bytes]:
    """(size, first KiB) of a file, or the ImageLoadError saying why it cannot be read."""
    if not path.exists():
        raise ImageLoadError(f"{name}: no such file")
    if not path.is_file():
        raise ImageLoadError(f"{name}: not a file (a folder?)")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            return size, f.read(1024)
    except OSError as exc:
        raise ImageLoadError(f"{name}: cannot read ({exc.strerror or exc})") from None


def decode_image(data: bytes, name: str = "image", max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Picture bytes held in memory (a `data:` URL, a worker's PNG) -> upright RGB, by the same rules as
    `load_image` (no PDF); `name` is what the error line calls it."""
    if not data:
        raise ImageLoadError(f"{name}: empty picture")
    return _load_raster(io.BytesIO(data), name, bytes(data[:1024]), max_pixels)


def check_shape(name: str, w: int, h: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Refuse sizes no ECG page has, before anything is decoded: no pixels, over `max_pixels` (a
    decompression bomb), under MIN_SIDE a side, or longer than MAX_ASPECT:1 (a sliver that later stages
    would scale up to gigabytes)."""
    if w <= 0 or h <= 0:
        raise ImageLoadError(f"{name}: image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise ImageLoadError(f"{name}: image too large ({w}x{h} = {w * h:,} pixels; limit {max_pixels:,})")
    if min(w, h) < MIN_SIDE:
        raise ImageLoadError(f"{name}: {w}x{h} is too small for an ECG page (at least {MIN_SIDE} pixels a side)")
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise ImageLoadError(f"{name}: {w}x{h} is not the shape of an ECG page (aspect ratio "
                             f"{max(w, h) / min(w, h):,.0f}:1; at most {MAX_ASPECT:.0f}:1)")


def _load_raster(src: Path | BinaryIO, name: str, head: bytes, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is checked below
            im = Image.open(src, formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError:
        raise ImageLoadError(f"{name}: image too large (decompression bomb?); limit {max_pixels:,} pixels") from None
    except UnidentifiedImageError:
        if head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS:  # ours, but libheif could not open it
            raise ImageLoadError(f"{name}: unreadable HEIC/HEIF image (corrupt, truncated, or not HEVC-coded)") from None
        found = _sniff(head)
        if found:
            raise ImageLoadError(f"{name}: {found} is not an allowed picture format ({_EXPECTED})") from None
        raise ImageLoadError(f"{name}: not an image ({_guess_kind(Path(name), head)}; {_EXPECTED})") from None
    except OSError as exc:
        raise ImageLoadError(f"{name}: unreadable image ({_short(exc)})") from None
    with im:
        w, h = im.size
        if w * h > max_pixels:
            raise ImageLoadError(f"{name}: image too large ({w}x{h} = {w * h:,} pixels; limit {max_pixels:,})")
        check_shape(name, w, h, max_pixels)
        try:
            if im.format != "HEIF":  # a HEIF holding several pictures opens at its primary one: keep it
                im.seek(0)  # multi-page TIFF / animated files: the first frame
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im.load()
            out = to_rgb(ImageOps.exif_transpose(im))
            return im.copy() if out is im else out  # `im` is closed on leaving the with-block
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageLoadError(f"{name}: corrupt or truncated {im.format or 'image'} ({_short(exc)})") from None


def _open_pdf(path: Path, name: str):
    import pypdfium2 as pdfium

    try:
        return pdfium.PdfDocument(str(path))
    except pdfium.PdfiumError as exc:
        raise ImageLoadError(f"{name}: unreadable PDF ({_short(exc)}; encrypted or corrupt?)") from None


def _load_pdf(path: Path, name: str, max_pixels: int, dpi: int, index: int) -> Image.Image:
    import pypdfium2 as pdfium

    pdf = _open_pdf(path, name)
    try:
        n = len(pdf)
        if n == 0:
            raise ImageLoadError(f"{name}: PDF has no pages")
        if not 0 <= index < n:
            raise ImageLoadError(f"{name}: PDF has {n} page{'s' if n > 1 else ''}, no page {index + 1}")
        name = page_name(name, index) if n > 1 else name  # error lines name the page of a multi-page PDF
        page = pdf[index]
        try:
            w_pt, h_pt = page.get_size()
            w, h = int(round(w_pt * dpi / 72)), int(round(h_pt * dpi / 72))
            if w * h > max_pixels:
                raise ImageLoadError(f"{name}: PDF page at {dpi} dpi is {w}x{h} = {w * h:,} pixels "
                                     f"(limit {max_pixels:,}); use a lower pdf_dpi")
            check_shape(name, w, h, max_pixels)
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


_SIGNATURES = (  # (offset, magic bytes, what it is): formats people have that we do not read
    (0, b"%!PS", "PostScript/EPS"), (0, b"\xc5\xd0\xd3\xc6", "PostScript/EPS"), (0, b"8BPS", "Photoshop PSD"),
    (4, b"ftypavif", "AVIF"), (0, b"\x00\x00\x00\x0cjP  ", "JPEG 2000"), (0, b"\xff\x4f\xff\x51", "JPEG 2000"),
    (0, b"\x00\x00\x01\x00", "Windows icon (ICO)"), (0, b"icns", "Mac icon (ICNS)"), (0, b"gimp xcf", "GIMP XCF"),
    (0, b"/* XPM */", "XPM"), (0, b"DDS ", "DirectDraw DDS"), (0, b"qoif", "QOI"), (128, b"DICM", "DICOM"),
    (0, b"\x76\x2f\x31\x01", "OpenEXR"), (0, b"SIMPLE  =", "FITS"), (0, b"\x59\xa6\x6a\x95", "Sun raster"),
)


def _sniff(head: bytes) -> str | None:
    """The picture/document format the first bytes show, when it is one we refuse to decode."""
    for offset, magic, what in _SIGNATURES:
        if head[offset:offset + len(magic)] == magic:
            return what
    if len(head) > 2 and head[:1] == b"P" and head[1:2] in b"1234567" and head[2:3] in b" \t\r\n":
        return "Netpbm (PBM/PGM/PPM)"
    if b"<svg" in head[:1024].lower() and head.lstrip()[:1] == b"<":
        return "SVG"
    return None


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
