"""Training datasets: InsightFace ``.rec`` folders and image folders.

Each dataset returns ``(image, label)``: ``image`` float32 ``(3, 112, 112)`` RGB in ``[-1, 1]``
(``(x / 255 - 0.5) / 0.5``, randomly flipped left-right when ``flip=True``; ``uint8`` with
``normalize=False``, for :func:`normalize_images` to normalise a whole batch), ``label`` int64
scalar tensor. An item may be asked for as ``(index, flip)``, the caller deciding the flip. Each
exposes ``labels`` (int64 array, one per index) without decoding images, for the
identity-balanced sampler.

Bad data is caught as early as it can be: a ``.rec`` index is checked against every record's
header when the dataset is built; an image that cannot be decoded during training is replaced by
the next image of the same identity (in index order, cycling), warned about once per process,
and counted in the item when the dataset is built with ``report_bad=True``
(``(image, label, n_bad)``), so that the training loader can stop a run on badly damaged data
(:class:`otface.data.loader.TrainLoader`).
"""

from __future__ import annotations

import operator
import os
import warnings
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from otface.data.rec_labels import RecLabels, read_rec_labels
from otface.data.recordio import (
    IndexedRecordReader,
    RecordIOError,
    unpack_payload,
)

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
    "UndecodableImageError",
]

IMAGE_SIZE = 112
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_warned_resize = False


def _decode_bgr(data: bytes, *, where: str) -> np.ndarray:
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
    except cv2.error:
        img = None
    if img is None:
        raise UndecodableImageError(
            f"{where}: image bytes ({len(data)} bytes) could not be decoded"
        )
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
        UndecodableImageError: the bytes are not a decodable image (the message names ``where``).
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


class UndecodableImageError(RecordIOError):
    """An image's bytes cannot be read or decoded (the message names the file or record key)."""


def _parse_item(item: object, n: int) -> tuple[int, bool | None]:
    """``index`` or ``(index, flip)`` → ``(index in [0, n), flip or None)``."""
    flip = None
    if isinstance(item, tuple):
        if len(item) != 2 or not isinstance(item[1], (bool, np.bool_)):
            raise TypeError(f"expected an index or an (index, flip: bool) pair, got {item!r}")
        item, flip = item[0], bool(item[1])
    try:
        index = operator.index(item)
    except TypeError:
        raise TypeError(
            f"expected an index or an (index, flip: bool) pair, got {type(item).__name__}"
        ) from None
    if not -n <= index < n:
        raise IndexError(f"index {index} is out of range for a dataset of {n} images")
    return index % n, flip


class _ReplacingDataset(Dataset):
    """Shared ``__getitem__``: an undecodable image is replaced by the next image of the same
    identity in index order (cycling), warned about once per image and process, and counted.

    Subclasses set ``labels``, ``flip``, ``normalize``, ``report_bad`` and implement
    :meth:`_read_chw` and :meth:`_all_bad_error`.
    """

    labels: np.ndarray
    flip: bool
    normalize: bool
    report_bad: bool

    def _read_chw(self, index: int, flip: bool) -> torch.Tensor:
        """RGB ``uint8 (3, 112, 112)`` of ``index``; raises :class:`UndecodableImageError`."""
        raise NotImplementedError

    def _all_bad_error(self, label: int, members: np.ndarray) -> RecordIOError:
        raise NotImplementedError

    def _try_read(self, index: int, flip: bool, label: int) -> torch.Tensor | None:
        """The image of ``index``, or ``None`` if it is undecodable (warned about once)."""
        if not hasattr(self, "_bad"):
            self._bad: set[int] = set()  # per process: each DataLoader worker has its own
        if index in self._bad:
            return None
        try:
            return self._read_chw(index, flip)
        except UndecodableImageError as e:
            self._bad.add(index)
            warnings.warn(
                f"{e}; replaced by another image of identity {label} (not reported again by "
                "this process)",
                stacklevel=3,
            )
            return None

    def _same_identity(self, index: int) -> np.ndarray:
        """Indices of ``index``'s identity in index order, starting at ``index`` (cycling)."""
        if getattr(self, "_by_label", None) is None:  # built on the first bad image only
            self._by_label = np.argsort(self.labels, kind="stable")
            self._sorted_labels = self.labels[self._by_label]
        label = self.labels[index]
        lo, hi = np.searchsorted(self._sorted_labels, [label, label + 1])
        members = self._by_label[lo:hi]
        at = int(np.searchsorted(members, index))
        return np.roll(members, -at)

    def __getitem__(self, item: object) -> tuple[torch.Tensor, ...]:
        """``(image, label)``, or ``(image, label, n_bad)`` with ``report_bad=True``.

        Args:
            item: an index, or ``(index, flip)`` with the flip decided by the caller; with a
                plain index the image is flipped at random when the dataset's ``flip`` is set.
        """
        index, flip = _parse_item(item, len(self))
        if flip is None:
            flip = self.flip and _random_flip()
        label = int(self.labels[index])
        img, n_bad = self._try_read(index, flip, label), 0
        if img is None:
            members = self._same_identity(index)
            for candidate in members[1:].tolist():
                n_bad += 1  # the image tried last was undecodable
                img = self._try_read(candidate, flip, label)
                if img is not None:
                    break
            else:
                raise self._all_bad_error(label, np.sort(members))
        if getattr(self, "augment", None) is not None:
            img = self.augment(img)
        image, label_t = _finish(img, label, normalize=self.normalize)
        if self.report_bad:
            return image, label_t, torch.tensor(n_bad, dtype=torch.int64)
        return image, label_t


