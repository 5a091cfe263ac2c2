"""From a config's ``rec`` to a training DataLoader.

``rec`` is ``"synthetic"``, ``"demo"`` (the embedded data set, generated on first use), a folder
with ``train.rec`` / ``train.idx``, or an image folder with one sub-folder per identity.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from otface.data.datasets import (
    IMAGE_EXTENSIONS,
    ImageFolderDataset,
    RecDataset,
    normalize_images,
    read_rec_labels,
    scan_image_folder,
)
from otface.data.recordio import IndexedRecordReader
from otface.data.sampler import FlipBatchSampler, PKBatchSampler, UniformBatchSampler
from otface.data.synthetic import SyntheticDataset

__all__ = [
    "DatasetInfo",
    "SAMPLER_TYPES",
    "TooManyBadImages",
    "TrainLoader",
    "build_dataset",
    "build_train_loader",
    "check_dataset_config",
    "dataset_info",
    "prepare_rec",
    "resolve_auto_sizes",
    "sizes_from_data",
    "worker_start_method",
]

SAMPLER_TYPES = ("pk", "uniform")


class DatasetInfo(NamedTuple):
    """Sizes of a training set: ``num_classes = max(label) + 1`` and the number of images."""

    num_classes: int
    num_image: int


def _is_rec_folder(path: Path) -> bool:
    return (path / "train.rec").is_file() or (path / "train.idx").is_file()


def prepare_rec(rec: str | os.PathLike, *, demo_occlusion_p: float | None = None) -> str:
    """Resolves ``config.rec`` to something :func:`build_train_loader` reads.

    ``"synthetic"`` is returned as is; ``"demo"`` generates the embedded demo set on first use
    (with ``demo_occlusion_p``, the variant whose training images carry occluders with that
    probability) and returns its folder; a folder must hold ``train.rec`` + ``train.idx`` or
    identity sub-folders with images.

    Raises:
        FileNotFoundError: the folder is missing or holds neither layout (the message names it).
    """
    if rec == "synthetic":
        return "synthetic"
    if rec == "demo":
        from otface.demo.generate import ensure_demo

        return str(ensure_demo(train_occlusion_p=demo_occlusion_p))
    path = Path(rec).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"config.rec={str(rec)!r}: no such folder (expected a folder with train.rec/train.idx, "
            "an image folder with one sub-folder per identity, 'synthetic' or 'demo')"
        )
    if _is_rec_folder(path):
        for name in ("train.rec", "train.idx"):
            if not (path / name).is_file():
                raise FileNotFoundError(f"config.rec={str(rec)!r}: {path / name} is missing")
        return str(path)
    for sub in path.iterdir():
        if sub.is_dir() and any(
            f.suffix.lower() in IMAGE_EXTENSIONS for f in sub.iterdir() if f.is_file()
        ):
            return str(path)
    raise FileNotFoundError(
        f"config.rec={str(rec)!r}: {path} holds neither train.rec/train.idx nor identity "
        f"sub-folders with images ({'/'.join(IMAGE_EXTENSIONS)})"
    )


def dataset_info(rec_path: str | os.PathLike) -> DatasetInfo | None:
    """Counts identities and images of a prepared ``rec`` without decoding images.

    Returns ``None`` for ``"synthetic"`` (its sizes come from the config).
    """
    if rec_path == "synthetic":
        return None
    path = Path(prepare_rec(rec_path))
    if _is_rec_folder(path):
        reader = IndexedRecordReader(path / "train.rec", path / "train.idx")
        try:
            labels = read_rec_labels(reader).labels
        finally:
            reader.close()
    else:
        labels = scan_image_folder(path)[1]
    return DatasetInfo(int(labels.max()) + 1, int(labels.size))


def _property_classes(path: Path) -> int:
    """The number of classes in a ``property`` file (``"num_classes,112,112"``)."""
    try:
        first = path.read_text(encoding="ascii", errors="replace").strip().splitlines()[0]
        return int(first.split(",")[0])
    except (OSError, IndexError, ValueError):
        raise ValueError(
            f"{path}: not a property file (expected a first line 'num_classes,112,112')"
        ) from None


def sizes_from_data(dataset: Dataset) -> tuple[DatasetInfo, str]:
    """``(num_classes, num_image)`` of a built training set, and where the number of classes
    was read: a ``.rec``'s header-0 ranges (identities without images count), else its
    ``property`` file, else ``max(label) + 1``; an image folder's identity sub-folders.

    Raises:
        ValueError: a ``property`` file that is unreadable or lists fewer classes than the
            labels need (names the file and both values).
    """
    labels = np.asarray(dataset.labels)
    images = int(labels.size)
    top = int(labels.max()) + 1 if images else 0
    if isinstance(dataset, RecDataset):
        rec = dataset.root / "train.rec"
        if dataset.header0:
            return DatasetInfo(int(dataset.header0), images), f"header 0 of {rec}"
        prop = dataset.root / "property"
        if prop.is_file():
            classes = _property_classes(prop)
            if classes < top:
                raise ValueError(
                    f"{prop} says {classes} classes, but {rec} has labels up to {top - 1} "
                    f"({top} classes); correct the property file or remove it"
                )
            return DatasetInfo(classes, images), str(prop)
        return DatasetInfo(top, images), f"the labels of {rec} (max label + 1)"
    if isinstance(dataset, ImageFolderDataset):
        classes = max(len(dataset.classes), top)
        return DatasetInfo(classes, images), f"the identity sub-folders of {dataset.root}"
    return DatasetInfo(top, images), f"the labels of {type(dataset).__name__}"


def resolve_auto_sizes(cfg: Any, dataset: Dataset) -> list[str]:
    """Replace ``"auto"`` in ``cfg.num_classes`` / ``cfg.num_image`` by the data's sizes
    (:func:`sizes_from_data`); returns a line per replaced key, for the log."""
    auto = [key for key in ("num_classes", "num_image") if cfg[key] == "auto"]
    if not auto:
        return []
    info, source = sizes_from_data(dataset)
    notes = []
    for key in auto:
        value = getattr(info, key)
        cfg[key] = value
        where = source if key == "num_classes" else f"the image records of {cfg.rec}"
        notes.append(f"{key} = 'auto': {value}, from {where}")
    return notes


def check_dataset_config(cfg: Any, info: DatasetInfo | None) -> None:
    """Checks ``config.num_classes`` / ``config.num_image`` against the data.

    Raises:
        ValueError: ``num_classes`` smaller than the data's identities (labels out of range), or
            ``num_image`` larger than the data's images; the message names the key and both values.
    """
    if info is None:
        return
    if int(cfg.num_classes) < info.num_classes:
        raise ValueError(
            f"config.num_classes={cfg.num_classes} but the data in {cfg.rec!r} has labels up to "
            f"{info.num_classes - 1} (set num_classes >= {info.num_classes})"
        )
    if int(cfg.num_image) > info.num_image:
        raise ValueError(
            f"config.num_image={cfg.num_image} but the data in {cfg.rec!r} has "
            f"{info.num_image} images (set num_image = {info.num_image})"
        )


def build_dataset(
    cfg: Any, *, flip: bool = True, normalize: bool = True, report_bad: bool = False
) -> Dataset:
    """The training dataset named by ``cfg.rec`` (``labels`` attribute included).

    ``normalize=False`` makes every dataset return ``uint8`` images for
    :func:`otface.data.datasets.normalize_images`.
    ``report_bad=True`` makes file datasets return ``(image, label, n_undecodable_replaced)``.
    ``cfg.augment.occlusion_p > 0`` draws occluders on file datasets' images
    (:mod:`otface.data.occluders`); synthetic data is never augmented.
    """
    rec = prepare_rec(cfg.rec)
    if rec == "synthetic":
        return SyntheticDataset(
            int(cfg.num_image), int(cfg.num_classes), seed=int(cfg.seed), pixels=not normalize
        )
    path = Path(rec)
    augment = _occlusion_augment(cfg)
    kwargs = dict(flip=flip, normalize=normalize, report_bad=report_bad, augment=augment)
    if _is_rec_folder(path):
        return RecDataset(path, **kwargs)
    return ImageFolderDataset(path, **kwargs)


def _occlusion_augment(cfg: Any):
    """The config's occlusion augmentation (``augment`` section), or None when it is off."""
    section = cfg.get("augment") or {}
    p = float(section.get("occlusion_p", 0.0))
    if p == 0.0:
        return None
    from otface.data.occluders import OCCLUDERS, OcclusionAugment

    return OcclusionAugment(p, section.get("occluders", OCCLUDERS))


