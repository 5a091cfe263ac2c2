"""A ``train.py`` for torchrun in tests: trains as ``python train.py CONFIG``, and writes the
batches this rank's sampler dealt and torchrun's variables to ``RECORD_DIR/rank{RANK}.json``."""

import json
import os
import sys

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "plugin")
)

from otface.data.sampler import PKBatchSampler  # noqa: E402
from otface.train import main  # noqa: E402

_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "GROUP_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR")


def _recording(batches):
    original = PKBatchSampler.__iter__

    def __iter__(self):
        for b, batch in enumerate(original(self), start=self.start_batch):
            batches.append([self.epoch, b, batch])
            yield batch

    return __iter__


if __name__ == "__main__":
    config, record_dir = sys.argv[1:3]
    batches: list = []
    PKBatchSampler.__iter__ = _recording(batches)
    code = main(config)
    record = {"env": {k: os.environ.get(k) for k in _VARS}, "batches": batches}
    with open(os.path.join(record_dir, f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump(record, f)
    sys.exit(code)
