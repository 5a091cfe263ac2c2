"""Loading finished models for evaluation and export: PyTorch ``model.pt`` or ONNX.

Every embedder here takes aligned faces as ``uint8`` RGB arrays of shape ``(N, 3, H, W)`` and
applies the training preprocessing ``(x / 255 - 0.5) / 0.5``, which equals insightface's
``(x - 127.5) / 127.5`` after its BGR→RGB swap, so a PyTorch backbone and its ONNX export give
the same embeddings for the same pixels.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

__all__ = [
    "import_onnxruntime",
    "Embedder",
    "TorchEmbedder",
    "OnnxEmbedder",
    "resolve_model_path",
    "load_backbone_state",
    "state_shapes",
    "state_differences",
    "load_state_into",
    "load_backbone",
    "network_from_training_log",
    "resolve_network",
    "resolve_device",
    "open_embedder",
    "preprocess",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]
Shape = Tuple[int, ...]
#: A state_dict's key → tensor shape.
Shapes = Dict[str, Shape]
#: A function from ``uint8`` RGB faces ``(N, 3, H, W)`` to float32 embeddings ``(N, D)``.
Embedder = Callable[[np.ndarray], np.ndarray]

_TRAINING_CHECKPOINT_KEYS = ("state_dict_softmax_fc", "state_dict_backbone", "state_optimizer")
# The config dump at the top of a training.log, written by this trainer and by arcface_torch:
# "Training: 2024-05-01 10:00:00,123-: network                  r100".
_LOGGED_NETWORK = re.compile(r"^Training: .*?-: network\s+(\S+)\s*$")


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """Map ``uint8`` pixels to the network's input range: ``(x / 255 - 0.5) / 0.5``, float32."""
    return images.float().div_(255.0).sub_(0.5).div_(0.5)


def resolve_model_path(path: PathLike) -> Path:
    """Return ``path``, or ``path/model.pt`` when ``path`` is a training output folder."""
    path = Path(path)
    if path.is_dir():
        candidate = path / "model.pt"
        if not candidate.is_file():
            raise FileNotFoundError(f"{path} is a folder without model.pt in it")
        return candidate
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    return path


def load_backbone_state(path: PathLike) -> Dict[str, torch.Tensor]:
    """Read a backbone ``state_dict`` (arcface_torch's ``model.pt``) onto the CPU.

    A DDP ``module.`` prefix on every key is removed. A training checkpoint
    (``checkpoint_gpu_{rank}.pt``, which also holds the partial-FC centres and optimizer) is
    refused with a message pointing to ``model.pt``.
    """
    path = resolve_model_path(path)
    if path.stat().st_size == 0:
        raise ValueError(f"cannot read {path} as a PyTorch state_dict: the file is empty (0 bytes)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle / zip errors come in many types
        reason = str(exc).strip() or type(exc).__name__
        raise ValueError(f"cannot read {path} as a PyTorch state_dict: {reason}") from exc
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, expected a state_dict (dict)")
    found = [k for k in _TRAINING_CHECKPOINT_KEYS if k in state]
    if found:
        raise ValueError(
            f"{path} is a full training checkpoint (it has {', '.join(found)}), not a backbone. "
            "Pass model.pt from the same output folder: it holds the backbone weights only "
            "and is written by rank 0 at the end of every epoch."
        )
    return clean_backbone_state(state, str(path))


def clean_backbone_state(state: dict, source: str) -> Dict[str, torch.Tensor]:
    """A backbone ``state_dict`` checked and without a DDP ``module.`` prefix on its keys.

    Raises:
        ValueError: an entry that is not a tensor, or a tensor holding NaN or Inf; the message
            starts with ``source`` (a path, or a config key and its value).
    """
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{source} is not a state_dict: entry {bad[0]!r} is not a tensor")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    broken = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise ValueError(
            f"{source} holds NaN or Inf in {broken[0]!r}"
            + (f" and {len(broken) - 1} more tensors" if len(broken) > 1 else "")
            + ": its weights are meaningless (the run that wrote it diverged)"
        )
    return state


def state_shapes(module_or_state: Union[nn.Module, Mapping[str, torch.Tensor]]) -> Shapes:
    """Key → shape of a module's ``state_dict()`` or of a state_dict."""
    if isinstance(module_or_state, nn.Module):
        module_or_state = module_or_state.state_dict()
    return {k: tuple(v.shape) for k, v in module_or_state.items()}


def state_differences(expected: Mapping[str, Shape], found: Mapping[str, Shape]) -> List[str]:
    """How the key shapes of a file (``found``) differ from a network's (``expected``).

    Returns:
        One phrase per difference, in the network's key order, then the file's extra keys;
        empty when the two have the same keys and shapes.
    """
    diffs = []
    for key, shape in expected.items():
        if key not in found:
            diffs.append(f"{key!r} is missing from the file")
        elif found[key] != shape:
            diffs.append(f"{key!r} is {found[key]} in the file, {shape} in the network")
    diffs += [f"{k!r} is in the file but not in the network" for k in found if k not in expected]
    return diffs


