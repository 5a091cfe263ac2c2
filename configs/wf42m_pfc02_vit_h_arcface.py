"""ArcFace baseline, ViT-H on WebFace42M, GPUs not stated upstream."""

import copy

from configs.wf42m_pfc03_40epoch_64gpu_vit_b_arcface import config as _parent

# arcface_torch's configs/wf42m_pfc02_vit_h.py: the values of
# wf42m_pfc03_40epoch_64gpu_vit_b_arcface.py, with these changes.
# A deep copy: the imported config object is left as it is.
config = copy.deepcopy(_parent)
config.network = "vit_h"
config.sample_rate = 0.5
config.batch_size = 768
config.num_epoch = 16
config.warmup_epoch = config.num_epoch // 8
# Upstream reads this run with NVIDIA DALI (dali = True, dali_aug = True). DALI is not
# supported here (dali = True is refused): the built-in DataLoader reads the .rec, with
# random left-right flips and none of DALI's augmentation; dali and dali_aug stay False.
config.dali = False
