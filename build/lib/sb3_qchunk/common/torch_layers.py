"""Layers of an ensemble of networks evaluated together (the critics of QC)."""

import math

import torch as th
from torch import nn
from torch.nn import functional as F


class EnsembleLinear(nn.Module):
    """
    ``n_members`` independent linear layers evaluated with one batched matmul.

    :param n_members: number of ensemble members (K)
    :param in_features: input size
    :param out_features: output size
    :param bias: whether to add a bias
    """

    def __init__(self, n_members: int, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(th.empty(n_members, in_features, out_features))
        self.bias = nn.Parameter(th.empty(n_members, 1, out_features)) if bias else None
        # Same initialisation as nn.Linear, member by member.
        bound = 1.0 / math.sqrt(in_features) if in_features > 0 else 0.0
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: th.Tensor) -> th.Tensor:
        """
        :param x: (K, B, in) or (B, in) (the same input for every member)
        :return: (K, B, out)
        """
        if x.dim() == 2:
            out = th.matmul(x, self.weight)
        else:
            out = th.bmm(x, self.weight)
        return out if self.bias is None else out + self.bias


class EnsembleLayerNorm(nn.Module):
    """
    LayerNorm over the last dimension with a separate affine transform per ensemble member.

    :param n_members: number of ensemble members (K)
    :param features: size of the normalised dimension
    """

    def __init__(self, n_members: int, features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(th.ones(n_members, 1, features))
        self.bias = nn.Parameter(th.zeros(n_members, 1, features))

    def forward(self, x: th.Tensor) -> th.Tensor:
        return th.addcmul(self.bias, F.layer_norm(x, x.shape[-1:]), self.weight)  # one pass for the affine part
