"""ArcFace baseline, IResNet-100 on WebFace12M, 8 GPUs."""

import copy

from configs.wf12m_r100_arcface import config as _parent

# arcface_torch's configs/wf12m_pfc02_r100.py: the values of
# wf12m_r100_arcface.py, with these changes.
# A deep copy: the imported config object is left as it is.
config = copy.deepcopy(_parent)
config.sample_rate = 0.2  # Partial FC: 20% of the negative class centres per step
