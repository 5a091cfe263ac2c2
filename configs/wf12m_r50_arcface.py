"""ArcFace baseline, IResNet-50 on WebFace12M, 8 GPUs."""

import copy

from configs.wf4m_r50_arcface import config as _parent

# arcface_torch's configs/wf12m_r50.py: the values of
# wf4m_r50_arcface.py, with these changes.
# A deep copy: the imported config object is left as it is.
config = copy.deepcopy(_parent)
config.rec = "/train_tmp/WebFace12M"
config.num_classes = 617970
config.num_image = 12720066
config.val_targets = []  # upstream verifies nothing during its WebFace12M runs
