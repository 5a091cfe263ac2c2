"""Train with OTFace in this arcface_torch checkout.

    torchrun --nproc_per_node=8 train_otface.py configs/ms1mv3_r100_otface
    python train_otface.py configs/ms1mv3_r100_otface        # one process (CPU: gloo)

Written by ``python -m otface.patch apply``; ``python -m otface.patch revert`` removes it. The
networks come from this checkout's ``backbones.get_model``; the loss, sampler, data reader,
Partial FC and checkpoints come from the ``otface`` package (installed with ``pip install -e``).
"""

import argparse
import os
import sys

TREE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TREE)  # this checkout's `backbones`, whatever the working directory

try:
    from otface.patch_train import main
except ImportError as err:
    sys.exit(f"error: train_otface.py needs the otface package (pip install -e it): {err}")

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="arcface_torch training with the OTFace loss")
    parser.add_argument("config", help="job config, e.g. configs/ms1mv3_r100_otface")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in the output folder (the same as resume = True in the config)",
    )
    args = parser.parse_args()
    sys.exit(main(args.config, tree=TREE, resume=args.resume))
