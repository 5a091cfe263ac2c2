"""OpenMP's spin-wait, set before torch loads it, so that CPU training survives a busy machine.

By default GNU OpenMP threads spin for a long while at every barrier before they sleep. On a
machine whose cores are shared (a laptop, a shared server, two runs at once) the spinning
threads take the cores the working ones need. Measured with the demo's first epoch on the
2-core machine (`train.py` on `configs/demo_otface` with `num_epoch = 1`, `val_targets = []`):

| setting | alone | two runs at once (each) |
|---|---|---|
| default | 24.1 s | 295 s |
| `GOMP_SPINCOUNT=10000` (set here) | 24.4 s | 53-56 s |
| `OMP_WAIT_POLICY=PASSIVE` | 29.6 s | 39.6 s |
| `OMP_NUM_THREADS=1` | 35.7 s | 36.7 s |

A spin count of 10,000 keeps the time of a run alone (within 1.3%) and removes most of the
11-fold loss; passive waiting or one thread cost 23% and 48% alone. A value the user set is
kept.
"""

from __future__ import annotations

import os

__all__ = ["SPINCOUNT", "configure_openmp"]

SPINCOUNT = "10000"


def configure_openmp(environ=os.environ) -> None:
    """Set ``GOMP_SPINCOUNT`` (unless set, or a wait policy is chosen) for this process and its
    children. Call before torch is imported: OpenMP reads it when it loads."""
    if "GOMP_SPINCOUNT" not in environ and "OMP_WAIT_POLICY" not in environ:
        environ["GOMP_SPINCOUNT"] = SPINCOUNT
