"""ArcFace baseline, IResNet-50 on WebFace42M, 8 GPUs."""

import copy

from configs.wf42m_pfc02_r100_arcface import config as _parent

# arcface_torch's configs/wf42m_pfc02_8gpus_r50_bs4k.py: the values of
# wf42m_pfc02_r100_arcface.py, with these changes.
# A deep copy: the imported config object is left as it is.
config = copy.deepcopy(_parent)
config.network = "r50"
config.batch_size = 512  # x 8 GPUs: 4k
config.lr = 0.4
config.warmup_epoch = 2
