"""map_to_label / normalize_answer: the free-text shapes small models produce, and what must stay unmapped."""

from __future__ import annotations

import pytest
from persona_dspy.signatures.labels import LAMP_1_LABELS, LAMP_2M_LABELS, LAMP_2N_LABELS, LAMP_3_LABELS

from persona_dspy.agent.answers import label_key, map_to_label, normalize_answer


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("politics", "politics"),
        ("Politics", "politics"),
        ("  POLITICS  ", "politics"),
        ("politics.", "politics"),
        ('"politics"', "politics"),
        ("'Politics'", "politics"),
        ("**Politics**", "politics"),
        ("`politics`", "politics"),
        ("Answer: politics", "politics"),
        ("Category: Politics", "politics"),
        ("The category is Politics.", "politics"),
        ("The answer is: **Politics**", "politics"),
        ("Style & Beauty", "style & beauty"),
        ("style and beauty", "style & beauty"),
        ("food&drink", "food & drink"),
        ("healthy-living", "healthy living"),
        # contained as a whole phrase
        ("I think this article is about politics and elections.", "politics"),
        ("sports\n\nExplanation: the deal was good business", "sports"),
        ("The article covers business.\nCategory: sports", "sports"),  # the answer marker beats an earlier mention
        # near misses (difflib >= 0.8)
        ("politic", "politics"),
        ("Womens", "women"),
        ("entertain", "entertainment"),
    ],
)
def test_news_labels(text: str, expected: str) -> None:
    assert map_to_label(text, LAMP_2N_LABELS) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Sci-Fi", "sci-fi"),
        ("scifi", "sci-fi"),
        ("dystopian", "dystopia"),
        ("Based on a book.", "based on a book"),
        ("This film is a dark comedy.", "dark comedy"),  # longest: 'comedy' is nested in 'dark comedy'
        ("A dark comedy, not a plain comedy", "dark comedy"),
        ("a comedy with a twist ending", "comedy"),  # two separate labels: earliest wins
        ("twist ending; also comedy", "twist ending"),
    ],
)
def test_movie_labels(text: str, expected: str) -> None:
    assert map_to_label(text, LAMP_2M_LABELS) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[1]", "[1]"),
        ("1", "[1]"),
        (" [2] ", "[2]"),
        ("2.", "[2]"),
        ("The answer is 2.", "[2]"),
        ("Answer: [1]", "[1]"),
        ("Reference [2] is more likely to be cited.", "[2]"),
    ],
)
def test_citation_labels(text: str, expected: str) -> None:
    assert map_to_label(text, LAMP_1_LABELS) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4", "4"),
        ("4.0", "4"),
        ("4 stars", "4"),
        ("4/5", "4"),
        ("4 out of 5", "4"),
        ("Rating: 3", "3"),
        ("I'd give it 5 stars.", "5"),
        ("On a scale of 1 to 5, I would rate it 2.", "2"),
        ("8 out of 10", "4"),
        ("five", "5"),
        ("★★★★☆", "4"),
        ("3.5", "4"),
    ],
)
def test_ratings(text: str, expected: str) -> None:
    assert map_to_label(text, LAMP_3_LABELS) == expected


@pytest.mark.parametrize(
    ("text", "labels"),
    [
        ("", LAMP_2N_LABELS),
        ("   ", LAMP_2N_LABELS),
        ("weather", LAMP_2N_LABELS),
        ("I cannot determine the category.", LAMP_2N_LABELS),
        ("horror", LAMP_2M_LABELS),
        ("fiction", LAMP_2M_LABELS),  # 0.77 to 'action': below the cutoff on purpose
        ("[3]", LAMP_1_LABELS),  # digits are never 'similar'
        ("great product, would buy again", LAMP_3_LABELS),
        ("9", LAMP_3_LABELS),
        ("0 stars", LAMP_3_LABELS),
    ],
)
def test_unmappable(text: str, labels: tuple[str, ...]) -> None:
    assert map_to_label(text, labels) is None


def test_none_and_empty_label_set() -> None:
    assert map_to_label(None, LAMP_2N_LABELS) is None
    assert map_to_label("politics", ()) is None


def test_label_keys_are_unique_per_task() -> None:
    """Normalisation must not merge two labels of one task, or mapping would be ambiguous."""
    for labels in (LAMP_1_LABELS, LAMP_2N_LABELS, LAMP_2M_LABELS, LAMP_3_LABELS):
        assert len({label_key(label) for label in labels}) == len(labels)


def test_normalize_answer_per_kind() -> None:
    # classification: mapped label, or the raw text unchanged when unmappable (LaMP then scores it wrong)
    assert normalize_answer("LaMP_2N", "Answer: Politics") == "politics"
    assert normalize_answer("LaMP_1", "1") == "[1]"
    assert normalize_answer("LaMP_2M", "  no idea  ") == "  no idea  "
    # rating: mapped, or raw (LaMP then scores it as the farther of 1 and 5)
    assert normalize_answer("LaMP_3", "4/5") == "4"
    assert normalize_answer("lamp-3", "no rating") == "no rating"
    # generation: stripped only
    assert normalize_answer("LaMP_4", "  Answer: A Headline  \n") == "Answer: A Headline"
    assert normalize_answer("LaMP_7", None) == ""
    with pytest.raises(ValueError):
        normalize_answer("LaMP_2", "politics")
