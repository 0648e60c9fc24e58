"""User interaction data: MovieLens, an operator's JSONL, and a per-user chronological split.

The generic JSONL format has one interaction per line::

    {"user_id": "u42", "item_text": "Heat (1995), Action Crime", "label": 4, "timestamp": 1700000000}

``label`` is the task's target: a rating 1..5 for ``rating``, 0 or 1 for ``binary``. An optional
``item_id`` defaults to ``item_text``.
"""

from __future__ import annotations

import csv
import json
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from prompt_migration_client.ids import USER_ID_RULE, is_user_id

from models import assets
from models.errors import DataError

BUILTIN_DATASETS = ("movielens-100k", "movielens-1m", "synthetic-tiny")


@dataclass(frozen=True)
class Interaction:
    user_id: str
    item_id: str
    item_text: str
    label: float
    timestamp: float


@dataclass
class Splits:
    """Per-user chronological split; users without enough interactions are listed, not dropped."""

    train: dict[str, list[Interaction]]
    val: dict[str, list[Interaction]]
    test: dict[str, list[Interaction]]
    skipped_users: list[str] = field(default_factory=list)

    @property
    def users(self) -> list[str]:
        return list(self.train)

    def train_labels(self) -> dict[str, list[float]]:
        """Each user's training labels, the input of user selection and of the mean baselines."""
        return {u: [i.label for i in items] for u, items in self.train.items()}

    def train_item_texts(self) -> list[str]:
        """The distinct texts of every item in the training split: a catalogue without labels."""
        return sorted({i.item_text for items in self.train.values() for i in items})

    def latest_train(self, n: int | None) -> dict[str, list[Interaction]]:
        """Each user's latest ``n`` training interactions; every one when ``n`` is None."""
        return self.train if n is None else {u: items[-n:] for u, items in self.train.items()}

    def require_training_data(self, users: list[str]) -> None:
        """Refuse users with no training interactions: nothing would train them, yet they would
        come back with prompts that look trained."""
        missing = [u for u in users if not self.train.get(u)]
        if missing:
            more = ", ..." if len(missing) > 5 else ""
            raise DataError(
                f"{len(missing)} of {len(users)} users have no training interactions in this "
                f"dataset ({', '.join(missing[:5])}{more}): leave them out, or add their "
                "interactions to the dataset first."
            )

    def restrict(self, users: list[str]) -> Splits:
        keep = set(users)
        pick = lambda part: {u: v for u, v in part.items() if u in keep}  # noqa: E731
        return Splits(pick(self.train), pick(self.val), pick(self.test), self.skipped_users)


def _rating_to_label(rating: float, task: str) -> float:
    return float(rating >= 4) if task == "binary" else float(rating)


