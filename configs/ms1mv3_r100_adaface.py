"""AdaFace (Kim et al., CVPR 2022), IResNet-100 on MS1MV3.

ms1mv3_r100_arcface.py with Partial FC's margin head set to "adaface" (docs/heads.md).

Only the head differs from the ArcFace baseline, so the two compare like for like; the paper's
own recipe (its learning-rate steps, epochs and batch) is not reproduced.
`torchrun --nproc_per_node=8 train.py configs/ms1mv3_r100_adaface`.
"""

import copy

from easydict import EasyDict as edict

from configs.ms1mv3_r100_arcface import config as _arcface

# A deep copy: the imported config object is left as it is. loss stays "arcface": the margin
# softmax alone, with this head; margin_list is the combined head's and is not used.
config = copy.deepcopy(_arcface)
config.head = "adaface"
config.adaface = edict(m=0.4, h=0.333, t_alpha=0.01)  # the paper's defaults
