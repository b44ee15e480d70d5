"""Tests for transfer_lit.data.decode, on files Pillow really encodes in tmp_path."""

from __future__ import annotations

import pickle
import random
import struct
from pathlib import Path

import pytest
from PIL import Image, ImageOps
from torchvision.datasets.folder import IMG_EXTENSIONS

from transfer_lit.data.decode import (
    BAD_IMAGE_POLICIES,
    IMAGE_EXTENSIONS,
    BadImageError,
    jpeg_damage,
    load_image,
    scan_images,
)

HYMENOPTERA = Path("/work/shared/data/hymenoptera_data")
WHITE = (255, 255, 255)


def _close(actual: object, expected: tuple[int, ...], tolerance: int = 12) -> bool:
    assert isinstance(actual, tuple), actual
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


def _header(path: Path) -> tuple[str, dict]:
    """Mode and info of a file as Pillow opens it, closing the file."""
    with Image.open(path) as img:
        return img.mode, img.info


def _noise_jpeg(path: Path, size: tuple[int, int] = (64, 64)) -> Path:
    rng = random.Random(0)
    img = Image.frombytes("RGB", size, rng.randbytes(size[0] * size[1] * 3))
    img.save(path, "JPEG", quality=95)
    return path


def test_extensions_match_imagefolder_and_exclude_gif() -> None:
    assert set(IMAGE_EXTENSIONS) == set(IMG_EXTENSIONS)
    assert all(ext.startswith(".") and ext == ext.lower() for ext in IMAGE_EXTENSIONS)
    assert ".gif" not in IMAGE_EXTENSIONS
    assert BAD_IMAGE_POLICIES == ("error", "skip")


def test_good_jpeg_loads_as_independent_rgb(tmp_path: Path) -> None:
    path = _noise_jpeg(tmp_path / "ok.jpg")
    img = load_image(path)
    path.unlink()  # the returned image must not need the file any more
    assert img.mode == "RGB" and img.size == (64, 64)
    img.load()


def test_truncated_jpeg_is_bad(tmp_path: Path) -> None:
    data = _noise_jpeg(tmp_path / "full.jpg").read_bytes()
    path = tmp_path / "half.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadImageError, match="truncated") as info:
        load_image(path)
    assert info.value.path == str(path)


def _cut_at_half_with_end_marker(data: bytes, keep_tail: bool) -> bytes:
    """An end-of-image marker in the middle of the scan data: the file ends there (keep_tail False), or the
    rest follows it (a marker spliced in)."""
    half = data.find(b"\xff\xda") + (len(data) - data.find(b"\xff\xda")) // 2
    return data[:half] + b"\xff\xd9" + (data[half:] if keep_tail else b"")


@pytest.mark.parametrize("keep_tail", [False, True])
@pytest.mark.parametrize("progressive", [False, True])
def test_jpeg_with_an_early_end_marker_is_bad(tmp_path: Path, keep_tail: bool, progressive: bool) -> None:
    # Pillow decodes these without an error: the rows after the marker come out flat gray (baseline) or coarse.
    full = tmp_path / "full.jpg"
    rng = random.Random(0)
    Image.frombytes("RGB", (96, 96), rng.randbytes(96 * 96 * 3)).save(full, "JPEG", quality=90, progressive=progressive)
    path = tmp_path / "damaged.jpg"
    path.write_bytes(_cut_at_half_with_end_marker(full.read_bytes(), keep_tail))
    with Image.open(path) as img:
        img.load()  # what the loader did before: no error, no warning
    with pytest.raises(BadImageError, match=r"damaged JPEG data \(Corrupt JPEG data: premature end of data segment\)"):
        load_image(path)
    assert [error.path for error in scan_images([full, path, full])] == [str(path)]
    assert jpeg_damage(full.read_bytes()) is None


def test_jpeg_with_garbled_scan_data_is_bad(tmp_path: Path) -> None:
    data = bytearray(_noise_jpeg(tmp_path / "ok.jpg").read_bytes())
    start = data.find(b"\xff\xda") + 20
    data[start:start + 400] = bytes(400)  # zeroed sectors, as a damaged disk or download leaves them
    path = tmp_path / "zeroed.jpg"
    path.write_bytes(bytes(data))
    damage = jpeg_damage(bytes(data))
    assert damage is not None and "Corrupt JPEG data" in damage
    with pytest.raises(BadImageError, match="damaged JPEG data"):
        load_image(path)


