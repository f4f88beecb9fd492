"""Reading user images safely, the bundled sample photos, and preprocessing into a batch."""
from __future__ import annotations

import functools
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_PIXELS = 90_000_000
UPLOAD_MAX_SIDE = 2048  # uploads are shrunk to this longer side: more than any page shows or model sees
ACCEPTED_TYPES = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")


class ImageError(ValueError):
    """An input that cannot be used as an image; the message says why."""


@dataclass(frozen=True)
class NamedImage:
    name: str
    image: Image.Image  # RGB


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB for every mode: palette/RGBA over white, CMYK converted, 16-bit and float scaled to 8 bit."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        img = Image.fromarray(arr.round().astype(np.uint8))
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return img.convert("RGB")


def load_image(source: bytes | str | Path, name: str | None = None, max_pixels: int = MAX_PIXELS,
               max_side: int | None = None) -> NamedImage:
    """Decode an image from bytes or a path: first frame, EXIF orientation applied, RGB. Raises ImageError.

    With ``max_side`` the image is shrunk (aspect kept) to at most that many pixels on its longer side; a JPEG is
    then decoded at a reduced scale already, so a huge upload never lies in memory at full size."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        name = name or path.name
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ImageError(f"{name}: cannot be read ({exc.strerror or exc}).") from exc
    else:
        data = bytes(source)
        name = name or "image"
    if not data:
        raise ImageError(f"{name}: the file is empty.")
    # Decompression-bomb guard of our own, with a clear message instead of PIL's warning/exception.
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        img = Image.open(io.BytesIO(data))
        width, height = img.size
        if width * height > max_pixels:
            raise ImageError(f"{name}: {width}x{height} is {width * height / 1e6:.0f} megapixels; "
                             f"images over {max_pixels / 1e6:.0f} megapixels are refused. Downscale it first.")
        img.seek(0)
        if max_side is not None:
            img.draft(img.mode, (max_side, max_side))  # JPEG: the smallest 1/2^k scale that is still large enough
        img.load()
        img = ImageOps.exif_transpose(img)
        if max_side is not None and max(img.size) > max_side:
            img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        return NamedImage(name, _to_rgb(img))
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageError(f"{name}: not a readable image ({type(exc).__name__}: {exc}). "
                         f"Accepted formats: {', '.join(ACCEPTED_TYPES)}.") from exc
    finally:
        Image.MAX_IMAGE_PIXELS = previous


@functools.lru_cache(maxsize=1)
def _sklearn_samples() -> tuple[NamedImage, ...]:
    from sklearn.datasets import load_sample_images

    bunch = load_sample_images()
    return tuple(NamedImage(Path(f).stem, Image.fromarray(arr).convert("RGB"))
                 for f, arr in zip(bunch.filenames, bunch.images))


def sample_images() -> list[NamedImage]:
    """Real photos bundled with scikit-learn (a Chinese temple, a flower): the default inputs of every page."""
    return list(_sklearn_samples())


def load_folder(folder: str | Path, limit: int | None = None) -> tuple[list[NamedImage], list[str]]:
    """All readable images under a folder (recursively) and the messages for the ones that were skipped."""
    images, skipped = [], []
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower().lstrip(".") in ACCEPTED_TYPES)
    for path in files[:limit]:
        try:
            images.append(load_image(path, name=str(path.relative_to(folder))))
        except ImageError as exc:
            skipped.append(str(exc))
    return images, skipped


def to_batch(images: Sequence[NamedImage | Image.Image], transform: Callable) -> torch.Tensor:
    """Preprocess with a model's timm eval transform (resize, centre crop, normalise) and stack."""
    pil = [im.image if isinstance(im, NamedImage) else im for im in images]
    return torch.stack([transform(im) for im in pil])


def model_view(image: Image.Image, data_config: dict) -> Image.Image:
    """The image as the model sees it (resize + centre crop, no normalisation): the canvas for token maps."""
    import timm.data

    cfg = dict(data_config)
    tf = timm.data.create_transform(**cfg)
    # Drop ToTensor/Normalize: the transform's leading steps are PIL -> PIL.
    steps = [t for t in getattr(tf, "transforms", []) if type(t).__name__ not in ("ToTensor", "Normalize", "MaybeToTensor")]
    for step in steps:
        image = step(image)
    return image


def denormalize(tensor: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> Image.Image:
    """One preprocessed [3, H, W] image with its normalisation undone: the pixels the model actually saw."""
    pixels = tensor.detach().float().cpu() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    return Image.fromarray((pixels.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


@functools.lru_cache(maxsize=1)
def _imagenet_info():
    from timm.data import ImageNetInfo

    return ImageNetInfo()


def imagenet_label(index: int) -> str:
    """Short ImageNet-1k class name (first synonym), from the table timm ships."""
    return _imagenet_info().index_to_description(int(index)).split(",")[0]


def imagenet_class_index(folder_name: str) -> int:
    """The ImageNet-1k index a class sub-folder stands for: its index ("207"), WordNet id ("n02099601")
    or one of its names ("golden retriever", case-insensitive). Raises ValueError otherwise."""
    info, name = _imagenet_info(), folder_name.strip()
    if name.isdigit() and 0 <= int(name) < info.num_classes():
        return int(name)
    wordnet_ids = list(info.label_names())
    if name in wordnet_ids:
        return wordnet_ids.index(name)
    wanted = name.lower().replace("_", " ")
    for index, description in enumerate(info.label_descriptions()):
        if wanted in (s.strip().lower() for s in description.split(",")):
            return index
    raise ValueError(f"Sub-folder {folder_name!r} is not an ImageNet class: name it by class index (0-999), "
                     f"WordNet id (e.g. n02099601) or class name (e.g. golden retriever).")


def class_folder(relative: str | Path) -> str | None:
    """The class sub-folder of a path relative to a dataset root (its first part); None for a file in the root."""
    parts = Path(relative).parts
    return parts[0] if len(parts) > 1 else None


def folder_class_labels(paths: Sequence[str | Path], strict: bool = True) -> list[int | None]:
    """The one parser of class sub-folders: the ImageNet index of each file's class sub-folder (relative paths;
    see ``imagenet_class_index``), None for a file directly in the root. A sub-folder that names no class
    raises ValueError when ``strict``, else gives None."""
    index_of: dict[str, int | None] = {}
    labels = []
    for path in paths:
        name = class_folder(path)
        if name is not None and name not in index_of:
            try:
                index_of[name] = imagenet_class_index(name)
            except ValueError:
                if strict:
                    raise
                index_of[name] = None
        labels.append(None if name is None else index_of[name])
    return labels
