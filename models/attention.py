"""Attention for a training step that runs the user's tokens over an item's cached prefix.

The queries of such a step are the last ``q`` positions; the keys and values before them are the
frozen model's cached states over the item text, constants to autograd. A fused SDPA kernel
still writes a gradient for every key and value it was given, ``[batch, heads, prefix,
head_dim]`` per layer (after repeating the grouped KV heads), memory traffic that a CPU step
pays for (1.08x to 1.22x per step, ``bench/results/prefix-cache-epyc-avx2.json``). Here the
scores over the cached part and over the queries' own positions are two matmuls, and only the
second one's keys and values carry gradients. When the queries need no gradient, or nothing is
cached, this is transformers' SDPA as is.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "prefix_reuse"


def prefix_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query ``[B, H, q, D]``; key, value ``[B, H_kv, L, D]`` whose first ``L - q`` positions
    are cached constants; attention_mask ``[B, 1, q, L]`` from ``sdpa_mask`` (True attends) or
    None.
    Returns ``[B, q, H, D]`` as transformers' attention functions do."""
    batch, heads, q_len, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    past = kv_len - q_len
    if past == 0 or not query.requires_grad:
        output, _ = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
        return output, None
    groups = heads // kv_heads
    # Query heads k*groups .. (k+1)*groups - 1 read KV head k: one matmul per KV head, no repeat.
    grouped = query.reshape(batch, kv_heads, groups * q_len, head_dim)
    cached_keys, own_keys = key[:, :, :past].detach(), key[:, :, past:]
    cached_values, own_values = value[:, :, :past].detach(), value[:, :, past:]
    scores = torch.cat(
        [grouped @ cached_keys.transpose(-1, -2), grouped @ own_keys.transpose(-1, -2)], dim=-1
    ) * (scaling if scaling is not None else head_dim**-0.5)  # [B, H_kv, groups * q, L]
    softcap = kwargs.get("softcap")
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:  # omitted by sdpa_mask only where every query sees every key
        by_group = scores.view(batch, kv_heads, groups, q_len, kv_len)
        hidden = ~attention_mask[:, :, None]  # [B, 1, 1, q, L]
        scores = by_group.masked_fill(hidden, torch.finfo(scores.dtype).min).flatten(2, 3)
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    output = probs[..., :past] @ cached_values + probs[..., past:] @ own_values
    return output.reshape(batch, heads, q_len, head_dim).transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, prefix_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)
