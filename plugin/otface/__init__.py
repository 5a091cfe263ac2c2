"""OTFace: margin softmax plus an optimal-transport loss on hard samples, for arcface_torch.

Importing this package has no side effects: no process group, no CUDA call.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
