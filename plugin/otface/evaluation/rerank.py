"""Optimal transport between two faces' local features, for re-scoring at test time.

Stage 1 compares the pooled embeddings by cosine. Stage 2 re-scores a pair with

    s = α · s_OT + (1 − α) · cos,     s_OT = Σ_ij T_ij · cos(u_i, v_j),

where ``u``, ``v`` are the two faces' L2-normalised local features (the map the OT training
term reads: IResNet's 7×7 ``bn2`` output, MobileFaceNet's last conv, a ViT's patch tokens),
optionally average-pooled to a coarser grid, and ``T`` is the entropic plan between them under
the cost ``1 − cos`` (the project's batched Sinkhorn, :func:`otface.ot.sinkhorn`). This is the
patch-wise re-scoring of DeepFace-EMD (Phan & Nguyen, CVPR 2022), with the project's solver.

Marginals: ``"uniform"`` (every patch weighs the same) or ``"cross"`` (a patch of one face
weighs by the ReLU of its cosine with the other face's mean local feature, normalised to one;
patches unlike anything in the other face, such as a mask, carry less mass).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from otface.evaluation.models import preprocess
from otface.hooks import FeatureCapture
from otface.ot.cost import cosine_cost
from otface.ot.sinkhorn import sinkhorn

__all__ = [
    "PATCH_WEIGHTS",
    "RerankOptions",
    "OTScores",
    "LocalEmbedder",
    "OnnxLocalEmbedder",
    "local_points",
    "mirror_points",
    "open_local_embedder",
    "patch_weights",
    "ot_similarity",
    "solve_with",
    "solve_rows",
    "combine_scores",
    "rerank_top_k",
]

#: Marginal choices of :func:`patch_weights`.
PATCH_WEIGHTS = ("uniform", "cross")


class RerankOptions(NamedTuple):
    """Stage-2 settings.

    Attributes:
        alpha: weight of ``s_OT`` in the combined score, in [0, 1] (default 0.2: the best
            on ``demo_lfw`` over the demo's models, docs/results.md).
        k: 1:N only: how many of each probe's best gallery templates stage 2 re-scores.
        grid: pool the local features to ``grid × grid`` (None: the layer's own resolution).
        weights: ``"uniform"`` or ``"cross"`` marginals.
        eps: entropic regularisation of the plan (cost units; the cost is in [0, 2]).
        max_iter, tol: the Sinkhorn budget and its stopping tolerance on the marginal error.
        relaxation: over-relaxation of the Sinkhorn updates, in [1, 2) (1: plain Sinkhorn);
            the fixed point, hence the plan, is the same, reached in fewer iterations.
    """

    alpha: float = 0.2
    k: int = 100
    grid: Optional[int] = None
    weights: str = "uniform"
    eps: float = 0.05
    max_iter: int = 200
    tol: float = 1e-4
    relaxation: float = 1.6

    def checked(self) -> "RerankOptions":
        """Self, or a ValueError naming the bad field and its valid range."""
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"rerank alpha must be in [0, 1], got {self.alpha}")
        if self.k < 1:
            raise ValueError(f"rerank k must be >= 1, got {self.k}")
        if self.grid is not None and self.grid < 1:
            raise ValueError(f"patch grid must be >= 1, got {self.grid}")
        if self.weights not in PATCH_WEIGHTS:
            raise ValueError(
                f"patch weights must be one of {', '.join(PATCH_WEIGHTS)}, got {self.weights!r}"
            )
        if self.eps <= 0:
            raise ValueError(f"rerank eps must be > 0, got {self.eps}")
        if not 1.0 <= self.relaxation < 2.0:
            raise ValueError(f"rerank relaxation must be in [1, 2), got {self.relaxation}")
        return self


class OTScores(NamedTuple):
    """``s_OT`` of a batch of face pairs, with what produced it.

    Attributes:
        score: ``(B,)`` transport-weighted cosines ``Σ T_ij cos(u_i, v_j)``.
        plan: ``(B, n, m)`` entropic plans.
        a, b: ``(B, n)``, ``(B, m)`` the marginals used.
        marginal_error: ``(B,)`` each plan's L1 marginal error.
    """

    score: torch.Tensor
    plan: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    marginal_error: torch.Tensor


def local_points(features: torch.Tensor, grid: Optional[int]) -> torch.Tensor:
    """``(B, C, H, W)`` maps or ``(B, T, C)`` tokens → ``(B, P, C)`` points, pooled to
    ``grid × grid`` when asked (tokens of a square patch grid are pooled the same way)."""
    if features.dim() == 3:
        if grid is None:
            return features
        side = int(round(features.shape[1] ** 0.5))
        if side * side != features.shape[1]:
            raise ValueError(
                f"cannot pool {features.shape[1]} tokens to a grid: they are not a square"
            )
        features = features.transpose(1, 2).reshape(features.shape[0], -1, side, side)
    if features.dim() != 4:
        raise ValueError(f"local features must be (B, C, H, W) or (B, T, C), got {features.shape}")
    if grid is not None:
        features = F.adaptive_avg_pool2d(features, grid)
    return features.flatten(2).transpose(1, 2)


def mirror_points(points: np.ndarray) -> np.ndarray:
    """``(B, P, C)`` points of a square ``g × g`` patch grid (row-major) → those of the mirror
    image's grid read back in the original's order (columns reversed). A grid that is not square
    (a ViT with extra tokens) is returned as it is."""
    side = int(round(points.shape[1] ** 0.5))
    if side * side != points.shape[1]:
        return points
    grid = points.reshape(points.shape[0], side, side, points.shape[2])
    return np.ascontiguousarray(grid[:, :, ::-1]).reshape(points.shape)


class LocalEmbedder:
    """Embeds ``uint8`` RGB faces with a PyTorch backbone, keeping the local features too.

    Args:
        backbone: the model (eval mode is set while embedding and restored after).
        layer: the feature layer, ``"auto"`` as for the OT training term.
        grid: pool the local features to ``grid × grid``.
        batch_size: faces per forward.
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        layer: str = "auto",
        grid: Optional[int] = None,
        batch_size: int = 64,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.backbone, self.layer, self.grid, self.batch_size = backbone, layer, grid, batch_size

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Args: images ``(N, 3, H, W)`` uint8 RGB.

        Returns:
            ``(N, D)`` float32 embeddings and ``(N, P, C)`` float32 L2-normalised local
            features.
        """
        device = next((p.device for p in self.backbone.parameters()), torch.device("cpu"))
        was_training = self.backbone.training
        self.backbone.eval()
        embeddings, local = [], []
        try:
            with FeatureCapture(self.backbone, self.layer) as capture:
                for start in range(0, len(images), self.batch_size):
                    chunk = np.ascontiguousarray(images[start : start + self.batch_size])
                    emb = self.backbone(preprocess(torch.from_numpy(chunk).to(device)))
                    points = local_points(capture.pop().float(), self.grid)
                    embeddings.append(emb.float().cpu().numpy())
                    local.append(F.normalize(points, dim=-1).cpu().numpy())
        finally:
            self.backbone.train(was_training)
        if not embeddings:
            return np.zeros((0, 0), np.float32), np.zeros((0, 0, 0), np.float32)
        return np.concatenate(embeddings), np.concatenate(local)


class OnnxLocalEmbedder:
    """:class:`LocalEmbedder`'s twin for the ``model_local.onnx`` that ``python -m otface.export
    --local-features`` writes (outputs ``embedding`` and ``local``)."""

    def __init__(self, path, *, batch_size: int = 64) -> None:
        from otface.evaluation.models import OnnxEmbedder

        self._onnx = OnnxEmbedder(path, batch_size=batch_size)
        names = [o.name for o in self._onnx.session.get_outputs()]
        if names != ["embedding", "local"]:
            raise ValueError(
                f"{path} has outputs {names}; re-scoring needs ['embedding', 'local'] "
                "(python -m otface.export --local-features)"
            )

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Args: images ``(N, 3, H, W)`` uint8 RGB. Returns: embeddings and local features."""
        emb, points = self._onnx.run_outputs(images, ["embedding", "local"])
        return emb, points


def open_local_embedder(embedder, options: RerankOptions):
    """The embedder that also gives local features for an opened model: the PyTorch
    backbone's (:class:`LocalEmbedder`), or an ONNX model's ``<stem>_local.onnx``
    (``python -m otface.export --local-features``; :class:`OnnxLocalEmbedder`).

    Raises:
        ValueError: an ONNX model without its ``_local.onnx``, or a ``grid`` asked of one (the
            grid is fixed at export).
    """
    from otface.evaluation.models import TorchEmbedder

    if isinstance(embedder, TorchEmbedder):
        return LocalEmbedder(embedder.backbone, grid=options.grid, batch_size=embedder.batch_size)
    path = Path(str(embedder.path))
    local = path.with_name(path.stem + "_local.onnx")
    if not local.is_file():
        raise ValueError(
            f"re-scoring and per-condition rows need local features: a PyTorch model "
            f"(model.pt), or {local} beside the ONNX model (python -m otface.export "
            "--local-features)"
        )
    if options.grid is not None:
        raise ValueError(
            f"--patch-grid is fixed when {local.name} is exported (python -m otface.export "
            "--local-features --patch-grid G)"
        )
    return OnnxLocalEmbedder(local, batch_size=embedder.batch_size)


def patch_weights(u: torch.Tensor, v: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Marginals ``(a, b)`` of shapes ``(B, n)`` and ``(B, m)`` for points ``u``, ``v``.

    ``"uniform"``: ``1/n`` and ``1/m``. ``"cross"``: ``a_i ∝ max(0, cos(u_i, mean_j v_j))`` and
    ``b_j ∝ max(0, cos(v_j, mean_i u_i))``, each summing to one; a face none of whose patches
    resembles the other's mean falls back to uniform.
    """
    batch, n, m = u.shape[0], u.shape[1], v.shape[1]
    if kind == "uniform":
        return (
            torch.full((batch, n), 1.0 / n, dtype=u.dtype, device=u.device),
            torch.full((batch, m), 1.0 / m, dtype=v.dtype, device=v.device),
        )
    if kind != "cross":
        raise ValueError(f"patch weights must be one of {', '.join(PATCH_WEIGHTS)}, got {kind!r}")

    def towards(points, other):
        centre = F.normalize(other.mean(dim=1), dim=-1)
        w = torch.relu(torch.einsum("bpc,bc->bp", F.normalize(points, dim=-1), centre))
        total = w.sum(dim=1, keepdim=True)
        uniform = torch.full_like(w, 1.0 / w.shape[1])
        return torch.where(total > 0, w / total.clamp_min(1e-30), uniform)

    return towards(u, v), towards(v, u)


def ot_similarity(
    u: torch.Tensor,
    v: torch.Tensor,
    *,
    weights: str = "uniform",
    eps: float = 0.05,
    max_iter: int = 200,
    tol: float = 1e-4,
    relaxation: float = 1.0,
    kernel: str = "auto",
) -> OTScores:
    """``s_OT = Σ T_ij cos(u_i, v_j)`` under the entropic plan between two point sets.

    Args:
        u: ``(B, n, C)`` local features of the first faces (any norm; compared by cosine).
        v: ``(B, m, C)`` those of the second faces.
        weights: ``"uniform"`` or ``"cross"`` marginals (:func:`patch_weights`).
        eps: entropic regularisation; the cost ``1 − cos`` lies in [0, 2].
        max_iter, tol: Sinkhorn budget and tolerance on the marginal error.
        relaxation: over-relaxation in [1, 2) (same plan, fewer iterations).
        kernel: the solver's kernel (``"auto"`` picks the Triton one on GPUs).
    """
    cost = cosine_cost(u, v)
    a, b = patch_weights(u.to(cost.dtype), v.to(cost.dtype), weights)
    with torch.no_grad():
        budget = {"eps": eps, "tol": tol, "max_iter": max_iter, "relaxation": relaxation}
        res = sinkhorn(cost, a=a, b=b, kernel=kernel, cost_range=2.0, warn=False, **budget)
        score = (res.plan * (1.0 - cost)).sum(dim=(1, 2))
    # The error the solver's stop test measured for each problem (below tol where it stopped).
    return OTScores(score, res.plan, a, b, res.problem_errors)


def solve_with(u: torch.Tensor, v: torch.Tensor, options: RerankOptions) -> OTScores:
    """:func:`ot_similarity` with the marginals and solver budget of ``options``."""
    return ot_similarity(
        u,
        v,
        weights=options.weights,
        eps=options.eps,
        max_iter=options.max_iter,
        tol=options.tol,
        relaxation=options.relaxation,
    )


def solve_rows(
    local: np.ndarray,
    rows_a: np.ndarray,
    rows_b: np.ndarray,
    options: RerankOptions,
    *,
    device="cpu",
    chunk_size: int = 2048,
    label: str = "OT re-scoring",
) -> tuple[np.ndarray, np.ndarray]:
    """``s_OT`` and marginal error ``(M,)`` float64 of the pairs ``(local[rows_a[i]],
    local[rows_b[i]])``, solved ``chunk_size`` pairs per batch on ``device``."""
    from otface.progress import Progress

    score = np.empty(len(rows_a), np.float64)
    error = np.empty(len(rows_a), np.float64)
    with Progress(len(rows_a), label) as progress:
        for start in range(0, len(rows_a), chunk_size):
            sl = slice(start, start + chunk_size)
            u = torch.from_numpy(local[rows_a[sl]]).to(device, torch.float32)
            v = torch.from_numpy(local[rows_b[sl]]).to(device, torch.float32)
            res = solve_with(u, v, options)
            score[sl] = res.score.double().cpu().numpy()
            error[sl] = res.marginal_error.double().cpu().numpy()
            progress.update(start + len(u))
    return score, error


def combine_scores(cos: np.ndarray, s_ot: np.ndarray, alpha: float) -> np.ndarray:
    """``α · s_OT + (1 − α) · cos`` (float64); α = 0 gives ``cos`` exactly."""
    cos = np.asarray(cos, dtype=np.float64)
    if alpha == 0.0:
        return cos.copy()
    return alpha * np.asarray(s_ot, dtype=np.float64) + (1.0 - alpha) * cos


def rerank_top_k(scores: np.ndarray, k: int, rescore) -> np.ndarray:
    """Stage 2 of a 1:N search: each probe's ``k`` best gallery entries are re-scored.

    Args:
        scores: ``(P, G)`` stage-1 similarities.
        k: entries re-scored per probe (capped at ``G``).
        rescore: ``(probe_idx (M,), gallery_idx (M,), stage1 (M,)) → (M,)`` new scores.

    Returns:
        ``(P, G)`` scores: the re-scored entries replaced, every other entry as it was, lowered
        where needed so that it stays below the probe's re-scored ones (an entry outside the top
        ``k`` never overtakes one inside it; among themselves they keep their order).
    """
    scores = np.asarray(scores, dtype=np.float64)
    n_probe, n_gallery = scores.shape
    k = min(int(k), n_gallery)
    out = scores.copy()
    if k == 0 or n_probe == 0:
        return out
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    rows = np.repeat(np.arange(n_probe), k)
    cols = top.reshape(-1)
    out[rows, cols] = np.asarray(rescore(rows, cols, scores[rows, cols]), dtype=np.float64)
    if k < n_gallery:
        inside = np.zeros_like(scores, dtype=bool)
        inside[rows, cols] = True
        floor = np.where(inside, out, np.inf).min(axis=1, keepdims=True)
        rest_max = np.where(inside, -np.inf, scores).max(axis=1, keepdims=True)
        # Shift the untouched entries down as a block where they would reach the top k.
        shift = np.maximum(rest_max - floor + 1e-9, 0.0)
        out = np.where(inside, out, scores - shift)
    return out
