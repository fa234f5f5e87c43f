"""Request images -> the backend's input crops, (N, S, S, 3) uint8 RGB.

Two ways in, both checked before any embedding work:
- encoded files (PNG or JPEG, base64): decoded with Pillow, any size, grey or RGBA made RGB;
- a raw array: uint8, shape (N, H, W, 3), C order, base64 of its bytes (H = W = S, the
  backend's input side, is the usual case and passes untouched).

Then an aligner (ALIGNERS, chosen by the `aligner` setting) turns each decoded image into an
S x S crop:
- `resize`: the image is taken to be an aligned face crop and resized exactly as
  fl_sim.faces.to_uint8_rgb does, so the in-process oracle and the service agree;
- `yunet`: the face is found with YuNet and aligned with the five-landmark similarity
  transform SFace was trained with (fl_sim.face_detection; the crop cv2.FaceRecognizerSF.alignCrop
  makes). The highest-scoring face is taken; an image with none is refused with
  ImageError(422, "no_face"). An S x S image is taken to be an aligned crop already and passes
  untouched, as it does on the raw-array path (which never calls an aligner for it).
A new aligner registers in ALIGNERS; one that finds no face raises ImageError(422, "no_face").

The face gate (the `face_gate` defense, fl_sim.oracle_defenses) uses the same detector on the
crops, whatever the aligner, so faceless queries (noise, smooth blobs) never reach the model.
"""
from __future__ import annotations

import base64
import binascii
import io
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from fl_sim.face_detection import SCORE_THRESHOLD, align_face
from fl_sim.registry import Registry


@dataclass
class ImageError(Exception):
    """A request image or array that cannot be used; the API turns it into an error body."""

    status: int  # 413, 415 or 422
    code: str
    reason: str


MIN_SIDE = 8  # smaller images carry no face

# An aligner maps one decoded RGB image (H, W, 3) uint8 to the backend's (S, S, 3) crop.
Aligner = Callable[[np.ndarray, int], np.ndarray]
ALIGNERS: Registry[Aligner] = Registry("face aligner")


@ALIGNERS.register("resize")
def resize_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Treat the image as an aligned face crop: resize it to size x size (bilinear, antialiased)."""
    if image.shape[:2] == (size, size):
        return image
    import torch

    from fl_sim.faces import to_uint8_rgb

    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255.0
    return to_uint8_rgb(x, size)[0]


FACE_MIN_SCORE = SCORE_THRESHOLD  # the face gate's and the yunet aligner's least detection score


@ALIGNERS.register("yunet")
def yunet_crop(image: np.ndarray, size: int, min_score: float = FACE_MIN_SCORE) -> np.ndarray:
    """Detect the face (YuNet), take the best one and align it onto the SFace template."""
    if image.shape[:2] == (size, size):
        return image
    crop = align_face(image, size, min_score)
    if crop is None:
        h, w = image.shape[:2]
        raise ImageError(422, "no_face", f"no face found in a {w}x{h} image (YuNet score below {min_score})")
    return crop


def decode_image(data: str, index: int, max_pixels: int) -> np.ndarray:
    """One base64 PNG or JPEG -> (H, W, 3) uint8 RGB."""
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(415, "undecodable_image", f"images[{index}] is not valid base64") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw), formats=("PNG", "JPEG"))
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError(413, "image_too_large",
                                 f"images[{index}] is {w}x{h} pixels; at most {max_pixels} pixels are accepted")
            img.load()
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(413, "image_too_large", f"images[{index}] has too many pixels") from None
    except Exception as exc:  # Pillow raises many kinds (UnidentifiedImageError, OSError, SyntaxError, ...)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImageError(415, "undecodable_image", f"images[{index}] is not a readable PNG or JPEG ({first})") from None


def decode_images(images: Sequence[str], size: int, aligner: str, max_pixels: int) -> np.ndarray:
    align = ALIGNERS.get(aligner)
    crops = [align(decode_image(data, i, max_pixels), size) for i, data in enumerate(images)]
    return np.stack(crops)


def decode_array(dtype: str, shape: Sequence[int], data: str, size: int, aligner: str = "resize",
                 max_pixels: int = 4096 * 4096, max_batch: int | None = None) -> np.ndarray:
    """A raw uint8 array (N, H, W, 3) in C order, base64 -> (N, size, size, 3) crops."""
    if dtype != "uint8":
        raise ImageError(422, "bad_dtype", f"array.dtype must be 'uint8', got {dtype!r}")
    if (len(shape) != 4 or shape[0] < 1 or shape[3] != 3 or not all(s >= MIN_SIDE for s in shape[1:3])):
        raise ImageError(422, "bad_shape", f"array.shape must be [N, H, W, 3] (N >= 1, H and W >= {MIN_SIDE}; "
                         f"[N, {size}, {size}, 3] for this backend), got {list(shape)}")
    if shape[1] * shape[2] > max_pixels:
        raise ImageError(413, "image_too_large", f"array images are {shape[2]}x{shape[1]} pixels; "
                         f"at most {max_pixels} pixels are accepted")
    if max_batch is not None and shape[0] > max_batch:
        raise ImageError(413, "batch_too_large", f"{shape[0]} images in one request; at most {max_batch}")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(422, "bad_array", "array.data is not valid base64") from None
    expected = int(np.prod(shape))
    if len(raw) != expected:
        raise ImageError(422, "bad_array",
                         f"array.data holds {len(raw)} bytes; shape {list(shape)} of uint8 needs {expected}")
    images = np.frombuffer(raw, dtype=np.uint8).reshape(tuple(shape))
    if tuple(shape[1:3]) == (size, size):
        return images
    align = ALIGNERS.get(aligner)
    return np.stack([align(img, size) for img in images])


def encode_png(image: np.ndarray) -> str:
    """(H, W, 3) uint8 -> base64 PNG (for clients and tests)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


__all__ = ["ALIGNERS", "FACE_MIN_SCORE", "ImageError", "decode_array", "decode_images", "decode_image", "encode_png",
           "resize_crop", "yunet_crop"]
