"""Instant, data-free migration: a linear map between two models' token-embedding spaces.

Both vocabularies share many strings ("the", " movie", digits...). A ridge least-squares fit of
target rows on source rows over those shared strings gives a map that sends any source prompt
to a plausible target prompt at once, with no training and no user data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.errors import DataError
from models.foundation import FoundationModel
from models.prompts import PromptSet

_SPACE_MARKERS = ("Ġ", "▁")  # byte-level BPE and SentencePiece spell a leading space so


@dataclass(frozen=True)
class LinearMap:
    """``y = (x - source_mean) @ weight + target_mean``; weight ``[d_s, d_t]``."""

    weight: torch.Tensor
    source_mean: torch.Tensor
    target_mean: torch.Tensor
    n_shared: int
    r2: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.source_mean) @ self.weight + self.target_mean


def _normalised_vocab(model: FoundationModel) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for token, index in model.tokenizer.get_vocab().items():
        text = token
        for marker in _SPACE_MARKERS:
            text = text.replace(marker, " ")
        if text.strip() and text.isascii() and text.isprintable():
            vocab.setdefault(text, index)
    return vocab


def fit_vocab_map(
    source: FoundationModel, target: FoundationModel, *, ridge: float = 1e-2
) -> LinearMap:
    source_vocab, target_vocab = _normalised_vocab(source), _normalised_vocab(target)
    shared = sorted(source_vocab.keys() & target_vocab.keys())
    if len(shared) < 2 * source.hidden_size:
        raise DataError(
            f"{source.name} and {target.name} share only {len(shared)} token strings: too few "
            "for an instant map. Use adapter migration instead."
        )
    x = source.raw_embeddings(torch.tensor([source_vocab[s] for s in shared])).cpu().double()
    y = target.raw_embeddings(torch.tensor([target_vocab[s] for s in shared])).cpu().double()
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc, yc = x - x_mean, y - y_mean
    gram = xc.T @ xc + ridge * len(shared) * torch.eye(x.shape[1], dtype=x.dtype) * xc.var()
    weight = torch.linalg.solve(gram, xc.T @ yc)
    residual = yc - xc @ weight
    r2 = 1.0 - float(residual.pow(2).sum() / yc.pow(2).sum())
    return LinearMap(weight.float(), x_mean.float(), y_mean.float(), len(shared), r2)


def stacked_map(maps: list[LinearMap]) -> LinearMap:
    """One map for concatenated sources: the average of each source's mapped prompt."""
    k = len(maps)
    return LinearMap(
        weight=torch.cat([m.weight for m in maps]) / k,
        source_mean=torch.cat([m.source_mean for m in maps]),
        target_mean=torch.stack([m.target_mean for m in maps]).mean(0),
        n_shared=min(m.n_shared for m in maps),
        r2=min(m.r2 for m in maps),
    )


def instant_migrate(sources: list[PromptSet], maps: list[LinearMap], *, target: str) -> PromptSet:
    """Every user of the first source mapped at once; the head is the first source's."""
    users = sources[0].user_ids
    mapped = torch.stack([m(s.rows(users)) for s, m in zip(sources, maps, strict=True)]).mean(0)
    return PromptSet(target, sources[0].task, list(users), mapped, dict(sources[0].head))