def test_harmless_jpeg_warnings_pass(tmp_path: Path) -> None:
    # Extra bytes before the end marker (some cameras and editors write them): libjpeg warns, the pixels are whole.
    good = _noise_jpeg(tmp_path / "ok.jpg")
    data = good.read_bytes()
    path = tmp_path / "extra.jpg"
    path.write_bytes(data[:-2] + b"\x00\x01\x02" + data[-2:])
    assert list(load_image(path).getdata()) == list(load_image(good).getdata())
    assert jpeg_damage(path.read_bytes()) is None


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("noise.jpg", random.Random(1).randbytes(2000)),
        ("notes.png", b"just some text, not a PNG\n"),
        ("empty.jpg", b""),
    ],
)
def test_non_image_with_image_extension_is_bad(tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(BadImageError, match="not an image") as info:
        load_image(path)
    assert str(info.value) == f"cannot read image '{path}': {info.value.reason}"


def test_missing_file_is_bad(tmp_path: Path) -> None:
    with pytest.raises(BadImageError, match="No such file"):
        load_image(tmp_path / "absent.png")


def test_gif_is_readable_but_not_an_image_extension(tmp_path: Path) -> None:
    # torchvision's ImageFolder skips .gif (not in IMG_EXTENSIONS), so IMAGE_EXTENSIONS does too and a
    # dataset never lists one. load_image itself still reads a valid GIF (its first frame): deciding
    # which files belong to a dataset is the extension filter's job, not the decoder's.
    path = tmp_path / "real.gif"
    img = Image.new("P", (8, 6), 1)
    img.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    img.save(path)
    assert path.suffix not in IMAGE_EXTENSIONS
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.getpixel((0, 0)) == (0, 255, 0)


def test_grayscale_becomes_rgb(tmp_path: Path) -> None:
    path = tmp_path / "gray.png"
    Image.new("L", (5, 5), 77).save(path)
    assert load_image(path).getpixel((2, 2)) == (77, 77, 77)


def test_one_bit_becomes_rgb(tmp_path: Path) -> None:
    path = tmp_path / "bits.png"
    img = Image.new("1", (4, 1), 0)
    img.putpixel((3, 0), 1)
    img.save(path)
    loaded = load_image(path)
    assert loaded.getpixel((0, 0)) == (0, 0, 0) and loaded.getpixel((3, 0)) == WHITE


@pytest.mark.parametrize(
    ("mode", "transparent", "opaque", "opaque_rgb"),
    [("RGBA", (255, 0, 0, 0), (0, 0, 255, 255), (0, 0, 255)), ("LA", (0, 0), (50, 255), (50, 50, 50))],
)
def test_alpha_is_composited_on_white(
    tmp_path: Path, mode: str, transparent: tuple[int, ...], opaque: tuple[int, ...], opaque_rgb: tuple[int, ...]
) -> None:
    path = tmp_path / f"{mode}.png"
    img = Image.new(mode, (2, 1), transparent)  # hidden color under alpha 0 must not show
    img.putpixel((1, 0), opaque)
    img.save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB"
    assert loaded.getpixel((0, 0)) == WHITE
    assert loaded.getpixel((1, 0)) == opaque_rgb


def test_half_transparent_pixel_is_blended_with_white(tmp_path: Path) -> None:
    path = tmp_path / "half.png"
    Image.new("RGBA", (1, 1), (0, 0, 0, 128)).save(path)
    assert _close(load_image(path).getpixel((0, 0)), (127, 127, 127), tolerance=1)


def test_palette_with_transparency(tmp_path: Path) -> None:
    path = tmp_path / "palette.png"
    img = Image.new("P", (2, 1), 0)
    img.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    img.putpixel((1, 0), 1)
    img.save(path, transparency=0)  # index 0 (red) is transparent
    assert _header(path)[1].get("transparency") == 0
    loaded = load_image(path)
    assert loaded.getpixel((0, 0)) == WHITE
    assert loaded.getpixel((1, 0)) == (0, 255, 0)


def test_plain_palette_keeps_colors(tmp_path: Path) -> None:
    path = tmp_path / "palette.bmp"
    img = Image.new("P", (1, 1), 0)
    img.putpalette([10, 20, 30] + [0] * 765)
    img.save(path)
    assert load_image(path).getpixel((0, 0)) == (10, 20, 30)


def test_cmyk_jpeg_keeps_colors(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    img = Image.new("CMYK", (16, 8), (0, 255, 255, 0))  # red
    img.paste((255, 255, 0, 0), (8, 0, 16, 8))  # blue
    img.save(path, "JPEG", quality=95)
    assert _header(path)[0] == "CMYK"
    loaded = load_image(path)
    assert _close(loaded.getpixel((2, 4)), (255, 0, 0))
    assert _close(loaded.getpixel((13, 4)), (0, 0, 255))


@pytest.mark.parametrize(("suffix", "mode"), [(".png", "I;16"), (".tif", "I;16B")])
def test_16_bit_gray_is_scaled_not_clipped(tmp_path: Path, suffix: str, mode: str) -> None:
    path = tmp_path / f"deep{suffix}"
    img = Image.new(mode, (3, 1), 32896)  # mid-gray: 32896 / 257 = 128
    img.putpixel((1, 0), 65535)
    img.putpixel((2, 0), 0)
    img.save(path)
    with Image.open(path) as raw:
        assert raw.mode == mode
        assert raw.convert("L").getpixel((0, 0)) == 255  # why scaling is needed: Pillow's convert clips
    loaded = load_image(path)
    assert loaded.getpixel((0, 0)) == (128, 128, 128)
    assert loaded.getpixel((1, 0)) == WHITE
    assert loaded.getpixel((2, 0)) == (0, 0, 0)


def test_float_image_is_clipped(tmp_path: Path) -> None:
    path = tmp_path / "float.tif"
    img = Image.new("F", (3, 1), 100.0)
    img.putpixel((0, 0), -10.0)
    img.putpixel((2, 0), 300.5)
    img.save(path)
    assert _header(path)[0] == "F"
    loaded = load_image(path)
    assert [loaded.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (100, 100, 100), WHITE]


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    img.save(path, "JPEG", quality=95, exif=exif)
    loaded = load_image(path)
    assert loaded.size == (20, 40)
    assert _close(loaded.getpixel((10, 5)), (255, 0, 0))  # the left half is now on top
    assert _close(loaded.getpixel((10, 35)), (0, 0, 255))


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize(("mode", "subsampling"), [("RGB", 0), ("RGB", 2), ("L", 0)])
@pytest.mark.parametrize("min_side", [None, 9, 20, 40])
def test_jpeg_pixels_are_pillows_own(tmp_path: Path, orientation: int, mode: str, subsampling: int,
                                     min_side: int | None) -> None:
    # libjpeg-turbo through simplejpeg (which also checks the data) must give what Pillow gives: every EXIF
    # orientation, chroma subsampling, grayscale, each DCT scale of draft (odd sizes: 1/2 .. 1/8 round up).
    rng = random.Random(orientation)
    path = tmp_path / "photo.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    image = Image.frombytes("RGB", (83, 61), rng.randbytes(83 * 61 * 3)).convert(mode)
    image.save(path, "JPEG", quality=85, subsampling=subsampling, exif=exif)
    with Image.open(path) as img:
        if min_side is not None and min(img.size) >= 2 * min_side:
            scale = min_side / min(img.size)
            img.draft(img.mode, (-(-img.size[0] * scale // 1), -(-img.size[1] * scale // 1)))
        expected = ImageOps.exif_transpose(img).convert("RGB")
    loaded = load_image(path, min_side=min_side)
    assert loaded.size == expected.size and loaded.tobytes() == expected.tobytes()


def test_too_many_pixels(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (10, 10)).save(path)
    with pytest.raises(BadImageError) as info:
        load_image(path, max_pixels=99)
    assert "10x10 = 100 pixels" in info.value.reason
    assert "99" in info.value.reason and "max_pixels" in info.value.reason
    assert load_image(path, max_pixels=100).size == (10, 10)


def test_bad_arguments_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_pixels"):
        load_image(tmp_path / "x.png", max_pixels=0)
    with pytest.raises(ValueError, match="num_workers"):
        scan_images([], num_workers=-1)


def test_bad_image_error_survives_pickling() -> None:
    error = pickle.loads(pickle.dumps(BadImageError("a.jpg", "broken")))
    assert isinstance(error, BadImageError) and isinstance(error, ValueError)
    assert (error.path, error.reason, str(error)) == ("a.jpg", "broken", "cannot read image 'a.jpg': broken")


@pytest.mark.parametrize("num_workers", [0, 3])
def test_scan_reports_all_bad_files_in_order(tmp_path: Path, num_workers: int) -> None:
    good = _noise_jpeg(tmp_path / "good.jpg")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:500])
    text = tmp_path / "text.png"
    text.write_text("hello")
    big = tmp_path / "big.png"
    Image.new("L", (100, 100)).save(big)
    missing = tmp_path / "missing.webp"
    paths = [text, good, big, truncated, good, missing]
    errors = scan_images(paths, max_pixels=64 * 64, num_workers=num_workers)
    assert [error.path for error in errors] == [str(text), str(big), str(truncated), str(missing)]
    assert ["not an image" in error.reason for error in errors] == [True, False, False, False]
    assert scan_images([], num_workers=num_workers) == []


@pytest.mark.skipif(not HYMENOPTERA.exists(), reason=f"{HYMENOPTERA} is absent (the hymenoptera tutorial data set)")
def test_hymenoptera_train_folder() -> None:
    # train/ants/imageNotFound.gif is the placeholder picture a crawler saved instead of an ant: a valid
    # 300x300 GIF, not a broken file. ImageFolder never sees it (.gif is not an image extension) and
    # scan_images, which only finds files that do not decode, reports nothing even when given it.
    files = sorted(path for path in (HYMENOPTERA / "train").rglob("*") if path.is_file())
    placeholder = HYMENOPTERA / "train" / "ants" / "imageNotFound.gif"
    listed = [path for path in files if path.suffix.lower() in IMAGE_EXTENSIONS]
    assert [path for path in files if path not in listed] == [placeholder]
    assert scan_images(files, num_workers=4) == []
    assert load_image(placeholder).size == (300, 300)


def test_cielab_tiff_keeps_colors(tmp_path: Path) -> None:
    """TIFF's CIELab (a* and b* signed bytes, as libtiff and Photoshop write them) decodes to its colors."""
    from PIL import ImageCms

    srgb_to_lab = ImageCms.buildTransform(ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB")
    rgb = Image.new("RGB", (16, 8), (220, 20, 30))
    rgb.paste((20, 140, 40), (8, 0, 16, 8))
    path = tmp_path / "lab.tif"
    lab = ImageCms.applyTransform(rgb, srgb_to_lab)
    assert lab is not None and lab.tobytes()[3 * (4 * 16 + 12) + 1] > 127  # green: a* < 0, a signed byte
    lab.save(path)
    assert _header(path)[0] == "LAB"
    loaded = load_image(path)
    assert _close(loaded.getpixel((2, 4)), (220, 20, 30))
    assert _close(loaded.getpixel((12, 4)), (20, 140, 40))


def _one_pixel_tiff(path: Path, photometric: int, bits: int) -> None:
    """A one-pixel, three-sample little-endian TIFF written byte by byte (Pillow writes no such layout)."""
    pixel = bytes(3 * bits // 8)
    short = [(256, 1), (257, 1), (259, 1), (262, photometric), (277, 3), (278, 1)]
    entries = [struct.pack("<HHIHH", tag, 3, 1, value, 0) for tag, value in short]
    entries += [struct.pack("<HHII", 258, 3, 3, 122), struct.pack("<HHII", 273, 4, 1, 128),
                struct.pack("<HHII", 279, 4, 1, len(pixel))]
    entries.sort()
    ifd = struct.pack("<H", len(entries)) + b"".join(entries) + struct.pack("<I", 0)
    path.write_bytes(b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<HHH", bits, bits, bits) + pixel)


@pytest.mark.parametrize(("photometric", "bits", "layout"), [(8, 16, "8 (CIELab), 16"), (9, 8, "9 (ICCLab), 8")])
def test_a_tiff_layout_pillow_cannot_decode_is_named(tmp_path: Path, photometric: int, bits: int, layout: str) -> None:
    path = tmp_path / "scan.tif"
    _one_pixel_tiff(path, photometric, bits)
    with pytest.raises(BadImageError) as caught:
        load_image(path)
    assert f"a TIFF whose pixel layout Pillow cannot decode (photometric {layout} bits per sample); save it as" \
        in str(caught.value)
    assert "not an image file" not in str(caught.value)
    for cut in (12, 5):  # within the first directory; within the 8-byte header
        path.write_bytes(path.read_bytes()[:cut])
        with pytest.raises(BadImageError, match="a TIFF whose header is cut short or damaged"):
            load_image(path)
