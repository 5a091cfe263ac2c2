"""IJB-B / IJB-C 1:1 verification (TAR at FAR) and 1:N identification of a finished model.

    python eval/ijb.py --model work_dirs/NAME/model.pt --network r100 \
        --data /data/IJBC --target IJBC
    python eval/ijb.py --model work_dirs/NAME/model.onnx --data /data/IJBB --target IJBB
    python eval/ijb.py --model work_dirs/demo_otface/model.pt --data demo --protocol all

``--protocol`` is ``11`` (1:1 verification, TAR at FAR 1e-6 … 1e-1; the default), ``1n``
(1:N identification: rank-1/5/10 and TPIR at FPIR 1e-2 and 1e-1, galleries G1 + G2 or S1 + S2
joined against the mixed probes, as InsightFace's ``ijb_1n.py``) or ``all`` (both, from one
feature extraction).

``--data`` is InsightFace's release layout (``meta/`` + ``loose_crop/``), or ``demo`` for the
embedded demo data's ``ijb/`` part (target ``demo``). Without ``--network``, a ``model.pt`` in a
training output folder is loaded as the ``network`` its ``training.log`` names. Writes into
``--output`` (default: ``<model folder>/ijb_<target>``) the table, the scores (``.npy``), the ROC
plot (PNG and PDF, with matplotlib) and a feature cache, so a second run with the same model
file, network and flip setting scores without re-extracting (the model is still opened first, so
a wrong ``--network`` is an error either way). 1:N writes ``<target>_1n.txt``, the
probe-against-gallery scores ``<target>_1n_scores.npz`` and the CMC plot ``<target>_cmc``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from otface.console_log import cli_logging
from otface.evaluation.cli import (
    add_model_arguments,
    add_rerank_arguments,
    positive_int,
    rerank_options,
)
from otface.evaluation.data_dirs import DEMO_DATA, DEMO_IJB_TARGET, is_demo, resolve_data_dir
from otface.evaluation.ijb import (
    FeatureOptions,
    VerifyOptions,
    feature_cache_key,
    format_table,
    save_roc_plot,
    template_features,
    verify_templates,
)
from otface.evaluation.ijb_1n import (
    FPIR_METHODS,
    evaluate_identification,
    format_1n_table,
    save_cmc_plot,
)
from otface.evaluation.ijb_meta import ijb_1n_files, ijb_layout, read_ijb_1n_meta
from otface.evaluation.ijb_rerank import (
    rerank_identification,
    rerank_verification,
    template_features_with_local,
)
from otface.evaluation.metrics import TAR_METHODS
from otface.evaluation.models import (
    TorchEmbedder,
    open_embedder,
    resolve_device,
    resolve_model_path,
    resolve_network,
)
from otface.evaluation.rerank import RerankOptions, open_local_embedder


def _rerank_line(
    options: RerankOptions, n: int, unconverged: int, what: str, seconds: float
) -> str:
    grid = "the layer's own" if options.grid is None else f"{options.grid}x{options.grid}"
    k = f", top {options.k} per probe" if what.startswith("probe") else ""
    return (
        f"rerank ot: alpha {options.alpha:g}, patch grid {grid}, {options.weights} marginals"
        f"{k}; {n} {what} re-scored in {seconds:.1f} s, {unconverged} plans above the tolerance"
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(parser)
    parser.add_argument(
        "--data",
        required=True,
        help=f"IJB folder with meta/ and loose_crop/, or {DEMO_DATA!r} for the embedded demo data",
    )
    parser.add_argument(
        "--target",
        default=None,
        help=f"meta file prefix: IJBB or IJBC (default IJBC; {DEMO_IJB_TARGET!r} with --data demo)",
    )
    parser.add_argument("--batch-size", type=positive_int, default=128)
    parser.add_argument("--num-workers", type=int, default=4, help="image loading threads")
    parser.add_argument("--no-flip", action="store_true", help="skip the flip test")
    parser.add_argument(
        "--no-faceness",
        dest="faceness",
        action="store_false",
        help="do not weight faces by their detector score (weighting is on, as in arcface_torch)",
    )
    parser.add_argument(
        "--tar-method",
        choices=TAR_METHODS,
        default=TAR_METHODS[0],
        help="how TAR@FAR is read from the ROC: as arcface_torch's eval_ijbc.py does (default; "
        "its published tables are read this way), or by interpolation on the full ROC",
    )
    parser.add_argument(
        "--protocol",
        choices=("11", "1n", "all"),
        default="11",
        help="11: 1:1 verification (default); 1n: 1:N identification; all: both",
    )
    parser.add_argument(
        "--fpir-method",
        choices=FPIR_METHODS,
        default=FPIR_METHODS[0],
        help="how 1:N TPIR at FPIR is read: as InsightFace's ijb_1n.py (default; one pool of all "
        "non-mated scores) or NIST-style (each probe's highest non-mated score; mate at rank 1)",
    )
    add_rerank_arguments(parser, top_k=True)
    parser.add_argument("--output", default=None, help="result folder")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if present)")
    args = parser.parse_args(argv)
    rerank = rerank_options(parser, args)
    cli_logging(logging.INFO)
    flip = not args.no_flip
    target = args.target or (DEMO_IJB_TARGET if is_demo(args.data) else "IJBC")
    try:
        model_file = resolve_model_path(args.model)
        network = resolve_network(model_file, args.network)
        # Opened before the cache is looked at: a wrong --network fails even on a cache hit.
        embedder = open_embedder(
            model_file, network=network, batch_size=args.batch_size, device=args.device
        )
        data_dir = resolve_data_dir(args.data, subdir="ijb")
        layout = ijb_layout(data_dir, target)
        out_dir = Path(args.output or model_file.parent / f"ijb_{target.lower()}")
        if out_dir.exists() and not out_dir.is_dir():
            raise FileExistsError(f"--output {out_dir} is a file, not a folder")
        out_dir.mkdir(parents=True, exist_ok=True)
        if args.protocol != "11":
            ijb_1n_files(data_dir, target)  # a missing 1:N list fails before extraction
        key = feature_cache_key(model_file, layout.name_5pts_score, flip=flip, network=network)
        features = FeatureOptions(
            flip=flip,
            faceness=args.faceness,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
        )
        cache_file = out_dir / f"{target.lower()}_features_{key}.npy"
        local = None
        if rerank is None:
            meta, pooled = template_features(
                embedder, data_dir, target, options=features, cache_file=cache_file
            )
        else:
            grid = "full" if rerank.grid is None else f"{rerank.grid}x{rerank.grid}"
            meta, pooled, local = template_features_with_local(
                open_local_embedder(embedder, rerank),
                data_dir,
                target,
                options=features,
                cache_file=cache_file,
                local_cache_file=out_dir
                / f"{target.lower()}_local_{key}_{grid}_faceness{int(args.faceness)}.npy",
                # An ONNX model's local features come from its _local.onnx: stage 1 keeps to
                # the model file itself, as without --rerank.
                stage1_embedder=None if isinstance(embedder, TorchEmbedder) else embedder,
            )
            ot_device = resolve_device(args.device)
        name = model_file.parent.name if model_file.stem == "model" else model_file.stem
        stem = out_dir / target.lower()
        lines: list = []
        notes: list = []
        if args.protocol in ("11", "all"):
            verify = VerifyOptions(tar_method=args.tar_method)
            result = verify_templates(meta, pooled, target, options=verify)
            np.save(f"{stem}_scores.npy", result.scores)
            rows = {name: result}
            if rerank is not None:
                started = time.perf_counter()
                stage2, bad = rerank_verification(
                    meta, pooled, local, result, rerank, verify=verify, device=ot_device
                )
                np.save(f"{stem}_scores_rerank_ot.npy", stage2.scores)
                rows[f"{name}+rerank-ot"] = stage2
                seconds = time.perf_counter() - started
                notes.append(_rerank_line(rerank, len(stage2.scores), bad, "pairs", seconds))
            table = format_table(rows)
            Path(f"{stem}_tar_at_far.txt").write_text(table + "\n", encoding="utf-8")
            plots = save_roc_plot(rows, stem)
            lines += [
                "1:1 verification",
                table,
                f"{result.num_faces} faces, {result.num_templates} templates, "
                f"{len(result.scores)} pairs" + (f" (ROC: {plots[0].name})" if plots else ""),
            ]
        if args.protocol in ("1n", "all"):
            meta_1n = read_ijb_1n_meta(data_dir, target, pooled.templates)
            ident = evaluate_identification(pooled, meta_1n, target, fpir_method=args.fpir_method)
            rows_1n = {name: ident}
            if rerank is not None:
                started = time.perf_counter()
                ident2, bad = rerank_identification(ident, local, rerank, device=ot_device)
                seconds = time.perf_counter() - started
                rows_1n[f"{name}+rerank-ot"] = ident2
                np.save(f"{stem}_1n_similarity_rerank_ot.npy", ident2.similarity)
                n_rescored = len(ident.probe_templates) * min(rerank.k, ident.similarity.shape[1])
                notes.append(_rerank_line(rerank, n_rescored, bad, "probe-gallery pairs", seconds))
            table_1n = format_1n_table(rows_1n)
            Path(f"{stem}_1n.txt").write_text(table_1n + "\n", encoding="utf-8")
            np.savez(
                f"{stem}_1n_scores.npz",
                similarity=ident.similarity,
                mates=ident.mates,
                probe_templates=ident.probe_templates,
                gallery_templates=ident.gallery_templates,
                cmc=ident.cmc,
            )
            cmc_plots = save_cmc_plot(rows_1n, f"{stem}_cmc")
            lines += [
                "1:N identification",
                table_1n,
                f"CMC: {cmc_plots[0].name}" if cmc_plots else "no CMC plot (no matplotlib)",
            ]
    # OSError: files (missing, unreadable, --output naming a file); ValueError includes
    # IJBLayoutError; ImportError: an optional package (onnxruntime, insightface) with its hint.
    except (OSError, ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print("\n".join(lines + notes))
    print(f"results in {out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
