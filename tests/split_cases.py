

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
