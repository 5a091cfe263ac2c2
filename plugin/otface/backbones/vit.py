"""Vision Transformer (ViT) face backbones, as arcface_torch's ``vit_*`` networks.

Dosovitskiy et al., "An Image is Worth 16x16 Words" (ICLR 2021), adapted to 112×112 faces as in
arcface_torch (An et al., "Killing Two Birds with One Stone", Partial FC, CVPR 2022): a 9×9
stride-9 patch embedding gives a 12×12 grid of 144 tokens (no class token) plus a learned
position embedding; ``depth`` pre-norm blocks ``x + attn(LN(x))``, ``x + mlp(LN(x))`` with
bias-free ``qkv``, ``num_heads`` heads and a ReLU6 MLP of ``mlp_ratio × dim`` hidden units; a
final LayerNorm; and the head ``flatten → linear(144·dim → dim) → BN1d → linear(dim →
num_features) → BN1d``.

Training-mode regularisers, as arcface_torch's:

- token masking (He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022): a
  random subset of each image's tokens is dropped before the first block, so the blocks see
  only ``int(144 · (1 - mask_ratio))`` tokens; after the final norm a learned ``mask_token``
  fills the dropped positions;
- stochastic depth (Huang et al., ECCV 2016): block ``i`` of ``depth`` skips its residual
  branches for a whole sample with probability ``drop_path_rate · i / (depth - 1)``;
- activation checkpointing of every block (``checkpointing``).

Parameter names, their order and shapes equal arcface_torch's, so its ``model.pt`` files load
with ``strict=True`` and give the same embeddings.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from otface.backbones._common import cuda_autocast

__all__ = ["VisionTransformer", "drop_path"]

# arcface_torch's head BatchNorms use the MXNet-era epsilon.
_HEAD_BN_EPS = 2e-5


def drop_path(x: torch.Tensor, rate: float, *, training: bool) -> torch.Tensor:
    """Stochastic depth on a residual branch ``x`` of shape ``(B, ...)``.

    In training mode each sample's branch is zeroed with probability ``rate`` and the kept ones
    are scaled by ``1 / (1 - rate)``, so the expectation is unchanged; otherwise ``x`` itself.
    """
    if not training or rate == 0.0:
        return x
    keep_prob = 1.0 - rate
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    keep = torch.empty(shape, device=x.device, dtype=x.dtype).bernoulli_(keep_prob)
    return x * keep.div_(keep_prob)


class _PatchEmbed(nn.Module):
    """``(B, 3, H, W) → (B, (H // patch)·(W // patch), dim)`` by a stride-``patch`` conv."""

    def __init__(self, *, patch_size: int, embed_dim: int, in_channels: int = 3) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class _Attention(nn.Module):
    """Multi-head self-attention ``(B, T, dim) → (B, T, dim)``, softmax scale ``head_dim^-½``.

    The products run in :func:`torch.nn.functional.scaled_dot_product_attention` (fused
    kernels on GPU; under float16 autocast they keep the softmax statistics in float32).
    """

    def __init__(self, dim: int, *, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, T, 3·dim) → (3, B, heads, T, head_dim); the 3·dim axis is laid out q | k | v,
        # each split into heads, as the checkpoints' qkv weights are.
        qkv = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).flatten(2))


