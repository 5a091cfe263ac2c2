"""ArcFace baseline, IResNet-100 on WebFace42M, 32 GPUs."""

import copy

from configs.wf42m_pfc02_r100_16gpus_arcface import config as _parent

# arcface_torch's configs/wf42m_pfc02_r100_32gpus.py: the values of
# wf42m_pfc02_r100_16gpus_arcface.py, with these changes.
# A deep copy: the imported config object is left as it is.
config = copy.deepcopy(_parent)
config.lr = 0.4
