"""A faithful re-implementation of the official VideoMAEv2 ViT forward, used as the reference in tests.

Follows OpenGVLab/VideoMAEv2 `models/modeling_finetune.py` (`VisionTransformer`) and
`models/modeling_pretrain.py` (`PretrainVisionTransformerEncoder`/`...Decoder`/`PretrainVisionTransformer`):
same module names (so `state_dict()` has the official key layout), same arithmetic, inference only
(no dropout, drop path, checkpointing or flash attention). Input is (B, C, T, H, W) as in the official
code. Written without timm.

One non-official option: `Attention(full_qkv_bias=True)` uses a timm-style `qkv.bias` (q, k and v
biases) instead of `q_bias`/`v_bias`, to test conversion of such checkpoints.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def get_sinusoid_encoding_table(n_position: int, d_hid: int) -> torch.Tensor:
    """Sinusoid position encoding table, (1, n_position, d_hid), as in the official code."""

    def get_position_angle_vec(position):
        return [position / np.power(10000, 2 * (hid_j // 2) / d_hid) for hid_j in range(d_hid)]

    sinusoid_table = np.array([get_position_angle_vec(pos_i) for pos_i in range(n_position)])
    sinusoid_table[:, 0::2] = np.sin(sinusoid_table[:, 0::2])  # dim 2i
    sinusoid_table[:, 1::2] = np.cos(sinusoid_table[:, 1::2])  # dim 2i+1
    return torch.tensor(sinusoid_table, dtype=torch.float, requires_grad=False).unsqueeze(0)


def _pair(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x, x)


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, full_qkv_bias: bool = False):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        all_head_dim = head_dim * self.num_heads
        self.scale = head_dim**-0.5
        self.full_qkv_bias = full_qkv_bias
        self.qkv = nn.Linear(dim, all_head_dim * 3, bias=full_qkv_bias)
        if qkv_bias and not full_qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(all_head_dim))
            self.v_bias = nn.Parameter(torch.zeros(all_head_dim))
        else:
            self.q_bias = None
            self.v_bias = None
        self.proj = nn.Linear(all_head_dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        if self.full_qkv_bias:
            qkv_bias = self.qkv.bias
        else:
            qkv_bias = None
            if self.q_bias is not None:
                qkv_bias = torch.cat(
                    (self.q_bias, torch.zeros_like(self.v_bias, requires_grad=False), self.v_bias)
                )
        qkv = F.linear(input=x, weight=self.qkv.weight, bias=qkv_bias)
        qkv = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, -1)
        return self.proj(x)


class Block(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        full_qkv_bias: bool = False,
        init_values: float = 0.0,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, full_qkv_bias=full_qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio))
        if init_values > 0:
            self.gamma_1 = nn.Parameter(init_values * torch.ones(dim))
            self.gamma_2 = nn.Parameter(init_values * torch.ones(dim))
        else:
            self.gamma_1, self.gamma_2 = None, None

    def forward(self, x):
        if self.gamma_1 is None:
            x = x + self.attn(self.norm1(x))
            x = x + self.mlp(self.norm2(x))
        else:
            x = x + self.gamma_1 * self.attn(self.norm1(x))
            x = x + self.gamma_2 * self.mlp(self.norm2(x))
        return x


class PatchEmbed(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, num_frames=16, tubelet_size=2):
        super().__init__()
        img_size = _pair(img_size)
        patch_size = _pair(patch_size)
        num_spatial_patches = (img_size[0] // patch_size[0]) * (img_size[1] // patch_size[1])
        self.num_patches = num_spatial_patches * (num_frames // tubelet_size)
        self.proj = nn.Conv3d(
            in_channels=in_chans,
            out_channels=embed_dim,
            kernel_size=(tubelet_size, patch_size[0], patch_size[1]),
            stride=(tubelet_size, patch_size[0], patch_size[1]),
        )

    def forward(self, x):
        # (B, C, T, H, W) -> (B, N, D)
        return self.proj(x).flatten(2).transpose(1, 2)


def _blocks(depth, embed_dim, num_heads, mlp_ratio, qkv_bias, full_qkv_bias, init_values):
    return nn.ModuleList(
        [
            Block(
                embed_dim,
                num_heads,
                mlp_ratio,
                qkv_bias,
                full_qkv_bias=full_qkv_bias,
                init_values=init_values,
            )
            for _ in range(depth)
        ]
    )


class VisionTransformer(nn.Module):
    """The finetune / distilled model (`vit_*_patch*_224`): patch_embed.*, blocks.*, fc_norm.*, head.*."""

    def __init__(
        self,
        img_size=224,
        patch_size=16,
        in_chans=3,
        num_classes=1000,
        embed_dim=768,
        depth=12,
        num_heads=12,
        mlp_ratio=4.0,
        qkv_bias=True,
        full_qkv_bias=False,
        init_values=0.0,
        use_learnable_pos_emb=False,
        all_frames=16,
        tubelet_size=2,
        use_mean_pooling=True,
    ):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, all_frames, tubelet_size)
        num_patches = self.patch_embed.num_patches
        if use_learnable_pos_emb:
            self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, embed_dim))
        else:
            self.pos_embed = get_sinusoid_encoding_table(num_patches, embed_dim)
        self.blocks = _blocks(depth, embed_dim, num_heads, mlp_ratio, qkv_bias, full_qkv_bias, init_values)
        self.norm = nn.Identity() if use_mean_pooling else nn.LayerNorm(embed_dim, eps=1e-6)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6) if use_mean_pooling else None
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def tokens(self, x):
        """Output of the last block before any norm, (B, N, D): the body of the official forward_features."""
        B = x.size(0)
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed.expand(B, -1, -1).type_as(x).to(x.device).clone().detach()
        for blk in self.blocks:
            x = blk(x)
        return x

    def forward_features(self, x):
        x = self.tokens(x)
        if self.fc_norm is not None:
            return self.fc_norm(x.mean(1))
        return self.norm(x[:, 0])

    def forward(self, x):
        return self.head(self.forward_features(x))


class PretrainVisionTransformerEncoder(nn.Module):
    """The pretrain encoder: patch_embed.*, blocks.*, norm.* (head is Identity for num_classes=0)."""

    def __init__(
        self,
        img_size=224,
        patch_size=16,
        in_chans=3,
        num_classes=0,
        embed_dim=768,
        depth=12,
        num_heads=12,
        mlp_ratio=4.0,
        qkv_bias=True,
        init_values=0.0,
        tubelet_size=2,
        num_frames=16,
    ):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, num_frames, tubelet_size)
        self.pos_embed = get_sinusoid_encoding_table(self.patch_embed.num_patches, embed_dim)
        self.blocks = _blocks(depth, embed_dim, num_heads, mlp_ratio, qkv_bias, False, init_values)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def tokens(self, x, mask=None):
        """Visible tokens after the last block, before the final norm, (B, N_vis, D)."""
        x = self.patch_embed(x)
        x = x + self.pos_embed.type_as(x).to(x.device).clone().detach()
        B, _, C = x.shape
        if mask is None:
            mask = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
        x_vis = x[~mask].reshape(B, -1, C)
        for blk in self.blocks:
            x_vis = blk(x_vis)
        return x_vis

    def forward_features(self, x, mask=None):
        return self.norm(self.tokens(x, mask))

    def forward(self, x, mask=None):
        return self.head(self.forward_features(x, mask))


class PretrainVisionTransformerDecoder(nn.Module):
    def __init__(self, num_classes=1536, embed_dim=384, depth=4, num_heads=6, mlp_ratio=4.0):
        super().__init__()
        self.blocks = _blocks(depth, embed_dim, num_heads, mlp_ratio, True, False, 0.0)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)


class PretrainVisionTransformer(nn.Module):
    """The pretrain model (`pretrain_videomae_*`): encoder.*, decoder.*, encoder_to_decoder.*, mask_token."""

    def __init__(
        self,
        img_size=224,
        patch_size=16,
        encoder_embed_dim=768,
        encoder_depth=12,
        encoder_num_heads=12,
        decoder_embed_dim=384,
        decoder_depth=2,
        decoder_num_heads=6,
        mlp_ratio=4.0,
        tubelet_size=2,
        num_frames=16,
    ):
        super().__init__()
        self.encoder = PretrainVisionTransformerEncoder(
            img_size=img_size,
            patch_size=patch_size,
            embed_dim=encoder_embed_dim,
            depth=encoder_depth,
            num_heads=encoder_num_heads,
            mlp_ratio=mlp_ratio,
            tubelet_size=tubelet_size,
            num_frames=num_frames,
        )
        self.decoder = PretrainVisionTransformerDecoder(
            num_classes=3 * tubelet_size * patch_size**2,
            embed_dim=decoder_embed_dim,
            depth=decoder_depth,
            num_heads=decoder_num_heads,
            mlp_ratio=mlp_ratio,
        )
        self.encoder_to_decoder = nn.Linear(encoder_embed_dim, decoder_embed_dim, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))


@torch.no_grad()
def randomize_(module: nn.Module, seed: int = 0, scale: float = 0.2) -> nn.Module:
    """Give every parameter random values (LayerNorm weights around 1), so a wrong key mapping shows."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=gen) * scale
        is_norm_weight = name.endswith("weight") and p.dim() == 1 and "norm" in name
        p.copy_(1.0 + noise if is_norm_weight or "gamma" in name else noise)
    return module
