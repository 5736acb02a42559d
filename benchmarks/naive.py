"""The naive PyTorch projection, written here so the benchmark runs without peft installed.

It is PEFT's algorithm (peft.tuners.unilora.layer.Linear.forward) in plain PyTorch: int64
indices and one fp32 scale per element of A and B (12 bytes per element of D), A and B
gathered with advanced indexing on every call, then ``base(x) + F.linear(F.linear(x, A), B)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class NaiveUniLoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, theta: nn.Parameter, idx_a: torch.Tensor, idx_b: torch.Tensor,
                 scales: torch.Tensor):
        super().__init__()
        self.base_layer = base
        self.theta_d = theta
        self.register_buffer("indices_A", idx_a.long())
        self.register_buffer("indices_B", idx_b.long())
        self.register_buffer("scales_A", scales[idx_a.long()].float())
        self.register_buffer("scales_B", scales[idx_b.long()].float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        A = self.theta_d[self.indices_A] * self.scales_A
        B = self.theta_d[self.indices_B] * self.scales_B
        result = self.base_layer(x)
        return (result + F.linear(F.linear(x.to(self.theta_d.dtype), A), B)).to(x.dtype)
