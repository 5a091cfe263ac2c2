"""OTFace, IResNet-100 on Glint360K: glint360k_r100_arcface.py plus the OT term on hard triplets."""

import copy

from easydict import EasyDict as edict

from configs.glint360k_r100_arcface import config as _arcface

# In this project: `torchrun --nproc_per_node=8 train.py configs/glint360k_r100_otface`.
# In an arcface_torch checkout (after `python -m otface.patch apply`, which copies this file and
# glint360k_r100_arcface.py there): `torchrun --nproc_per_node=8 train_otface.py
# configs/glint360k_r100_otface`.
# A deep copy: the imported config object is left as it is.
config = copy.deepcopy(_arcface)
config.loss = "otface"
# Hard-triplet mining needs positives in every batch: P identities x K images per rank.
config.sampler = edict(type="pk", k=4)
# The OT term of ms1mv3_r100_otface.py (configs/base.py's defaults), on the feature map of
# layer "auto" (IResNet: bn2's 512x7x7 map).
config.otface = edict(mode="spatial", layer="auto")
