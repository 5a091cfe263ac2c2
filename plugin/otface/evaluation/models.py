"""Loading finished models for evaluation and export: PyTorch ``model.pt`` or ONNX.

Every embedder here takes aligned faces as ``uint8`` RGB arrays of shape ``(N, 3, H, W)`` and
applies the training preprocessing ``(x / 255 - 0.5) / 0.5``, which equals insightface's
``(x - 127.5) / 127.5`` after its BGR→RGB swap, so a PyTorch backbone and its ONNX export give
the same embeddings for the same pixels.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

__all__ = [
    "Embedder",
    "TorchEmbedder",
    "OnnxEmbedder",
    "resolve_model_path",
    "load_backbone_state",
    "load_state_into",
    "load_backbone",
    "open_embedder",
    "preprocess",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]
#: A function from ``uint8`` RGB faces ``(N, 3, H, W)`` to float32 embeddings ``(N, D)``.
Embedder = Callable[[np.ndarray], np.ndarray]

_TRAINING_CHECKPOINT_KEYS = ("state_dict_softmax_fc", "state_dict_backbone", "state_optimizer")


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
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle / zip errors come in many types
        raise ValueError(f"cannot read {path} as a PyTorch state_dict: {exc}") from exc
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, expected a state_dict (dict)")
    found = [k for k in _TRAINING_CHECKPOINT_KEYS if k in state]
    if found:
        raise ValueError(
            f"{path} is a full training checkpoint (it has {', '.join(found)}), not a backbone. "
            "Pass model.pt from the same output folder: it holds the backbone weights only "
            "and is written by rank 0 at the end of every epoch."
        )
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path} is not a state_dict: entry {bad[0]!r} is not a tensor")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def load_state_into(
    backbone: nn.Module, state: Dict[str, torch.Tensor], *, network: str, source: str = "state_dict"
) -> nn.Module:
    """Load ``state`` into ``backbone`` strictly, explaining any key or shape mismatch.

    Raises:
        ValueError: naming ``network``, the source, and a few missing / unexpected / mis-shaped
            keys, when ``state`` was not written by this architecture.
    """
    expected = backbone.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [
        f"{k}: file {tuple(state[k].shape)} vs network {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or misshaped:
        parts = []
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatches", misshaped),
        ):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
        raise ValueError(
            f"{source} does not match --network {network!r}: {'; '.join(parts)}. "
            "Was the model trained with another network?"
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


class OnnxEmbedder:
    """Embeds ``uint8`` RGB faces with an ONNX model through onnxruntime.

    ``providers=None`` picks ``CUDAExecutionProvider`` when the installed onnxruntime has it,
    then the CPU. A model with a fixed batch axis is run one face at a time.
    """

    def __init__(
        self,
        path: PathLike,
        *,
        batch_size: int = 64,
        providers: Optional[Sequence[str]] = None,
    ) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX model {self.path} does not exist")
        if providers is None:
            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider",) if p in available]
            providers.append("CPUExecutionProvider")
        self.session = ort.InferenceSession(str(self.path), providers=list(providers))
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
        self.batch_size = fixed if isinstance(fixed, int) and fixed > 0 else batch_size
        logger.info("onnxruntime providers for %s: %s", self.path, self.session.get_providers())

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Args: images ``(N, 3, H, W)`` uint8 RGB. Returns: ``(N, D)`` float32 embeddings."""
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = images[start : start + self.batch_size].astype(np.float32)
            batch = (batch / 255.0 - 0.5) / 0.5
            feats = self.session.run([self.output_name], {self.input_name: batch})[0]
            out.append(np.asarray(feats, dtype=np.float32).reshape(len(batch), -1))
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def open_embedder(
    path: PathLike,
    *,
    network: Optional[str] = None,
    batch_size: int = 64,
    device: Optional[str] = None,
    embedding_size: int = 512,
) -> Embedder:
    """Open ``model.onnx`` (onnxruntime) or ``model.pt`` (needs ``network``) as an embedder."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        return OnnxEmbedder(path, batch_size=batch_size)
    if network is None:
        raise ValueError(f"{path} is a PyTorch model: pass --network (e.g. r50, r100, mbf)")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    backbone = load_backbone(path, network, embedding_size=embedding_size, device=device)
    return TorchEmbedder(backbone, batch_size=batch_size)
