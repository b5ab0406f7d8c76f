"""What each LaMP task looks like: profile fields, the label field, and how to read a query.

One registry that the loaders, the memory (what text to embed, which field is the label) and
the agent share, so that a task is described once.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from persona_dspy.signatures.labels import AMBIGUOUS_LAMP_2, canonical_task_name, label_list


class TaskKind(StrEnum):
    CLASSIFICATION = "classification"
    RATING = "rating"
    GENERATION = "generation"


@dataclass(frozen=True)
class TaskSpec:
    """One LaMP task.

    profile_fields: fields every profile item must carry (besides ``id``; ``date`` is optional).
    text_fields: the item fields that describe the item (embedded and shown to the model).
    label_field: the item field that plays the role of the user's answer, or None (LaMP-1, LaMP-7).
    query_markers: prompt prefixes after which the query's own content starts, tried in order.
    """

    name: str
    description: str
    kind: TaskKind
    profile_fields: tuple[str, ...]
    text_fields: tuple[str, ...]
    label_field: str | None
    query_markers: tuple[str, ...] = ()
    prompt_template: str | None = None

    @property
    def labels(self) -> tuple[str, ...] | None:
        return label_list(self.name)

    def item_text(self, fields: dict[str, str]) -> str:
        """The descriptive text of a profile item (what memory embeds)."""
        parts = [str(fields[f]).strip() for f in self.text_fields if str(fields.get(f, "")).strip()]
        return ". ".join(parts)

    def interaction_prompt(self, fields: dict[str, str], max_chars: int | None = None) -> str:
        """A past item asked again as a LaMP query: alignment answers past interactions in the task's format, and
        a demonstration shows one as the query it answered. ``max_chars`` shortens the item's text (at a word)."""
        if self.prompt_template is None or self.label_field is None:
            raise ValueError(f"{self.name} items carry no answer, so past interactions cannot be asked again")
        labels = ", ".join(self.labels or ())
        content = self.item_text(fields)
        if max_chars is not None and len(content) > max_chars:
            content = content[:max_chars].rsplit(" ", 1)[0].rstrip(" .,;:") + " ..."
        return self.prompt_template.format(labels=labels, content=content)

    def query_text(self, prompt: str) -> str:
        """The content of a LaMP query prompt, without the task's instruction boilerplate."""
        for marker in self.query_markers:
            at = prompt.find(marker)
            if at >= 0:
                return prompt[at + len(marker):].strip()
        return prompt.strip()


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            "LaMP_1", "personalized citation identification", TaskKind.CLASSIFICATION,
            profile_fields=("title", "abstract"), text_fields=("title", "abstract"), label_field=None,
            query_markers=(),
        ),
        TaskSpec(
            "LaMP_2N", "personalized news categorization", TaskKind.CLASSIFICATION,
            profile_fields=("title", "text", "category"), text_fields=("title", "text"), label_field="category",
            query_markers=("article: ",),
            prompt_template=("Which category does this article relate to among the following categories? Just answer "
                             "with the category name without further explanation. categories: [{labels}] "
                             "article: {content}"),
        ),
        TaskSpec(
            "LaMP_2M", "personalized movie tagging", TaskKind.CLASSIFICATION,
            profile_fields=("description", "tag"), text_fields=("description",), label_field="tag",
            query_markers=("description: ",),
            prompt_template=("Which tag does this movie relate to among the following tags? Just answer with the tag "
                             "name without further explanation. tags: [{labels}] description: {content}"),
        ),
        TaskSpec(
            "LaMP_3", "personalized product rating", TaskKind.RATING,
            profile_fields=("text", "score"), text_fields=("text",), label_field="score",
            query_markers=("review: ",),
            prompt_template=("What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, "
                             "3, 4, or 5 without further explanation. review: {content}"),
        ),
        TaskSpec(
            "LaMP_4", "personalized news headline generation", TaskKind.GENERATION,
            profile_fields=("text", "title"), text_fields=("text",), label_field="title",
            query_markers=("following article: ", "article: "),
            prompt_template="Generate a headline for the following article: {content}",
        ),
        TaskSpec(
            "LaMP_5", "personalized scholarly title generation", TaskKind.GENERATION,
            profile_fields=("title", "abstract"), text_fields=("abstract",), label_field="title",
            query_markers=("abstract of a paper: ", "paper: "),
            prompt_template="Generate a title for the following abstract of a paper: {content}",
        ),
        TaskSpec(
            "LaMP_6", "personalized email subject generation", TaskKind.GENERATION,
            profile_fields=("text", "title"), text_fields=("text",), label_field="title",
            query_markers=("following email: ", "email: "),
            prompt_template="Generate a subject for the following email: {content}",
        ),
        TaskSpec(
            "LaMP_7", "personalized tweet paraphrasing", TaskKind.GENERATION,
            profile_fields=("text",), text_fields=("text",), label_field=None,
            query_markers=("before or after it: ", "following tweet: "),
        ),
    )
}


def normalize_task_name(name: str) -> str:
    """Accept 'LaMP_3', 'lamp-3', 'LaMP3', '3', '2N' ...; return the registry key or raise ValueError.

    'LaMP_2' is returned as is: it is ambiguous, and the caller resolves it from the data (see resolve_lamp2).
    """
    key = canonical_task_name(name)
    if key is None or (key != "LaMP_2" and key not in TASKS):
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return key


def resolve_lamp2(profile_item: dict) -> str:
    """Official files call both LaMP-2 variants 'LaMP_2'; the profile fields tell them apart."""
    if "tag" in profile_item or "description" in profile_item:
        return "LaMP_2M"
    return "LaMP_2N"


def get_task(name: str) -> TaskSpec:
    key = normalize_task_name(name)
    if key == "LaMP_2":
        raise ValueError(AMBIGUOUS_LAMP_2)
    return TASKS[key]
