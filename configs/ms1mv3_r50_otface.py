"""OTFace, IResNet-50 on MS1MV3: ms1mv3_r50_arcface.py plus the OT term on hard triplets."""

import copy

from easydict import EasyDict as edict

from configs.ms1mv3_r50_arcface import config as _arcface

# In this project: `torchrun --nproc_per_node=8 train.py configs/ms1mv3_r50_otface`.
# In an arcface_torch checkout (after `python -m otface.patch apply`, which copies this file and
# ms1mv3_r50_arcface.py there): `torchrun --nproc_per_node=8 train_otface.py
# configs/ms1mv3_r50_otface`.
# A deep copy: the imported config object is left as it is.
config = copy.deepcopy(_arcface)
config.loss = "otface"
# Hard-triplet mining needs positives in every batch: P identities x K images per rank.
config.sampler = edict(type="pk", k=4)
# The OT term of ms1mv3_r100_otface.py (configs/base.py's defaults), on the feature map of
# layer "auto" (IResNet: bn2's 512x7x7 map).
config.otface = edict(mode="spatial", layer="auto")
