"""Images for the vision tower, on the app side: decode, convert to RGB and
resize by the artifact's rule; the compiled ``image_embed`` does the rest
(normalisation, patches).  Pillow and numpy only.

The rule is transformers' ``smart_resize`` (Qwen2-VL's processor, used by
every Qwen3.5 size), read from the artifact (``mlc-chat-config.json``'s
``image.resize``): sides rounded to multiples of ``factor`` (32), the pixel
count kept in ``[min_pixels, max_pixels]``, resampled with the PIL filter the
checkpoint's processor names (bicubic).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..errors import UserError


def smart_resize(height: int, width: int, rule: dict) -> tuple[int, int]:
    """The (height, width) an image of this size is resized to (transformers' smart_resize)."""
    factor, min_pixels, max_pixels = rule["factor"], rule["min_pixels"], rule["max_pixels"]
    if min(height, width) <= 0:
        raise UserError(f"the image is {width}x{height} pixels: nothing to see")
    ratio = max(height, width) / min(height, width)
    if ratio > rule.get("max_aspect_ratio", 200):
        raise UserError(
            f"the image is {width}x{height} pixels: an aspect ratio of {ratio:.0f} is more than "
            f"the {rule.get('max_aspect_ratio', 200)} the model's processor accepts"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def open_image(image) -> object:
    """A PIL image from a PIL image, a path, or a uint8 array [H, W, 3] (RGB) or
    [H, W] (grey); a file that is not an image, or is cut short, is one clear
    UserError."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise UserError(f"{path}: no such image file")
        try:
            with Image.open(path) as img:
                img.load()  # decode now: a truncated file fails here, not later
                return img.copy()
        except UnidentifiedImageError:
            raise UserError(f"{path}: not an image file Pillow can read") from None
        except Image.DecompressionBombError as e:  # more pixels than Pillow will decode
            raise UserError(f"{path}: the image is too large to decode ({e})") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise UserError(f"{path}: the image is corrupt or truncated ({e})") from None
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise UserError(f"an image array must be uint8, got {image.dtype}")
        if image.ndim == 3 and image.shape[2] == 3 or image.ndim == 2:
            return Image.fromarray(image)
        raise UserError(f"an image array must be [H, W, 3] RGB or [H, W] grey, got {image.shape}")
    raise UserError(f"an image is a PIL image, a path or a uint8 array, not {type(image).__name__}")


def prepare(image, rule: dict) -> np.ndarray:
    """The uint8 RGB pixels [H, W, 3] that ``image_embed`` takes: converted to
    RGB (as the processor's ``do_convert_rgb``), resized by ``rule``."""
    img = open_image(image)
    if img.mode != "RGB":
        img = img.convert("RGB")
    height, width = smart_resize(img.height, img.width, rule)
    if (height, width) != (img.height, img.width):
        img = img.resize((width, height), resample=rule["resample"])
    return np.asarray(img, dtype=np.uint8)


def grid(pixels: np.ndarray, factor: int) -> tuple[int, int]:
    """(rows, cols) of the image's token grid: one token per factor x factor cell."""
    return pixels.shape[0] // factor, pixels.shape[1] // factor


def expand_placeholders(ids: list[int], grids: list[tuple[int, int]], image_pad: int) -> list[int]:
    """Each single ``image_pad`` of ``ids`` repeated to its image's token count
    (rows x cols), as transformers' Qwen3-VL processor expands the chat
    template's placeholder; one placeholder per image, in order."""
    at = [i for i, t in enumerate(ids) if t == image_pad]
    if len(at) != len(grids):
        raise UserError(
            f"{len(grids)} image(s) given, but the prompt has {len(at)} <|image_pad|> "
            "placeholder(s)"
        )
    out, last = [], 0
    for i, (rows, cols) in zip(at, grids):
        out += ids[last:i] + [image_pad] * (rows * cols)
        last = i + 1
    return out + ids[last:]