class _Mlp(nn.Module):
    """``fc1 → ReLU6 → fc2``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    """Pre-norm transformer block with stochastic depth ``drop_path_rate`` on both branches."""

    def __init__(
        self, dim: int, *, num_heads: int, mlp_ratio: float, drop_path_rate: float
    ) -> None:
        super().__init__()
        # Registration order fixes the state_dict order (norm2 before attn); keep it.
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, num_heads=num_heads)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rate, training = self.drop_path_rate, self.training
        x = x + drop_path(self.attn(self.norm1(x)), rate, training=training)
        return x + drop_path(self.mlp(self.norm2(x)), rate, training=training)


class VisionTransformer(nn.Module):
    """ViT trunk and embedding head for aligned faces.

    Args:
        num_features: embedding size.
        fp16: run the patch embedding and the blocks under float16 autocast when the input is
            on CUDA (with ``fp16=False`` an enclosing autocast region is disabled, as for the
            IResNets); the final norm and the head always run in float32. arcface_torch's ViT
            has no such flag: on CUDA it always runs ``qkv``, ``proj`` and the MLP under
            autocast and the attention products in float32.
        img_size: input height and width.
        patch_size: side of the square patches (and stride of the patch embedding).
        embed_dim: token width ``dim``.
        depth: number of transformer blocks.
        num_heads: attention heads; must divide ``embed_dim``.
        mlp_ratio: MLP hidden width over ``embed_dim``.
        drop_path_rate: stochastic-depth rate of the last block; block ``i`` uses
            ``linspace(0, drop_path_rate, depth)[i]`` (the first block none).
        mask_ratio: in training mode, the share of each image's tokens dropped before the
            blocks: ``int(T · (1 - mask_ratio))`` of the ``T`` tokens are kept (with ``T=144``:
            15 masked at 0.1, 8 at 0.05). arcface_torch's forward masks at its default 0.1
            whenever its ``mask_ratio`` is positive, whatever the value; here the value given
            is used. Inference (eval mode) never masks.
        checkpointing: in training mode, recompute each block's activations in the backward
            pass (:func:`torch.utils.checkpoint.checkpoint`, non-reentrant; the random
            stochastic-depth draws are replayed, so gradients equal the plain run's).

    Shapes:
        input ``(B, 3, img_size, img_size)`` → ``patch_tokens`` output ``(B, T, embed_dim)``
        with ``T = (img_size // patch_size)²`` (144 for 112 px, patch 9) → embedding
        ``(B, num_features)``.

    Attributes:
        feature_layer: ``"patch_tokens"``, a parameter-free module whose output is the
            final-norm patch tokens ``(B, T, embed_dim)`` in grid order, for feature hooks;
            masked positions hold ``mask_token``.
        last_token_mask: after a forward in training mode with ``mask_ratio > 0``, a bool
            ``(B, T)`` tensor on the input's device, True where the token is a real (kept)
            patch token and False where it is the mask token; None after a forward that
            masked nothing (eval mode, or ``mask_ratio == 0``). Not part of the
            ``state_dict``.
    """

    feature_layer = "patch_tokens"

    def __init__(
        self,
        *,
        num_features: int = 512,
        fp16: bool = False,
        img_size: int = 112,
        patch_size: int = 9,
        embed_dim: int = 256,
        depth: int = 12,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        mask_ratio: float = 0.0,
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if not 0 < patch_size <= img_size:
            raise ValueError(f"patch_size must be in [1, img_size={img_size}]; got {patch_size}")
        if depth < 1 or num_heads < 1 or embed_dim % num_heads:
            raise ValueError(
                f"need depth >= 1 and num_heads dividing embed_dim; got depth={depth}, "
                f"embed_dim={embed_dim}, num_heads={num_heads}"
            )
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1); got {drop_path_rate}")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1); got {mask_ratio}")
        self.fp16 = fp16
        self.img_size = img_size
        self.embed_dim = embed_dim
        self.num_patches = (img_size // patch_size) ** 2
        self.mask_ratio = mask_ratio
        self.checkpointing = checkpointing
        self.last_token_mask: Optional[torch.Tensor] = None
        # Direct parameters come first in the state_dict, in this order.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.patch_embed = _PatchEmbed(patch_size=patch_size, embed_dim=embed_dim)
        # On the CPU whatever the default device (meta included); float32 as the reference.
        rates = torch.linspace(0.0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            _Block(embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, drop_path_rate=rate)
            for rate in rates
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.patch_tokens = nn.Identity()
        self.feature = nn.Sequential(
            nn.Linear(embed_dim * self.num_patches, embed_dim, bias=False),
            nn.BatchNorm1d(embed_dim, eps=_HEAD_BN_EPS),
            nn.Linear(embed_dim, num_features, bias=False),
            nn.BatchNorm1d(num_features, eps=_HEAD_BN_EPS),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _keep_indices(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, n_keep)`` positions of the tokens kept, drawn uniformly per image."""
        batch, num_tokens = tokens.shape[:2]
        n_keep = int(num_tokens * (1 - self.mask_ratio))
        noise = torch.rand(batch, num_tokens, device=tokens.device)
        return noise.argsort(dim=1)[:, :n_keep]

    def _fill_masked(self, kept: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
        """Put the ``(B, n_keep, dim)`` kept tokens back at their positions among
        ``num_patches`` and ``mask_token`` everywhere else; record :attr:`last_token_mask`."""
        batch, _, dim = kept.shape
        full = self.mask_token.to(kept.dtype).expand(batch, self.num_patches, dim)
        tokens = full.scatter(1, keep_idx.unsqueeze(-1).expand(-1, -1, dim), kept)
        is_real = torch.zeros(batch, self.num_patches, dtype=torch.bool, device=kept.device)
        self.last_token_mask = is_real.scatter(1, keep_idx, True)
        return tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, img_size, img_size)`` images → ``(B, num_features)`` embeddings (not
        normalised)."""
        if tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(
                f"{type(self).__name__} takes {self.img_size}×{self.img_size} images; got "
                f"input of shape {tuple(x.shape)}"
            )
        masking = self.training and self.mask_ratio > 0
        keep_idx = None
        with cuda_autocast(x, fp16=self.fp16):
            tokens = self.patch_embed(x) + self.pos_embed
            if masking:
                keep_idx = self._keep_indices(tokens)
                gather_idx = keep_idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
                tokens = tokens.gather(1, gather_idx)
            for block in self.blocks:
                if self.checkpointing and self.training:
                    tokens = checkpoint(block, tokens, use_reentrant=False)
                else:
                    tokens = block(tokens)
        tokens = self.norm(tokens.float() if self.fp16 else tokens)
        if keep_idx is not None:
            tokens = self._fill_masked(tokens, keep_idx)
        else:
            self.last_token_mask = None
        tokens = self.patch_tokens(tokens)
        return self.feature(tokens.flatten(1))
