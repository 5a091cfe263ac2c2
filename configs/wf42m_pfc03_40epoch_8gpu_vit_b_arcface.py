"""ArcFace baseline, ViT-B on WebFace42M, 8 GPUs."""

import copy

from configs.wf42m_pfc03_40epoch_64gpu_vit_b_arcface import config as _parent

# arcface_torch's configs/wf42m_pfc03_40epoch_8gpu_vit_b.py: the values of
# wf42m_pfc03_40epoch_64gpu_vit_b_arcface.py, with these changes.
# A deep copy: the imported config object is left as it is.
config = copy.deepcopy(_parent)
config.batch_size = 256
# 8 GPUs x 256 images x 12 accumulated batches per optimiser step: 64 GPUs x 384.
config.gradient_acc = 12
