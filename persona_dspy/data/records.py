"""Per-user records produced by the loaders and consumed by memory, the agent and the aligner."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from persona_dspy.data.tasks import TaskSpec


class UserDataError(ValueError):
    """One user's records cannot be used as they are (an empty profile): the data, not the model, is at fault.

    Raised for that user only (the others go on); reports name the data file beside it.
    """

    def __init__(self, user_id: str, problem: str) -> None:
        self.user_id = user_id
        self.problem = problem
        super().__init__(f"user {user_id!r} {problem}")


@dataclass(frozen=True)
class HistoryItem:
    """One past interaction of a user: a LaMP profile item.

    ``fields`` holds the item as the file gave it (minus ``id``/``date``; ratings normalised, "5.0" ->
    "5"); ``text`` and ``label`` are derived through the task spec so every consumer reads them alike.
    ``position`` is the item's rank in the user's time order (used when dates are absent).
    """

    id: str
    date: datetime | None
    fields: dict[str, str] = field(hash=False)
    text: str
    label: str | None
    position: int = 0

    @classmethod
    def from_fields(cls, spec: TaskSpec, item_id: str, date: datetime | None, fields: dict[str, str],
                    position: int = 0) -> HistoryItem:
        label = str(fields[spec.label_field]) if spec.label_field else None
        return cls(item_id, date, dict(fields), spec.item_text(fields), label, position)


@dataclass(frozen=True)
class Query:
    """A test question of a user with its gold output.

    ``profile_ids`` is the query's own profile: its memory is exactly these items, never the union
    of the user's profiles (a later query's profile holds earlier queries' answers).
    ``before`` is the cutoff date when the profile is dated: the day after its newest item.
    """

    id: str
    input: str
    gold: str
    profile_ids: frozenset[str]
    before: datetime | None = None


@dataclass
class UserHistory:
    """A user's history (all distinct profile items, oldest first) and their test queries."""

    user_id: str
    task: str
    items: list[HistoryItem]
    queries: list[Query] = field(default_factory=list)

    def item(self, item_id: str) -> HistoryItem:
        for it in self.items:
            if it.id == item_id:
                return it
        raise KeyError(item_id)

    def shared_history(self) -> list[HistoryItem]:
        """Items in every query's profile: the history strictly before the user's earliest query.

        Alignment trains on this part only, so that no query's gold answer (which later queries'
        profiles contain as ordinary history) can reach the persona.
        """
        if not self.queries:
            return list(self.items)
        common = frozenset.intersection(*(q.profile_ids for q in self.queries))
        return [it for it in self.items if it.id in common]

    def recent_interactions(self, n: int = 3) -> list[HistoryItem]:
        """The latest ``n`` items of the shared history: the trainset of test-time alignment."""
        if n < 0:
            raise ValueError("n must be >= 0")
        shared = self.shared_history()
        return shared[-n:] if n else []

    def items_before(self, target: HistoryItem) -> list[HistoryItem]:
        """What may be remembered when answering ``target`` as a past interaction: strictly earlier items."""
        if target.date is not None:
            return [it for it in self.items if it.date is not None and it.date < target.date]
        return [it for it in self.items if it.position < target.position]


def common_task(histories: Sequence[UserHistory], purpose: str) -> str:
    """The one task all ``histories`` belong to; evaluation, comparison and tuning pool scores over users."""
    from persona_dspy.data.tasks import get_task

    if not histories:
        raise ValueError(f"no users for the {purpose}")
    task = get_task(histories[0].task).name
    mixed = sorted({h.task for h in histories if get_task(h.task).name != task})
    if mixed:
        raise ValueError(f"one task per {purpose}: got {task} and {', '.join(mixed)}")
    return task


def select_users(histories: Sequence[UserHistory], ids: Sequence[str] | None = None,
                 limit: int | None = None) -> list[UserHistory]:
    """The users named by ``ids`` (dataset order; an unknown id is an error), then at most ``limit`` of them."""
    selected = list(histories)
    if ids:
        known = {h.user_id for h in histories}
        unknown = [u for u in ids if u not in known]
        if unknown:
            shown = ", ".join(repr(u) for u in sorted(known)[:10]) + (f", ... ({len(known)} users)"
                                                                      if len(known) > 10 else "")
            raise ValueError(f"unknown user(s): {', '.join(map(repr, unknown[:5]))}; known users: {shown}")
        wanted = set(ids)
        selected = [h for h in selected if h.user_id in wanted]
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        selected = selected[:limit]
    return selected
