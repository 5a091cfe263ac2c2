"""ArcFace baseline, MobileFaceNet on WebFace12M, 8 GPUs.

As arcface_torch's configs/wf12m_mbf.py.
"""

from easydict import EasyDict as edict

config = edict()
config.loss = "arcface"
config.margin_list = (1.0, 0.0, 0.4)  # CosFace, as upstream for WebFace
config.network = "mbf"
config.resume = False
config.output = None
config.embedding_size = 512
config.sample_rate = 1.0
config.interclass_filtering_threshold = 0.0
config.fp16 = True
config.optimizer = "sgd"
config.momentum = 0.9
config.weight_decay = 1e-4
config.batch_size = 128
config.gradient_acc = 1
config.lr = 0.1
config.verbose = 2000
config.dali = False

config.rec = "/train_tmp/WebFace12M"
config.num_classes = 617970
config.num_image = 12720066
config.num_epoch = 20
config.warmup_epoch = 0
config.val_targets = []  # upstream verifies nothing during its WebFace12M runs
# arcface_torch samples uniformly; keep it for the baseline.
config.sampler = edict(type="uniform")
