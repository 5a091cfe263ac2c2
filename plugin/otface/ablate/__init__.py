"""One-command ablation: every config × seed trained on the same data, evaluated, compared.

``python -m otface.ablate CONFIG [CONFIG ...] --seeds N`` (see :mod:`otface.ablate.__main__`).
The pieces: :mod:`~otface.ablate.plan` (configs, overrides, run folders),
:mod:`~otface.ablate.runner` (training in order, skipping finished runs, evaluation),
:mod:`~otface.ablate.stats` (mean ± std, paired differences) and
:mod:`~otface.ablate.report` (table, json, csv, png).
"""

from otface.ablate.stats import PairedDifference, SeedSummary, paired_difference, summarize

__all__ = ["PairedDifference", "SeedSummary", "paired_difference", "summarize"]
