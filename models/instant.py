"""Instant, data-free migration: a linear map between two models' token-embedding spaces.

Both vocabularies share many strings ("the", " movie", digits...). A ridge least-squares fit of
target rows on source rows over those shared strings gives a map that sends any source prompt
to a plausible target prompt at once, with no training and no user data.

The source head was fitted to the source model's label logits; the target's come on another
scale. ``transfer_head`` runs mapped prompts with catalogue items through both models and folds
a least-squares fit between their logits into the head: item text only, no ratings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from models.adapter import AdapterConfig, PumaAdapter
from models.errors import DataError
from models.foundation import FoundationModel
from models.loop import Examples, PromptTable, label_logits
from models.prompts import PromptSet
from models.tasks import Task

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

    @property
    def offset(self) -> torch.Tensor:
        """``b`` of the same map written ``y = x @ weight + b``: ``[d_t]``."""
        return self.target_mean - self.source_mean @ self.weight

    def as_adapter(self) -> PumaAdapter:
        """This map as a linear-only adapter, stored, loaded and applied like a trained one."""
        d_in, d_out = self.weight.shape
        adapter = PumaAdapter(AdapterConfig(d_in=d_in, d_out=d_out, dropout=0.0, linear_only=True))
        adapter.init_skip(self.weight, self.offset)
        return adapter.eval()


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
    x = source.raw_embeddings(torch.tensor([source_vocab[s] for s in shared])).cpu()
    y = target.raw_embeddings(torch.tensor([target_vocab[s] for s in shared])).cpu()
    weight, x_mean, y_mean, r2 = _ridge_fit(x, y, ridge=ridge)
    return LinearMap(weight.float(), x_mean.float(), y_mean.float(), len(shared), r2)


def _ridge_fit(
    x: torch.Tensor, y: torch.Tensor, *, ridge: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """``y - y_mean ~ (x - x_mean) @ weight`` for x ``[n, p]``, y ``[n, q]``, in float64.

    Returns ``weight`` ``[p, q]``, ``x_mean``, ``y_mean`` and the fit's R^2. The penalty scales
    with ``n`` and the variance of x, so one ``ridge`` suits any scale.
    """
    x, y = x.double(), y.double()
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc, yc = x - x_mean, y - y_mean
    gram = xc.T @ xc + ridge * len(x) * float(xc.var()) * torch.eye(x.shape[1], dtype=x.dtype)
    weight = torch.linalg.solve(gram, xc.T @ yc)
    residual = yc - xc @ weight
    r2 = 1.0 - float(residual.pow(2).sum() / yc.pow(2).sum().clamp(min=1e-12))
    return weight, x_mean, y_mean, r2


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


@dataclass(frozen=True)
class TransferredHead:
    """The source head reading the target's logits; ``r2`` of the logit fit, ``passes`` run."""

    state: dict[str, torch.Tensor]
    r2: float
    passes: int


def _catalogue_pairs(
    task: Task, prompt_set: PromptSet, item_texts: Sequence[str], *, n_pairs: int, seed: int
) -> Examples:
    rng = np.random.default_rng(seed)
    catalogue = sorted(set(item_texts))  # any order and repeats in, one draw per seed out
    if not catalogue:
        raise DataError("No item texts to calibrate the head on: give the catalogue's items.")
    # Few distinct items bound the frozen models' prefix work; many users cover the prompts.
    items = rng.choice(len(catalogue), size=min(len(catalogue), 256), replace=False)
    rows = rng.integers(len(prompt_set.user_ids), size=n_pairs)
    return Examples(
        users=rows,
        prefixes=[task.template.prefix_for(catalogue[i]) for i in rng.choice(items, n_pairs)],
        targets=np.zeros(n_pairs, dtype=np.float32),
        user_ids=[prompt_set.user_ids[r] for r in rows],
    )


def transfer_head(
    task: Task,
    *,
    source: FoundationModel,
    source_set: PromptSet,
    target: FoundationModel,
    target_set: PromptSet,
    item_texts: Sequence[str],
    n_pairs: int = 1024,
    ridge: float = 1e-3,
    seed: int = 0,
) -> TransferredHead:
    """The source set's head, made to read ``target``'s label logits for ``target_set``.

    ``target_set`` holds the same users as ``source_set`` (e.g. its instant migration). Random
    (user, catalogue item) pairs go through both models; the head's input features on the source
    are fitted by ridge least squares on those on the target, and the fit is folded into the head.
    """
    examples = _catalogue_pairs(task, source_set, item_texts, n_pairs=n_pairs, seed=seed)
    head = task.load_head(source_set.head)
    features = []
    for model, prompt_set in ((source, source_set), (target, target_set)):
        table = PromptTable(prompt_set.rows(source_set.user_ids)).to(model.device)
        features.append(head.features(label_logits(model, task, table, examples)))
    weight, target_mean, source_mean, r2 = _ridge_fit(features[1], features[0], ridge=ridge)
    head.precompose(weight.float(), (source_mean - target_mean @ weight).float())
    state = {name: value.detach().clone() for name, value in head.state_dict().items()}
    return TransferredHead(state, r2, passes=2 * n_pairs)


@dataclass(frozen=True)
class InstantFit:
    """What an instant migration fits: one vocabulary map per source and the transferred head."""

    maps: list[LinearMap]
    head: TransferredHead

    @property
    def linear(self) -> LinearMap:
        """The maps as one map of the sources' concatenated features."""
        return stacked_map(self.maps)


def fit_instant(
    task: Task,
    *,
    sources: list[PromptSet],
    source_models: list[FoundationModel],
    target: FoundationModel,
    item_texts: Sequence[str],
    calibration_users: int = 1024,
    seed: int = 0,
) -> InstantFit:
    """Fit the maps from ``source_models`` to ``target`` and the first source's head for them.

    ``sources`` hold the same users in the same order. The head is calibrated on a seeded sample
    of at most ``calibration_users`` of them: what it costs does not grow with the population.
    """
    maps = [fit_vocab_map(model, target) for model in source_models]
    users = sources[0].user_ids
    rows = np.random.default_rng(seed).choice(
        len(users), size=min(len(users), calibration_users), replace=False
    )
    sample = [users[i] for i in sorted(rows)]
    calibration = [s.subset(sample) for s in sources]
    head = transfer_head(
        task,
        source=source_models[0],
        source_set=calibration[0],
        target=target,
        target_set=instant_migrate(calibration, maps, target=target.name),
        item_texts=item_texts,
        seed=seed,
    )
    return InstantFit(maps, head)
