"""OTFace twin of wf4m_r100_adaface.py: that run plus the OT term on hard triplets (the
OT term and its mining do not depend on the head).

Like wf4m_r100_adaface.py it derives from wf4m_r100_arcface.py (one file deep, as every
config here): the head, then the OT term of wf4m_r100_otface.py.
`torchrun --nproc_per_node=8 train.py configs/wf4m_r100_adaface_otface`.
"""

import copy

from easydict import EasyDict as edict

from configs.wf4m_r100_arcface import config as _arcface

# A deep copy: the imported config object is left as it is.
config = copy.deepcopy(_arcface)
config.head = "adaface"
config.adaface = edict(m=0.4, h=0.333, t_alpha=0.01)  # the paper's defaults
config.loss = "otface"
# Hard-triplet mining needs positives in every batch: P identities x K images per rank.
config.sampler = edict(type="pk", k=4)
# The OT term of ms1mv3_r100_otface.py (configs/base.py's defaults), on the feature map of
# layer "auto" (IResNet: bn2's 512x7x7 map).
config.otface = edict(mode="spatial", layer="auto")
