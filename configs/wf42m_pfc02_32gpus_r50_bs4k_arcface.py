"""ArcFace baseline, IResNet-50 on WebFace42M, 32 GPUs.

As arcface_torch's configs/wf42m_pfc02_32gpus_r50_bs4k.py.
"""

from easydict import EasyDict as edict

config = edict()
config.loss = "arcface"
config.margin_list = (1.0, 0.0, 0.4)  # CosFace, as upstream for WebFace
config.network = "r50"
config.resume = False
config.output = None
config.embedding_size = 512
config.sample_rate = 0.2  # Partial FC: 20% of the negative class centres per step
config.interclass_filtering_threshold = 0.0
config.fp16 = True
config.optimizer = "sgd"
config.momentum = 0.9
config.weight_decay = 5e-4
config.batch_size = 128  # x 32 GPUs: 4k
config.gradient_acc = 1
config.lr = 0.4
config.verbose = 10000
config.dali = False

config.rec = "/train_tmp/WebFace42M"
config.num_classes = 2059906
config.num_image = 42474557
config.num_epoch = 20
config.warmup_epoch = 2
config.val_targets = ["lfw", "cfp_fp", "agedb_30"]
# arcface_torch samples uniformly; keep it for the baseline.
config.sampler = edict(type="uniform")