def load_state_into(
    backbone: nn.Module, state: Dict[str, torch.Tensor], *, network: str, source: str = "state_dict"
) -> nn.Module:
    """Load ``state`` into ``backbone`` strictly, explaining any key or shape mismatch.

    Raises:
        ValueError: naming ``network``, the source, the number of differing keys, the first
            few of them and the network ``state`` looks like, when it was not written by this
            architecture.
    """
    diffs = state_differences(state_shapes(backbone), state_shapes(state))
    if diffs:
        from otface.backbones.guess import network_hint

        raise ValueError(
            f"{source} does not match --network {network!r}: {len(diffs)} differing keys "
            f"(e.g. {'; '.join(diffs[:3])}); {network_hint(state)}"
        )
    backbone.load_state_dict(state, strict=True)
    return backbone


def load_backbone(
    path: PathLike, network: str, *, embedding_size: int = 512, device: str = "cpu"
) -> nn.Module:
    """Build ``otface.backbones.get_model(network)`` and load ``model.pt`` into it (eval mode)."""
    from otface.backbones import get_model

    path = resolve_model_path(path)
    state = load_backbone_state(path)
    backbone = get_model(network, dropout=0.0, fp16=False, num_features=embedding_size)
    load_state_into(backbone, state, network=network, source=str(path))
    return backbone.to(device).eval()


class TorchEmbedder:
    """Embeds ``uint8`` RGB faces with a PyTorch backbone on the backbone's own device."""

    def __init__(self, backbone: nn.Module, *, batch_size: int = 64) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.backbone = backbone
        self.batch_size = batch_size

    @property
    def device(self) -> torch.device:
        for tensor in self.backbone.parameters():
            return tensor.device
        return torch.device("cpu")

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Args: images ``(N, 3, H, W)`` uint8 RGB. Returns: ``(N, D)`` float32 embeddings."""
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(images[start : start + self.batch_size]))
            feats = self.backbone(preprocess(batch.to(self.device)))
            out.append(feats.float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def import_onnxruntime():
    """The ``onnxruntime`` module, or an ImportError saying which extra brings it."""
    try:
        import onnxruntime
    except ImportError as err:
        raise ImportError(
            "ONNX models need ONNX Runtime: pip install -e '.[cpu]' (onnxruntime) or, on GPU "
            "machines, pip install -e '.[gpu]' (onnxruntime-gpu); never both"
        ) from err
    return onnxruntime


class OnnxEmbedder:
    """Embeds ``uint8`` RGB faces with an ONNX model through onnxruntime.

    ``providers=None`` picks ``CUDAExecutionProvider`` when the installed onnxruntime has it,
    then the CPU. A model with a fixed batch axis is run that many faces at a time, the last
    batch padded.
    """

    def __init__(
        self,
        path: PathLike,
        *,
        batch_size: int = 64,
        providers: Optional[Sequence[str]] = None,
    ) -> None:
        ort = import_onnxruntime()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX model {self.path} does not exist")
        if providers is None:
            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider",) if p in available]
            providers.append("CPUExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(self.path), providers=list(providers))
        except Exception as exc:  # onnxruntime raises its own types (InvalidArgument, Fail, ...)
            raise ValueError(f"cannot load {self.path} as an ONNX model: {exc}") from exc
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise ValueError(
                f"{self.path}: expected one NCHW image input, got "
                f"{[(i.name, i.shape) for i in inputs]}"
            )
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name
        self.input_shape = inputs[0].shape
        fixed = self.input_shape[0]
        self.fixed_batch = isinstance(fixed, int) and fixed > 0
        self.batch_size = fixed if self.fixed_batch else batch_size
        logger.info("onnxruntime providers for %s: %s", self.path, self.session.get_providers())

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Args: images ``(N, 3, H, W)`` uint8 RGB. Returns: ``(N, D)`` float32 embeddings."""
        (feats,) = self.run_outputs(images, [self.output_name])
        return feats.reshape(len(feats), -1) if len(feats) else np.zeros((0, 0), np.float32)

    def run_outputs(self, images: np.ndarray, names: Sequence[str]) -> List[np.ndarray]:
        """The model's outputs ``names`` for ``(N, 3, H, W)`` uint8 RGB faces, as float32 arrays
        of ``N`` rows: the faces normalised as in training, run ``batch_size`` at a time (a
        fixed batch axis padded, the padding cut off)."""
        fixed = tuple(self.input_shape[1:])
        if all(isinstance(v, int) for v in fixed) and fixed != tuple(images.shape[1:]):
            raise ValueError(
                f"{self.path} takes input {fixed} per face, the faces here are "
                f"{tuple(images.shape[1:])}"
            )
        out: List[List[np.ndarray]] = [[] for _ in names]
        for start in range(0, len(images), self.batch_size):
            batch = images[start : start + self.batch_size].astype(np.float32)
            batch = (batch / 255.0 - 0.5) / 0.5
            n = len(batch)
            if self.fixed_batch and n < self.batch_size:  # the last, short batch: pad, then cut
                pad = np.zeros((self.batch_size - n,) + batch.shape[1:], np.float32)
                batch = np.concatenate([batch, pad])
            for sink, value in zip(out, self.session.run(list(names), {self.input_name: batch})):
                sink.append(np.asarray(value, dtype=np.float32)[:n])
        return [np.concatenate(v) if v else np.zeros((0,), np.float32) for v in out]


