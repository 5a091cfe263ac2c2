"""ArcFace baseline, ViT-B on WebFace42M, 8 GPUs.

As arcface_torch's configs/wf42m_pfc03_40epoch_8gpu_vit_b.py.
"""

from easydict import EasyDict as edict

config = edict()
config.loss = "arcface"
config.margin_list = (1.0, 0.0, 0.4)  # CosFace, as upstream for WebFace
config.network = "vit_b_dp005_mask_005"
config.resume = False
config.output = None
config.embedding_size = 512
config.sample_rate = 0.3  # Partial FC: 30% of the negative class centres per step
config.interclass_filtering_threshold = 0.0
config.fp16 = True
config.optimizer = "adamw"
config.momentum = 0.9
config.weight_decay = 0.1
config.batch_size = 256
# 8 GPUs x 256 images x 12 accumulated batches per optimiser step: 64 GPUs x 384.
config.gradient_acc = 12
config.lr = 0.001
config.verbose = 2000
config.dali = False

config.rec = "/train_tmp/WebFace42M"
config.num_classes = 2059906
config.num_image = 42474557
config.num_epoch = 40
config.warmup_epoch = config.num_epoch // 10
config.val_targets = []
# arcface_torch samples uniformly; keep it for the baseline.
config.sampler = edict(type="uniform")