class RecDataset(_ReplacingDataset):
    """An InsightFace ``.rec`` folder (``train.rec`` + ``train.idx``), read without mxnet.

    The index is checked against every record's header when the dataset is built
    (:func:`read_rec_labels`). An undecodable image is replaced by another image of its
    identity (the training loader counts them).

    Args:
        root: folder holding ``train.rec`` and ``train.idx``.
        flip: random left-right flip for plain-index access.
        normalize: return float32 in ``[-1, 1]``; ``False`` returns ``uint8`` ``(3, H, W)``
            for :func:`normalize_images` to normalise batch-wise (faster).
        report_bad: items are ``(image, label, n_bad)``, ``n_bad`` an int64 scalar tensor
            counting the undecodable images met while producing the item.
        augment: called on each ``uint8 (3, H, W)`` image after the flip (e.g.
            :class:`otface.data.occluders.OcclusionAugment`), or None.

    Raises:
        FileNotFoundError: a file is missing. RecordIOError: malformed file or index (file,
            ``.idx`` line and key named).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        flip: bool = True,
        normalize: bool = True,
        report_bad: bool = False,
        augment=None,
    ) -> None:
        self.root = Path(root)
        self.reader = IndexedRecordReader(self.root / "train.rec", self.root / "train.idx")
        self.keys, self.labels, self.header0 = read_rec_labels(self.reader)
        self.flip = flip
        self.normalize = normalize
        self.report_bad = report_bad
        self.augment = augment

    def __len__(self) -> int:
        return int(self.keys.size)

    def _read_chw(self, index: int, flip: bool) -> torch.Tensor:
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
        return _decode_chw(image, where=where, flip=flip)

    def _all_bad_error(self, label: int, members: np.ndarray) -> RecordIOError:
        keys = self.keys[members].tolist()
        shown = ", ".join(map(str, keys[:5])) + (", ..." if len(keys) > 5 else "")
        return RecordIOError(
            f"{self.reader.rec_path}: all {len(keys)} images of identity {label} are "
            f"undecodable (record keys {shown})"
        )


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


class ImageFolderDataset(_ReplacingDataset):
    """A folder with one sub-folder per identity; labels follow sorted sub-folder names.

    ``flip``, ``normalize``, ``report_bad`` and ``augment`` are as in :class:`RecDataset`; an
    unreadable or undecodable file (a zero-byte ``.jpg``) is replaced by another image of its
    identity.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        flip: bool = True,
        normalize: bool = True,
        report_bad: bool = False,
        augment=None,
    ) -> None:
        self.root = Path(root)
        self.paths, self.labels, self.classes = scan_image_folder(self.root)
        self.flip = flip
        self.normalize = normalize
        self.report_bad = report_bad
        self.augment = augment

    def __len__(self) -> int:
        return len(self.paths)

    def _read_chw(self, index: int, flip: bool) -> torch.Tensor:
        path = self.paths[index]
        try:
            data = path.read_bytes()
        except OSError as e:
            raise UndecodableImageError(f"{path}: cannot read image ({e})") from e
        return _decode_chw(data, where=str(path), flip=flip)

    def _all_bad_error(self, label: int, members: np.ndarray) -> RecordIOError:
        return RecordIOError(
            f"{self.root / self.classes[label]}: all {members.size} images of identity {label} "
            "are unreadable or undecodable"
        )
