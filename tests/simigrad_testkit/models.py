"""Small models for the backend tests, and the independent half-batch reference."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(12, 32), nn.Linear(32, 32), nn.Linear(32, 5)

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(F.gelu(self.fc1(x)))))


class Block(nn.Module):
    def __init__(self, d=16, heads=2):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.heads = heads

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """Embedding, positional parameter, LayerNorm, causal attention, tied head."""

    def __init__(self, vocab=40, d=16, t=8, loss_inside=True, pos_embedding=False):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(t, d) if pos_embedding else nn.Parameter(torch.randn(t, d) * 0.1)
        self.block = Block(d)
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight
        self.loss_inside = loss_inside

    def forward(self, idx, targets=None):
        t = idx.shape[1]
        x = self.emb(idx) + (self.pos(torch.arange(t)) if isinstance(self.pos, nn.Embedding) else self.pos[:t])
        logits = self.head(self.ln(self.block(x)))
        if self.loss_inside:
            return F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits


class SeqFirstAttention(nn.Module):
    """nn.MultiheadAttention in its native (T, B, D) layout: needs batch_dim=1."""

    def __init__(self, d=16):
        super().__init__()
        self.inp = nn.Linear(6, d)
        self.att = nn.MultiheadAttention(d, 2)
        self.out = nn.Linear(d, 3)

    def forward(self, x):
        h = self.inp(x)
        return self.out(self.att(h, h, h)[0])


class GroupedCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.gn = nn.GroupNorm(2, 8)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=4)
        self.c3 = nn.Conv1d(8, 6, 3, stride=2)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        h = F.relu(self.gn(self.c1(x)))
        h = F.relu(self.c2(h)).flatten(2)
        return self.fc(self.c3(h).mean(2))


class WithBreak(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(12, 24), nn.Linear(24, 5)

    def forward(self, x):
        h = torch.relu(self.a(x))
        torch._dynamo.graph_break()
        return self.b(h)


def flat_grads(model):
    return torch.cat([
        (p.grad if p.grad is not None else torch.zeros_like(p)).detach().double().flatten()
        for p in model.parameters()
    ])


def half_reference(model, loss_of, batch_size):
    """(d, a, b, cos) from two separate eager passes on the halves, each scaled by |half|/B, in fp64."""
    h = batch_size // 2
    halves = []
    for rows in (slice(0, h), slice(h, batch_size)):
        model.zero_grad(set_to_none=True)
        n = rows.stop - rows.start
        (loss_of(rows) * (n / batch_size)).backward()
        halves.append(flat_grads(model))
    model.zero_grad(set_to_none=True)
    g1, g2 = halves
    cos = F.cosine_similarity(g1, g2, dim=0).item()
    return (g1 @ g2).item(), (g1 @ g1).item(), (g2 @ g2).item(), cos


class Conv3dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv3d(2, 4, 3, stride=(1, 2, 2), padding=1, groups=2)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(F.relu(self.c(x)).mean((2, 3, 4)))
