"""ArcFace baseline, MobileFaceNet on WebFace4M, 8 GPUs."""

import copy

from configs.wf4m_r50_arcface import config as _parent

# arcface_torch's configs/wf4m_mbf.py: the values of
# wf4m_r50_arcface.py, with these changes.
# A deep copy: the imported config object is left as it is.
config = copy.deepcopy(_parent)
config.network = "mbf"
config.weight_decay = 1e-4
