"""Training datasets: InsightFace ``.rec`` folders and image folders.

Each dataset returns ``(image, label)``: ``image`` float32 ``(3, 112, 112)`` RGB in ``[-1, 1]``
(``(x / 255 - 0.5) / 0.5``, randomly flipped left-right when ``flip=True``; ``uint8`` with
``normalize=False``, for :func:`normalize_images` to normalise a whole batch), ``label`` int64
scalar tensor. Each exposes ``labels`` (int64 array, one per index) without decoding images, for
the identity-balanced sampler.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from otface.data.recordio import IndexedRecordReader, RecordIOError, unpack_payload

__all__ = [
    "IMAGE_EXTENSIONS",
    "IMAGE_SIZE",
    "RecLabels",
    "RecDataset",
    "ImageFolderDataset",
    "decode_image",
    "image_to_tensor",
    "normalize_images",
    "read_rec_labels",
    "scan_image_folder",
]

IMAGE_SIZE = 112
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_warned_resize = False


def _decode_bgr(data: bytes, *, where: str) -> np.ndarray:
    buf = np.frombuffer(data, dtype=np.uint8)
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
    if img is None:
        raise RecordIOError(f"{where}: image bytes ({len(data)} bytes) could not be decoded")
    if img.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
        global _warned_resize
        if not _warned_resize:
            _warned_resize = True
            warnings.warn(
                f"{where}: image is {img.shape[1]}x{img.shape[0]}, resizing to "
                f"{IMAGE_SIZE}x{IMAGE_SIZE} (further resizes are not reported)",
                stacklevel=3,
            )
        img = cv2.resize(img, (IMAGE_SIZE, IMAGE_SIZE), interpolation=cv2.INTER_LINEAR)
    return img


def decode_image(data: bytes, *, where: str) -> np.ndarray:
    """Decodes JPEG/PNG bytes to an RGB ``uint8`` array ``(112, 112, 3)``.

    Images of another size are resized (with one warning per process).

    Raises:
        RecordIOError: the bytes are not a decodable image (the message names ``where``).
    """
    return cv2.cvtColor(_decode_bgr(data, where=where), cv2.COLOR_BGR2RGB)


def _decode_chw(data: bytes, *, where: str, flip: bool) -> torch.Tensor:
    """Encoded image → RGB ``uint8 (3, 112, 112)``, mirrored when ``flip``."""
    bgr = _decode_bgr(data, where=where)
    if flip:
        bgr = cv2.flip(bgr, 1)
    return torch.from_numpy(np.stack(cv2.split(bgr)[::-1]))


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """``uint8`` pixels → float32 ``(x / 255 - 0.5) / 0.5 = x / 127.5 - 1`` in ``[-1, 1]``.

    Any shape and device: a training loop may move ``uint8`` batches to the GPU (4× fewer
    bytes) and normalise there.
    """
    return images.to(torch.float32).mul_(1.0 / 127.5).sub_(1.0)


def image_to_tensor(img: np.ndarray, *, flip: bool) -> torch.Tensor:
    """RGB ``uint8 (H, W, 3)`` → float32 ``(3, H, W)`` in ``[-1, 1]``, optionally mirrored."""
    if flip:
        img = img[:, ::-1]
    return normalize_images(torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))))


def _random_flip() -> bool:
    # torch's RNG: DataLoader seeds it per worker, so flips differ across workers and epochs.
    return bool(torch.randint(0, 2, ()).item())


class RecLabels(NamedTuple):
    """Image records of a ``.rec`` file: their keys and labels (int64, same length)."""

    keys: np.ndarray
    labels: np.ndarray
    header0: bool


def read_rec_labels(reader: IndexedRecordReader) -> RecLabels:
    """Finds the image records of a ``.rec`` file and their labels without decoding images.

    With header-0 identity ranges, only record 0 and the identity records are read; otherwise
    every record's header is read (``label``, or the first of its float labels).

    Raises:
        RecordIOError: inconsistent identity ranges or a negative label (names file and key).
    """
    where = str(reader.rec_path)
    if len(reader) == 0:
        raise RecordIOError(f"{where}: the index {reader.idx_path} lists no records")
    if 0 in reader:
        head = reader.read_header(0)
        if head.flag >= 2 and _is_header0(head.label, reader):
            first, end = int(head.label[0]), int(head.label[1])
            labels = np.full(first - 1, -1, dtype=np.int64)
            for c, key in enumerate(range(first, end)):
                rng = reader.read_header(key)
                if rng.flag < 2:
                    raise RecordIOError(
                        f"{where}, record key {key}: identity record {c} has no (start, end) range"
                    )
                a, b = int(rng.label[0]), int(rng.label[1])
                if not 1 <= a <= b <= first:
                    raise RecordIOError(
                        f"{where}, record key {key}: identity {c} range [{a}, {b}) is outside "
                        f"the image keys [1, {first})"
                    )
                labels[a - 1 : b - 1] = c
            missing = np.flatnonzero(labels < 0)
            if missing.size:
                raise RecordIOError(
                    f"{where}: image record key {int(missing[0]) + 1} (and {missing.size - 1} "
                    "more) is in no identity range of the header-0 layout"
                )
            return RecLabels(np.arange(1, first, dtype=np.int64), labels, True)
    labels = np.empty(len(reader), dtype=np.int64)
    for i, key in enumerate(reader.keys):
        head = reader.read_header(int(key))
        value = head.label[0] if head.flag > 0 else head.label
        labels[i] = int(value)
        if labels[i] < 0:
            raise RecordIOError(f"{where}, record key {int(key)}: negative label {value}")
    return RecLabels(reader.keys.copy(), labels, False)


def _is_header0(label: np.ndarray, reader: IndexedRecordReader) -> bool:
    first, end = float(label[0]), float(label[1])
    if first != int(first) or end != int(end) or not 1 <= first <= end:
        return False
    return (first == end or int(end) - 1 in reader) and (first == 1 or int(first) - 1 in reader)


class RecDataset(Dataset):
    """An InsightFace ``.rec`` folder (``train.rec`` + ``train.idx``), read without mxnet.

    Args:
        root: folder holding ``train.rec`` and ``train.idx``.
        flip: random left-right flip.
        normalize: return float32 in ``[-1, 1]``; ``False`` returns ``uint8`` ``(3, H, W)``
            for :func:`normalize_images` to normalise batch-wise (faster).

    Raises:
        FileNotFoundError: a file is missing. RecordIOError: malformed file (file and key named).
    """

    def __init__(
        self, root: str | os.PathLike, *, flip: bool = True, normalize: bool = True
    ) -> None:
        self.root = Path(root)
        self.reader = IndexedRecordReader(self.root / "train.rec", self.root / "train.idx")
        self.keys, self.labels, self.header0 = read_rec_labels(self.reader)
        self.flip = flip
        self.normalize = normalize

    def __len__(self) -> int:
        return int(self.keys.size)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = int(self.keys[index])
        where = f"{self.reader.rec_path}, record key {key}"
        header, image = unpack_payload(self.reader.read(key), where=where)
        label = int(self.labels[index])
        stored = header.label[0] if header.flag > 0 else header.label
        if int(stored) != label:
            raise RecordIOError(
                f"{where}: header label {stored} disagrees with identity {label} of the "
                "header-0 ranges"
            )
        img = _decode_chw(image, where=where, flip=self.flip and _random_flip())
        return _finish(img, label, normalize=self.normalize)


def scan_image_folder(root: str | os.PathLike) -> tuple[list[Path], np.ndarray, list[str]]:
    """Lists images of a folder with one sub-folder per identity.

    Returns:
        ``(paths, labels, class_names)``: labels follow the sorted sub-folder names, files are
        sorted within a sub-folder.

    Raises:
        FileNotFoundError: ``root`` is missing or holds no images (names it).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    paths: list[Path] = []
    labels: list[int] = []
    for c, name in enumerate(classes):
        for f in sorted((root / name).iterdir()):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                paths.append(f)
                labels.append(c)
    if not paths:
        raise FileNotFoundError(
            f"{root}: no images found (expected one sub-folder per identity holding "
            f"{'/'.join(IMAGE_EXTENSIONS)} files)"
        )
    return paths, np.asarray(labels, dtype=np.int64), classes


def _finish(img: torch.Tensor, label: int, *, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return (normalize_images(img) if normalize else img), torch.tensor(label, dtype=torch.int64)


class ImageFolderDataset(Dataset):
    """A folder with one sub-folder per identity; labels follow sorted sub-folder names.

    ``flip`` and ``normalize`` are as in :class:`RecDataset`.
    """

    def __init__(
        self, root: str | os.PathLike, *, flip: bool = True, normalize: bool = True
    ) -> None:
        self.root = Path(root)
        self.paths, self.labels, self.classes = scan_image_folder(self.root)
        self.flip = flip
        self.normalize = normalize

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        path = self.paths[index]
        try:
            data = path.read_bytes()
        except OSError as e:
            raise OSError(f"{path}: cannot read image ({e})") from e
        img = _decode_chw(data, where=str(path), flip=self.flip and _random_flip())
        return _finish(img, int(self.labels[index]), normalize=self.normalize)
