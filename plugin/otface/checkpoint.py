"""The former name of :mod:`otface.full_state` (one full-state file from a run's per-rank
checkpoints, and back), kept so that ``python -m otface.checkpoint merge|split`` still runs.
Training's own checkpoint files are :mod:`otface.train.checkpoint`."""

import sys

from otface.full_state import FULL_STATE_NAME, main, merge, split

__all__ = ["FULL_STATE_NAME", "main", "merge", "split"]

if __name__ == "__main__":
    sys.exit(main())