def _read_tsv(path: Path) -> list[list[str]]:
    with path.open(encoding="utf-8", errors="replace", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return rows[1:]  # the first row is recbole's typed header


def load_movielens(name: str, *, task: str) -> list[Interaction]:
    folder = assets.dataset_dir(name)
    stem = assets.DATASET_ASSETS[name].stem
    if not (folder / f"{stem}.inter").exists():
        raise DataError(f"{name} is not in the asset cache {folder}: run `make setup`.")
    items = {
        row[0]: f"{row[1]} ({row[2].split('.')[0]}), {row[3]}"
        for row in _read_tsv(folder / f"{stem}.item")
        if len(row) >= 4
    }
    return [
        Interaction(user, item, items.get(item, item), _rating_to_label(float(r), task), float(t))
        for user, item, r, t in (row[:4] for row in _read_tsv(folder / f"{stem}.inter"))
    ]


def load_jsonl(path: Path, *, task: str) -> list[Interaction]:
    if not path.is_file():
        raise DataError(f"Dataset file {path} does not exist: give the path of a JSONL file.")
    records = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                label = float(row["label"])
                records.append(
                    Interaction(
                        user_id=str(row["user_id"]),
                        item_id=str(row.get("item_id", row["item_text"])),
                        item_text=str(row["item_text"]),
                        label=label,
                        timestamp=float(row["timestamp"]),
                    )
                )
            except (ValueError, KeyError, TypeError) as error:
                raise DataError(
                    f"{path}:{number} is not a valid record ({error!r}): each line needs "
                    "user_id, item_text, label and timestamp."
                ) from error
            _check_label(label, task=task, where=f"{path}:{number}")
            _check_user(records[-1].user_id, where=f"{path}:{number}")
    return records


def _check_user(user: str, *, where: str) -> None:
    """The API's rule: a user a dataset lets in must be readable, erasable and exportable."""
    if not is_user_id(user):
        raise DataError(f"{where}: user_id {user[:40]!r} is invalid; use {USER_ID_RULE}.")


def _check_label(label: float, *, task: str, where: str) -> None:
    if task == "binary" and label not in (0.0, 1.0):
        raise DataError(f"{where}: binary labels must be 0 or 1, got {label}.")
    if task == "rating" and not 1.0 <= label <= 5.0:
        raise DataError(f"{where}: ratings must lie in 1..5, got {label}.")


def synthetic_tiny(
    *, task: str, n_users: int = 24, n_items: int = 40, per_user: int = 24, seed: int = 0
) -> list[Interaction]:
    """A small set with a learnable per-user signal: each user has a taste bias plus noise.

    Item texts use the tiny models' vocabulary so tests can run end to end in seconds.
    """
    rng = random.Random(seed)
    genres = ["comedy", "drama", "action", "thriller", "romance", "horror"]
    item_bias = {i: rng.uniform(-0.5, 0.5) for i in range(n_items)}
    rows = []
    for u in range(n_users):
        taste = 1.5 + 3.0 * (u % 5) / 4  # users spread over 1.5..4.5
        for step, item in enumerate(rng.sample(range(n_items), per_user)):
            rating = min(5.0, max(1.0, round(taste + item_bias[item] + rng.gauss(0, 0.3))))
            text = f"item{item} {genres[item % len(genres)]}"
            rows.append(
                Interaction(f"u{u}", f"i{item}", text, _rating_to_label(rating, task), float(step))
            )
    return rows


def load_interactions(
    source: str, *, task: str, max_users: int | None = None, seed: int = 0
) -> list[Interaction]:
    """Interactions of a built-in dataset or a JSONL path; optionally a seeded user sample."""
    if source in ("movielens-100k", "movielens-1m"):
        rows = load_movielens(source, task=task)
    elif source == "synthetic-tiny":
        rows = synthetic_tiny(task=task, seed=seed)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise DataError(
                f"Unknown dataset {source!r}: use one of {list(BUILTIN_DATASETS)} or the path of a "
                "JSONL file."
            )
        rows = load_jsonl(path, task=task)
    if not rows:
        raise DataError(f"Dataset {source!r} holds no interactions.")
    if max_users is not None:
        users = sorted({r.user_id for r in rows})
        keep = set(random.Random(seed).sample(users, min(max_users, len(users))))
        rows = [r for r in rows if r.user_id in keep]
    return rows


def split_chronological(
    interactions: list[Interaction], *, n_test: int = 5, n_val: int = 5, max_train: int = 30
) -> Splits:
    """Per user, by time: the last ``n_test`` for test, the ``n_val`` before for validation and up
    to ``max_train`` before those for training. Users left without a training interaction are
    reported in ``skipped_users``."""
    by_user: dict[str, list[Interaction]] = defaultdict(list)
    for row in interactions:
        by_user[row.user_id].append(row)
    splits = Splits({}, {}, {})
    for user, rows in by_user.items():
        rows.sort(key=lambda r: r.timestamp)
        train_end = len(rows) - n_test - n_val
        if train_end < 1:
            splits.skipped_users.append(user)
            continue
        splits.train[user] = rows[max(0, train_end - max_train) : train_end]
        splits.val[user] = rows[train_end : train_end + n_val]
        splits.test[user] = rows[train_end + n_val :]
    if not splits.train:
        raise DataError(
            f"No user has more than {n_test + n_val} interactions, so none can be trained: "
            "lower n_test/n_val or supply more data."
        )
    return splits
