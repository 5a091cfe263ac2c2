"""The ArcFace five-point landmark template, shared by the demo renderer and evaluation's
alignment (numpy only, so the renderer stays light)."""

import numpy as np

__all__ = ["ARCFACE_TEMPLATE_112"]

#: Reference five landmarks of a 112×112 aligned face (left eye, right eye, nose tip, left and
#: right mouth corner; "left" is the smaller x), in pixels, as published with InsightFace's
#: alignment.
ARCFACE_TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float32,
)
