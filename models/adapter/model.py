"""The residual adapter Phi of PUMA.

z   = (x - mean) [@ V_r] / scale  d_in -> f: the source table's statistics (set_input_statistics);
                                  V_r its top-r principal directions when input_rank = r, f = r
z1  = z + FFN_s(LN(z))            in f       } the residual network,
h   = FFN_up(LN(z1))              f -> d_out } left out when linear_only
h2  = h + FFN_t(LN(h))            in d_out   }
out = W_out(LN(h2)) [+ W_skip z]  d_out      (linear_only: out = W_skip z + b)
"""

from __future__ import annotations

import json
from typing import cast

import torch
from safetensors.torch import load, save
from torch import nn

from models.adapter.config import AdapterConfig
from models.errors import ShapeMismatchError


class FeedForward(nn.Module):
    def __init__(self, d_in: int, hidden: int, d_out: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(d_in),
            nn.Linear(d_in, hidden),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, d_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @property
    def layers(self) -> tuple[nn.LayerNorm, nn.Linear, nn.Linear]:
        """The norm and the two linear layers (``models.adapter.folded`` reads their weights)."""
        norm, first, _, _, second = self.net
        return cast(nn.LayerNorm, norm), cast(nn.Linear, first), cast(nn.Linear, second)


class ResidualNetwork(nn.Module):
    """The paper's residual blocks around an up-projection: ``[..., f]`` -> ``[..., d_out]``."""

    def __init__(self, config: AdapterConfig) -> None:
        super().__init__()
        c, f = config, config.d_features
        self.source_block = FeedForward(f, c.hidden, f, c.dropout)
        self.up = FeedForward(f, c.hidden, c.d_out, c.dropout)
        self.target_block = FeedForward(c.d_out, c.hidden, c.d_out, c.dropout)
        self.out_norm = nn.LayerNorm(c.d_out)
        self.out_proj = nn.Linear(c.d_out, c.d_out)
        # LN gives unit-variance features, so weights of std out_std / sqrt(d) give outputs of
        # std out_std.
        nn.init.normal_(self.out_proj.weight, std=c.out_std / c.d_out**0.5)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z1 = z + self.source_block(z)
        h = self.up(z1)
        h = h + self.target_block(h)
        return self.out_proj(self.out_norm(h))


class PumaAdapter(nn.Module):
    input_mean: torch.Tensor  # [d_in]
    input_scale: torch.Tensor  # [] one scale for all features keeps the table's geometry
    input_basis: torch.Tensor | None  # [d_in, input_rank] orthonormal columns, with input_rank

    def __init__(self, config: AdapterConfig) -> None:
        super().__init__()
        self.config = config
        c, f = config, config.d_features
        self.register_buffer("input_mean", torch.zeros(c.d_in))
        self.register_buffer("input_scale", torch.ones(()))
        basis = torch.eye(c.d_in, f) if c.input_rank is not None else None
        self.register_buffer("input_basis", basis)
        self.network = None if c.linear_only else ResidualNetwork(c)
        # Alone, the linear path carries the offset the network's output layer would have.
        self.skip = nn.Linear(f, c.d_out, bias=c.linear_only) if c.linear_skip else None
        # The linear path starts at zero unless a map is given (init_skip); alone, it starts at
        # one prompt for everyone, a random vector of the target embeddings' spread.
        if self.skip is not None:
            nn.init.zeros_(self.skip.weight)
        if self.skip is not None and self.skip.bias is not None:
            nn.init.normal_(self.skip.bias, std=c.out_std)

    @torch.no_grad()
    def set_input_statistics(self, prompts: torch.Tensor) -> None:
        """Centre and scale inputs by a whole source table ``[n, l, d_in]`` (every user, not only
        the trained ones): the users' differences carry the signal, not the start they share, so
        the adapter sees the differences, at unit scale whatever the source model's scale."""
        flat = prompts.reshape(-1, prompts.shape[-1]).float()
        needed = max(2, (self.config.input_rank or 0) + 1)
        if flat.shape[-1] != self.config.d_in or len(flat) < needed:
            raise ShapeMismatchError(
                f"Input statistics need at least {needed} prompt vectors of width "
                f"{self.config.d_in} (input_rank={self.config.input_rank}), got shape "
                f"{tuple(prompts.shape)}: lower input_rank or give the whole source table."
            )
        centred = flat - flat.mean(0)
        if self.input_basis is not None:
            # Right singular vectors of the centred table are its principal directions.
            _, _, vh = torch.linalg.svd(centred.double(), full_matrices=False)
            self.input_basis.copy_(vh[: self.config.d_features].T.float())
            centred = centred @ self.input_basis
        self.input_mean.copy_(flat.mean(0))
        self.input_scale.copy_(centred.pow(2).mean().sqrt().clamp_min(1e-8))

    def init_skip(self, linear_map: torch.Tensor, offset: torch.Tensor | None = None) -> None:
        """Start the linear path at ``x @ linear_map + offset`` (``[d_in, d_out]``, ``[d_out]``)
        for raw inputs ``x`` (within the kept principal directions when ``input_rank`` is set);
        call after ``set_input_statistics``."""
        if self.skip is None or linear_map.shape != (self.config.d_in, self.config.d_out):
            raise ShapeMismatchError(
                f"A linear map of shape {tuple(linear_map.shape)} cannot start an adapter "
                f"{self.config.d_in} -> {self.config.d_out} (with linear_skip=True)."
            )
        # x @ M = (z * scale [@ V^T] + mean) @ M: fold the statistics into weight and bias.
        weight = linear_map.T * self.input_scale
        self.set_linear_path(weight if self.input_basis is None else weight @ self.input_basis)
        with torch.no_grad():
            bias = self.input_mean @ linear_map + (0.0 if offset is None else offset)
            if self.network is None:
                assert self.skip.bias is not None  # linear_only gives the linear path a bias
                self.skip.bias.copy_(bias)
                return
            self.network.out_proj.weight.mul_(0.1)  # the network now starts as a small correction
            self.network.out_proj.bias.copy_(bias)

    def set_linear_path(self, weight: torch.Tensor) -> None:
        """Set the linear path to ``z -> weight @ z`` on the adapter's features
        (``weight`` ``[d_out, d_features]``, see ``features``), leaving the network as it is."""
        expected = (self.config.d_out, self.config.d_features)
        if self.skip is None or weight.shape != expected:
            raise ShapeMismatchError(
                f"A linear path of shape {tuple(weight.shape)} cannot be set on an adapter whose "
                f"path is {expected} (with linear_skip=True)."
            )
        with torch.no_grad():
            self.skip.weight.copy_(weight)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The standardised inputs the paths read: ``[..., l, d_in]`` -> ``[..., l, f]``."""
        self.config.check_input_width(x.shape[-1])
        z = x - self.input_mean
        if self.input_basis is not None:
            z = z @ self.input_basis
        return z / self.input_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., l, d_in]`` -> ``[..., l, d_out]``."""
        z = self.features(x)
        if self.network is None:
            assert self.skip is not None  # AdapterConfig: linear_only needs linear_skip
            return self.skip(z)
        y = self.network(z)
        return y + self.skip(z) if self.skip is not None else y


class AdapterPrompts(nn.Module):
    """Prompts of a batch of users through the adapter: ``users`` -> ``[B, l, d_out]``."""

    sources: torch.Tensor  # [n_users, l, d_in], frozen

    def __init__(self, adapter: PumaAdapter, sources: torch.Tensor) -> None:
        super().__init__()
        self.adapter = adapter
        self.register_buffer("sources", sources.float())

    def forward(self, users: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.sources[users])


def adapter_to_bytes(adapter: PumaAdapter) -> bytes:
    state = {k: v.detach().cpu().contiguous() for k, v in adapter.state_dict().items()}
    return save(state, metadata={"config": json.dumps(adapter.config.to_dict())})


# Adapters stored before the residual blocks moved into ``network`` name them at the top level.
_NETWORK_PARTS = ("source_block.", "up.", "target_block.", "out_norm.", "out_proj.")


def adapter_from_bytes(data: bytes) -> PumaAdapter:
    header_len = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8 : 8 + header_len])["__metadata__"]  # safetensors header
    adapter = PumaAdapter(AdapterConfig(**json.loads(meta["config"])))
    state = {
        f"network.{k}" if k.startswith(_NETWORK_PARTS) else k: v for k, v in load(data).items()
    }
    adapter.load_state_dict(state)
    return adapter.eval()
