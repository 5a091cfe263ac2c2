"""OTFace twin of wf42m_pfc02_r100_arcface.py: that run plus the OT term."""

import copy

from easydict import EasyDict as edict

from configs.wf42m_pfc02_r100_arcface import config as _arcface

# Launch it as the ArcFace run, e.g.
# `torchrun --nproc_per_node=8 train.py configs/wf42m_pfc02_r100_otface`.
# A deep copy: the imported config object is left as it is.
config = copy.deepcopy(_arcface)
config.loss = "otface"
# Hard-triplet mining needs positives in every batch: P identities x K images per rank.
config.sampler = edict(type="pk", k=4)
# The OT term of ms1mv3_r100_otface.py (configs/base.py's defaults), on the feature map of
# layer "auto" (IResNet: bn2's 512x7x7 map).
config.otface = edict(mode="spatial", layer="auto")
