"""A faster image encoder for SAM ViT and TinyViT (LiteMedSAM), same weights (issue 14).

Every new image costs one encoder pass, and for SAM ViT models that pass is nearly all of the
work. :func:`set_fast_encoder` swaps the ``forward`` of a loaded encoder's modules for
re-arranged versions with the same arithmetic up to float rounding, and restores the stock
ones with ``enabled=False``. Weights are never changed: derived tensors (folded batch norms,
gathered bias tables) are kept beside the modules, outside their state dicts, and rebuilt
whenever a source tensor is modified or moved (torch's per-tensor version counter and data
pointer).

SAM ViT (``segment_anything.modeling.image_encoder``), per ``Block``:

* attention through ``torch.nn.functional.scaled_dot_product_attention`` (one fused kernel)
  with SAM's decomposed relative-position terms ``rel_h + rel_w`` as its additive bias
  instead of matmul / add / softmax / matmul over a materialised attention map. For global
  attention the bias is built for a band of query rows at a time (at most
  :data:`BIAS_ELEMENTS` elements), so a 1024-px ViT-B block no longer holds the full
  ``(heads, 4096, 4096)`` attention map (805 MB in float32) -- about 1.7x faster per global
  block on one CPU thread, measured (3.2 s -> 1.8 s);
* window partition with one copy each way (stock: two or three) and no copy for cropping the
  padding (the crop is a view added to the shortcut).

TinyViT (:mod:`cosmoslib.models.tinyvit`), one forward over the whole encoder:

* everything in channels-last ``(B, H, W, C)``; 1x1 convolutions are ``F.linear`` on the
  last axis and batch norms are folded into the convolution weights (eval mode only; a
  module in training mode runs stock);
* the depth-wise 3x3 convolutions run on channels-last memory, where oneDNN has a fast
  kernel; stock PyTorch on contiguous NCHW took 256 ms for one (256 ch, 256 x 256) depth-wise
  convolution on one thread vs 46 ms channels-last (measured), and its 1x1 convolutions went
  to ``aten::_slow_conv2d_forward`` (about 13 % of a LiteMedSAM encode);
* the window-attention bias table is gathered once, not at every call, and passed to
  ``scaled_dot_product_attention`` as an expanded 4-D tensor: given the stock 3-D bias,
  PyTorch 2.x on a CPU runs the unfused math kernel instead of its flash kernel (measured
  4x slower for stage 2's (125, 5, 196, 32) windows).

Parity (``cosmoslib/tests/test_fast_encoder.py``): embeddings within 1e-4 absolute of the
stock encoder (measured <= 4e-6; values of order 1), masks decoded from them at mean DICE
>= 99.9 %. The differences are float32 rounding of the same order as running the stock
encoder with another number of threads, so the embedding cache does not key them apart (see
:attr:`cosmoslib.models.SamFamilyModel.signature`).

GPU: the same code paths run on CUDA, where ``scaled_dot_product_attention`` picks its
flash / memory-efficient kernels and ``autocast`` (bf16) applies; :func:`maybe_compile`
wraps an encoder with ``torch.compile`` (optional, first call slow).
"""

from __future__ import annotations

import types
import warnings

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import (
    Attention,
    Block,
    ImageEncoderViT,
    get_rel_pos,
)
from torch import nn

from cosmoslib.models.tinyvit import (
    AttentionStage,
    ConvBN,
    ConvStage,
    TinyViT,
    WindowAttention,
)

__all__ = ["BIAS_ELEMENTS", "set_fast_encoder", "is_fast", "fast_kind", "maybe_compile"]

#: Largest relative-position bias built at once for global attention (elements, per call).
BIAS_ELEMENTS = 1 << 25

_FLAG = "_cosmos_fast_forward"
_CACHE = "_cosmos_fast_cache"


# ----------------------------------------------------------------------------- public


def fast_kind(encoder: nn.Module) -> str | None:
    """``"vit"`` or ``"tinyvit"`` when a fast path exists for ``encoder``, else None."""


    if type(encoder) is TinyViT:
        return "tinyvit"
    if type(encoder) is ImageEncoderViT:
        return "vit"
    return None


def is_fast(encoder: nn.Module) -> bool:
    """Whether ``encoder`` currently runs the fast path."""
    return any(_FLAG in m.__dict__ for m in encoder.modules())


def set_fast_encoder(encoder: nn.Module, enabled: bool = True) -> bool:
    """Switch ``encoder`` (a ``Sam.image_encoder``) to the fast path, or back to stock.

    Idempotent and cheap; weights and state dict are untouched.

    Parameters
    ----------
    encoder : nn.Module
        ``segment_anything``'s ``ImageEncoderViT`` or cosmoslib's ``TinyViT``; any other
        module is left as it is.
    enabled : bool
        True: fast forwards; False: the stock ones (instance overrides removed).

    Returns
    -------
    bool
        Whether the fast path is now active.
    """
    kind = fast_kind(encoder)
    if not enabled or kind is None:
        for module in encoder.modules():
            if _FLAG in module.__dict__:
                del module.__dict__[_FLAG]
                module.__dict__.pop("forward", None)
                module.__dict__.pop(_CACHE, None)
        return False
    if kind == "vit":

        for block in encoder.blocks:
            if type(block) is Block and type(block.attn) is Attention:
                _install(block, _vit_block_forward)
    else:
        _install(encoder, _tinyvit_forward)
    return is_fast(encoder)


