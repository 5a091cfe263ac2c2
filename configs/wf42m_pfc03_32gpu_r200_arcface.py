"""ArcFace baseline, IResNet-200 on WebFace42M, 32 GPUs."""

import copy

from configs.wf42m_pfc03_32gpu_r50_arcface import config as _parent

# arcface_torch's configs/wf42m_pfc03_32gpu_r200.py: the values of
# wf42m_pfc03_32gpu_r50_arcface.py, with these changes.
# A deep copy: the imported config object is left as it is.
config = copy.deepcopy(_parent)
config.network = "r200"
