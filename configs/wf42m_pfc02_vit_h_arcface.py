"""ArcFace baseline, ViT-H on WebFace42M, GPUs not stated upstream.

As arcface_torch's configs/wf42m_pfc02_vit_h.py.
"""

from easydict import EasyDict as edict

config = edict()
config.loss = "arcface"
config.margin_list = (1.0, 0.0, 0.4)  # CosFace, as upstream for WebFace
config.network = "vit_h"
config.resume = False
config.output = None
config.embedding_size = 512
config.sample_rate = 0.5
config.interclass_filtering_threshold = 0.0
config.fp16 = True
config.optimizer = "adamw"
config.momentum = 0.9
config.weight_decay = 0.1
config.batch_size = 768
config.gradient_acc = 1
config.lr = 0.001
config.verbose = 2000
# Upstream reads this run with NVIDIA DALI (dali = True, dali_aug = True). DALI is not
# supported here (dali = True is refused): the built-in DataLoader reads the .rec, with
# random left-right flips and none of DALI's augmentation; dali and dali_aug stay False.
config.dali = False

config.rec = "/train_tmp/WebFace42M"
config.num_classes = 2059906
config.num_image = 42474557
config.num_epoch = 16
config.warmup_epoch = config.num_epoch // 8
config.val_targets = []
# arcface_torch samples uniformly; keep it for the baseline.
config.sampler = edict(type="uniform")
