import io

import numpy as np
import pytest
import timm
import timm.data
from PIL import Image

from analysis.data.images import ImageError, load_folder, load_image, model_view, sample_images, to_batch


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _gradient(size=(48, 32)) -> Image.Image:
    w, h = size
    arr = np.zeros((h, w, 3), np.uint8)
    arr[..., 0] = np.linspace(0, 255, w)[None, :]
    arr[..., 1] = np.linspace(0, 255, h)[:, None]
    return Image.fromarray(arr)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF"])
def test_every_accepted_format_decodes_to_rgb(fmt):
    named = load_image(_encode(_gradient(), fmt), name=f"x.{fmt.lower()}")
    assert named.image.mode == "RGB" and named.image.size == (48, 32)


def test_gif_takes_the_first_frame():
    red, blue = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))
    data = _encode(red, "GIF", save_all=True, append_images=[blue])
    r, g, b = load_image(data).image.getpixel((4, 4))
    assert r > 200 and b < 50


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16", "LA", "1"])
def test_modes_become_rgb(mode):
    src = _gradient().convert("RGBA" if mode in ("RGBA", "LA") else "RGB")
    if mode == "I;16":
        img = Image.fromarray(np.asarray(src.convert("L"), np.uint16) * 257)
        fmt = "PNG"
    else:
        img = src.convert(mode)
        fmt = "TIFF" if mode == "CMYK" else "PNG"
    out = load_image(_encode(img, fmt)).image
    assert out.mode == "RGB" and out.size == (48, 32)
    assert np.asarray(out).std() > 10  # content survives the conversion


def test_sixteen_bit_uses_the_full_range():
    arr = np.linspace(1000, 3000, 48 * 32).reshape(32, 48).astype(np.uint16)
    out = np.asarray(load_image(_encode(Image.fromarray(arr), "PNG")).image)
    assert out.min() == 0 and out.max() == 255


def test_transparent_pixels_composite_over_white():
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert load_image(_encode(img, "PNG")).image.getpixel((1, 1)) == (255, 255, 255)


def test_exif_orientation_is_applied():
    img = _gradient((40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    out = load_image(_encode(img, "JPEG", exif=exif.tobytes())).image
    assert out.size == (20, 40)


def test_empty_garbage_and_truncated_files_are_refused(tmp_path):
    with pytest.raises(ImageError, match="empty"):
        load_image(b"", name="empty.png")
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(b"hello, this is text", name="notes.jpg")
    truncated = _encode(_gradient((300, 300)), "PNG")[:200]
    with pytest.raises(ImageError, match="truncated.png"):
        load_image(truncated, name="truncated.png")
    with pytest.raises(ImageError, match="cannot be read"):
        load_image(tmp_path / "missing.jpg")


def test_huge_images_are_refused_before_decoding():
    huge = _encode(Image.new("1", (10_000, 9_500)), "PNG")  # 95 megapixels, a small file
    with pytest.raises(ImageError, match="95 megapixels"):
        load_image(huge, name="huge.png")


def test_folder_loading_skips_and_reports_bad_files(tmp_path):
    (tmp_path / "cats").mkdir()
    (tmp_path / "cats" / "a.png").write_bytes(_encode(_gradient(), "PNG"))
    (tmp_path / "cats" / "broken.jpg").write_bytes(b"\xff\xd8 broken")
    images, skipped = load_folder(tmp_path)
    assert [im.name for im in images] == ["cats/a.png"]
    assert len(skipped) == 1 and "broken.jpg" in skipped[0]


def test_samples_are_real_photos_and_preprocess_with_the_model_config():
    samples = sample_images()
    assert [s.name for s in samples] == ["china", "flower"]
    model = timm.create_model("efficientvit_m0")
    cfg = timm.data.resolve_data_config({}, model=model)
    batch = to_batch(samples, timm.data.create_transform(**cfg))
    assert batch.shape == (2, *cfg["input_size"])
    assert abs(batch.mean().item()) < 1.5 and batch.std().item() > 0.3
    assert model_view(samples[0].image, cfg).size == cfg["input_size"][1:][::-1]


def test_one_parser_for_class_sub_folders():
    from analysis.data.images import folder_class_labels

    paths = ["207/a.png", "n01443537/b.jpg", "golden retriever/c.png", "loose.png", "207/d.png"]
    assert folder_class_labels(paths) == [207, 1, 207, None, 207]
    with pytest.raises(ValueError, match="not an ImageNet class"):
        folder_class_labels(["holiday/x.png"])
    assert folder_class_labels(["holiday/x.png", "3/y.png"], strict=False) == [None, 3]
