"""ArcFace baseline, IResNet-100 on WebFace42M, 8 GPUs."""

import copy

from configs.wf4m_r100_arcface import config as _parent

# arcface_torch's configs/wf42m_pfc02_r100.py: the values of
# wf4m_r100_arcface.py, with these changes.
# A deep copy: the imported config object is left as it is.
config = copy.deepcopy(_parent)
config.sample_rate = 0.2  # Partial FC: 20% of the negative class centres per step
config.verbose = 10000
config.rec = "/train_tmp/WebFace42M"
config.num_classes = 2059906
config.num_image = 42474557
