"""ArcFace baseline, IResNet-50 on WebFace12M-Flip (40% of labels flipped), 8 GPUs."""

import copy

from configs.wf12m_flip_r50_arcface import config as _parent

# arcface_torch's configs/wf12m_flip_pfc01_filter04_r50.py: the values of
# wf12m_flip_r50_arcface.py, with these changes.
# A deep copy: the imported config object is left as it is.
config = copy.deepcopy(_parent)
config.sample_rate = 0.1
config.interclass_filtering_threshold = 0.4
