"""Reading and writing InsightFace's ``.bin`` verification sets (LFW, CFP-FP, AgeDB-30, ...).

A ``.bin`` file is a pickle of ``(bins, issame_list)``: ``bins`` holds ``2 * P`` encoded images
(JPEG/PNG bytes; pair ``k`` is ``bins[2k], bins[2k + 1]``) and ``issame_list`` holds ``P``
booleans. Files written by Python 2 hold ``str`` images and need ``encoding="bytes"``. Images are
decoded with OpenCV, no mxnet.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import List, NamedTuple, Sequence, Tuple, Union

import cv2
import numpy as np

__all__ = ["PairSet", "list_bin_sets", "read_bin", "write_bin", "decode_image", "load_image_file"]

PathLike = Union[str, Path]


class PairSet(NamedTuple):
    """Decoded verification pairs.

    Attributes:
        images: ``(2P, 3, H, W)`` uint8 RGB; pair ``k`` is ``images[2k], images[2k + 1]``.
        issame: ``(P,)`` bool, True for same-identity pairs.
    """

    images: np.ndarray
    issame: np.ndarray


def _to_buffer(item: object, *, where: str) -> np.ndarray:
    if isinstance(item, np.ndarray):
        return np.ascontiguousarray(item).view(np.uint8).reshape(-1)
    if isinstance(item, str):  # a Python-2 ``str`` read back as latin-1 text
        item = item.encode("latin-1")
    if isinstance(item, (bytes, bytearray, memoryview)):
        return np.frombuffer(item, dtype=np.uint8)
    raise ValueError(f"{where} is a {type(item).__name__}, expected encoded image bytes")


def decode_image(
    data: Union[bytes, np.ndarray],
    *,
    image_size: Tuple[int, int] = (112, 112),
    where: str = "image",
) -> np.ndarray:
    """Decode an encoded image to ``(3, H, W)`` uint8 RGB, resized to ``image_size`` (H, W)."""
    img = cv2.imdecode(_to_buffer(data, where=where), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f"{where} cannot be decoded as an image")
    return _to_chw_rgb(img, image_size)


def load_image_file(path: PathLike, *, image_size: Tuple[int, int] = (112, 112)) -> np.ndarray:
    """Read an (already aligned) face image file as ``(3, H, W)`` uint8 RGB."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise FileNotFoundError(f"cannot read image {path} (missing or not an image)")
    return _to_chw_rgb(img, image_size)


def _to_chw_rgb(img_bgr: np.ndarray, image_size: Tuple[int, int]) -> np.ndarray:
    height, width = image_size
    if img_bgr.shape[:2] != (height, width):
        img_bgr = cv2.resize(img_bgr, (width, height), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(img_bgr[:, :, ::-1].transpose(2, 0, 1))


def _unpickle(path: Path) -> object:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return pickle.loads(raw)
    except UnicodeDecodeError:
        return pickle.loads(raw, encoding="bytes")


def list_bin_sets(folder: PathLike) -> List[str]:
    """Names (file stems, sorted) of the ``.bin`` files in ``folder``; [] when it does not exist."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.bin") if p.is_file())


def read_bin(path: PathLike, *, image_size: Tuple[int, int] = (112, 112)) -> PairSet:
    """Read and decode a ``.bin`` verification set.

    Args:
        path: the ``.bin`` file.
        image_size: ``(H, W)`` of the returned images; others are resized.

    Returns:
        :class:`PairSet` with ``images`` ``(2P, 3, H, W)`` uint8 RGB and ``issame`` ``(P,)``.
    """
    path = Path(path)
    try:
        obj = _unpickle(path)
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise ValueError(f"{path} is not a readable .bin pickle: {exc}") from exc
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise ValueError(f"{path}: expected a pickled (bins, issame_list) pair")
    bins, issame_list = obj
    issame = np.asarray(issame_list, dtype=bool).reshape(-1)
    if len(bins) != 2 * len(issame):
        raise ValueError(
            f"{path}: {len(bins)} images for {len(issame)} pairs (expected {2 * len(issame)})"
        )
    images = np.empty((len(bins), 3, image_size[0], image_size[1]), dtype=np.uint8)
    # Pair sets repeat images (each demo photo is in several pairs): decode each distinct
    # encoding once.
    first_row: dict = {}
    for idx, item in enumerate(bins):
        key = bytes(_to_buffer(item, where=f"{path} image #{idx}"))
        row = first_row.setdefault(key, idx)
        if row == idx:
            images[idx] = decode_image(item, image_size=image_size, where=f"{path} image #{idx}")
        else:
            images[idx] = images[row]
    return PairSet(images=images, issame=issame)


def write_bin(
    path: PathLike,
    images: Sequence[Union[bytes, np.ndarray]],
    issame: Sequence[bool],
    *,
    ext: str = ".png",
) -> Path:
    """Write a ``.bin`` set readable by arcface_torch and by :func:`read_bin`.

    Args:
        path: output file.
        images: ``2P`` items, each encoded bytes or an ``(H, W, 3)`` uint8 RGB array (encoded
            with ``ext``; ``.png`` is lossless).
        issame: ``P`` booleans.
    """
    path = Path(path)
    if len(images) != 2 * len(issame):
        raise ValueError(f"{len(images)} images for {len(issame)} pairs (need twice as many)")
    bins: List[bytes] = []
    for idx, item in enumerate(images):
        if isinstance(item, np.ndarray) and item.ndim == 3:
            ok, buf = cv2.imencode(ext, np.ascontiguousarray(item[:, :, ::-1]))
            if not ok:
                raise ValueError(f"image #{idx} cannot be encoded as {ext}")
            item = buf.tobytes()
        bins.append(bytes(item))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        pickle.dump((bins, [bool(s) for s in issame]), f, protocol=pickle.HIGHEST_PROTOCOL)
    tmp.replace(path)
    return path
