"""The adapter's map with its wide layers folded onto the few directions they act on.

In ``models.adapter.model``, the up-projection's output ``h = W_u [a; 1]`` lies in a space of
``hidden + 1`` directions of ``d_out`` (``a`` its ``hidden`` activations), and the target block adds
``W_t2 c`` from ``hidden`` more. A LayerNorm of such a vector is exact from its coefficients: its
centred values are ``C v`` for the column-centred basis ``C`` and its variance is
``||R v||^2 / d_out`` for ``C = QR``. So the target block's first layer reads ``hidden + 1``
coefficients instead of ``d_out`` values, and the output layer ``W_out LN(h2) + W_skip z``
becomes one ``d_out x (2 hidden + 1 + f)`` product instead of ``d_out x (d_out + f)``: about a
third of the FLOPs per user for the recipe's adapter (hidden 64, 640 wide), the same values to
float32 rounding. Migrations map every user through this form.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from models.adapter.config import AdapterConfig
from models.adapter.model import PumaAdapter


class FoldedAdapter(nn.Module):
    """A ``PumaAdapter``'s eval-mode map (no dropout): ``[..., l, d_in]`` -> ``[..., l, d_out]``.
    Built by ``fold``; its weights are a copy, so the adapter can go on training."""

    feature_weight: torch.Tensor | None  # [d_in, f]; None when the adapter keeps every feature
    feature_shift: torch.Tensor  # [f]
    feature_scale: torch.Tensor  # []
    up_norm_factor: torch.Tensor  # [hidden + 1, hidden + 1]
    target_weight: torch.Tensor  # [hidden + 1, hidden]
    target_bias: torch.Tensor  # [hidden]
    out_norm_factor: torch.Tensor  # [2 hidden + 1, 2 hidden + 1]
    out_weight: torch.Tensor  # [2 hidden + 1 (+ f with the linear path), d_out]
    out_bias: torch.Tensor  # [d_out]

    def __init__(self, adapter: PumaAdapter) -> None:
        super().__init__()
        network = adapter.network
        if network is None:
            raise ValueError("A linear-only adapter is one product already; map it as it is.")
        self.config = adapter.config
        self._fold_features(adapter)
        self.source_block = copy.deepcopy(network.source_block)
        up_norm, up_in, up_out = network.up.layers
        self.up_in = nn.Sequential(copy.deepcopy(up_norm), copy.deepcopy(up_in))
        target_norm, target_in, target_out = network.target_block.layers
        # h = U [a; 1]: the up-projection's columns and bias. [d_out, hidden + 1]
        up_basis = torch.cat([_f64(up_out.weight), _f64(up_out.bias)[:, None]], dim=1)
        centred, factor = _centred_norm_factor(up_basis)
        self.register_buffer("up_norm_factor", factor)
        weight, bias = _normed_linear(target_norm, target_in, centred)
        self.register_buffer("target_weight", weight.T.contiguous().float())
        self.register_buffer("target_bias", bias.float())
        # h2 = H [a; c; 1]: the up-projection's and the target block's columns, both biases.
        # [d_out, 2 hidden + 1]
        out_basis = torch.cat(
            [
                _f64(up_out.weight),
                _f64(target_out.weight),
                (_f64(up_out.bias) + _f64(target_out.bias))[:, None],
            ],
            dim=1,
        )
        centred, factor = _centred_norm_factor(out_basis)
        self.register_buffer("out_norm_factor", factor)
        weight, bias = _normed_linear(network.out_norm, network.out_proj, centred)
        if adapter.skip is not None:  # the linear path joins the same product
            weight = torch.cat([weight, _f64(adapter.skip.weight)], dim=1)
            if adapter.skip.bias is not None:
                bias = bias + _f64(adapter.skip.bias)
        self.register_buffer("out_weight", weight.T.contiguous().float())
        self.register_buffer("out_bias", bias.float())
        self.up_eps, self.out_eps = target_norm.eps, network.out_norm.eps
        self.with_skip = adapter.skip is not None
        self.eval()  # a map, never trained: its copied blocks keep dropout off

    def _fold_features(self, adapter: PumaAdapter) -> None:
        """z = (x - mean) [@ V] / scale as one product x @ W + b (or a shift and a scale)."""
        scale, mean = _f64(adapter.input_scale), _f64(adapter.input_mean)
        basis = adapter.input_basis
        weight = None if basis is None else (_f64(basis) / scale).float()
        shift = -mean / scale if basis is None else -(mean @ _f64(basis)) / scale
        self.register_buffer("feature_weight", weight)
        self.register_buffer("feature_shift", shift.float())
        self.register_buffer("feature_scale", (1 / scale).float())

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``[n, d_in]`` -> ``[n, f]``, as ``PumaAdapter.features``."""
        if self.feature_weight is None:
            return x * self.feature_scale + self.feature_shift
        return torch.addmm(self.feature_shift, x, self.feature_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.config.check_input_width(x.shape[-1])
        z = self.features(x.reshape(-1, x.shape[-1]))  # [n, f]
        z1 = z + self.source_block(z)
        a = F.silu(self.up_in(z1))  # [n, hidden]
        ones = a.new_ones(len(a), 1)
        h = torch.cat([a, ones], dim=1)  # coefficients of h, [n, hidden + 1]
        inv_std = _inverse_std(h, self.up_norm_factor, self.up_eps)
        c = F.silu(torch.addcmul(self.target_bias, h @ self.target_weight, inv_std))
        h2 = torch.cat([a, c, ones], dim=1)  # coefficients of h2, [n, 2 hidden + 1]
        normed = h2 * _inverse_std(h2, self.out_norm_factor, self.out_eps)
        inputs = torch.cat([normed, z], dim=1) if self.with_skip else normed
        return torch.addmm(self.out_bias, inputs, self.out_weight).reshape(*x.shape[:-1], -1)


def _normed_linear(
    norm: nn.LayerNorm, linear: nn.Linear, centred: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``linear(norm(C v)) = (M v) / std(C v) + b`` for a basis ``C`` of centred columns
    ``[d, k]``: returns ``M`` ``[out, k]`` and ``b`` ``[out]``, in float64."""
    weight = (_f64(linear.weight) * _f64(norm.weight)) @ centred
    bias = _f64(linear.weight) @ _f64(norm.bias) + _f64(linear.bias)
    return weight, bias


def _centred_norm_factor(basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The basis ``[d, k]`` with each column's mean taken out, and ``R^T / sqrt(d)`` for its
    ``QR``, so that ``||v @ factor||^2`` is the variance of ``basis @ v`` over its ``d`` values."""
    centred = basis - basis.mean(dim=0, keepdim=True)
    r = torch.linalg.qr(centred, mode="r").R
    return centred, (r.T / basis.shape[0] ** 0.5).contiguous().float()


def _inverse_std(v: torch.Tensor, factor: torch.Tensor, eps: float) -> torch.Tensor:
    """``1 / sqrt(var + eps)`` of the vectors whose coefficients are ``v``: ``[n, k]`` -> ``[n, 1]``."""
    return torch.rsqrt((v @ factor).square().sum(dim=1, keepdim=True) + eps)


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().double()


def folds(config: AdapterConfig) -> bool:
    """Whether folding saves work: the output layer reads ``2 hidden + 1`` coefficients instead of
    ``d_out`` values, so only a network narrower than half its output gains."""
    return not config.linear_only and 2 * config.hidden + 1 < config.d_out


def fold(adapter: PumaAdapter) -> PumaAdapter | FoldedAdapter:
    """The cheapest exact form of ``adapter``'s eval-mode map: ``FoldedAdapter`` where ``folds``,
    else the adapter itself, in eval mode."""
    return FoldedAdapter(adapter) if folds(adapter.config) else adapter.eval()
