"""OTFace on top of CurricularFace (Huang et al., CVPR 2020), on the embedded demo faces.

demo_otface.py with Partial FC's margin head set to "curricularface" (the OT term and its mining do
not depend on the head).

The demo data is a synthetic stand-in for real faces; numbers measured on it say nothing about
real benchmarks. `python train.py configs/demo_curricularface_otface`.
"""

import copy

from easydict import EasyDict as edict

from configs.demo_otface import config as _otface

# A deep copy: the imported config object is left as it is.
config = copy.deepcopy(_otface)
# Partial FC's margin head (docs/heads.md); margin_list is not used by it.
config.head = "curricularface"
config.curricularface = edict(m=0.5, alpha=0.01)  # the paper's defaults