class TooManyBadImages(RuntimeError):
    """More undecodable images in one epoch than ``config.max_bad_image_fraction`` allows."""


class TrainLoader(DataLoader):
    """A DataLoader whose workers send ``uint8`` batches, normalised to float32 in ``[-1, 1]``
    as they are handed out (4× less inter-process traffic than float batches).

    ``normalize=False`` hands out the ``uint8`` batches (for :func:`normalize_images` on the
    GPU); float32 batches (synthetic data) pass through unchanged.

    With ``max_bad_images`` set, the dataset reports per item how many undecodable images it
    replaced (a third batch element); they are summed in ``bad_images`` (this epoch) and
    ``bad_images_total``, and more than ``max_bad_images`` in one epoch raises
    :class:`TooManyBadImages`.
    """

    def __init__(
        self,
        *args: Any,
        normalize: bool = True,
        max_bad_images: int | None = None,
        images_per_epoch: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.normalize = normalize
        self.max_bad_images = max_bad_images
        self.images_per_epoch = images_per_epoch
        self.bad_images = 0
        self.bad_images_total = 0

    def __iter__(self):
        self.bad_images = 0
        for batch in super().__iter__():
            images, labels = batch[0], batch[1]
            if self.max_bad_images is not None:
                self._count_bad(int(batch[2].sum()))
            if self.normalize and images.dtype == torch.uint8:
                images = normalize_images(images)
            yield images, labels

    def _count_bad(self, n: int) -> None:
        if not n:
            return
        self.bad_images += n
        self.bad_images_total += n
        if self.bad_images > self.max_bad_images:
            hint = ""
            if self.max_bad_images == 0 and self.images_per_epoch:
                # A small data set: the fraction times the images read rounds down to none.
                hint = (
                    f" (it rounds down to 0 for the {self.images_per_epoch} images read per epoch; "
                    f"max_bad_image_fraction = {1.0 / self.images_per_epoch:.3g} allows one)"
                )
            noun = "image" if self.bad_images == 1 else "images"
            raise TooManyBadImages(
                f"{self.bad_images} undecodable {noun} in this epoch of {self.dataset_name}, "
                f"more than the {self.max_bad_images} that config.max_bad_image_fraction allows"
                f"{hint}; the warnings above name them"
            )

    @property
    def dataset_name(self) -> str:
        return str(getattr(self.dataset, "root", type(self.dataset).__name__))


def _worker_init(worker_id: int) -> None:
    # Decoding parallelism comes from the workers; one thread each avoids oversubscription.
    import cv2

    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def worker_start_method() -> str:
    """How DataLoader workers are started: ``"forkserver"`` where the platform has it, else
    ``"spawn"``; never ``"fork"``.

    A forked child inherits the parent's locks but not its threads. After the parent has used
    OpenCV's or OpenMP's thread pools (rendering the demo data, decoding the verification set,
    a first forward pass), a forked worker can block forever on a lock held by a thread that
    does not exist in the child: the first-run hang. A forkserver starts workers from a clean
    single-threaded process.
    """
    import multiprocessing as mp

    return "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"


def build_train_loader(
    cfg: Any,
    *,
    rank: int,
    world_size: int,
    normalize: bool = True,
    dataset: Dataset | None = None,
) -> TrainLoader:
    """The training DataLoader of one rank.

    Yields ``(images float32 (B, 3, 112, 112) in [-1, 1], labels int64 (B,))`` with
    ``B = cfg.batch_size``; ``len(loader) == cfg.num_image // (cfg.batch_size * world_size)``.
    ``loader.batch_sampler.set_epoch(epoch, start_batch=s)`` selects the epoch's order and skips
    its first ``s`` batches without reading them. ``normalize=False`` yields ``uint8`` images
    (normalise them with :func:`otface.data.datasets.normalize_images`, e.g. on the GPU).
    ``dataset`` is the one :func:`build_dataset` made with ``normalize=False, report_bad=True``
    (built here when not given).

    Config keys used: ``rec, batch_size, num_classes, num_image, seed, num_workers,
    sampler.type ("pk" | "uniform"), sampler.k``.
    """
    if dataset is None:
        dataset = build_dataset(cfg, normalize=False, report_bad=True)
    labels = np.asarray(dataset.labels)
    if labels.size and int(labels.max()) >= int(cfg.num_classes):
        raise ValueError(
            f"config.num_classes={cfg.num_classes} but {cfg.rec!r} has label {int(labels.max())}"
        )
    sampler_cfg = cfg.get("sampler", None) or {}
    kind = sampler_cfg.get("type", "pk")
    common = dict(
        batch_size=int(cfg.batch_size),
        rank=int(rank),
        world_size=int(world_size),
        seed=int(cfg.seed),
        num_image=int(cfg.num_image),
    )
    if kind == "pk":
        batch_sampler = PKBatchSampler(labels, k=int(sampler_cfg.get("k", 4)), **common)
    elif kind == "uniform":
        batch_sampler = UniformBatchSampler(len(dataset), **common)
    else:
        raise ValueError(f"config.sampler.type={kind!r} is not one of {SAMPLER_TYPES}")
    files = isinstance(dataset, (RecDataset, ImageFolderDataset))
    if files:
        # Flips decided by the sampler: the same for any num_workers and after a resume.
        batch_sampler = FlipBatchSampler(batch_sampler, seed=int(cfg.seed), rank=int(rank))
    max_bad = per_rank_epoch = None
    if files:
        per_rank_epoch = batch_sampler.__len__() * int(cfg.batch_size)
        max_bad = int(float(cfg.get("max_bad_image_fraction", 0.001)) * per_rank_epoch)
    num_workers = int(cfg.get("num_workers", 0))
    return TrainLoader(
        dataset,
        normalize=normalize,
        max_bad_images=max_bad,
        images_per_epoch=per_rank_epoch,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=_worker_init if num_workers > 0 else None,
        multiprocessing_context=worker_start_method() if num_workers > 0 else None,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(int(cfg.seed) * 1000 + int(rank)),
    )