def network_from_training_log(model_path: PathLike) -> Optional[str]:
    """The ``network`` that the training run which wrote ``model_path`` logged, or None.

    Reads ``training.log`` in the model's folder (a training output folder, ``work_dirs/NAME``)
    and takes the ``network`` line of its config dump. A resumed run appends another dump to the
    same log, so the last one wins. None when there is no log or no such line.
    """
    model_path = Path(model_path)
    folder = model_path if model_path.is_dir() else model_path.parent
    log = folder / "training.log"
    if not log.is_file():
        return None
    network = None
    with open(log, encoding="utf-8", errors="replace") as f:
        for line in f:
            match = _LOGGED_NETWORK.match(line)
            if match:
                network = match.group(1)
    return network


def resolve_network(model_path: PathLike, network: Optional[str]) -> Optional[str]:
    """The backbone name to load ``model_path`` with.

    ``network`` when given; None for an ONNX model (it carries its own graph); otherwise the
    name read by :func:`network_from_training_log` (None when the log does not say).
    """
    if network is not None:
        return network
    if Path(model_path).suffix.lower() == ".onnx":
        return None
    logged = network_from_training_log(model_path)
    if logged is not None:
        folder = Path(model_path) if Path(model_path).is_dir() else Path(model_path).parent
        logger.info("network %s, as logged in %s", logged, folder / "training.log")
    return logged


def resolve_device(device: Optional[str]) -> str:
    """``device``, checked, or ``"cuda"`` when CUDA is available and ``"cpu"`` otherwise.

    Raises:
        ValueError: ``device`` is not a torch device name, or names a CUDA device this machine
            does not have.
    """
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"--device {device!r} is not a torch device; valid: cpu, cuda, cuda:N"
        ) from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {device!r}: CUDA is not available here; use --device cpu")
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(
                f"--device {device!r}: this machine has {count} CUDA device(s), "
                f"valid: {', '.join(f'cuda:{i}' for i in range(count))}"
            )
    return device


def check_onnx_source(onnx_path: Path) -> None:
    """Refuse an ONNX model whose ``.source.json`` (written by ``otface.export``) names a
    ``model.pt`` beside it that has changed since: the ONNX file is then stale."""
    record = Path(str(onnx_path) + ".source.json")
    if not record.is_file():
        return
    try:
        info = json.loads(record.read_text(encoding="utf-8"))
        source = onnx_path.parent / str(info["model"])
        expected = str(info["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return  # an unreadable record vouches for nothing, and condemns nothing
    if not source.is_file():
        return
    digest = hashlib.sha256()
    with open(source, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise ValueError(
            f"{onnx_path} was exported from an earlier {source} (its SHA-256 has changed since, "
            f"per {record.name}): export again with python -m otface.export {onnx_path.parent}"
        )


def open_embedder(
    path: PathLike,
    *,
    network: Optional[str] = None,
    batch_size: int = 64,
    device: Optional[str] = None,
    embedding_size: int = 512,
) -> Embedder:
    """Open ``model.onnx`` (onnxruntime) or ``model.pt`` (needs ``network``) as an embedder.

    Raises:
        FileNotFoundError: no model file at ``path``.
        ValueError: no or an unknown ``network``, a file that does not match it, a bad
            ``device`` or ``batch_size``, or an unreadable ONNX file.
    """
    path = resolve_model_path(path)
    if path.suffix.lower() == ".onnx":
        check_onnx_source(path)
        return OnnxEmbedder(path, batch_size=batch_size)
    if network is None:
        from otface.backbones import list_models

        raise ValueError(
            f"{path} is a PyTorch model and its folder has no training.log naming the network: "
            f"pass --network, one of {', '.join(list_models())}"
        )
    device = resolve_device(device)
    backbone = load_backbone(path, network, embedding_size=embedding_size, device=device)
    return TorchEmbedder(backbone, batch_size=batch_size)
