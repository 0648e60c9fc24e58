"""A migration's population, a batch at a time: the users in every source, and bounded seeded
samples of them, so that no stage holds every user's id or prompt.

A sample is the ``limit`` users with the smallest keyed hash of (seed, user id): the same users
whatever order Redis lists them in, and all of them, sorted, when there are no more than
``limit`` (what the stages used before sampling, so small populations keep their figures).
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from app.store import Store
from models.data import Splits, load_interactions, split_chronological
from workers.context import JobRun
from workers.stage_io import dataset_source


def rank(user: str, *, seed: int) -> int:
    """The user's place in every sample of this seed (a keyed hash: stable, and independent of
    the order users are listed or were onboarded in)."""
    key = seed.to_bytes(8, "little", signed=True)
    return int.from_bytes(hashlib.blake2b(user.encode(), digest_size=8, key=key).digest(), "big")


@dataclass
class Sample:
    """The ``limit`` users of smallest rank among those ``offer``ed, in bounded memory."""

    limit: int
    seed: int
    seen: int = 0
    _heap: list[tuple[int, str]] = field(default_factory=list)  # (-rank, user): the largest first
    _held: set[str] = field(default_factory=set)

    def offer(self, users: Iterable[str]) -> None:
        for user in users:
            self.seen += 1
            if user in self._held:
                continue  # listed twice (SSCAN while the set grows)
            item = (-rank(user, seed=self.seed), user)
            if len(self._heap) < self.limit:
                heapq.heappush(self._heap, item)
            elif item > self._heap[0]:
                self._held.discard(heapq.heapreplace(self._heap, item)[1])
            else:
                continue
            self._held.add(user)

    def users(self) -> list[str]:
        return sorted(user for _, user in self._heap)


def sample(users: Iterable[str], *, limit: int, seed: int) -> list[str]:
    drawn = Sample(limit, seed)
    drawn.offer(users)
    return drawn.users()


def in_every_source(store: Store, sources: Sequence[dict[str, str]], users: list[str]) -> list[str]:
    """Those of ``users`` listed in every source, in order."""
    for source in sources:
        member = store.in_set(source["model"], source["version"], users)
        users = [u for u, m in zip(users, member, strict=True) if m]
    return users


def scan_common(store: Store, sources: Sequence[dict[str, str]]) -> Iterator[list[str]]:
    """The users of every source, a batch at a time (SSCAN of the first, membership in the rest;
    a user may come twice while a source grows)."""
    first, rest = sources[0], sources[1:]
    for batch in store.scan_users(first["model"], first["version"]):
        yield in_every_source(store, rest, batch) if rest else batch


@dataclass(frozen=True)
class Drawn:
    """What the training stage reads: the population's size, and two samples of it."""

    population: int  # users in every source (each counted once)
    statistics: list[str]  # the adapter's input statistics (and the recipe's population)
    trainable: list[str]  # users with training data, the candidates of selection


def draw(
    store: Store,
    sources: Sequence[dict[str, str]],
    *,
    limit: int,
    seed: int,
    can_train: Callable[[str], bool],
) -> Drawn:
    """Both samples in one pass over the sources; the population is counted exactly (SSCAN may
    list a user twice) with the sources' own count when there is one source."""
    statistics, trainable = Sample(limit, seed), Sample(limit, seed)
    for batch in scan_common(store, sources):
        statistics.offer(batch)
        trainable.offer(u for u in batch if can_train(u))
    population = statistics.seen
    if len(sources) == 1:
        population = store.set_size(sources[0]["model"], sources[0]["version"])
    return Drawn(population, statistics.users(), trainable.users())


def dataset_splits(job: JobRun, *, task: str) -> Splits:
    """The dataset's every user's interactions, split (bounded by the dataset, not the sets)."""
    spec = job.spec
    interactions = load_interactions(dataset_source(spec.dataset), task=task, seed=spec.seed)
    return split_chronological(interactions, max_train=spec.max_train_per_user)


def member_splits(job: JobRun, *, task: str, sets: Sequence[dict[str, str]]) -> Splits:
    """The dataset's splits restricted to its users listed in every one of ``sets``."""
    splits = dataset_splits(job, task=task)
    users = sorted({*splits.train, *splits.val, *splits.test})
    return splits.restrict(in_every_source(job.store, sets, users))
