"""OTFace on the embedded demo faces with a small ViT (``vit_t_lite``), on a laptop CPU.

``configs/demo_otface`` with the backbone swapped: ``vit_t_lite`` is a CPU demo network (vit_t's
112 px input, 9 px patches and 0.1 token masking, but 64-wide tokens and 2 blocks; it matches no
upstream network). ``otface.layer = "auto"`` hooks its final patch tokens, 144 per image: each
sample is the uniform distribution over its kept tokens (masked ones have no mass).
The demo data is a synthetic stand-in for real face images; its numbers say nothing about real
benchmarks.
"""

import copy

from configs.demo_otface import config as _demo

# A deep copy: the imported config object is left as it is.
config = copy.deepcopy(_demo)
config.network = "vit_t_lite"
# AdamW as arcface_torch's ViT configs use (SGD at lr 0.1 does not suit a transformer).
config.optimizer = "adamw"
config.lr = 1e-3
config.weight_decay = 0.1
