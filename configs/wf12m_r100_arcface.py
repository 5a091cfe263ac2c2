"""ArcFace baseline, IResNet-100 on WebFace12M, 8 GPUs."""

import copy

from configs.wf12m_r50_arcface import config as _parent

# arcface_torch's configs/wf12m_r100.py: the values of
# wf12m_r50_arcface.py, with these changes.
# A deep copy: the imported config object is left as it is.
config = copy.deepcopy(_parent)
config.network = "r100"
