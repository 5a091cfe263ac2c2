"""OTFace, IResNet-100 on MS1MV3: ms1mv3_r100_arcface.py plus the OT term on hard triplets.

In this project: `torchrun --nproc_per_node=8 train.py configs/ms1mv3_r100_otface`.
In an arcface_torch checkout (after `python -m otface.patch apply`, which copies this file and
ms1mv3_r100_arcface.py there): `torchrun --nproc_per_node=8 train_otface.py
configs/ms1mv3_r100_otface`.
"""

import copy

from easydict import EasyDict as edict

from configs.ms1mv3_r100_arcface import config as _arcface

# A deep copy: the imported config object is left as it is.
config = copy.deepcopy(_arcface)
config.loss = "otface"

# Hard-triplet mining needs positives in every batch: P identities x K images per rank.
# K = 4 is our default (the paper does not state its batch composition).
config.sampler = edict(type="pk", k=4)

# The OT term. The paper's abstract gives the method, not these numbers: every value below is
# our default (see configs/base.py), written out here so a run records what it used. The other
# *_otface twins use the same values.
config.otface = edict(
    lambda_ot=10.0,
    warmup_steps=0,
    mode="spatial",  # uniform distribution over the 7x7 vectors of bn2's 512x7x7 output
    variant="hinge",
    ot_margin=0.05,
    mining_margin=0.0,
    max_triplets=0,
    epsilon=0.05,
    max_iter=500,
    tol=3e-4,
    relaxation=1.6,
    layer="auto",  # IResNet: bn2
    solver="auto",
)
