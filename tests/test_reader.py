"""Reading images in loader workers (transfer_lit.data.reader): reduced-size JPEG decoding within a few levels of
a full decode after the checkpoint's resize, and the resized cache giving the eval transform the same pixels."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import SHARED, make_image_folder
from PIL import Image

from transfer_lit import ImageDataModule, build_eval_transform, load_image
from transfer_lit.data import reader as reader_module
from transfer_lit.data.reader import ImageReader
from transfer_lit.preprocessing import DEFAULT_PREPROCESSING, ImagePreprocessing

PHOTOS = SHARED / "data" / "hymenoptera_data"


def _photo(path: Path, size: tuple[int, int]) -> Path:
    """A smooth, photo-like JPEG (gradients and soft shapes: what DCT scaling is meant for)."""
    w, h = size
    x = torch.linspace(0, 1, w).view(1, w).expand(h, w)
    y = torch.linspace(0, 1, h).view(h, 1).expand(h, w)
    rgb = torch.stack([x, y, ((x - 0.5) ** 2 + (y - 0.5) ** 2).sqrt()], -1) * 200 + 20
    rgb += (25 * torch.sin(x * 37) * torch.cos(y * 23))[..., None]
    Image.fromarray(rgb.clamp(0, 255).to(torch.uint8).numpy()).save(path, quality=92)
    return path


def _large_photos(tmp_path: Path) -> list[Path]:
    made = [_photo(tmp_path / "a.jpg", (2400, 1800)), _photo(tmp_path / "b.jpg", (1100, 2000))]
    real = [p for p in sorted(PHOTOS.rglob("*.jpg")) if min(Image.open(p).size) >= 4 * 256] if PHOTOS.is_dir() else []
    return made + real


def test_a_large_jpeg_is_decoded_at_reduced_size_and_others_at_full(tmp_path: Path) -> None:
    big = _photo(tmp_path / "big.jpg", (2400, 1800))
    assert load_image(big, min_side=512).size == (1200, 900)  # 1/2: 1/4 would leave 450 < 512
    assert load_image(big, min_side=200).size == (300, 225)  # 1/8: the smallest scale leaving 225 >= 200
    assert load_image(big).size == (2400, 1800)
    small = _photo(tmp_path / "small.jpg", (900, 700))  # shorter side < 2 x 512: full size
    assert load_image(small, min_side=512).size == (900, 700)
    png = tmp_path / "big.png"
    Image.open(big).save(png)
    assert load_image(png, min_side=512).size == (2400, 1800)  # DCT scaling is for JPEGs only


def test_reduced_decoding_changes_the_eval_crop_by_a_few_levels_at_most(tmp_path: Path) -> None:
    transform = build_eval_transform(DEFAULT_PREPROCESSING, normalize=False)
    reduced = ImageReader(DEFAULT_PREPROCESSING, reduced_decode=True)
    for path in _large_photos(tmp_path):
        assert reduced(str(path)).size != Image.open(path).size, path  # it did decode at reduced size
        diff = (transform(load_image(path)).int() - transform(reduced(str(path))).int()).abs().float()
        assert diff.max() <= 8 and diff.mean() <= 0.5, (path.name, float(diff.max()), float(diff.mean()))


@pytest.mark.parametrize("crop_mode", ["center", "squash"])
def test_the_resized_cache_gives_the_eval_transform_the_same_pixels(tmp_path: Path, crop_mode: str,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    p = ImagePreprocessing(64, 56, "bicubic", (0.5,) * 3, (0.5,) * 3, crop_mode=crop_mode)  # type: ignore[arg-type]
    files = [_photo(tmp_path / "wide.jpg", (300, 180)), _photo(tmp_path / "tall.jpg", (150, 260))]
    Image.new("RGB", (64, 40), (10, 200, 30)).save(tmp_path / "tiny.png")
    files.append(tmp_path / "tiny.png")
    cached = ImageReader(p, cache_dir=str(tmp_path / "cache"))
    transform = build_eval_transform(p, normalize=False)
    for file in files:
        first = transform(cached(str(file)))  # a miss: decoded, resized, stored
        assert cached.entry(str(file)).is_file()
        assert torch.equal(first, transform(load_image(file, min_side=cached.min_side)))
    monkeypatch.setattr(reader_module, "load_image", lambda *a, **k: pytest.fail("a hit must not decode the file"))
    for file in files:
        assert torch.equal(transform(cached(str(file))), transform(load_image(file)))


def test_a_changed_file_misses_and_the_settings_are_part_of_the_key(tmp_path: Path) -> None:
    file = _photo(tmp_path / "x.jpg", (300, 200))
    cached = ImageReader(DEFAULT_PREPROCESSING, cache_dir=str(tmp_path / "cache"))
    before = cached.entry(str(file))
    os.utime(file, ns=(0, 1234))
    assert cached.entry(str(file)) != before
    other = ImageReader(ImagePreprocessing(128, 112, "bilinear", (0.5,) * 3, (0.5,) * 3), cache_dir=cached.cache_dir)
    assert other.entry(str(file)) != cached.entry(str(file))
    assert cached.describe() != ImageReader(DEFAULT_PREPROCESSING).describe() != \
        ImageReader(DEFAULT_PREPROCESSING, reduced_decode=False).describe()


def test_a_file_gone_since_it_was_listed_is_a_bad_image_with_the_cache_too(tmp_path: Path) -> None:
    from transfer_lit import BadImageError
    from transfer_lit.data import ImageDataset

    gone = str(tmp_path / "gone.jpg")
    cached = ImageReader(DEFAULT_PREPROCESSING, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(BadImageError, match=r"gone\.jpg"):
        cached(gone)
    skipping = ImageDataset([(gone, 0)], lambda image: image, bad_images="skip", loader=cached)
    assert skipping[0] is None and skipping.skipped_paths() == [gone]


def test_the_data_module_reads_through_the_cache(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "images", {"train": 4, "val": 2})
    p = ImagePreprocessing(36, 32, "bilinear", (0.5,) * 3, (0.25,) * 3)
    data = ImageDataModule(root=str(root), batch_size=4, num_workers=0, preprocessing=p,
                           cache_dir=str(tmp_path / "cache"))
    data.setup("fit")
    for loader in (data.train_dataloader(), data.val_dataloader()):
        for _ in loader:
            pass
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 18  # 12 train + 6 val images, once each
    plain = ImageDataModule(root=str(root), batch_size=4, num_workers=0, preprocessing=p)
    plain.setup("fit")
    assert all(torch.equal(a[0], b[0]) for a, b in zip(data.val_dataloader(), plain.val_dataloader(), strict=True))
