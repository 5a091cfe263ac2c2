"""ONNX export of a trained backbone, for onnxruntime and the insightface model zoo.

``python -m otface.export work_dirs/NAME`` reads ``work_dirs/NAME/model.pt`` (the network as
logged in ``training.log``, or ``--network r100``) and writes, in that folder:

- ``model.onnx``: input ``data`` ``(N, 3, 112, 112)`` float32 with a dynamic batch axis, RGB
  scaled to ``(x - 127.5) / 127.5``, one output ``embedding`` ``(N, 512)``. After export,
  onnxruntime runs a batch and each embedding must match PyTorch's (cosine ≥ 0.9999).
- ``package/``: an insightface model package (``manifest.json``, manifest version 2, task
  ``recognition``, and the ``MODEL.LICENSE`` it names) holding the same ``model.onnx``;
  insightface ≥ 2.1 loads it with ``get_model("package", model_task="recognition")``.

Only the backbone is exported. Pass ``model.pt`` (or its folder), not ``checkpoint_gpu_*.pt``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from otface.console_log import cli_logging
from otface.evaluation.models import (
    import_onnxruntime,
    load_backbone,
    preprocess,
    resolve_model_path,
)

__all__ = [
    "DEFAULT_OPSET",
    "ExportResult",
    "ExportParityError",
    "export_onnx",
    "check_onnx_parity",
    "write_model_package",
    "export_model",
    "main",
]

logger = logging.getLogger(__name__)
PathLike = Union[str, Path]

#: Opset 17 is read by onnxruntime ≥ 1.11 and by every insightface release that reads ONNX.
DEFAULT_OPSET = 17
MIN_COSINE = 0.9999
_MODEL_ID = re.compile(r"[^A-Za-z0-9._-]+")


class ExportParityError(RuntimeError):
    """onnxruntime's embeddings differ from PyTorch's beyond the tolerance."""


class ExportResult(NamedTuple):
    """Files written and the parity measured: ``onnx_path``, ``package_dir`` (or None),
    ``min_cosine`` (worst row), ``max_abs_diff`` between onnxruntime and PyTorch."""

    onnx_path: Path
    package_dir: Optional[Path]
    min_cosine: float
    max_abs_diff: float


def export_onnx(
    backbone: nn.Module,
    output: PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    image_size: Tuple[int, int] = (112, 112),
    simplify: bool = False,
) -> Path:
    """Writes ``backbone`` (put in eval mode, on the CPU) as ONNX with a dynamic batch axis.

    Args:
        backbone: maps ``(N, 3, H, W)`` float inputs to ``(N, D)`` embeddings.
        output: the ``.onnx`` file to write.
        opset: ONNX opset version.
        image_size: ``(H, W)`` of the input.
        simplify: run onnxsim on the exported graph (needs the ``onnxsim`` package).
    """
    import onnx

    if simplify:
        _require_onnxsim()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    backbone = backbone.cpu().eval()
    dummy = torch.zeros(2, 3, *image_size)
    tmp = output.with_name(output.name + ".tmp")
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter is the one that needs no onnxscript; its deprecation
        # notice is not the user's concern.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            backbone,
            (dummy,),
            str(tmp),
            input_names=["data"],
            output_names=["embedding"],
            dynamic_axes={"data": {0: "batch"}, "embedding": {0: "batch"}},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    model = onnx.load(str(tmp))
    if simplify:
        from onnxsim import simplify as onnxsim_simplify

        model, ok = onnxsim_simplify(model)
        if not ok:
            raise RuntimeError("onnxsim could not validate the simplified graph")
    onnx.checker.check_model(model)
    outputs = model.graph.output
    if len(outputs) != 1:
        raise RuntimeError(f"exported graph has {len(outputs)} outputs; a backbone must have one")
    onnx.save(model, str(tmp))
    tmp.replace(output)
    return output


def _require_onnxsim() -> None:
    try:
        import onnxsim  # noqa: F401
    except ImportError:
        raise ImportError(
            "--simplify needs the onnxsim package, which is not installed: "
            "pip install onnxsim, or export without --simplify"
        ) from None


def check_onnx_parity(
    backbone: nn.Module,
    onnx_path: PathLike,
    *,
    batch_sizes: Sequence[int] = (1, 7),
    image_size: Tuple[int, int] = (112, 112),
    min_cosine: float = MIN_COSINE,
    seed: int = 0,
) -> Tuple[float, float]:
    """Runs onnxruntime (CPU) and PyTorch on random ``uint8`` faces of each batch size.

    Returns:
        ``(worst cosine, largest absolute difference)`` over all embeddings.

    Raises:
        ExportParityError: when a cosine is below ``min_cosine``.
    """
    ort = import_onnxruntime()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    backbone = backbone.cpu().eval()
    worst_cos, worst_abs = 1.0, 0.0
    for n in batch_sizes:
        pixels = rng.integers(0, 256, size=(n, 3, *image_size), dtype=np.uint8)
        x = preprocess(torch.from_numpy(pixels))
        with torch.no_grad():
            ref = backbone(x).float().numpy()
        got = session.run(None, {"data": x.numpy()})[0]
        if got.shape != ref.shape:
            raise ExportParityError(
                f"{onnx_path}: batch {n} gives output {got.shape}, PyTorch gives {ref.shape}"
            )
        if not (np.isfinite(ref).all() and np.isfinite(got).all()):
            raise ExportParityError(f"{onnx_path}: non-finite embeddings for batch {n}")
        got64, ref64 = got.astype(np.float64), ref.astype(np.float64)
        cos = np.sum(got64 * ref64, 1) / (
            np.linalg.norm(got64, axis=1) * np.linalg.norm(ref64, axis=1)
        )
        worst_cos = min(worst_cos, float(np.nan_to_num(cos, nan=-1.0).min()))
        worst_abs = max(worst_abs, float(np.abs(got64 - ref64).max()))
    if not worst_cos >= min_cosine:
        raise ExportParityError(
            f"{onnx_path}: onnxruntime and PyTorch embeddings differ (worst cosine "
            f"{worst_cos:.6f} < {min_cosine}); the export is not usable"
        )
    return worst_cos, worst_abs


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_model_package(
    onnx_path: PathLike,
    package_dir: PathLike,
    *,
    model_id: str,
    embedding_size: int = 512,
    image_size: int = 112,
) -> Path:
    """Writes an insightface model package (manifest version 2) around ``onnx_path``.

    The folder gets ``model.onnx`` (a hard link to, or copy of, ``onnx_path``) and
    ``manifest.json`` with the recognition task: file, sha256, mean/std 127.5 preprocessing
    (RGB), input size and embedding dimension. The ``license`` field names ``MODEL.LICENSE``
    as the schema requires, and that file is written too (unless one is already there): it
    says that no license was chosen and that the model's terms follow its training data's;
    replace it with your own before you ship the package.
    """
    onnx_path = Path(onnx_path)
    package_dir = Path(package_dir)
    clean_id = _MODEL_ID.sub("_", model_id).strip("._-")[:128] or "otface"
    package_dir.mkdir(parents=True, exist_ok=True)
    target = package_dir / "model.onnx"
    if target.resolve() != onnx_path.resolve():
        if target.exists():
            target.unlink()
        try:
            os.link(onnx_path, target)
        except OSError:
            shutil.copyfile(onnx_path, target)
    manifest = {
        "manifest_version": 2,
        "model_id": clean_id,
        "display_name": model_id,
        "license": "MODEL.LICENSE",
        "tasks": {
            "recognition": {
                "file": "model.onnx",
                "sha256": _sha256(target),
                "preprocessing": {"mean": 127.5, "std": 127.5},
                "preprocessing_version": "insightface-arcface-1",
                "input_size": [image_size, image_size],
                "embedding_dimension": embedding_size,
            }
        },
    }
    license_file = package_dir / "MODEL.LICENSE"
    if not license_file.exists():
        license_file.write_text(_LICENSE_PLACEHOLDER, encoding="utf-8")
    tmp = package_dir / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    tmp.replace(package_dir / "manifest.json")
    return package_dir


_LICENSE_PLACEHOLDER = """\
No license has been chosen for this model yet.