def maybe_compile(encoder: nn.Module, enabled: bool = True):
    """``torch.compile(encoder)`` when asked and available; otherwise ``encoder`` itself.

    Compilation pays off on a GPU for long runs (the first call takes tens of seconds); a
    failure to compile warns and returns the eager module.
    """
    if not enabled:
        return encoder
    try:
        return torch.compile(encoder, dynamic=False)
    except Exception as exc:  # no compiler toolchain, unsupported platform ...
        warnings.warn(f"torch.compile unavailable ({type(exc).__name__}: {exc}); "
                      f"running the encoder eagerly", stacklevel=2)
        return encoder


def _install(module: nn.Module, fn) -> None:
    module.__dict__["forward"] = types.MethodType(fn, module)
    module.__dict__[_FLAG] = True


def _stock(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return type(module).forward(module, x)


# ----------------------------------------------------------------------------- SAM ViT


def _vit_attention(attn, x: torch.Tensor) -> torch.Tensor:
    """``segment_anything`` ``Attention.forward`` through SDPA; ``x (B, H, W, C)``."""

    b, h, w, _ = x.shape
    heads = attn.num_heads
    qkv = F.linear(x, attn.qkv.weight, attn.qkv.bias).view(b, h * w, 3, heads, -1)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (b, heads, h*w, head_dim) views
    if not attn.use_rel_pos:
        out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
    else:
        r_h = get_rel_pos(h, h, attn.rel_pos_h)
        r_w = get_rel_pos(w, w, attn.rel_pos_w)
        r_q = q.reshape(b, heads, h, w, -1)
        # The stock code uses the unscaled query for the relative-position terms.
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, r_h.to(q.dtype))
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, r_w.to(q.dtype))
        per_row = b * heads * w * h * w  # bias elements per query row of the grid
        rows = max(1, min(h, BIAS_ELEMENTS // max(1, per_row)))
        if rows >= h:
            bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, heads, h * w, h * w)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale)
        else:
            out = torch.empty_like(q)
            for r in range(0, h, rows):
                r1 = min(h, r + rows)
                bias = (rel_h[:, :, r:r1, :, :, None] + rel_w[:, :, r:r1, :, None, :]
                        ).reshape(b, heads, (r1 - r) * w, h * w)
                out[:, :, r * w:r1 * w] = F.scaled_dot_product_attention(
                    q[:, :, r * w:r1 * w], k, v, attn_mask=bias, scale=attn.scale)
    out = out.transpose(1, 2).reshape(b, h, w, -1)
    return F.linear(out, attn.proj.weight, attn.proj.bias)


def _vit_block_forward(self, x: torch.Tensor) -> torch.Tensor:
    """``segment_anything`` ``Block.forward`` with SDPA attention and lean windowing."""
    shortcut = x
    x = self.norm1(x)
    s = self.window_size
    if s > 0:
        b, h, w, c = x.shape
        pad_h, pad_w = (-h) % s, (-w) % s
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        nh, nw = (h + pad_h) // s, (w + pad_w) // s
        windows = x.view(b, nh, s, nw, s, c).transpose(2, 3).reshape(b * nh * nw, s, s, c)
        out = _vit_attention(self.attn, windows)
        x = out.view(b, nh, nw, s, s, c).transpose(2, 3).reshape(b, nh * s, nw * s, c)
        x = x[:, :h, :w]  # a view: the addition below reads it in place
    else:
        x = _vit_attention(self.attn, x)
    x = shortcut + x
    return x + self.mlp(self.norm2(x))


# ----------------------------------------------------------------------------- TinyViT


