"""ArcFace baseline, ViT-B on WebFace42M, 64 GPUs."""

import copy

from configs.wf42m_pfc03_32gpu_r50_arcface import config as _parent

# arcface_torch's configs/wf42m_pfc03_40epoch_64gpu_vit_b.py: the values of
# wf42m_pfc03_32gpu_r50_arcface.py, with these changes.
# A deep copy: the imported config object is left as it is.
config = copy.deepcopy(_parent)
config.network = "vit_b_dp005_mask_005"
config.optimizer = "adamw"
config.lr = 0.001
config.weight_decay = 0.1
config.val_targets = []
config.batch_size = 384
config.num_epoch = 40
config.warmup_epoch = config.num_epoch // 10
