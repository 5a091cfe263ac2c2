"""A picture of a match: ``python -m otface.explain --model M IMG_A IMG_B -o match.png``.

Draws the two aligned faces side by side, each patch's transport mass as a heat overlay, and the
strongest flows of the entropic plan between their patches as lines whose width follows the
mass; the title gives the cosine of the embeddings, ``s_OT`` and the stage-2 score
``α·s_OT + (1 − α)·cos`` (:mod:`otface.evaluation.rerank`).

A search: ``python -m otface.explain --model M PROBE --gallery LIST -o top5.png``, ``LIST`` a
text file of image paths (one per line) or a folder of images, draws the probe and its best
five gallery faces before re-ranking (cosine) and after (each probe's ``--rerank-k`` best
re-scored), each with its scores.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from otface.evaluation.rerank import (
    PATCH_WEIGHTS,
    LocalEmbedder,
    RerankOptions,
    combine_scores,
    rerank_top_k,
    solve_with,
)

__all__ = [
    "MatchExplanation",
    "SearchExplanation",
    "explain_pair",
    "explain_search",
    "draw_match",
    "draw_search",
    "main",
]


class MatchExplanation(NamedTuple):
    """What the picture shows.

    Attributes:
        cosine: cosine of the two pooled embeddings.
        s_ot: transport-weighted cosine of the local features.
        combined: ``α·s_OT + (1 − α)·cos``.
        plan: ``(n, n)`` entropic plan between the patches (row: face A, column: face B).
        side: patches per row of the square patch grid.
        flows: the drawn flows ``(i, j, mass)``, strongest first.
    """

    cosine: float
    s_ot: float
    combined: float
    plan: np.ndarray
    side: int
    flows: List[Tuple[int, int, float]]


def _read_face(path: Path) -> np.ndarray:
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise FileNotFoundError(f"cannot read {path} as an image")
    if image.shape[:2] != (112, 112):
        image = cv2.resize(image, (112, 112), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(image[:, :, ::-1])  # RGB


def explain_pair(
    backbone: torch.nn.Module,
    face_a: np.ndarray,
    face_b: np.ndarray,
    options: RerankOptions,
    *,
    n_flows: int = 12,
) -> MatchExplanation:
    """Scores two aligned ``(112, 112, 3)`` uint8 RGB faces and picks the flows to draw."""
    images = np.stack([face_a, face_b]).transpose(0, 3, 1, 2)
    emb, local = LocalEmbedder(backbone, grid=options.grid)(images)
    side = int(round(local.shape[1] ** 0.5))
    if side * side != local.shape[1]:
        raise ValueError(f"the local features are not a square grid ({local.shape[1]} points)")
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    cosine = float(e[0] @ e[1])
    res = solve_with(torch.from_numpy(local[:1]), torch.from_numpy(local[1:]), options)
    plan = res.plan[0].double().numpy()
    s_ot = float(res.score[0])
    order = np.argsort(-plan, axis=None)[:n_flows]
    flows = [(int(k // plan.shape[1]), int(k % plan.shape[1]), float(plan.flat[k])) for k in order]
    combined = options.alpha * s_ot + (1.0 - options.alpha) * cosine
    return MatchExplanation(cosine, s_ot, combined, plan, side, flows)


def draw_match(
    face_a: np.ndarray,
    face_b: np.ndarray,
    match: MatchExplanation,
    out: Path,
    *,
    alpha: float,
    titles: Sequence[str] = ("A", "B"),
) -> Path:
    """Writes the picture of ``match`` to ``out`` (PNG, or any format matplotlib knows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size, gap = 112, 24
    canvas = np.full((size, 2 * size + gap, 3), 255, np.uint8)
    canvas[:, :size], canvas[:, size + gap :] = face_a, face_b
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=150)
    ax.imshow(canvas)
    cell = size / match.side
    # Each face's patch mass (row sums for A, column sums for B), as a heat overlay.
    for mass, x0 in ((match.plan.sum(1), 0), (match.plan.sum(0), size + gap)):
        heat = mass.reshape(match.side, match.side)
        ax.imshow(
            heat / max(heat.max(), 1e-12),
            cmap="magma",
            alpha=0.3,
            extent=(x0 - 0.5, x0 + size - 0.5, size - 0.5, -0.5),
            interpolation="nearest",
        )

    def centre(idx: int, x0: float) -> Tuple[float, float]:
        row, col = divmod(idx, match.side)
        return x0 + (col + 0.5) * cell - 0.5, (row + 0.5) * cell - 0.5

    top = match.flows[0][2] if match.flows else 1.0
    colours = plt.get_cmap("cool")(np.linspace(0.0, 1.0, max(len(match.flows), 2)))
    t = np.linspace(0.0, 1.0, 32)[:, None]
    for rank, (i, j, mass) in enumerate(match.flows):
        a, b = np.array(centre(i, 0)), np.array(centre(j, size + gap))
        # A curve bowed up or down by rank, so that flows between one row of patches part.
        bow = (10.0 + 6.0 * (rank // 2)) * (-1.0 if rank % 2 else 1.0)
        control = (a + b) / 2 + np.array([0.0, bow])
        curve = (1 - t) ** 2 * a + 2 * (1 - t) * t * control + t**2 * b
        width = 0.6 + 3.4 * mass / top
        ax.plot(curve[:, 0], curve[:, 1], color=colours[rank], linewidth=width, alpha=0.9)
        ax.plot(*np.stack([a, b]).T, "o", color=colours[rank], markersize=2.5)
    ax.set_xlim(-0.5, 2 * size + gap - 0.5)
    ax.set_ylim(size - 0.5, -0.5)
    ax.set_xticks([size / 2, size + gap + size / 2], titles)
    ax.set_yticks([])
    ax.set_title(
        f"cos {match.cosine:.3f}   s_OT {match.s_ot:.3f}   "
        f"combined (α {alpha:g}) {match.combined:.3f}",
        fontsize=9,
    )
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


class SearchExplanation(NamedTuple):
    """A 1:N search of one probe, before and after re-ranking.

    Attributes:
        cosine: ``(G,)`` stage-1 cosine of each gallery face.
        s_ot: ``(G,)`` ``s_OT`` of the re-scored gallery faces, NaN for the others.
        stage2: ``(G,)`` stage-2 scores (:func:`otface.evaluation.rerank.rerank_top_k`).
        before, after: the gallery indices of the best ``top``, by stage 1 and by stage 2.
    """

    cosine: np.ndarray
    s_ot: np.ndarray
    stage2: np.ndarray
    before: np.ndarray
    after: np.ndarray


def explain_search(
    backbone: torch.nn.Module,
    probe: np.ndarray,
    gallery: np.ndarray,
    options: RerankOptions,
    *,
    top: int = 5,
) -> SearchExplanation:
    """Searches aligned ``(112, 112, 3)`` uint8 RGB ``probe`` in ``gallery`` ``(G, 112, 112, 3)``
    and re-ranks its ``options.k`` best, as ``eval/ijb.py --rerank ot`` does for templates."""
    images = np.concatenate([probe[None], gallery]).transpose(0, 3, 1, 2)
    emb, local = LocalEmbedder(backbone, grid=options.grid)(images)
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    cosine = (e[1:] @ e[0]).astype(np.float64)
    s_ot = np.full(len(gallery), np.nan)

    def rescore(_, cols, cos):
        probe = torch.from_numpy(np.repeat(local[:1], len(cols), axis=0))
        res = solve_with(probe, torch.from_numpy(local[1:][cols]), options)
        s_ot[cols] = res.score.double().numpy()
        return combine_scores(cos, s_ot[cols], options.alpha)

    stage2 = rerank_top_k(cosine[None], options.k, rescore)[0]
    order = np.argsort(-cosine, kind="stable")[:top]
    return SearchExplanation(cosine, s_ot, stage2, order, np.argsort(-stage2, kind="stable")[:top])


def draw_search(
    probe: np.ndarray,
    gallery: np.ndarray,
    search: SearchExplanation,
    out: Path,
    *,
    names: Sequence[str],
    alpha: float,
) -> Path:
    """Writes the probe and its best gallery faces before and after re-ranking to ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = len(search.before)
    stage1_rank = np.argsort(np.argsort(-search.cosine, kind="stable"), kind="stable")
    fig, axes = plt.subplots(2, top + 1, figsize=(1.45 * (top + 1), 4.4), dpi=150)
    for row, (label, order) in enumerate((("cosine", search.before), ("re-ranked", search.after))):
        axes[row, 0].imshow(probe)
        axes[row, 0].set_title("probe", fontsize=7)
        axes[row, 0].set_ylabel(label, fontsize=8)
        for col, g in enumerate(order, start=1):
            ax = axes[row, col]
            ax.imshow(gallery[g])
            moved = "" if row == 0 else f"\nwas #{int(stage1_rank[g]) + 1}"
            s_ot = "" if np.isnan(search.s_ot[g]) else f"\ns_OT {search.s_ot[g]:.3f}"
            score = search.cosine[g] if row == 0 else search.stage2[g]
            ax.set_title(f"{_short(names[g])}\n{score:.3f}{s_ot}{moved}", fontsize=6)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"top {top} by cosine, and after OT re-ranking (α {alpha:g})", fontsize=9)
    fig.tight_layout(h_pad=1.2)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def _short(name: str) -> str:
    """``identity/file`` of a path, cut to fit under a thumbnail."""
    p = Path(name)
    for text in (f"{p.parent.name}/{p.name}", p.name):
        if len(text) <= 18:
            return text
    return "…" + p.name[-17:]


def _gallery_paths(spec: Path) -> List[Path]:
    """The images a ``--gallery`` names: lines of a text file, or a folder's images (sorted,
    recursively)."""
    if spec.is_dir():
        found = sorted(
            p for p in spec.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp")
        )
    elif spec.is_file():
        lines = [ln.strip() for ln in spec.read_text(encoding="utf-8").splitlines()]
        found = [
            (spec.parent / ln) if not Path(ln).is_absolute() else Path(ln) for ln in lines if ln
        ]
    else:
        raise FileNotFoundError(f"--gallery {spec} is neither a list file nor a folder")
    if not found:
        raise ValueError(f"--gallery {spec} names no images")
    return found


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line; see the module docstring."""
    from otface.console_log import cli_logging
    from otface.evaluation.cli import positive_int
    from otface.evaluation.models import load_backbone, resolve_network

    parser = argparse.ArgumentParser(prog="python -m otface.explain", description=__doc__)
    parser.add_argument("--model", required=True, help="model.pt (or its training folder)")
    parser.add_argument("--network", default=None, help="default: from the run's training.log")
    parser.add_argument(
        "images",
        nargs="+",
        help="two aligned faces (112x112, or resized); or one probe face with --gallery",
    )
    parser.add_argument(
        "--gallery",
        default=None,
        help="1:N: a text file of gallery image paths (one per line) or a folder of images",
    )
    parser.add_argument("--top", type=positive_int, default=5, help="1:N: faces shown per row")
    parser.add_argument(
        "--rerank-k", type=positive_int, default=RerankOptions().k, help="1:N: faces re-scored"
    )
    parser.add_argument("-o", "--output", default="match.png", help="picture to write")
    parser.add_argument("--rerank-alpha", type=float, default=RerankOptions().alpha)
    parser.add_argument("--patch-grid", type=positive_int, default=None)
    parser.add_argument("--patch-weights", choices=PATCH_WEIGHTS, default="uniform")
    parser.add_argument("--flows", type=positive_int, default=12, help="flows drawn")
    args = parser.parse_args(argv)
    if len(args.images) != (1 if args.gallery else 2):
        parser.error("give two faces, or one probe face with --gallery")
    cli_logging()
    try:
        options = RerankOptions(
            alpha=args.rerank_alpha,
            k=args.rerank_k,
            grid=args.patch_grid,
            weights=args.patch_weights,
        ).checked()
        network = resolve_network(args.model, args.network)
        if network is None:
            raise ValueError(
                f"no training.log beside {args.model} names its network: pass --network"
            )
        backbone = load_backbone(args.model, network=network, device="cpu").eval()
        if args.gallery:
            paths = _gallery_paths(Path(args.gallery))
            probe = _read_face(Path(args.images[0]))
            gallery = np.stack([_read_face(p) for p in paths])
            top = min(args.top, len(paths))
            search = explain_search(backbone, probe, gallery, options, top=top)
            names = [str(p) for p in paths]
            out = draw_search(
                probe, gallery, search, Path(args.output), names=names, alpha=options.alpha
            )
            for label, order, score in (
                ("cosine", search.before, search.cosine),
                ("re-ranked", search.after, search.stage2),
            ):
                print(
                    f"{label:9s} " + "  ".join(f"{_short(names[g])} {score[g]:.4f}" for g in order)
                )
            print(f"-> {out}")
            return 0
        faces = [_read_face(Path(p)) for p in args.images]
        match = explain_pair(backbone, *faces, options, n_flows=args.flows)
        out = draw_match(
            *faces,
            match,
            Path(args.output),
            alpha=options.alpha,
            titles=[Path(p).name for p in args.images],
        )
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"cos {match.cosine:.4f}  s_OT {match.s_ot:.4f}  combined {match.combined:.4f}  -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
