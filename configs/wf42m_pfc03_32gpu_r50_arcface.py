"""ArcFace baseline, IResNet-50 on WebFace42M, 32 GPUs."""

import copy

from configs.wf42m_pfc02_r100_32gpus_arcface import config as _parent

# arcface_torch's configs/wf42m_pfc03_32gpu_r50.py: the values of
# wf42m_pfc02_r100_32gpus_arcface.py, with these changes.
# A deep copy: the imported config object is left as it is.
config = copy.deepcopy(_parent)
config.network = "r50"
config.sample_rate = 0.3  # Partial FC: 30% of the negative class centres per step
config.verbose = 2000
