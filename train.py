"""Train a face-recognition model: ``python train.py configs/NAME`` or
``torchrun --nproc_per_node=N train.py configs/NAME``."""

import argparse
import os
import sys

# Run from a checkout without `pip install -e .`: the package lives under plugin/.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "plugin"))

from otface.openmp import configure_openmp  # noqa: E402

configure_openmp()  # before torch loads OpenMP: CPU runs that survive a busy machine

from otface.train import main  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="arcface_torch-style training with OTFace")
    parser.add_argument("config", help="config to train, e.g. configs/demo_otface")
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument(
        "--overwrite",
        action="store_const",
        const="overwrite",
        dest="existing",
        help="train into an output folder that holds another run, replacing it",
    )
    existing.add_argument(
        "--move-aside",
        action="store_const",
        const="move-aside",
        dest="existing",
        help="rename an output folder that holds another run to OUTPUT.<date> first",
    )
    existing.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in the output folder from its last checkpoint "
        "(the same as resume = True in the config)",
    )
    args = parser.parse_args()
    sys.exit(main(args.config, existing=args.existing or "refuse", resume=args.resume))
