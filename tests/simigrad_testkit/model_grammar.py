"""A grammar of small models built from the constructs library models use, for the split-pass fuzzer.

A :class:`Spec` is plain data (so a failing example prints as a readable value and a regression test can name
one): a stem (token ids, an embedding bag, a float sequence, or a 1-3d image), image blocks, sequence blocks, a
head, the batch size and the dtype. :func:`build` turns it into a module and its inputs; :func:`specs` is the
``hypothesis`` strategy that draws them. Every block keeps the activation's shape (``[B, C, *S]`` for images,
``[B, T, D]`` for sequences), so any sequence of blocks is a valid model.

``graph_break`` blocks (and the ``*_break`` ones, which compute a tensor, break, then use it) make Dynamo split
the model, so later graphs receive activations, HF-style rotary tables of shape ``[1, T, D]`` or ``[T, D]``, and
learned tensors from an earlier graph as their inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

D, C, VOCAB = 8, 4, 20

SEQ_BLOCKS = (
    "linear", "linear_shared", "mlp_residual", "layernorm", "rmsnorm", "groupnorm", "batchnorm_train",
    "batchnorm_eval", "attention", "attention_causal", "attention_padding", "sdpa", "sdpa_causal",
    "sdpa_bool_mask", "sdpa_padding", "sdpa_additive_padding", "class_token", "pos_arange", "pos_ids_embedding",
    "index_arange_batch", "transpose_batch", "reshape_batch_rows", "permute_scale", "pad_features", "causal_conv",
    "max_pool", "avg_pool", "graph_break", "rotary_break", "rotary_2d_break", "learned_pos_break",
    "broadcast_input", "where_mask",
)
IMAGE_BLOCKS = ("conv", "conv_grouped", "conv_shared", "batchnorm_train", "batchnorm_eval", "groupnorm", "instancenorm",
                "max_pool", "avg_pool", "pad_reflect_conv", "pad_replicate_conv", "residual_conv", "graph_break")
STEMS = ("tokens", "bag", "seq", "image1d", "image2d", "image3d")
HEADS = ("flat", "pool_linear", "token_cross_entropy", "tied_cross_entropy")
"""``tied_cross_entropy``: logits over the vocabulary whose weight is the token embedding's (tied, as language
models do) where the stem has one, its own ``nn.Linear`` otherwise."""
CROSS_SAMPLE = {"batchnorm_train"}
"""Blocks whose forward mixes samples: the halves are contributions under the whole batch's statistics, so
only ``g1 + g2 == g`` can be checked, not two separate half-batch passes."""


@dataclass(frozen=True)
class Spec:
    batch: int
    dtype: str
    stem: str
    image_blocks: Tuple[str, ...] = ()
    seq_blocks: Tuple[str, ...] = ()
    head: str = "flat"
    t: int = 5
    seed: int = 0
    options: Dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    @property
    def cross_sample(self) -> bool:
        return bool(CROSS_SAMPLE & (set(self.image_blocks) | set(self.seq_blocks)))

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


@st.composite
def specs(draw, max_blocks: int = 5) -> Spec:
    stem = draw(st.sampled_from(STEMS))
    image = stem.startswith("image")
    image_blocks = tuple(draw(st.lists(st.sampled_from(IMAGE_BLOCKS), max_size=3))) if image else ()
    seq_blocks = tuple(draw(st.lists(st.sampled_from(SEQ_BLOCKS), min_size=0 if image else 1, max_size=max_blocks)))
    return Spec(batch=draw(st.integers(2, 9)), dtype=draw(st.sampled_from(("float32", "bfloat16"))), stem=stem,
                image_blocks=image_blocks, seq_blocks=seq_blocks, head=draw(st.sampled_from(HEADS)),
                t=draw(st.integers(4, 6)), seed=draw(st.integers(0, 2**16)))


# --- sequence blocks: [B, T, D] -> [B, T, D] ---
class SeqBlock(nn.Module):
    def __init__(self, kind: str, t: int, shared: nn.Module):
        super().__init__()
        self.kind = kind
        if kind in ("linear", "pos_ids_embedding", "index_arange_batch", "transpose_batch", "reshape_batch_rows",
                    "rotary_break", "rotary_2d_break", "class_token", "where_mask"):
            self.fc = nn.Linear(D, D)
        if kind == "linear_shared":
            self.fc = shared
        if kind == "mlp_residual":
            self.fc, self.fc2 = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)
        if kind == "layernorm":
            self.norm = nn.LayerNorm(D)
        if kind == "rmsnorm":
            self.norm = nn.RMSNorm(D)
        if kind == "groupnorm":
            self.norm = nn.GroupNorm(2, D)
        if kind.startswith("batchnorm"):
            self.norm = nn.BatchNorm1d(D)
            self.norm.train(kind == "batchnorm_train")
        if kind.startswith(("attention", "sdpa")):
            self.qkv, self.out = nn.Linear(D, 3 * D), nn.Linear(D, D)
        if kind == "class_token":
            self.cls = nn.Parameter(torch.randn(1, 1, D))
        if kind in ("pos_arange", "learned_pos_break"):
            self.pos = nn.Parameter(torch.randn(t, D) * 0.3)
        if kind == "pos_ids_embedding":
            self.emb = nn.Embedding(t, D)
        if kind == "permute_scale":
            self.scale = nn.Parameter(torch.randn(t, D))
        if kind == "pad_features":
            self.fc = nn.Linear(D + 3, D)
        if kind == "causal_conv":
            self.conv = nn.Conv1d(D, D, 3)
        if kind in ("rotary_break", "rotary_2d_break"):
            self.register_buffer("inv_freq", 1.0 / (10.0 ** (torch.arange(D) / D)))

    def train(self, mode: bool = True):
        super().train(mode)
        if self.kind == "batchnorm_eval":
            self.norm.train(False)
        return self

    def forward(self, h, keep=None, bias=None):
        kind, (b, t, d) = self.kind, h.shape
        if kind in ("linear", "linear_shared"):
            return F.gelu(self.fc(h))
        if kind == "mlp_residual":
            return h + self.fc2(F.gelu(self.fc(h)))
        if kind in ("layernorm", "rmsnorm"):
            return self.norm(h)
        if kind == "groupnorm":
            return self.norm(h.transpose(1, 2)).transpose(1, 2)
        if kind in ("batchnorm_train", "batchnorm_eval"):  # over the B*T rows: torch 2.13's plain aot_eager
            return self.norm(h.reshape(b * t, d)).view(b, t, d)  # fails on BatchNorm1d of h.transpose(1, 2)
        if kind.startswith(("attention", "sdpa")):
            return self._attention(h, keep)
        if kind == "class_token":
            y = self.fc(torch.cat([self.cls.expand(b, -1, -1).to(h.dtype), h], 1))
            return y[:, 1:] + y[:, :1]
        if kind == "pos_arange":
            return h + self.pos[torch.arange(t)]
        if kind == "pos_ids_embedding":
            return self.fc(h + self.emb(torch.arange(t).unsqueeze(0).repeat(b, 1)))
        if kind == "index_arange_batch":
            return self.fc(h[torch.arange(b)[:, None], torch.arange(t)[None, :]])
        if kind == "transpose_batch":
            return self.fc(h.transpose(0, 1)).transpose(0, 1)
        if kind == "reshape_batch_rows":
            return self.fc(h.reshape(b * t, d)).view(b, t, d)
        if kind == "permute_scale":
            return (h.permute(1, 2, 0) * self.scale[:, :, None]).permute(2, 0, 1)
        if kind == "pad_features":
            return self.fc(F.pad(h, (1, 2)))
        if kind == "causal_conv":
            return self.conv(F.pad(h.transpose(1, 2), (2, 0))).transpose(1, 2)
        if kind in ("max_pool", "avg_pool"):
            pool = F.max_pool1d if kind == "max_pool" else F.avg_pool1d
            return pool(h.transpose(1, 2), 3, 1, 1).transpose(1, 2)
        if kind == "graph_break":
            torch._dynamo.graph_break()
            return h
        if kind in ("rotary_break", "rotary_2d_break"):
            angles = torch.arange(t, dtype=self.inv_freq.dtype)[:, None] * self.inv_freq[None]
            cos, sin = angles.cos().to(h.dtype), angles.sin().to(h.dtype)
            if kind == "rotary_break":
                cos, sin = cos[None], sin[None]
            torch._dynamo.graph_break()
            rotated = torch.cat([-h[..., d // 2:], h[..., : d // 2]], -1)
            return self.fc(h * cos + rotated * sin)
        if kind == "learned_pos_break":
            pos = self.pos[None, :t].to(h.dtype)
            torch._dynamo.graph_break()
            return h + pos
        if kind == "broadcast_input":
            return h if bias is None else h * bias
        if kind == "where_mask":
            y = self.fc(h)
            return torch.where(y > 0, y, 0.1 * y).masked_fill(torch.arange(t)[None, :, None] % 3 == 1, 0.0)
        raise ValueError(kind)

    def _attention(self, h, keep):
        kind, (b, t, d) = self.kind, h.shape
        q, k, v = self.qkv(h).view(b, t, 3, 2, d // 2).permute(2, 0, 3, 1, 4)
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        padded = keep is not None and kind in ("attention_padding", "sdpa_padding", "sdpa_additive_padding")
        allowed = (keep[:, None, None, :] > 0.5) & causal if padded else causal
        if kind.startswith("sdpa"):
            mask = {"sdpa": None, "sdpa_causal": None, "sdpa_bool_mask": causal}.get(kind, allowed)
            if kind == "sdpa_additive_padding" and padded:
                mask = torch.where(allowed, 0.0, -1e9).to(h.dtype)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=kind == "sdpa_causal")
        else:
            scores = q @ k.transpose(-1, -2) / math.sqrt(d // 2)
            if kind != "attention":
                scores = scores.masked_fill(~allowed, -1e9)
            y = scores.softmax(-1) @ v
        return self.out(y.transpose(1, 2).reshape(b, t, d))


# --- image blocks: [B, C, *S] -> [B, C, *S] ---
class ImageBlock(nn.Module):
    def __init__(self, kind: str, dims: int, shared: nn.Module):
        super().__init__()
        self.kind, self.dims = kind, dims
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
        if kind in ("conv", "residual_conv"):
            self.conv = conv(C, C, 3, padding=1)
        if kind == "conv_grouped":
            self.conv = conv(C, C, 3, padding=1, groups=2)
        if kind == "conv_shared":
            self.conv = shared
        if kind.startswith("pad_"):
            self.conv = conv(C, C, 3)
        if kind.startswith("batchnorm"):
            self.norm = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims - 1](C)
            self.norm.train(kind == "batchnorm_train")
        if kind == "groupnorm":
            self.norm = nn.GroupNorm(2, C)
        if kind == "instancenorm":  # per sample and channel: BatchNorm over [1, B*C, *S] in training mode
            self.norm = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)[dims - 1](C, affine=True)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.kind == "batchnorm_eval":
            self.norm.train(False)
        return self

    def forward(self, h):
        kind = self.kind
        if kind in ("conv", "conv_grouped", "conv_shared"):
            return F.relu(self.conv(h))
        if kind == "residual_conv":
            return h + self.conv(F.relu(h))
        if kind in ("batchnorm_train", "batchnorm_eval", "groupnorm", "instancenorm"):
            return self.norm(h)
        if kind in ("max_pool", "avg_pool"):
            pool = getattr(F, f"{kind}{self.dims}d")
            return pool(h, 3, 1, 1)
        if kind.startswith("pad_"):
            return self.conv(F.pad(h, (1, 1) * self.dims, mode=kind.split("_")[1]))
        if kind == "graph_break":
            torch._dynamo.graph_break()
            return h
        raise ValueError(kind)


class GrammarModel(nn.Module):
    def __init__(self, spec: Spec):
        super().__init__()
        self.spec = spec
        t = self._seq_len(spec)
        if spec.stem in ("tokens", "bag"):  # odd seeds: a padding index, whose row gets no gradient
            self.emb = nn.Embedding(VOCAB, D, padding_idx=0 if spec.seed % 2 else None)
        if spec.stem == "bag":
            self.bag = nn.EmbeddingBag(VOCAB, D, mode=("sum", "mean", "max")[spec.seed % 3])
        if spec.stem == "seq":
            self.inp = nn.Linear(3, D)
        if spec.stem.startswith("image"):
            dims = int(spec.stem[5])
            self.stem_conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1](3, C, 3, padding=1)
            self.to_seq = nn.Linear(C, D)
            shared_conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1](C, C, 3, padding=1)
            self.image = nn.ModuleList(ImageBlock(k, dims, shared_conv) for k in spec.image_blocks)
        shared = nn.Linear(D, D)
        self.blocks = nn.ModuleList(SeqBlock(k, t, shared) for k in spec.seq_blocks)
        if spec.head == "pool_linear":
            self.head = nn.Linear(D, 3)
        if spec.head == "token_cross_entropy":
            self.head = nn.Linear(D, 7)
        if spec.head == "tied_cross_entropy":
            self.head = nn.Linear(D, VOCAB, bias=False)
            if spec.stem in ("tokens", "bag"):
                self.head.weight = self.emb.weight

    @staticmethod
    def _seq_len(spec: Spec) -> int:
        return 2 ** int(spec.stem[5]) if spec.stem.startswith("image") else spec.t

    def forward(self, x, keep=None, bias=None, targets=None):
        stem = self.spec.stem
        if stem == "tokens":
            h = self.emb(x)
        elif stem == "bag":  # mode "sum" (seed % 3 == 0) with per-sample weights computed from the ids
            weights = ((x % 3) + 1).to(self.emb.weight.dtype) / 3 if self.bag.mode == "sum" else None
            h = self.emb(x) + self.bag(x, per_sample_weights=weights)[:, None, :]
        elif stem == "seq":
            h = self.inp(x)
        else:
            h = self._image(self.stem_conv(x), 0)
            h = getattr(F, f"adaptive_avg_pool{stem[5]}d")(h, 2)
            h = self.to_seq(h.flatten(2).transpose(1, 2))
        h = self._seq(h, 0, keep, bias)
        if self.spec.head == "pool_linear":
            return self.head(h.mean(1))
        if self.spec.head in ("token_cross_entropy", "tied_cross_entropy"):
            logits = self.head(h)
            return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none").view(h.shape[:2])
        return h


    # The blocks run by recursion, not a loop: Dynamo cannot resume a frame inside a loop after a graph break
    # (it would run the whole forward eagerly), but it resumes a frame after a call that broke.
    def _image(self, h, i: int):
        return h if i == len(self.image) else self._image(self.image[i](h), i + 1)

    def _seq(self, h, i: int, keep, bias):
        return h if i == len(self.blocks) else self._seq(self.blocks[i](h, keep, bias), i + 1, keep, bias)


def build(spec: Spec):
    """``(model, inputs, dims)``: the module in ``spec.dtype``, its positional inputs, and each input's batch
    dim (``None`` for an input that broadcasts against the batch)."""
    gen = torch.Generator().manual_seed(spec.seed)
    torch.manual_seed(spec.seed)
    model = GrammarModel(spec).to(spec.torch_dtype)
    b, t = spec.batch, GrammarModel._seq_len(spec)
    stem = spec.stem
    if stem in ("tokens", "bag"):
        x = torch.randint(0, VOCAB, (b, t), generator=gen)
    elif stem == "seq":
        x = torch.randn(b, t, 3, generator=gen)
    else:
        dims = int(stem[5])
        x = torch.randn(b, 3, *([(7, 6, 4)[dims - 1]] * dims), generator=gen)
    x = x.to(spec.torch_dtype) if x.is_floating_point() else x
    keep = bias = targets = None
    if any(k.endswith("padding") for k in spec.seq_blocks):
        keep = (torch.rand(b, t, generator=gen) > 0.3).to(spec.torch_dtype)
        keep[:, 0] = 1
    if "broadcast_input" in spec.seq_blocks:
        bias = (1 + 0.5 * torch.randn(1, t, D, generator=gen)).to(spec.torch_dtype)
    if spec.head in ("token_cross_entropy", "tied_cross_entropy"):
        targets = torch.randint(0, 7 if spec.head == "token_cross_entropy" else VOCAB, (b, t), generator=gen)
    inputs = (x, keep, bias, targets)
    dims = (0, 0, None, 0)
    while inputs and inputs[-1] is None:  # trailing Nones left to the defaults
        inputs, dims = inputs[:-1], dims[:-1]
    return model, inputs, dims


def loss_of(out: torch.Tensor) -> torch.Tensor:
    """A mean over samples of a fixed, non-degenerate per-sample weighting of the output (in fp32 or fp64)."""
    out = out if out.dtype == torch.float64 else out.float()
    flat = out.flatten(1) if out.dim() > 1 else out[:, None]
    weights = torch.cos(torch.arange(flat.shape[1], dtype=flat.dtype) * 0.37 + 0.3)
    return (flat * weights).sum(1).mean()


def narrow(inputs, dims, start: int, length: int):
    return tuple(x if x is None or d is None else x.narrow(d, start, length) for x, d in zip(inputs, dims))
