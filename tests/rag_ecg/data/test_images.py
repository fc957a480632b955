"""Loading user images: every supported type loads upright as RGB; every bad file fails with one clear line."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from rag_ecg.data.images import (IMAGE_SUFFIXES, ImageLoadError, load_image, page_name, pdf_page_count,
                                  save_image, split_page)
from rag_ecg.data.records import read_ludb
from rag_ecg.errors import InputError
from rag_ecg.paper.layout import RenderConfig
from rag_ecg.paper.render import render_record


def _page(w: int = 120, h: int = 80) -> Image.Image:
    """A small landscape test card: white, a red marker in the top-left corner, a black line."""
    arr = np.full((h, w, 3), 255, np.uint8)
    arr[:10, :16] = (255, 0, 0)
    arr[h // 2, :] = 0
    return Image.fromarray(arr)


@pytest.mark.parametrize("suffix,kw", [(".png", {}), (".bmp", {}), (".tif", {"compression": "tiff_lzw"}),
                                       (".jpg", {"quality": 95})])
def test_common_formats_load_as_rgb(tmp_path, suffix, kw):
    p = tmp_path / f"ecg{suffix}"
    _page().save(p, **kw)
    im = load_image(p)
    assert im.mode == "RGB" and im.size == (120, 80)
    r, g, b = im.getpixel((5, 5))
    assert r > 200 and g < 60 and b < 60  # the red marker survived


def test_jpeg_exif_orientation_is_applied(tmp_path):
    p = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: display rotated 90° clockwise
    _page().save(p, exif=exif, quality=95)
    im = load_image(p)
    assert im.size == (80, 120)
    r, g, b = im.getpixel((75, 5))  # top-left marker is now top-right
    assert r > 200 and g < 60


def test_pdf_first_page_renders_at_requested_dpi(tmp_path, ludb_dir):
    page = render_record(read_ludb(ludb_dir / "data" / "2"), RenderConfig(dpi=50)).image
    second = _page()
    p = tmp_path / "ecg.pdf"
    page.save(p, "PDF", resolution=50.0, save_all=True, append_images=[second])
    im = load_image(p, pdf_dpi=100)
    assert im.mode == "RGB"
    assert im.size[0] == pytest.approx(page.size[0] * 2, abs=2) and im.size[1] == pytest.approx(page.size[1] * 2, abs=2)
    small = np.asarray(im.resize(page.size)).astype(int)
    assert np.abs(small - np.asarray(page).astype(int)).mean() < 12  # it is the first page, not the card


@pytest.mark.parametrize("mode", ["L", "1", "RGBA", "LA", "P", "P+transparency", "CMYK", "I;16"])
def test_other_modes_are_normalised_to_rgb(tmp_path, mode):
    src = _page()
    p = tmp_path / ("ecg.tif" if mode == "CMYK" else "ecg.png")
    if mode == "I;16":  # 16-bit grey, as some scanners write
        img = Image.fromarray(np.asarray(src.convert("L")).astype(np.uint16) * 257)
        assert img.mode == "I;16"
    elif mode == "P+transparency":
        img = src.convert("P")
        img.info["transparency"] = 255
    else:
        img = src.convert(mode)
    img.save(p)
    im = load_image(p)
    assert im.mode == "RGB" and im.size == (120, 80)
    assert np.asarray(im)[40].max() < 60  # the black line is still black
    assert min(np.asarray(im)[75, 100]) > 200  # white paper stays white


def test_transparency_is_composited_on_white(tmp_path):
    arr = np.zeros((40, 60, 4), np.uint8)
    arr[5:10, :, 3] = 255  # one opaque black band, the rest fully transparent
    p = tmp_path / "ecg.png"
    Image.fromarray(arr, "RGBA").save(p)
    im = np.asarray(load_image(p))
    assert (im[0] == 255).all() and (im[7] == 0).all()


def test_multipage_tiff_gives_first_page(tmp_path):
    p = tmp_path / "scan.tif"
    first, second = _page(), Image.new("RGB", (120, 80), "black")
    first.save(p, save_all=True, append_images=[second])
    assert min(load_image(p).getpixel((100, 70))) > 200


def _fails(path, match, **kw):
    with pytest.raises(ImageLoadError, match=match) as err:
        load_image(path, **kw)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(path.name + ":")
    assert isinstance(err.value, ValueError)
    return msg


def test_empty_file(tmp_path):
    p = tmp_path / "ecg-01.png"
    p.write_bytes(b"")
    _fails(p, "empty file")


def test_text_file_is_not_an_image(tmp_path):
    p = tmp_path / "ecg-07.jpg"
    p.write_text("patient 7, 12-lead ECG, sinus rhythm\n")
    msg = _fails(p, r"not an image \(looks like text; expected PNG, JPEG, BMP, TIFF, WebP, GIF, HEIC/HEIF or PDF\)")
    assert msg.startswith("ecg-07.jpg: not an image")


def test_wfdb_header_gets_a_hint(tmp_path):
    p = tmp_path / "00310_lr.hea"
    p.write_text("00310_lr 12 100 1000\n")
    _fails(p, "a WFDB record file")


def test_random_bytes_are_not_an_image(tmp_path):
    p = tmp_path / "ecg.png"
    p.write_bytes(np.random.default_rng(0).integers(1, 255, 4000, dtype=np.uint8).tobytes())
    _fails(p, "not an image")


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".tif"])
def test_truncated_file_is_corrupt(tmp_path, suffix):
    full = tmp_path / f"full{suffix}"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(full)
    p = tmp_path / f"cut{suffix}"
    p.write_bytes(full.read_bytes()[: full.stat().st_size // 3])
    _fails(p, "corrupt or truncated|unreadable image")


def test_corrupt_pdf(tmp_path):
    p = tmp_path / "ecg.pdf"
    p.write_bytes(b"%PDF-1.7\n%garbage that is no PDF at all\n" * 3)
    _fails(p, "unreadable PDF")


def test_over_the_pixel_limit(tmp_path):
    p = tmp_path / "big.png"
    _page().save(p)
    _fails(p, r"image too large \(120x80 = 9,600 pixels; limit 5,000\)", max_pixels=5000)
    pdf = tmp_path / "big.pdf"
    _page().save(pdf, "PDF", resolution=10.0)  # a 12 x 8 inch page
    _fails(pdf, "use a lower pdf_dpi", pdf_dpi=600, max_pixels=10_000_000)


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    p = tmp_path / "bomb.png"
    Image.new("1", (10_000, 10_000)).save(p)  # 100 Mpx that compress to a few kB
    assert p.stat().st_size < 200_000
    _fails(p, "image too large")


def test_missing_file_and_folder(tmp_path):
    _fails(tmp_path / "nope.png", "no such file")
    d = tmp_path / "folder.png"
    d.mkdir()
    _fails(d, "not a file")


def test_save_image_writes_the_suffix_format_atomically(tmp_path):
    out = save_image(_page(), tmp_path / "new" / "card.jpg", quality=95)
    with Image.open(out) as im:
        assert im.format == "JPEG" and im.size == (120, 80)
    assert sorted(p.name for p in out.parent.iterdir()) == ["card.jpg"]  # no temp file left
    with pytest.raises(InputError, match=r"card\.xyz: unknown image suffix"):
        save_image(_page(), tmp_path / "card.xyz")


# ---------------------------------------------------------------- formats, shapes, every call site (issue 15)

_EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 120 80\n%%EndComments\n"
        b"newpath 0 40 moveto 120 40 lineto stroke showpage\n%%EOF\n")


def test_postscript_named_png_is_refused_and_ghostscript_never_runs(tmp_path, monkeypatch):
    from PIL import EpsImagePlugin

    from rag_ecg.reader.report_render import thumbnail_data_url

    bin_dir, marker = tmp_path / "bin", tmp_path / "gs-ran"
    bin_dir.mkdir()
    (bin_dir / "gs").write_text(f'#!/bin/sh\necho "$@" >> {marker}\n[ "$1" = --version ] && exit 0\nexit 1\n')
    (bin_dir / "gs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)  # Pillow looks for `gs` again, finds ours
    p = tmp_path / "chart.png"
    p.write_bytes(_EPS)
    with pytest.raises(Exception), Image.open(p) as im:  # what an unrestricted Image.open does with it
        im.load()
    assert marker.exists()  # ... it ran Ghostscript on the user's file
    marker.unlink()
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)
    msg = _fails(p, "PostScript")
    assert "not an allowed picture format" in msg
    with pytest.raises(ImageLoadError, match="chart.png: .*PostScript"):
        thumbnail_data_url(p)  # the report page's thumbnails use the same loader
    assert not marker.exists()


def test_data_url_pictures_are_restricted_too(tmp_path):
    import base64

    from rag_ecg.reader.messages import decode_data_url

    with pytest.raises(ValueError, match="PostScript"):
        decode_data_url("data:image/png;base64," + base64.b64encode(_EPS).decode())
    arr = np.zeros((40, 60, 4), np.uint8)
    arr[10:20, :, 3] = 255
    import io
    buf = io.BytesIO()
    Image.fromarray(arr, "RGBA").save(buf, "PNG")
    im = np.asarray(decode_data_url("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()))
    assert (im[0] == 255).all() and (im[15] == 0).all()  # transparent -> white paper, not black


@pytest.mark.parametrize("suffix", [".gif", ".webp"])
def test_gif_and_webp_load(tmp_path, suffix):
    p = tmp_path / f"ecg{suffix}"
    if suffix == ".gif":  # an animated GIF: the first frame
        _page().save(p, save_all=True, append_images=[Image.new("RGB", (120, 80), "black")])
    else:
        _page().save(p, lossless=True)
    im = load_image(p)
    assert im.mode == "RGB" and im.size == (120, 80)
    assert min(im.getpixel((100, 70))) > 200 and im.getpixel((5, 5))[0] > 200


def test_transparent_png_is_white_at_every_call_site(tmp_path):
    import base64
    import io

    from rag_ecg.reader.interpret import _load_image
    from rag_ecg.reader.report_render import thumbnail_data_url

    arr = np.zeros((80, 120, 4), np.uint8)  # transparent black pixels, one opaque black band
    arr[30:40, :, 3] = 255
    p = tmp_path / "ecg.png"
    Image.fromarray(arr, "RGBA").save(p)
    url = thumbnail_data_url(p)
    thumb = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))
    for im in (np.asarray(load_image(p)), np.asarray(_load_image(p)), thumb):
        assert (im[5] == 255).all() and (im[35] == 0).all()


def test_exif_rotation_at_the_reader_call_site(tmp_path):
    from rag_ecg.reader.interpret import _load_image

    p = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    _page().save(p, exif=exif, quality=95)
    assert _load_image(p).size == (80, 120)


def test_implausible_page_shapes_are_refused(tmp_path):
    sliver = tmp_path / "sliver.png"
    Image.new("1", (100, 640_000), 1).save(sliver)  # 64 Mpx: exactly at the pixel cap
    msg = _fails(sliver, r"100x640000 is not the shape of an ECG page")
    assert "aspect" in msg
    tiny = tmp_path / "icon.png"
    Image.new("RGB", (16, 16), "white").save(tiny)
    _fails(tiny, r"16x16 is too small for an ECG page")


# ---------------------------------------------------------------- iPhone HEIC, every page of a PDF (issue 15 item 9)

def _ecg(ludb_dir, record: str = "2", dpi: int = 50) -> Image.Image:
    return render_record(read_ludb(ludb_dir / "data" / record), RenderConfig(dpi=dpi)).image


def _diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a.convert("RGB")).astype(int) - np.asarray(b.convert("RGB")).astype(int)).mean())


def test_iphone_heic_loads_upright_like_a_jpeg(tmp_path, ludb_dir):
    """A phone photo taken turned: the pixels are stored sideways and the file says how to turn them (irot +
    EXIF orientation 6, as an iPhone writes). Loaded, it is the upright page (HEVC tolerance), as the same
    sideways pixels in a JPEG with that EXIF tag are."""
    upright = _ecg(ludb_dir)
    sideways = upright.transpose(Image.Transpose.ROTATE_90)  # displayed turned 90° clockwise = upright
    exif = Image.Exif()
    exif[0x0112] = 6
    heic, jpeg = tmp_path / "IMG_0042.HEIC", tmp_path / "IMG_0042.jpg"
    sideways.save(heic, format="HEIF", exif=exif.tobytes(), quality=90)
    sideways.save(jpeg, exif=exif, quality=95)
    assert heic.read_bytes()[4:12] == b"ftypheic" and heic.suffix.lower() in IMAGE_SUFFIXES
    with Image.open(heic, formats=["HEIF"]) as raw:
        assert raw.info["original_orientation"] == 6  # the file carried the EXIF tag ...
    for p in (heic, jpeg):
        im = load_image(p)
        assert im.mode == "RGB" and im.size == upright.size, p.name  # ... and the page is turned once, not twice
        assert _diff(im, upright) < 8, p.name
        assert _diff(im, upright.transpose(Image.Transpose.ROTATE_180)) > 2 * _diff(im, upright), p.name


def test_broken_heic_is_one_line(tmp_path, ludb_dir):
    good = tmp_path / "good.heic"
    _ecg(ludb_dir).save(good, format="HEIF", quality=50)
    cut = tmp_path / "cut.heic"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # the header is whole, the picture is not
    _fails(cut, "corrupt or truncated HEIF")
    cut.write_bytes(good.read_bytes()[:100])  # not even the header: libheif cannot open it
    _fails(cut, r"unreadable HEIC/HEIF image \(corrupt, truncated")
    avif = tmp_path / "photo.heic"  # an AVIF under a HEIC name: no AV1 decoder is shipped, named as such
    avif.write_bytes(b"\x00\x00\x00\x1cftypavif" + b"\x00" * 200)
    _fails(avif, "AVIF is not an allowed picture format")


def test_every_page_of_a_pdf_loads(tmp_path, ludb_dir):
    """`page=k` renders page k (each page is its own ECG, found by its pixels); the count is cheap; a missing page
    or a bad one is an error line naming `x.pdf#page=N`."""
    pages = [_ecg(ludb_dir, r) for r in ("1", "2", "3")]
    p = tmp_path / "cart export.pdf"
    tiny = Image.new("RGB", (16, 16), "white")
    pages[0].save(p, "PDF", resolution=50.0, save_all=True, append_images=pages[1:] + [tiny])
    assert pdf_page_count(p) == 4
    for k, page in enumerate(pages):
        im = load_image(p, pdf_dpi=50, page=k).resize(page.size)
        assert min(range(3), key=lambda j: _diff(im, pages[j])) == k
    with pytest.raises(ImageLoadError, match=r"^cart export\.pdf#page=4: 16x16 is too small for an ECG page"):
        load_image(p, pdf_dpi=50, page=3)
    _fails(p, r"cart export\.pdf: PDF has 4 pages, no page 5", page=4)
    png = tmp_path / "one.png"
    pages[0].save(png)
    assert pdf_page_count(png) == 1
    _fails(png, "no page 2", page=1)
    bad = tmp_path / "bad.pdf"
    bad.write_bytes(b"%PDF-1.4\n1 0 obj garbage\n")
    with pytest.raises(ImageLoadError, match="bad.pdf: unreadable PDF"):
        pdf_page_count(bad)
    assert split_page(page_name("/a/x.PDF", 11)) == ("/a/x.PDF", 11) and split_page("/a/x.png") == ("/a/x.png", 0)
