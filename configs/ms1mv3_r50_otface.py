"""OTFace, IResNet-50 on MS1MV3.

Values of arcface_torch's configs/ms1mv3_r50.py, plus the OT term on hard triplets.
In this project: `torchrun --nproc_per_node=8 train.py configs/ms1mv3_r50_otface`.
In an arcface_torch checkout (after `python -m otface.patch apply`, which copies this file
there): `torchrun --nproc_per_node=8 train_otface.py configs/ms1mv3_r50_otface`.
"""

from easydict import EasyDict as edict

config = edict()
config.loss = "otface"
config.margin_list = (1.0, 0.5, 0.0)  # ArcFace
config.network = "r50"
config.resume = False
config.output = None
config.embedding_size = 512
config.sample_rate = 1.0
config.fp16 = True
config.momentum = 0.9
config.weight_decay = 5e-4
config.batch_size = 128
config.lr = 0.1
config.verbose = 2000
config.dali = False

config.rec = "/train_tmp/ms1m-retinaface-t1"
config.num_classes = 93431
config.num_image = 5179510
config.num_epoch = 20
config.warmup_epoch = 0
config.val_targets = ["lfw", "cfp_fp", "agedb_30"]

# Hard-triplet mining needs positives in every batch: P identities x K images per rank.
# K = 4 is our default (the paper does not state its batch composition).
config.sampler = edict(type="pk", k=4)

# The OT term. The paper's abstract gives the method, not these numbers: every value below is
# our default (see configs/base.py), written out here so a run records what it used.
config.otface = edict(
    lambda_ot=10.0,
    warmup_steps=0,
    mode="spatial",  # uniform distribution over the 7x7 vectors of bn2's 512x7x7 output
    variant="hinge",
    ot_margin=0.05,
    mining_margin=0.0,
    max_triplets=0,
    epsilon=0.05,
    max_iter=500,
    tol=3e-4,
    relaxation=1.6,
    layer="auto",  # IResNet: bn2
    solver="auto",
)
