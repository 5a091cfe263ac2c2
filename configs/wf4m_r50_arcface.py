"""ArcFace baseline, IResNet-50 on WebFace4M, 8 GPUs, as arcface_torch's configs/wf4m_r50.py.

Like every `*_arcface.py` recipe here, it states each of its keys, as upstream's file does, so
one file shows the run; its twin `wf4m_r50_otface.py` imports it and adds the OT term. Upstream
trains on WebFace with the CosFace margin.
"""

from easydict import EasyDict as edict

config = edict()
config.loss = "arcface"
config.margin_list = (1.0, 0.0, 0.4)  # CosFace, as upstream for WebFace
config.network = "r50"
config.resume = False
config.output = None
config.embedding_size = 512
config.sample_rate = 1.0
config.interclass_filtering_threshold = 0.0
config.fp16 = True
config.optimizer = "sgd"
config.momentum = 0.9
config.weight_decay = 5e-4
config.batch_size = 128
config.gradient_acc = 1
config.lr = 0.1
config.verbose = 2000
config.dali = False

config.rec = "/train_tmp/WebFace4M"
config.num_classes = 205990
config.num_image = 4235242
config.num_epoch = 20
config.warmup_epoch = 0
config.val_targets = ["lfw", "cfp_fp", "agedb_30"]
# arcface_torch samples uniformly; keep it for the baseline.
config.sampler = edict(type="uniform")
