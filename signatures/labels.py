"""The label set of each LaMP label task, kept in exactly one place.

Data validation, Literal output types, label mapping and macro-F1 all read these lists.
The order is LaMP's own (the order in which the task prompt lists them).
"""

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
