"""Trains one ablation run from its frozen config: ``python -m otface.ablate.train_run FILE``.

The ablation starts this in a child process (or under ``torchrun``), one per run. ``FILE`` is a
complete config written by :func:`otface.ablate.plan.write_frozen_config`, so it is read without
``configs/base.py``.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

__all__ = ["main"]


def _load_frozen(path: str):
    from otface.config import load_config

    return load_config(path, base=path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from otface.train.run import main as train_main

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m otface.ablate.train_run CONFIG_FILE", file=sys.stderr)
        return 2
    # The ablation owns its run folders: a run killed before its first checkpoint starts
    # again in its own folder.
    return train_main(args[0], load=_load_frozen, existing="overwrite")


if __name__ == "__main__":
    sys.exit(main())
