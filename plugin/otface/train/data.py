"""The training run's data: open and check the data set before anything is written, then build
this rank's loader. Bad data or a mismatch with the config is a :class:`ConfigError`."""

from __future__ import annotations

from otface.config import ConfigError
from otface.train.distributed import DistEnv

__all__ = ["build_loader", "prepare_data"]


def prepare_data(cfg):
    """Resolve ``cfg.rec`` (generating the demo data on first use), open the training set and
    check it against the config: index, labels, sizes, and the sampler's needs. Bad data or a
    mismatch is a :class:`ConfigError` naming the file or key; run it before anything is
    written. Returns the dataset for :func:`otface.train.loop.fit` (opened once: a ``.rec``
    index check reads every record's header)."""
    from otface.data import DatasetInfo, build_dataset, check_dataset_config, prepare_rec
    from otface.data.loader import resolve_auto_sizes
    from otface.data.sampler import num_batches_per_epoch

    try:
        cfg.rec = prepare_rec(cfg.rec, demo_occlusion_p=cfg.get("demo_occlusion_p"))
        dataset = build_dataset(cfg, normalize=False, report_bad=True)
        # "auto" sizes, and a line each for the log (written once logging is set up: fit).
        dataset.size_notes = resolve_auto_sizes(cfg, dataset)
        if cfg.rec != "synthetic":
            labels = dataset.labels
            check_dataset_config(cfg, DatasetInfo(int(labels.max()) + 1, int(labels.size)))
        num_batches_per_epoch(cfg.num_image, batch_size=cfg.batch_size, world_size=1)
    except (ValueError, OSError) as err:  # RecordIOError is a ValueError
        raise ConfigError(str(err)) from None
    return dataset


def build_loader(cfg, env: DistEnv, dataset):
    """This rank's training DataLoader over ``dataset`` (from :func:`prepare_data`); the
    sampler's and the dataset's checks (too few identities, ...) fail as a
    :class:`ConfigError`."""
    from otface.data import build_train_loader

    # On CUDA the loader's uint8 batches stay pinned and are normalised on the GPU in
    # train_step; normalising them on the host would hand out unpinned float32 batches
    # (4x the bytes, a synchronous copy) and cost the main process CPU time every step.
    try:
        return build_train_loader(
            cfg,
            rank=env.rank,
            world_size=env.world_size,
            normalize=env.device.type != "cuda",
            dataset=dataset,
        )
    except ValueError as err:  # the sampler's or dataset's checks: too few identities, ...
        raise ConfigError(str(err)) from None
