"""ArcFace baseline, IResNet-50 on WebFace42M, 32 GPUs."""

import copy

from configs.wf42m_pfc02_8gpus_r50_bs4k_arcface import config as _parent

# arcface_torch's configs/wf42m_pfc02_32gpus_r50_bs4k.py: the values of
# wf42m_pfc02_8gpus_r50_bs4k_arcface.py, with these changes.
# A deep copy: the imported config object is left as it is.
config = copy.deepcopy(_parent)
config.batch_size = 128  # x 32 GPUs: 4k
