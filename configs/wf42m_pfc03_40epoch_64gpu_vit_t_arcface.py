"""ArcFace baseline, ViT-T on WebFace42M, 64 GPUs."""

import copy

from configs.wf42m_pfc03_40epoch_64gpu_vit_b_arcface import config as _parent

# arcface_torch's configs/wf42m_pfc03_40epoch_64gpu_vit_t.py: the values of
# wf42m_pfc03_40epoch_64gpu_vit_b_arcface.py, with these changes.
# A deep copy: the imported config object is left as it is.
config = copy.deepcopy(_parent)
config.network = "vit_t_dp005_mask0"
