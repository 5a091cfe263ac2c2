"""ArcFace baseline, IResNet-100 on WebFace42M, 16 GPUs."""

import copy

from configs.wf42m_pfc02_r100_arcface import config as _parent

# arcface_torch's configs/wf42m_pfc02_r100_16gpus.py: the values of
# wf42m_pfc02_r100_arcface.py, with these changes.
# A deep copy: the imported config object is left as it is.
config = copy.deepcopy(_parent)
config.lr = 0.2
config.warmup_epoch = config.num_epoch // 10
