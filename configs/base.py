"""Every default of a training job. A job config ``configs/NAME.py`` updates these.

Keys and meanings follow arcface_torch's ``configs/base.py``; the ``otface`` and ``sampler``
sections and a few keys marked "ours" are this project's additions. Every key is validated at
start-up (``otface.config``): a misspelt or unknown key fails naming the closest valid ones.
"""

from easydict import EasyDict as edict

config = edict()

# Margin-based softmax: logit of the target class = s * (cos(m1 * theta + m2) - m3).
config.margin_list = (1.0, 0.5, 0.0)
# ours: False keeps arcface_torch's straight-through gradient for the ArcFace angle margin;
# True differentiates cos(theta + m) exactly.
config.margin_exact_grad = False
# ours: the margin head of Partial FC's softmax (docs/heads.md). "combined": arcface_torch's
# margin_list above; "adaface": AdaFace (Kim et al., CVPR 2022), margins scaled by the feature
# norm's z-score; "curricularface": CurricularFace (Huang et al., CVPR 2020), hard negatives
# re-weighted by t. Scale 64 for all three; margin_list and margin_exact_grad apply to
# "combined" only. The heads' running statistics are global across ranks and checkpointed.
config.head = "combined"
# AdaFace: margin m, concentration h of the norm's z-score, EMA weight t_alpha of the norm's
# batch mean and std (the paper's defaults).
config.adaface = edict(m=0.4, h=0.333, t_alpha=0.01)
# CurricularFace: additive angular margin m (radians), EMA weight alpha of t (the paper's).
config.curricularface = edict(m=0.5, alpha=0.01)
config.network = "r50"
config.resume = False
config.save_all_states = False
config.output = None  # None: work_dirs/<config name>

config.embedding_size = 512

# Partial FC
config.sample_rate = 1.0
config.interclass_filtering_threshold = 0.0

config.fp16 = False
# ours: memory layout of the backbone and its input batches. "auto": channels_last (NHWC) on
# CUDA, where cuDNN's convolutions skip two layout transposes each (r50 step 1.7x faster on an
# H200), plain NCHW on the CPU; True/False force it. model.pt and checkpoints are unchanged.
config.channels_last = "auto"
# ours: torch.compile the backbone in place (its state_dict keys do not change): False, True
# (mode "default"), or a mode: "default", "reduce-overhead" (CUDA graphs), "max-autotune",
# "max-autotune-no-cudagraphs".
# The first step pays the compile time. Off: on an H200 the compiled step was slower than the
# eager one (r100 103 vs 68 ms, r50 63 vs 42 ms; docs/benchmarks.md).
config.compile = False
# ours: what `compile` compiles. "blocks": the stem and each residual block on its own
# (identical blocks share one graph: r100 compiles like r18, and DDP's all-reduce still
# overlaps the backward); "network": the whole backbone as one graph. MobileFaceNet is always
# compiled whole.
config.compile_scope = "blocks"
# ours: IResNet blocks and stem run their BatchNorm + PReLU as one fused Triton op in training
# ("auto": on CUDA with channels_last; "triton": always, CPU tensors only under
# TRITON_INTERPRET=1; "off": the plain modules). The state_dict and eval mode are unchanged.
# Off: on an H200 it made the r100 step slower (96 vs 68 ms): benchmarks/bench_bn_prelu.py.
config.fused_bn_prelu = "off"
# ours: record the step's forward and backward once as a CUDA graph and replay it (one launch
# instead of ~2,500 kernel launches per r100 step; the optimiser step stays eager). "auto": where
# it can run (one CUDA process, gradient_acc 1, sample_rate 1, compile off), else off; "on": the
# same, and an error where it cannot; "off": never. On an H200 it takes the r100 step from 73
# to 50 ms (0.53x arcface_torch's); off by default until it has run through train.py's loop on
# a GPU (docs/benchmarks.md).
config.cuda_graph = "off"
config.batch_size = 128

