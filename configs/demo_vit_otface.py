"""OTFace on the embedded demo faces with a small ViT (``vit_t_lite``), on a laptop CPU.

``configs/demo_otface`` with the backbone swapped: ``vit_t_lite`` is a CPU demo network (vit_t's
112 px input, 9 px patches and 0.1 token masking, but 64-wide tokens and 2 blocks; it matches no
upstream network). ``otface.layer = "auto"`` hooks its final patch tokens, 144 per image: each
sample is the uniform distribution over its kept tokens (masked ones have no mass).
The demo data is a synthetic stand-in for real face images; its numbers say nothing about real
benchmarks.
"""

import copy
import importlib.util
import os

# The demo config, loaded by path: job configs are executed as files, not imported as modules.
_spec = importlib.util.spec_from_file_location(
    "_otface_config_demo_otface", os.path.join(os.path.dirname(__file__), "demo_otface.py")
)
_demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_demo)

config = copy.deepcopy(_demo.config)
config.network = "vit_t_lite"
# AdamW as arcface_torch's ViT configs use (SGD at lr 0.1 does not suit a transformer).
config.optimizer = "adamw"
config.lr = 1e-3
config.weight_decay = 0.1