It was exported by otface from weights trained by whoever ran the training. The terms under
which it may be used follow from its training data (MS1MV3, Glint360K and WebFace are licensed
for non-commercial research only) and from its owner's choice. Replace this file with those
terms before you ship the package.
"""


LOCAL_SUFFIX = "_local.onnx"


class _WithLocalFeatures(nn.Module):
    """The backbone, returning its embedding and the OT term layer's L2-normalised local
    features ``(N, P, C)`` (pooled to ``grid × grid`` when given)."""

    def __init__(self, backbone: nn.Module, grid: Optional[int]) -> None:
        super().__init__()
        from otface.hooks import FeatureCapture

        self.backbone, self.grid = backbone, grid
        self.capture = FeatureCapture(backbone)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        from otface.evaluation.rerank import local_points

        embedding = self.backbone(x)
        points = local_points(self.capture.pop().float(), self.grid)
        return embedding, torch.nn.functional.normalize(points, dim=-1)


def export_local_features(
    backbone: nn.Module,
    output: PathLike,
    *,
    grid: Optional[int] = None,
    opset: int = DEFAULT_OPSET,
    image_size: Tuple[int, int] = (112, 112),
) -> Path:
    """Writes the opt-in second file for OT re-scoring: input ``data`` as ``model.onnx``'s,
    outputs ``embedding`` ``(N, D)`` and ``local`` ``(N, P, C)`` (dynamic batch axis). The
    model-zoo file keeps its single output; this one is for ``--rerank ot`` on ONNX."""
    import onnx

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    wrapper = _WithLocalFeatures(backbone.cpu().eval(), grid).eval()
    tmp = output.with_name(output.name + ".tmp")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper,
                (torch.zeros(2, 3, *image_size),),
                str(tmp),
                input_names=["data"],
                output_names=["embedding", "local"],
                dynamic_axes={
                    "data": {0: "batch"},
                    "embedding": {0: "batch"},
                    "local": {0: "batch"},
                },
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
    finally:
        wrapper.capture.remove()
    onnx.checker.check_model(onnx.load(str(tmp)))
    tmp.replace(output)
    return output


def export_model(
    model_path: PathLike,
    *,
    network: str,
    output_dir: Optional[PathLike] = None,
    opset: int = DEFAULT_OPSET,
    simplify: bool = False,
    package: bool = True,
    package_dir: Optional[PathLike] = None,
    model_id: Optional[str] = None,
    embedding_size: int = 512,
    local_features: bool = False,
    patch_grid: Optional[int] = None,
) -> ExportResult:
    """``model.pt`` (or its folder) → ``model.onnx`` + parity check + model package.

    Args:
        model_path: backbone ``state_dict`` file, or the training output folder holding it.
        network: backbone name for ``otface.backbones.get_model`` (e.g. ``r100``).
        output_dir: where ``model.onnx`` goes; default the folder of ``model.pt``.
        package: also write the insightface model package (default ``output_dir/package``).
        model_id: the package's ``model_id``; default the output folder's name.
        local_features: also write ``model_local.onnx`` (:func:`export_local_features`), pooled
            to ``patch_grid`` when given.
    """
    if simplify:
        _require_onnxsim()
    model_file = resolve_model_path(model_path)
    out_dir = Path(output_dir) if output_dir is not None else model_file.parent
    backbone = load_backbone(model_file, network, embedding_size=embedding_size)
    # Export and check a staged file, so a failed check leaves no model.onnx behind.
    staged = export_onnx(backbone, out_dir / ".model.onnx.staged", opset=opset, simplify=simplify)
    try:
        cosine, abs_diff = check_onnx_parity(backbone, staged)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    onnx_path = staged.replace(out_dir / "model.onnx")
    write_source_record(onnx_path, model_file)
    logger.info(
        "%s: parity with PyTorch: min cosine %.7f, max |diff| %.2e", onnx_path, cosine, abs_diff
    )
    if local_features:
        local = export_local_features(
            backbone, out_dir / ("model" + LOCAL_SUFFIX), grid=patch_grid, opset=opset
        )
        write_source_record(local, model_file)
        logger.info("%s: embedding and local features, for --rerank ot", local)
    written_package = None
    if package:
        written_package = write_model_package(
            onnx_path,
            package_dir if package_dir is not None else out_dir / "package",
            model_id=model_id or out_dir.resolve().name,
            embedding_size=embedding_size,
        )
    return ExportResult(onnx_path, written_package, cosine, abs_diff)


SOURCE_SUFFIX = ".source.json"


def write_source_record(onnx_path: Path, model_file: Path) -> Path:
    """``model.onnx.source.json``: which ``model.pt`` (name and SHA-256) the ONNX model was made
    from, so that evaluation can refuse it once that file has changed."""
    record = Path(str(onnx_path) + SOURCE_SUFFIX)
    info = {"model": model_file.name, "sha256": _sha256(model_file)}
    tmp = record.with_name(record.name + ".tmp")
    tmp.write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    tmp.replace(record)
    return record


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line: ``python -m otface.export MODEL_PT_OR_DIR [--network NAME] [...]``."""
    parser = argparse.ArgumentParser(
        prog="python -m otface.export",
        description="Export a trained backbone (model.pt) to ONNX and an insightface package.",
    )
    parser.add_argument("model", help="model.pt, or the training output folder holding it")
    parser.add_argument(
        "--network",
        default=None,
        help="backbone name, e.g. r50, r100, mbf (default: as logged in the folder's training.log)",
    )
    parser.add_argument("--output", default=None, help="output folder (default: model's folder)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset version")
    parser.add_argument("--simplify", action="store_true", help="simplify with onnxsim")
    parser.add_argument("--embedding-size", type=int, default=512)
    parser.add_argument("--model-id", default=None, help="package model_id (default: folder)")
    parser.add_argument("--package-dir", default=None, help="package folder (default OUT/package)")
    parser.add_argument("--no-package", action="store_true", help="skip the model package")
    parser.add_argument(
        "--local-features",
        action="store_true",
        help="also write model_local.onnx (embedding and local features, for --rerank ot)",
    )
    parser.add_argument(
        "--patch-grid", type=int, default=None, help="pool model_local.onnx's features to GxG"
    )
    args = parser.parse_args(argv)
    cli_logging(logging.INFO)
    from otface.evaluation.models import resolve_network

    network = resolve_network(args.model, args.network)
    if network is None:
        print(
            f"error: cannot tell which network {args.model} is: no training.log beside it "
            "names one; give --network (e.g. r50, r100, mbf)",
            file=sys.stderr,
        )
        return 1
    try:
        result = export_model(
            args.model,
            network=network,
            output_dir=args.output,
            opset=args.opset,
            simplify=args.simplify,
            package=not args.no_package,
            package_dir=args.package_dir,
            model_id=args.model_id,
            embedding_size=args.embedding_size,
            local_features=args.local_features,
            patch_grid=args.patch_grid,
        )
    except (FileNotFoundError, ValueError, ImportError, ExportParityError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {result.onnx_path} (onnxruntime vs PyTorch: min cosine {result.min_cosine:.7f})")
    if result.package_dir is not None:
        print(f"wrote insightface model package {result.package_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
