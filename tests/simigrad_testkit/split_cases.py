"""Small modules, one per construct that real models use, for the split-rule tests; and the fp64 reference."""

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from simigrad_testkit.models import flat_grads


def loss_of(out):
    """A mean over samples of a fixed, non-degenerate per-sample weighting of the output."""
    flat = out.flatten(1) if out.dim() > 1 else out[:, None]
    weights = torch.cos(torch.arange(flat.shape[1], dtype=flat.dtype) * 0.37)
    return (flat * weights).sum(1).mean()


def half_gradients(model, inputs, loss=loss_of, dims=None):
    """g1, g2 from two separate eager fp64 passes on the halves (inputs cut along ``dims``, default 0), each
    scaled by its share of the samples."""
    ref = copy.deepcopy(model).double()
    xs = [t.double() if t.is_floating_point() else t for t in inputs]
    dims = dims or [0] * len(xs)
    batch = xs[0].shape[dims[0]]
    halves = []
    for start, end in ((0, batch // 2), (batch // 2, batch)):
        ref.zero_grad(set_to_none=True)
        (loss(ref(*[x.narrow(d, start, end - start) for x, d in zip(xs, dims)])) * ((end - start) / batch)).backward()
        halves.append(flat_grads(ref))
    return halves


class Conv(nn.Module):
    """A conv (whose weight gradient needs the batch) followed by ``f``."""

    def __init__(self, f, channels=3, dims=2):
        super().__init__()
        self.conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1](channels, 4, 3, padding=1)
        self.f = f

    def forward(self, x):
        return self.f(self.conv(x))


class Linear(nn.Module):
    """A linear layer over the last dim followed by ``f(h, *rest)``."""

    def __init__(self, f, d=6):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.f = f

    def forward(self, x, *rest):
        return self.f(self.fc(x), *rest)


class HFPaddingMask(nn.Module):
    """SDPA under a padding mask built the way Hugging Face builds it: ``mask[arange(B)[:, None, None, None],
    arange(T)[None, None, None, :]]``, and'ed with the causal mask."""

    def __init__(self, d=8):
        super().__init__()
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x, mask):
        b, t, d = x.shape
        batch = torch.arange(b)[:, None, None, None]
        kv, q_pos = torch.arange(t)[None, None, None, :], torch.arange(t)[None, None, :, None]
        allowed = mask.bool()[batch, kv] & (kv <= q_pos)
        q, k, v = self.qkv(x).view(b, t, 3, 2, d // 2).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class ClassToken(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return self.fc(torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1))


class PaddedLabels(nn.Module):
    """The HF causal-LM loss: labels padded with -100 (``constant_pad_nd``) and shifted."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)

    def forward(self, x, labels):
        shifted = F.pad(labels, (0, 1), value=-100)[..., 1:]
        logits = self.fc(x)
        loss = F.cross_entropy(logits.flatten(0, 1), shifted.flatten(), ignore_index=-100, reduction="none")
        return loss.view(x.shape[0], -1)


class ShiftRight(nn.Module):
    """T5's ``_shift_right``: a slice assignment into zeros (``copy``)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        h = self.fc(x)
        y = h.new_zeros(h.shape)
        y[:, 1:] = h[:, :-1]
        return y


class ChannelsLastHead(nn.Module):
    """ConvNeXt's head: ``adaptive_avg_pool2d(x, 1)`` on channels-last (``as_strided``)."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

    def forward(self, x):
        h = self.conv(x.contiguous(memory_format=torch.channels_last))
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


class LearnedBias(nn.Module):
    """``where(causal, bias_param, -1e9)`` added to attention scores: linear in the bias."""

    def __init__(self, t=5, d=4):
        super().__init__()
        self.bias, self.fc = nn.Parameter(torch.randn(t, t)), nn.Linear(d, d)

    def forward(self, x):
        t = x.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        scores = self.fc(x) @ x.transpose(1, 2) + torch.where(causal, self.bias, -1e9)
        return scores.softmax(-1) @ x


class PositionIds(nn.Module):
    """Learned positions indexed by ``arange(T).unsqueeze(0).repeat(B, 1)``."""

    def __init__(self, t=5, d=4):
        super().__init__()
        self.pos, self.fc = nn.Embedding(t, d), nn.Linear(d, d)

    def forward(self, x):
        b, t, _ = x.shape
        position_ids = torch.arange(t).unsqueeze(0).repeat(b, 1)
        return self.fc(x + self.pos(position_ids))


class Attention(nn.Module):
    """SDPA with a mask of the given kind; ``math`` forces the math kernel."""

    def __init__(self, kind, math=False, t=6, d=8):
        super().__init__()
        self.qkv, self.kind, self.math, self.t = nn.Linear(d, 3 * d), kind, math, t
        self.bias = nn.Parameter(torch.randn(t, t) * 0.1) if kind == "learned_bias" else None

    def forward(self, x, keep):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, 2, d // 2).permute(2, 0, 3, 1, 4)
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        mask = {
            "none": lambda: None,
            "causal": lambda: None,
            "bool_broadcast": lambda: causal,
            "additive_broadcast": lambda: torch.zeros(1, 1, t, t).masked_fill(~causal, -1e9),
            "bool_per_sample": lambda: keep[:, None, None, :].bool() & causal,
            "additive_per_sample": lambda: (1.0 - keep[:, None, None, :]) * -1e9,
            "expanded": lambda: causal.expand(b, 1, t, t),
            "learned_bias": lambda: torch.where(causal, self.bias, -1e9),
        }[self.kind]()
        if self.math:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.MATH):
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.kind == "causal")
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.kind == "causal")
        return y.transpose(1, 2).reshape(b, t, d)


class Bag(nn.Module):
    def __init__(self, mode, weighted=False, padding_idx=None):
        super().__init__()
        self.bag, self.fc = nn.EmbeddingBag(20, 6, mode=mode, padding_idx=padding_idx), nn.Linear(6, 3)
        self.weighted = weighted

    def forward(self, idx, weights):
        return self.fc(self.bag(idx, per_sample_weights=weights if self.weighted else None))


class OffsetBag(nn.Module):
    """``nn.EmbeddingBag`` with 1-D indices and offsets: the offsets are the batched input (one bag per sample)."""

    def __init__(self, mode):
        super().__init__()
        self.bag, self.fc = nn.EmbeddingBag(20, 6, mode=mode), nn.Linear(6, 3)

    def forward(self, offsets, flat):
        return self.fc(self.bag(flat, offsets))


class Recurrent(nn.Module):
    """``nn.GRU``/``nn.LSTM`` (``h0`` given: the initial state carries the batch in dim 1) and a linear head."""

    def __init__(self, kind, batch_first=True, layers=1, bidirectional=False):
        super().__init__()
        self.rnn = getattr(nn, kind)(3, 6, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first)
        self.fc = nn.Linear(6 * (1 + bidirectional), 2)
        self.batch_first = batch_first

    def forward(self, x, h0=None):
        state = h0 if h0 is None or isinstance(self.rnn, nn.GRU) else (h0, torch.tanh(h0))
        y, _ = self.rnn(x, state)
        return self.fc(y if self.batch_first else y.transpose(0, 1))


class CellLoop(nn.Module):
    """An RNN cell stepped over the sequence in Python (unrolled by Dynamo)."""

    def __init__(self, kind):
        super().__init__()
        self.cell, self.fc = getattr(nn, kind)(3, 6), nn.Linear(6, 2)

    def forward(self, x, h):
        state = (h, torch.tanh(h)) if isinstance(self.cell, nn.LSTMCell) else h
        outs = []
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
            outs.append(state[0] if isinstance(state, tuple) else state)
        return self.fc(torch.stack(outs, 1))


class WeightNormConv(nn.Module):
    """wav2vec2's positional conv: a weight-normed conv (``_weight_norm_interface_backward`` is linear in the
    weight's gradient)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.utils.parametrizations.weight_norm(nn.Conv1d(3, 4, 3, padding=1), dim=2)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(F.gelu(self.conv(x)).mean(2))


class PartlyZeroedBias(nn.Module):
    """Swin v2's attention: the key part of the qkv bias is zeroed in a clone (``slice_scatter`` of zeros)."""

    def __init__(self, d=6):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)

    def forward(self, x):
        bias = self.qkv.bias.clone()
        n = bias.numel() // 3
        bias[n: 2 * n].zero_()
        return F.linear(x, self.qkv.weight, bias)