# SGD (optimizer="sgd") or AdamW (optimizer="adamw": lr 0.001, weight_decay 0.1 upstream)
config.optimizer = "sgd"
config.lr = 0.1
config.momentum = 0.9
config.weight_decay = 5e-4

config.verbose = 2000  # verification every N steps
config.frequent = 10  # log line every N steps

# Data
config.rec = "synthetic"  # folder with train.rec/train.idx, image folder, "synthetic" or "demo"
# rec = "demo" only: probability that a training image carries an occluder (bar, patch, mask,
# hand); None keeps the renderer's draws (~20%, a mask on ~4%). 0.0 makes masks at test time as
# unseen as in real benchmarks. Each value is its own cache entry; only train.rec differs.
config.demo_occlusion_p = None
# Sizes of the training set; "auto" reads them from the data (a .rec's header 0 or property
# file, or the image folder).
config.num_classes = 93431
config.num_image = 5179510
config.num_epoch = 20
config.warmup_epoch = 0
config.val_targets = ["lfw", "cfp_fp", "agedb_30"]
config.dali = False  # NVIDIA DALI is not supported here; keep False
config.dali_aug = False

# ours: fine-tuning and your own data (docs/custom_data.md).
# Start the backbone from a file: our model.pt, arcface_torch's model.pt or a model-zoo
# backbone.pth (a bare state_dict), a checkpoint_gpu_*.pt or a merged full_state.pt. Unlike
# resume, the step, the schedule, the optimiser state and the RNG start fresh. None: random.
config.init_backbone = None
# Partial FC's class centres from a full_state.pt (python -m otface.full_state merge) of a run
# with the same classes, resharded to this run's ranks. None: random centres.
config.init_centres = None
# Keep the backbone, or its first stages, fixed for the first N steps, then train it; 0: never.
# A number below 1 is a fraction of the run (0.25: its first quarter), whatever its length.
config.freeze_steps = 0
# What freeze_steps holds fixed: "all" (the backbone) or k (an IResNet's stem and its first k
# residual stages; 0: the stem only).
config.freeze_stages = "all"
# While frozen, the frozen part's BatchNorm runs in eval mode (its running statistics stay).
config.freeze_bn = True
# The backbone's learning rate is lr * backbone_lr_mult; Partial FC's class centres keep lr.
config.backbone_lr_mult = 1.0

config.gradient_acc = 1
config.seed = 2048
config.num_workers = 2

# ours: also write checkpoint_gpu_{rank}.pt every N steps (0 = only at the end of each epoch),
# so that a killed run resumes close to where it stopped.
config.save_every_steps = 0

# ours: reliability over a long run.
# Stop when this many optimiser steps in a row were skipped for a non-finite loss or gradient
# (0: never stop). A skipped step leaves weights, optimiser state and BatchNorm buffers as they
# were before it.
config.max_consecutive_skips = 100
# Stop (exit code 1, model.pt not written) when more than this fraction of the optimiser steps so
# far were skipped, checked at the end of every epoch: a run whose steps are mostly skipped has
# diverged, even when no 100 of them came in a row. 1: never.
config.max_skipped_fraction = 0.2
# Undecodable images are replaced by another image of the same identity (warned, counted);
# training stops when one epoch meets more than this fraction of its images.
config.max_bad_image_fraction = 0.001
# Seconds a collective (all-reduce, all-gather) may wait for a stalled rank before the job
# fails with an error naming the operation (torch.distributed's timeout).
config.collective_timeout_s = 1800.0

# Loss: a name registered in otface.registry.LOSSES ("arcface" or "otface").
config.loss = "arcface"

# ours: occlusion augmentation. Each training image gets, with probability occlusion_p, one
# procedural occluder drawn on the aligned face: a mask over nose and mouth, a dark band over the
# eyes, a random rectangle or a hand (otface.data.occluders). 0: off, as arcface_torch.
config.augment = edict()
config.augment.occlusion_p = 0.0
config.augment.occluders = ["mask", "bar", "patch", "hand"]

