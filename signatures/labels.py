"""The label set of each LaMP label task, kept in exactly one place.

Data validation, Literal output types, label mapping and macro-F1 all read these lists.
The order is LaMP's own (the order in which the task prompt lists them).
"""

import re

LAMP_1_LABELS: tuple[str, ...] = ("[1]", "[2]")

LAMP_2N_LABELS: tuple[str, ...] = (
    "travel", "education", "parents", "style & beauty", "entertainment", "food & drink",
    "science & technology", "business", "sports", "healthy living", "women", "politics",
    "crime", "culture & arts", "religion",
)

LAMP_2M_LABELS: tuple[str, ...] = (
    "sci-fi", "based on a book", "comedy", "action", "twist ending", "dystopia", "dark comedy",
    "classic", "psychology", "fantasy", "romance", "thought-provoking", "social commentary",
    "violence", "true story",
)

LAMP_3_LABELS: tuple[str, ...] = ("1", "2", "3", "4", "5")

LABELS: dict[str, tuple[str, ...]] = {
    "LaMP_1": LAMP_1_LABELS,
    "LaMP_2N": LAMP_2N_LABELS,
    "LaMP_2M": LAMP_2M_LABELS,
    "LaMP_3": LAMP_3_LABELS,
}


def label_list(task: str) -> tuple[str, ...] | None:
    """The task's labels, or None for a generation task."""
    return LABELS.get(task)


_TASK_NAME = re.compile(r"(?i)(?:lamp[\s_-]*)?([1-7])([nm])?")
AMBIGUOUS_LAMP_2 = "'LaMP_2' is ambiguous (news or movies); say LaMP_2N or LaMP_2M"
"""Official LaMP files call both LaMP-2 variants 'LaMP_2': a name alone cannot tell them apart."""


def canonical_task_name(name: str) -> str | None:
    """The canonical spelling of a LaMP task name ('lamp-3', 'LaMP3', '3' -> 'LaMP_3'; '2n' -> 'LaMP_2N'), else None.

    Spelling only: the result may name no task ('LaMP_1N') or be the ambiguous 'LaMP_2'; callers check it against
    their registry. It lives here, not in persona_dspy.data.tasks, so that signatures stay a leaf package; here, not in
    persona_dspy.signatures.task_signatures, so that reading a task name imports no dspy (fast CLI start and errors).
    """
    match = _TASK_NAME.fullmatch(name.strip())
    return f"LaMP_{match.group(1)}{(match.group(2) or '').upper()}" if match else None
