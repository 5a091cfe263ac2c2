"""OTFace (ArcFace + OT loss on hard triplets) on the embedded demo faces, on a laptop CPU.

The demo data (``rec = "demo"``) is a synthetic stand-in for real face images, generated on
first use; numbers measured on it say nothing about real benchmarks.
"""

from easydict import EasyDict as edict

config = edict()
config.loss = "otface"
config.margin_list = (1.0, 0.5, 0.0)
config.network = "r18_lite"
config.embedding_size = 512
config.sample_rate = 1.0
config.fp16 = False
config.batch_size = 64
config.optimizer = "sgd"
config.lr = 0.1
config.momentum = 0.9
config.weight_decay = 5e-4
config.rec = "demo"
config.num_classes = 256
config.num_image = 4096
config.num_epoch = 6
config.warmup_epoch = 1
config.verbose = 64  # one verification per epoch (4096 / 64 steps)
config.frequent = 16
config.num_workers = 2
config.val_targets = ["demo_lfw"]
config.save_all_states = True
config.sampler = edict(type="pk", k=4)
config.seed = 2048
# The OT term on the 7x7 feature map of r18_lite's bn2 (spatial mode). lambda_ot, ot_margin and
# the warm-up are our defaults: the paper does not state them.
config.otface = edict(
    lambda_ot=10.0,
    warmup_steps=64,
    mode="spatial",
    variant="hinge",
    ot_margin=0.05,
    mining_margin=0.0,
    epsilon=0.05,
    max_iter=500,
    tol=3e-4,
    relaxation=1.6,
)
