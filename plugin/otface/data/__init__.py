"""Training data without mxnet: InsightFace RecordIO, image folders, synthetic and demo data,
and the identity-balanced P×K sampler.

Typical use (what the trainer does)::

    cfg.rec = prepare_rec(cfg.rec)
    check_dataset_config(cfg, dataset_info(cfg.rec))
    loader = build_train_loader(cfg, rank=rank, world_size=world_size)
    for epoch in range(cfg.num_epoch):
        loader.batch_sampler.set_epoch(epoch)
        for images, labels in loader: ...
"""

from otface.data.datasets import ImageFolderDataset, RecDataset
from otface.data.loader import (
    DatasetInfo,
    build_dataset,
    build_train_loader,
    check_dataset_config,
    dataset_info,
    prepare_rec,
    resolve_auto_sizes,
    sizes_from_data,
)
from otface.data.rec_writer import WrittenRec, write_rec
from otface.data.recordio import IndexedRecordReader, IRHeader, RecordIOError
from otface.data.sampler import PKBatchSampler, UniformBatchSampler
from otface.data.synthetic import SyntheticDataset

__all__ = [
    "DatasetInfo",
    "ImageFolderDataset",
    "IndexedRecordReader",
    "IRHeader",
    "PKBatchSampler",
    "RecDataset",
    "RecordIOError",
    "SyntheticDataset",
    "UniformBatchSampler",
    "WrittenRec",
    "build_dataset",
    "build_train_loader",
    "check_dataset_config",
    "dataset_info",
    "prepare_rec",
    "resolve_auto_sizes",
    "sizes_from_data",
    "write_rec",
]