def _fold(conv_bn) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``ConvBN`` (bias-free conv, then eval-mode batch norm) as one conv."""
    conv, bn = conv_bn.c, conv_bn.bn
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    weight = conv.weight * scale.view(-1, 1, 1, 1)
    bias = bn.bias - bn.running_mean * scale
    return weight.detach(), bias.detach()


def _tinyvit_params(enc) -> dict:
    """Folded weights of ``enc``, rebuilt when any parameter or buffer changed or moved."""
    tensors = list(enc.parameters()) + list(enc.buffers())
    version = tuple((t._version, t.data_ptr(), t.device.type) for t in tensors)
    cache = enc.__dict__.get(_CACHE)
    if cache is not None and cache["version"] == version:
        return cache

    params: dict = {"version": version}
    # Plain tensors even when first called under inference_mode (usable outside it later).
    with torch.inference_mode(False), torch.no_grad():
        for module in enc.modules():
            if isinstance(module, ConvBN):
                weight, bias = _fold(module)
                if weight.shape[-1] == 1:  # 1x1: a linear map on the channel axis
                    params[id(module)] = (weight[:, :, 0, 0].contiguous(), bias)
                else:
                    params[id(module)] = (weight.contiguous(memory_format=torch.channels_last),
                                          bias)
            elif isinstance(module, WindowAttention):
                params[id(module)] = module.attention_biases[:, module.bias_index].detach()
    enc.__dict__[_CACHE] = params
    return params


def _lin(params, conv_bn, x: torch.Tensor) -> torch.Tensor:
    weight, bias = params[id(conv_bn)]
    return F.linear(x, weight, bias)


def _conv_cl(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             stride: int = 1, padding: int = 1, groups: int = 1) -> torch.Tensor:
    """A convolution of channels-last ``x (B, H, W, C)``, returning ``(B, H', W', C')``."""
    out = F.conv2d(x.permute(0, 3, 1, 2), weight, bias, stride=stride, padding=padding,
                   groups=groups)
    return out.permute(0, 2, 3, 1)


def _dw(params, conv_bn, x: torch.Tensor) -> torch.Tensor:
    weight, bias = params[id(conv_bn)]
    conv = conv_bn.c
    return _conv_cl(x, weight.to(x.dtype) if weight.dtype != x.dtype else weight, bias,
                    stride=conv.stride[0], padding=conv.padding[0], groups=conv.groups)


def _stem(params, conv_bn, x: torch.Tensor) -> torch.Tensor:
    """A stem ConvBN: 1x1 (LiteMedSAM) as a linear map, else (MobileSAM's 3x3 stride 2) a
    channels-last convolution."""
    if params[id(conv_bn)][0].ndim == 2:
        return _lin(params, conv_bn, x)
    return _dw(params, conv_bn, x)


def _window_attention(params, attn, tokens: torch.Tensor) -> torch.Tensor:
    b, n, c = tokens.shape
    qkv = attn.qkv(attn.norm(tokens)).view(b, n, attn.num_heads, 3 * attn.head_dim)
    q, k, v = qkv.permute(0, 2, 1, 3).split(attn.head_dim, dim=-1)
    # A 4-D (expanded, not copied) bias: with the stock 3-D one PyTorch's CPU dispatcher
    # falls back to the unfused math kernel (measured 4x slower on these shapes).
    bias = params[id(attn)].to(q.dtype).expand(b, -1, -1, -1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    return attn.proj(out.transpose(1, 2).reshape(b, n, c))


def _tinyvit_block(params, block, x: torch.Tensor) -> torch.Tensor:
    b, h, w, c = x.shape
    s = block.window
    pad_h, pad_w = (-h) % s, (-w) % s
    y = F.pad(x, (0, 0, 0, pad_w, 0, pad_h)) if (pad_h or pad_w) else x
    nh, nw = (h + pad_h) // s, (w + pad_w) // s
    windows = y.view(b, nh, s, nw, s, c).transpose(2, 3).reshape(b * nh * nw, s * s, c)
    out = _window_attention(params, block.attn, windows)
    out = out.view(b, nh, nw, s, s, c).transpose(2, 3).reshape(b, nh * s, nw * s, c)
    x = x + out[:, :h, :w]
    x = _dw(params, block.local_conv, x)
    return x + block.mlp(x)


def _tinyvit_forward(self, x: torch.Tensor) -> torch.Tensor:
    """``TinyViT.forward`` in channels-last with folded batch norms (same output)."""

    if self.training:
        return _stock(self, x)
    if x.shape[-2:] != (self.img_size, self.img_size):
        raise ValueError(f"TinyViT expects {self.img_size}x{self.img_size} inputs, "
                         f"got {tuple(x.shape[-2:])}")
    p = _tinyvit_params(self)
    seq = self.patch_embed.seq
    x = x.permute(0, 2, 3, 1)
    x = _stem(p, seq[2], F.gelu(_stem(p, seq[0], x)))
    for stage in self.layers:
        if isinstance(stage, ConvStage):
            for blk in stage.blocks:
                y = F.gelu(_lin(p, blk.conv1, x))
                y = F.gelu(_dw(p, blk.conv2, y))
                x = F.gelu(x + _lin(p, blk.conv3, y))
        elif isinstance(stage, AttentionStage):
            for blk in stage.blocks:
                x = _tinyvit_block(p, blk, x)
        else:  # an unknown stage: run it as the stock model does, in (B, C, H, W)
            x = stage(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            continue
        ds = stage.downsample
        if ds is not None:
            x = F.gelu(_lin(p, ds.conv1, x))
            x = F.gelu(_dw(p, ds.conv2, x))
            x = _lin(p, ds.conv3, x)
    conv1, norm1, conv2, norm2 = self.neck
    x = F.linear(x, conv1.weight[:, :, 0, 0], conv1.bias)
    x = F.layer_norm(x, x.shape[-1:], norm1.weight, norm1.bias, norm1.eps)
    x = _conv_cl(x, conv2.weight, conv2.bias, padding=conv2.padding[0])
    x = F.layer_norm(x, x.shape[-1:], norm2.weight, norm2.bias, norm2.eps)
    return x.permute(0, 3, 1, 2).contiguous()
