"""CurricularFace (Huang et al., CVPR 2020), IResNet-100 on WebFace4M.

wf4m_r100_arcface.py with Partial FC's margin head set to "curricularface" (docs/heads.md).

Only the head differs from the ArcFace baseline, so the two compare like for like; the paper's
own recipe (its learning-rate steps, epochs and batch) is not reproduced.
`torchrun --nproc_per_node=8 train.py configs/wf4m_r100_curricularface`.
"""

import copy

from easydict import EasyDict as edict

from configs.wf4m_r100_arcface import config as _arcface

# A deep copy: the imported config object is left as it is. loss stays "arcface": the margin
# softmax alone, with this head; margin_list is the combined head's and is not used.
config = copy.deepcopy(_arcface)
config.head = "curricularface"
config.curricularface = edict(m=0.5, alpha=0.01)  # the paper's defaults
