"""A Hugging Face causal LM trained with dynamic padding keeps ``batch`` statistics on every step, with no more
graphs than a plain backend (issue 8). Too slow for the test suite (about a minute here); run it by hand:

    cd tests && python -m simigrad_testkit.hf_dynamic_padding

Reference: two separate fp64 half-batch passes, each loss weighted by its share of the step's label tokens (the
model's loss is a mean over all label tokens of the batch, so that is each half's contribution).
"""
import copy
import os
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.append(os.path.join(ROOT, "bench"))
try:  # torchvision's CUDA-linked extension breaks `import transformers` next to the CPU torch
    import bench_torchvision_cpu as torchvision_cpu

    torchvision_cpu.ensure_importable()
except ImportError:
    pass
from torch._dynamo.utils import counters  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import simigrad_compile  # noqa: E402

torch.manual_seed(0)
config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
model, B = LlamaForCausalLM(config), 4


def batch(t):
    ids, mask = torch.randint(1, 64, (B, t)), torch.ones(B, t, dtype=torch.long)
    for i in range(B):
        mask[i, t - (i % 3):] = 0  # right padding: samples keep t, t-1, t-2 tokens
    return ids, mask, ids.masked_fill(mask == 0, -100)


def halves(ids, mask, labels):
    ref, out, tokens = copy.deepcopy(model).double(), [], (labels[:, 1:] != -100).sum()
    for rows in (slice(0, B // 2), slice(B // 2, B)):
        ref.zero_grad()
        loss = ref(input_ids=ids[rows], attention_mask=mask[rows], labels=labels[rows]).loss
        (loss * (labels[rows, 1:] != -100).sum() / tokens).backward()
        out.append(torch.cat([p.grad.flatten() for p in ref.parameters() if p.grad is not None]))
    return out


def run(backend, options=None):
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend=backend, options=options)
    for t in (8, 11, 13, 10, 16):
        ids, mask, labels = batch(t)
        model.zero_grad()
        compiled(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        if backend == "simigrad":
            got = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).double()
            stats = simigrad_compile.gradient_stats(model, reset=True)
            g1, g2 = halves(ids, mask, labels)
            assert stats.mode == "batch" and not stats.unsplit, stats.unsplit
            assert (got - g1 - g2).norm() / (g1 + g2).norm() < 1e-5
            assert abs(stats.cosine - F.cosine_similarity(g1, g2, dim=0).item()) < 1e-4
            print(f"T={t}: cosine {stats.cosine:.6f}, reference {F.cosine_similarity(g1, g2, dim=0).item():.6f}")
    return counters["stats"]["unique_graphs"]


plain = run("aot_eager")
ours = run("simigrad", {"compiler": "aot_eager"})
print(f"graphs: plain aot_eager {plain}, simigrad {ours}")
assert ours == plain