# ours: batch composition. "pk": P identities x K images per rank (OTFace needs positives in
# the batch); "uniform": arcface_torch's uniform shuffling.
config.sampler = edict()
config.sampler.type = "pk"
config.sampler.k = 4

# ours: the OTFace term (used when loss == "otface"). The paper does not state these values;
# they are our defaults.
config.otface = edict()
# Weight of the OT term. 10: at 1 the OT term's gradient on the backbone was 0.4-2.6% of the
# margin loss's over a demo run (ot_grad_share, logged on every line); 10 makes it about 15%
# (docs/ot_term.md). Check ot_grad_share in your own log.
config.otface.lambda_ot = 10.0
config.otface.warmup_steps = 0  # linear warm-up of lambda_ot from 0
config.otface.mode = "spatial"  # "spatial": per-sample H*W feature vectors; "group": pooled
config.otface.variant = "hinge"  # "hinge": relu(W(a,p) - W(a,n) + ot_margin); "pull": W(a,p)
config.otface.ot_margin = 0.05
config.otface.mining_margin = 0.0  # anchor is hard iff S(a,n) + mining_margin > S(a,p)
config.otface.max_triplets = 0  # 0: no cap; else keep the largest violations
config.otface.epsilon = 0.05  # entropic regularisation of Sinkhorn (cost in [0, 2])
# Iterations at most, per problem: each problem stops on its own at tol. On the demo's and
# synthetic training batches the slowest problem needed 241 (docs/ot_term.md); at
# the earlier defaults (50 iterations, tol 1e-3, plain updates) 8-20% stopped short of tol.
config.otface.max_iter = 500
# Stop when the L1 marginal error falls below this. 3e-4: the divergence's gradient is then
# within about 3e-4 of the exact one on demo features (1.6e-3 at 1e-3).
config.otface.tol = 3e-4
# ours: eps-scaling: start the solve at eps 2 (the cost's range) and shrink it by this factor per
# iteration down to epsilon, carrying the potentials (GeomLoss's annealing); 0: off. Off: with
# the over-relaxation below it saved few iterations and cost time on the CPU.
config.otface.eps_scaling = 0.0
# ours: over-relaxed updates u <- u + omega (T(u) - u) (Thibault et al. 2017), safeguarded: a
# problem whose error grows goes on with plain updates; 1: plain Sinkhorn. 1.6 reaches tol
# 3e-4 in about 2.4x fewer iterations than plain updates on the demo's problems.
config.otface.relaxation = 1.6
config.otface.layer = "auto"  # feature map to hook: "auto" or a module name of the backbone
config.otface.solver = "auto"  # "auto", "torch" or "pot"
# our solver's kernel: "auto" (the fused Triton kernel on CUDA when it fits, else "matmul" or
# "torch"), or one of "torch", "matmul", "triton" (CUDA)
config.otface.kernel = "auto"
config.otface.distance = "divergence"  # W: "divergence", "entropic" or "transport" (approx. grad)
# ours: "auto" (True on CUDA): spatial mode solves every anchor's triplet and masks those that
# are not hard, so the step never waits for the host to learn how many are hard; False solves
# only the hard ones (fewer problems, one device sync per step).
config.otface.fixed_shapes = "auto"

# Weights & Biases (arcface_torch's keys): using_wandb = True logs rank 0's metrics under
# upstream's names (pip install -e .[wandb]); wandb_key, unless it is this placeholder, is passed
# to wandb and never written to the log. wandb_log_all is accepted; only rank 0 opens a run.
# save_artifacts uploads model.pt each epoch and at the end; wandb_resume (with resume = True)
# continues the run whose id is in <output>/wandb_run.json. notes is optional.
config.using_wandb = False
config.wandb_key = "XXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX"
config.suffix_run_name = None
config.wandb_entity = "entity"
config.wandb_project = "project"
config.wandb_log_all = True
config.save_artifacts = False
config.wandb_resume = False
config.notes = ""
