"""ArcFace baseline, IResNet-100 on WebFace42M, 16 GPUs."""

import copy

from configs.wf42m_pfc02_r100_arcface import config as _parent

# arcface_torch's configs/wf42m_pfc02_16gpus_r100.py: the values of
# wf42m_pfc02_r100_arcface.py, with these changes.
# A deep copy: the imported config object is left as it is.
config = copy.deepcopy(_parent)
config.batch_size = 256
config.lr = 0.3
config.verbose = 2000
config.warmup_epoch = 1
