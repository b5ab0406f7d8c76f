"""Tests of the LaMP / OPPU loaders: shipped samples, shared dev sets, leakage invariants, bad inputs."""

from __future__ import annotations

import importlib.util
import json
import pickle
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from persona_dspy.data.lamp import (
    DataError,
    dataset_dir,
    load_dataset,
    load_lamp,
    load_oppu,
    parse_date,
    profile_user_id,
)
from persona_dspy.data.records import UserHistory

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "lamp"
SAMPLES = REPO / "persona_dspy" / "data" / "samples"
needs_shared = pytest.mark.skipif(
    not SHARED.is_dir(), reason=f"shared LaMP dev sets not found at {SHARED} (../shared/lamp from the repo root)")

SHIPPED = {"LaMP_2N": (6, 18), "LaMP_3": (6, 18), "LaMP_2M": (3, 9)}
SHARED_COUNTS = {"LaMP_2N": (31, 93), "LaMP_3": (30, 90), "LaMP_2M": (5, 15)}

REVIEW = "What is the score of the following review on a scale of 1 to 5? review: "


# ------------------------------------------------------------------------------------------ helpers


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def review(item_id: str, date: str | None, score: Any = "4", text: str | None = None) -> dict[str, Any]:
    item = {"id": item_id, "text": text or f"review {item_id}", "score": score}
    if date is not None:
        item["date"] = date
    return item


def lamp3_files(tmp_path: Path, questions: list[dict[str, Any]] | None = None,
                golds: list[dict[str, Any]] | None = None, task: str | None = "LaMP_3") -> tuple[Path, Path]:
    """A valid LaMP_3 set in the time-based protocol (one user, 3 queries), unless overridden."""
    if questions is None:
        history = [review(f"i{n}", f"2020-01-0{n + 1}", score=str(n % 5 + 1)) for n in range(5)]
        questions = [
            {"id": "q1", "input": REVIEW + "first", "profile": history[:3], "user_id": "u1"},
            {"id": "q2", "input": REVIEW + "second", "profile": history[:4], "user_id": "u1"},
            {"id": "q3", "input": REVIEW + "third", "profile": history[:5], "user_id": "u1"},
        ]
    if golds is None:
        golds = [{"id": q["id"], "output": "5"} for q in questions]
    outputs: dict[str, Any] = {"golds": golds}
    if task is not None:
        outputs["task"] = task
    return write_json(tmp_path / "dev_questions.json", questions), write_json(tmp_path / "dev_outputs.json", outputs)


def assert_names(exc: pytest.ExceptionInfo[DataError], path: Path, record_id: str | None, field: str | None) -> None:
    message = str(exc.value)
    assert str(path) in message, message
    if record_id is not None:
        assert repr(record_id) in message, message
        assert exc.value.record_id == record_id
    if field is not None:
        assert f"field {field!r}" in message, message
        assert exc.value.field == field


def check_invariants(users: list[UserHistory], questions_path: Path) -> None:
    """History order, per-query profiles and the leakage guarantees of recent_interactions."""
    raw = {q["id"]: q for q in json.loads(questions_path.read_text(encoding="utf-8"))}
    assert sum(len(u.queries) for u in users) == len(raw)
    for user in users:
        dates = [it.date for it in user.items]
        assert all(d is not None for d in dates)
        assert dates == sorted(dates), f"history of {user.user_id} not sorted by date"
        assert [it.position for it in user.items] == list(range(len(user.items)))
        ids = [it.id for it in user.items]
        assert len(ids) == len(set(ids))
        profiles = [q.profile_ids for q in user.queries]
        assert set(ids) == frozenset().union(*profiles)
        for query in user.queries:
            assert query.profile_ids == {str(p["id"]) for p in raw[query.id]["profile"]}
            newest = max(user.item(i).date for i in query.profile_ids)
            assert query.before is not None and newest < query.before
            assert (query.before - newest).days <= 1
        recent = user.recent_interactions(3)
        earliest_raw = min((raw[q.id]["profile"] for q in user.queries), key=len)  # straight from the file
        assert [it.id for it in recent] == [str(p["id"]) for p in earliest_raw[-3:]]
        earliest = min(profiles, key=len)
        later_only = frozenset().union(*profiles) - frozenset.intersection(*profiles)
        for item in recent:
            assert item.id not in later_only, f"{item.id} appears only in later profiles: it may be a gold answer"
            assert item.id in earliest
            for query in user.queries:
                assert item.id in query.profile_ids
                assert item.date < query.before


def load_make_samples() -> Any:
    spec = importlib.util.spec_from_file_location("make_samples", REPO / "data" / "make_samples.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------- shipped/shared


@pytest.mark.parametrize("task", sorted(SHIPPED))
def test_shipped_sample_loads_with_right_counts_and_invariants(task: str) -> None:
    folder = dataset_dir(task)
    users = load_dataset(folder)
    assert (len(users), sum(len(u.queries) for u in users)) == SHIPPED[task]
    assert all(u.task == task for u in users)
    assert all(len(q.profile_ids) <= 60 for u in users for q in u.queries)
    check_invariants(users, folder / "dev_questions.json")


@needs_shared
@pytest.mark.parametrize("task", sorted(SHARED_COUNTS))
def test_shared_dev_set_loads_with_right_counts_and_invariants(task: str) -> None:
    users = load_dataset(SHARED / task)
    assert (len(users), sum(len(u.queries) for u in users)) == SHARED_COUNTS[task]
    assert all(len(u.queries) == 3 for u in users)
    check_invariants(users, SHARED / task / "dev_questions.json")


@needs_shared
def test_shipped_samples_are_reproducible_from_shared() -> None:
    make_samples = load_make_samples()
    files = make_samples.build(SHARED, SAMPLES)
    assert files
    for path, data in files.items():
        assert path.read_bytes() == data, f"{path} differs from `python data/make_samples.py`"
    assert sum(len(d) for d in files.values()) < 1_500_000


@needs_shared
def test_sample_profiles_are_the_most_recent_items_of_the_shared_profiles() -> None:
    for task in SHIPPED:
        shared = {q["id"]: q for q in json.loads((SHARED / task / "dev_questions.json").read_text(encoding="utf-8"))}
        sample = json.loads((dataset_dir(task) / "dev_questions.json").read_text(encoding="utf-8"))
        for question in sample:
            source = shared[question["id"]]["profile"]
            assert question["profile"] == source[-len(question["profile"]):]
            assert len(question["profile"]) == min(60, len(source))


# -------------------------------------------------------------------------------------- user forming


def test_official_files_without_user_id_group_by_identical_profile(tmp_path: Path) -> None:
    tags = [{"id": n, "description": f"movie {n}", "tag": "comedy"} for n in range(4)]  # int ids, official style
    questions = [
        {"id": 1, "input": "Which tag ... description: a", "profile": tags[:3]},
        {"id": 2, "input": "Which tag ... description: b", "profile": list(reversed(tags[:3]))},  # same set
        {"id": 3, "input": "Which tag ... description: c", "profile": tags[1:]},
    ]
    golds = [{"id": 1, "output": "sci-fi"}, {"id": 2, "output": "comedy"}, {"id": 3, "output": "classic"}]
    qpath = write_json(tmp_path / "q.json", questions)
    opath = write_json(tmp_path / "o.json", {"task": "LaMP_2", "golds": golds})
    users = load_lamp(qpath, opath)
    assert [u.task for u in users] == ["LaMP_2M", "LaMP_2M"]
    assert [[q.id for q in u.queries] for u in users] == [["1", "2"], ["3"]]
    assert users[0].user_id == profile_user_id(["0", "1", "2"]) == profile_user_id(["2", "1", "0"])
    assert users[0].user_id.startswith("profile-") and len(users[0].user_id) == len("profile-") + 12
    assert users[1].user_id == profile_user_id(["1", "2", "3"]) != users[0].user_id
    assert [it.id for it in users[0].items] == ["0", "1", "2"]  # undated: first-seen file order
    assert [it.position for it in users[0].items] == [0, 1, 2]
    assert all(q.before is None for u in users for q in u.queries)
    assert users[0].queries[1].gold == "comedy"


def test_official_lamp2_news_is_resolved_from_profile_fields(tmp_path: Path) -> None:
    item = {"id": "n1", "title": "t", "text": "x", "category": "politics", "date": "2019-02-24"}
    qpath = write_json(tmp_path / "q.json", [{"id": "1", "input": "article: y", "profile": [item]}])
    opath = write_json(tmp_path / "o.json", {"task": "LaMP_2", "golds": [{"id": "1", "output": "crime"}]})
    (user,) = load_lamp(qpath, opath)
    assert user.task == "LaMP_2N"
    assert user.items[0].label == "politics"
    assert user.items[0].text == "t. x"
    assert user.queries[0].before == datetime(2019, 2, 25)
    assert load_lamp(qpath, opath, task="LaMP_2N")[0].task == "LaMP_2N"


def test_no_outputs_file_gives_empty_golds(tmp_path: Path) -> None:
    qpath, _ = lamp3_files(tmp_path)
    users = load_lamp(qpath, task="LaMP_3")
    assert [q.gold for q in users[0].queries] == ["", "", ""]


def test_time_protocol_history_and_cutoffs(tmp_path: Path) -> None:
    qpath, opath = lamp3_files(tmp_path)
    (user,) = load_lamp(qpath, opath)
    assert user.user_id == "u1"
    assert [it.id for it in user.items] == ["i0", "i1", "i2", "i3", "i4"]
    assert [q.profile_ids for q in user.queries] == [{"i0", "i1", "i2"}, {"i0", "i1", "i2", "i3"},
                                                     {"i0", "i1", "i2", "i3", "i4"}]
    assert [q.before for q in user.queries] == [datetime(2020, 1, 4), datetime(2020, 1, 5), datetime(2020, 1, 6)]
    assert [it.id for it in user.recent_interactions(3)] == ["i0", "i1", "i2"]
    check_invariants([user], qpath)


def test_dates_sort_history_ties_keep_first_seen_order_and_cutoff_truncates(tmp_path: Path) -> None:
    profile = [review("late", "2020-03-01T18:30:00Z"), review("tie-a", "2020-01-01"), review("tie-b", "2020-01-01"),
               review("early", "2019-12-31T23:00:00-02:00")]  # = 2020-01-01T01:00 UTC
    qpath, opath = lamp3_files(tmp_path, [{"id": "q", "input": REVIEW + "x", "profile": profile}])
    (user,) = load_lamp(qpath, opath)
    assert [it.id for it in user.items] == ["tie-a", "tie-b", "early", "late"]
    assert user.item("early").date == datetime(2020, 1, 1, 1, 0)
    assert user.queries[0].before == datetime(2020, 3, 2)


def test_lamp3_scores_are_normalised(tmp_path: Path) -> None:
    profile = [review("a", None, "5"), review("b", None, 4), review("c", None, "3.0"), review("d", None, 2.0)]
    golds = [{"id": "q", "output": 5.0}]
    qpath, opath = lamp3_files(tmp_path, [{"id": "q", "input": REVIEW + "x", "profile": profile}], golds)
    (user,) = load_lamp(qpath, opath)
    assert [it.label for it in user.items] == ["5", "4", "3", "2"]
    assert [it.fields["score"] for it in user.items] == ["5", "4", "3", "2"]
    assert user.queries[0].gold == "5"


@pytest.mark.parametrize(("value", "expected"), [
    ("2020-05-17", datetime(2020, 5, 17)),
    ("2020-05-17T10:11:12", datetime(2020, 5, 17, 10, 11, 12)),
    ("2020-05-17T10:11:12Z", datetime(2020, 5, 17, 10, 11, 12)),
    ("2020-05-17T10:11:12+02:00", datetime(2020, 5, 17, 8, 11, 12)),
    ("2020-5-7", datetime(2020, 5, 7)),
    ("2014", datetime(2014, 1, 1)),
    (2014, datetime(2014, 1, 1)),
    (1393632000, datetime(2014, 3, 1)),
    ("1393632000", datetime(2014, 3, 1)),
    (1393632000.0, datetime(2014, 3, 1)),
])
def test_parse_date_formats(value: Any, expected: datetime) -> None:
    assert parse_date(value) == expected


@pytest.mark.parametrize("value", ["yesterday", "2020-13-01", "", "12345", 42, True, None, [2020]])
def test_parse_date_rejects(value: Any) -> None:
    with pytest.raises(ValueError):
        parse_date(value)


# --------------------------------------------------------------------------------------- bad inputs


def test_data_error_survives_pickling() -> None:
    error = DataError("f.json", "bad", record="question", record_id="q1", field="input")
    copy = pickle.loads(pickle.dumps(error))
    assert str(copy) == str(error) == "f.json: question 'q1': field 'input': bad"
    assert (copy.path, copy.record_id, copy.field) == ("f.json", "q1", "input")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope_questions.json"
    with pytest.raises(DataError, match="file not found") as exc:
        load_lamp(path, task="LaMP_3")
    assert_names(exc, path, None, None)


def test_malformed_json(tmp_path: Path) -> None:
    qpath, opath = lamp3_files(tmp_path)
    opath.write_text('{"task": "LaMP_3", "golds": [', encoding="utf-8")
    with pytest.raises(DataError, match="not valid JSON") as exc:
        load_lamp(qpath, opath)
    assert_names(exc, opath, None, None)


def test_a_json_error_reads_as_one_sentence(tmp_path: Path) -> None:
    """Python's message ends in "at" before the position: it is said once ("starting at line 1", not "at at")."""
    qpath, opath = lamp3_files(tmp_path)
    opath.write_text('{"task": "LaMP_3", "golds": [{"id": "q1, "output": "3"}]}', encoding="utf-8")
    with pytest.raises(DataError) as exc:
        load_lamp(qpath, opath)
    assert "at at" not in str(exc.value)
    assert "(Expecting ',' delimiter at line 1, column" in str(exc.value)
    opath.write_text('{"task": "LaMP_3", "golds": [{"id": "q1', encoding="utf-8")
    with pytest.raises(DataError, match=r"Unterminated string starting at line 1, column \d+\)") as exc:
        load_lamp(qpath, opath)
    assert "at at" not in str(exc.value)


def test_wrong_top_level_shape(tmp_path: Path) -> None:
    qpath = write_json(tmp_path / "q.json", {"id": "q1"})
    with pytest.raises(DataError, match="list of questions") as exc:
        load_lamp(qpath, task="LaMP_3")
    assert_names(exc, qpath, None, None)


def test_question_without_gold(tmp_path: Path) -> None:
    qpath, opath = lamp3_files(tmp_path, golds=[{"id": "q1", "output": "5"}, {"id": "q3", "output": "4"}])
    with pytest.raises(DataError, match="no gold") as exc:
        load_lamp(qpath, opath)
    assert_names(exc, opath, "q2", "output")


def test_gold_for_unknown_question(tmp_path: Path) -> None:
    golds = [{"id": q, "output": "5"} for q in ("q1", "q2", "q3", "q9")]
    qpath, opath = lamp3_files(tmp_path, golds=golds)
    with pytest.raises(DataError, match="not in") as exc:
        load_lamp(qpath, opath)
    assert_names(exc, opath, "q9", "id")


def test_duplicate_question_ids(tmp_path: Path) -> None:
    profile = [review("a", "2020-01-01")]
    questions = [{"id": "q1", "input": REVIEW, "profile": profile}, {"id": "q1", "input": REVIEW, "profile": profile}]
    qpath, opath = lamp3_files(tmp_path, questions, golds=[{"id": "q1", "output": "5"}])
    with pytest.raises(DataError, match="duplicate question id") as exc:
        load_lamp(qpath, opath)
    assert_names(exc, qpath, "q1", "id")


def test_duplicate_item_id_with_different_content_in_one_user(tmp_path: Path) -> None:
    questions = [
        {"id": "q1", "input": REVIEW, "profile": [review("a", "2020-01-01", "4")], "user_id": "u"},
        {"id": "q2", "input": REVIEW, "profile": [review("a", "2020-01-01", "2")], "user_id": "u"},
    ]
    qpath, opath = lamp3_files(tmp_path, questions)
    with pytest.raises(DataError, match="duplicate id with different content") as exc:
        load_lamp(qpath, opath)
    assert_names(exc, qpath, "a", "id")
    assert "score" in str(exc.value) and "'q1'" in str(exc.value)


def test_duplicate_item_id_with_different_content_in_one_profile(tmp_path: Path) -> None:
    profile = [review("a", "2020-01-01", text="one"), review("a", "2020-01-01", text="two")]
    qpath, opath = lamp3_files(tmp_path, [{"id": "q1", "input": REVIEW, "profile": profile}])
    with pytest.raises(DataError, match="duplicate id") as exc:
        load_lamp(qpath, opath)
    assert_names(exc, qpath, "a", "id")


def test_same_item_in_two_users_is_fine(tmp_path: Path) -> None:
    questions = [
        {"id": "q1", "input": REVIEW, "profile": [review("a", "2020-01-01", "4")], "user_id": "u"},
        {"id": "q2", "input": REVIEW, "profile": [review("a", "2020-01-01", "2")], "user_id": "v"},
    ]
    qpath, opath = lamp3_files(tmp_path, questions)
    assert [u.items[0].label for u in load_lamp(qpath, opath)] == ["4", "2"]


def test_profile_item_missing_task_field(tmp_path: Path) -> None:
    item = {"id": "n7", "title": "t", "text": "x"}  # no category
    qpath = write_json(tmp_path / "q.json", [{"id": "1", "input": "article: y", "profile": [item]}])
    opath = write_json(tmp_path / "o.json", {"task": "LaMP_2N", "golds": [{"id": "1", "output": "crime"}]})
    with pytest.raises(DataError, match="missing") as exc:
        load_lamp(qpath, opath)
    assert_names(exc, qpath, "n7", "category")


def test_question_missing_input(tmp_path: Path) -> None:
    qpath, opath = lamp3_files(tmp_path, [{"id": "q1", "profile": [review("a", None)]}])
    with pytest.raises(DataError, match="missing") as exc:
        load_lamp(qpath, opath)
    assert_names(exc, qpath, "q1", "input")


def test_question_missing_profile(tmp_path: Path) -> None:
    qpath, opath = lamp3_files(tmp_path, [{"id": "q1", "input": REVIEW}])
    with pytest.raises(DataError, match="missing") as exc:
        load_lamp(qpath, opath)
    assert_names(exc, qpath, "q1", "profile")


def test_question_missing_id(tmp_path: Path) -> None:
    qpath, opath = lamp3_files(tmp_path, [{"input": REVIEW, "profile": []}], golds=[])
    with pytest.raises(DataError, match="missing") as exc:
        load_lamp(qpath, opath)
    assert_names(exc, qpath, "#0", "id")


def test_profile_label_outside_label_list(tmp_path: Path) -> None:
    item = {"id": "m3", "description": "d", "tag": "horror"}
    qpath = write_json(tmp_path / "q.json", [{"id": "1", "input": "description: y", "profile": [item]}])
    opath = write_json(tmp_path / "o.json", {"task": "LaMP_2M", "golds": [{"id": "1", "output": "comedy"}]})
    with pytest.raises(DataError, match="not one of the LaMP_2M labels") as exc:
        load_lamp(qpath, opath)
    assert_names(exc, qpath, "m3", "tag")


def test_gold_outside_label_list(tmp_path: Path) -> None:
    qpath, opath = lamp3_files(tmp_path, golds=[{"id": "q1", "output": "5"}, {"id": "q2", "output": "6"},
                                                {"id": "q3", "output": "5"}])
    with pytest.raises(DataError, match="not a score 1-5") as exc:
        load_lamp(qpath, opath)
    assert_names(exc, opath, "q2", "output")


@pytest.mark.parametrize("score", ["4.5", "0", 6, "five", None, True])
def test_lamp3_profile_score_outside_1_to_5(tmp_path: Path, score: Any) -> None:
    qpath, opath = lamp3_files(tmp_path, [{"id": "q1", "input": REVIEW, "profile": [review("r", None, score)]}])
    with pytest.raises(DataError, match="not a score 1-5") as exc:
        load_lamp(qpath, opath)
    assert_names(exc, qpath, "r", "score")


def test_lamp1_gold_must_be_a_reference_number(tmp_path: Path) -> None:
    item = {"id": "p1", "title": "t", "abstract": "a"}
    qpath = write_json(tmp_path / "q.json", [{"id": "c1", "input": 'reference? [1]: "x" [2]: "y"', "profile": [item]}])
    opath = write_json(tmp_path / "o.json", {"task": "LaMP_1", "golds": [{"id": "c1", "output": "1"}]})
    with pytest.raises(DataError, match=r"\[1\]") as exc:
        load_lamp(qpath, opath)
    assert_names(exc, opath, "c1", "output")
    write_json(opath, {"task": "LaMP_1", "golds": [{"id": "c1", "output": "[2]"}]})
    (user,) = load_lamp(qpath, opath)
    assert user.queries[0].gold == "[2]" and user.items[0].label is None


def test_unparsable_date(tmp_path: Path) -> None:
    profile = [review("a", "2020-01-01"), review("b", "last tuesday")]
    qpath, opath = lamp3_files(tmp_path, [{"id": "q1", "input": REVIEW, "profile": profile}])
    with pytest.raises(DataError, match="unparsable date") as exc:
        load_lamp(qpath, opath)
    assert_names(exc, qpath, "b", "date")


def test_mixed_dated_and_undated_items_of_a_user(tmp_path: Path) -> None:
    questions = [
        {"id": "q1", "input": REVIEW, "profile": [review("a", "2020-01-01")], "user_id": "u"},
        {"id": "q2", "input": REVIEW, "profile": [review("a", "2020-01-01"), review("b", None)], "user_id": "u"},
    ]
    qpath, opath = lamp3_files(tmp_path, questions)
    with pytest.raises(DataError, match="dated and undated") as exc:
        load_lamp(qpath, opath)
    assert_names(exc, qpath, "b", "date")


def test_task_conflict(tmp_path: Path) -> None:
    qpath, opath = lamp3_files(tmp_path)
    with pytest.raises(DataError, match="task='LaMP_4'") as exc:
        load_lamp(qpath, opath, task="LaMP_4")
    assert_names(exc, opath, None, "task")


def test_no_task_anywhere(tmp_path: Path) -> None:
    qpath, opath = lamp3_files(tmp_path, task=None)
    with pytest.raises(DataError, match="no task") as exc:
        load_lamp(qpath, opath)
    assert_names(exc, qpath, None, "task")
    assert load_lamp(qpath, opath, task="lamp-3")[0].task == "LaMP_3"


def test_user_id_on_some_questions_only(tmp_path: Path) -> None:
    profile = [review("a", None)]
    questions = [{"id": "q1", "input": REVIEW, "profile": profile, "user_id": "u"},
                 {"id": "q2", "input": REVIEW, "profile": profile}]
    qpath, opath = lamp3_files(tmp_path, questions)
    with pytest.raises(DataError, match="present on other questions") as exc:
        load_lamp(qpath, opath)
    assert_names(exc, qpath, "q2", "user_id")


def test_load_dataset_requires_outputs(tmp_path: Path) -> None:
    qpath, opath = lamp3_files(tmp_path)
    opath.unlink()
    with pytest.raises(DataError, match="file not found") as exc:
        load_dataset(tmp_path)
    assert_names(exc, opath, None, None)


def test_dataset_dir_errors() -> None:
    with pytest.raises(FileNotFoundError, match="no shipped sample for LaMP_4") as exc:
        dataset_dir("LaMP_4")
    assert isinstance(exc.value, DataError) and str(SAMPLES / "LaMP_4") in str(exc.value)
    with pytest.raises(ValueError, match="ambiguous"):
        dataset_dir("LaMP_2")
    assert dataset_dir("lamp-3") == SAMPLES / "LaMP_3"


# --------------------------------------------------------------------------------------------- OPPU


def oppu_files(tmp_path: Path) -> tuple[Path, Path]:
    """OPPU's data/movie_tagging/user_top_100_history.json and ..._label.json, in their exact shape."""
    def movie(n: int, tag: str) -> dict[str, str]:
        return {"id": f"{n}", "description": f"a film {n}", "tag": tag}

    history = [
        {"user_id": "101", "profile": [movie(1, "comedy"), movie(2, "classic"), movie(3, "comedy")],
         "query": [{"id": "9001", "input": "Which tag does this movie relate to ...] description: x"},
                   {"id": "9002", "input": "Which tag does this movie relate to ...] description: y"}]},
        {"user_id": "202", "profile": [movie(4, "sci-fi"), movie(5, "dystopia")],
         "query": [{"id": "9003", "input": "Which tag does this movie relate to ...] description: z"}]},
    ]
    labels = {"task": "LaMP_2M", "golds": [{"id": "9001", "output": "comedy"}, {"id": "9002", "output": "romance"},
                                           {"id": "9003", "output": "sci-fi"}]}
    return (write_json(tmp_path / "user_top_100_history.json", history),
            write_json(tmp_path / "user_top_100_history_label.json", labels))


def test_oppu_round_trip(tmp_path: Path) -> None:
    hpath, lpath = oppu_files(tmp_path)
    users = load_oppu(hpath, lpath)
    assert [u.user_id for u in users] == ["101", "202"]
    assert all(u.task == "LaMP_2M" for u in users)
    first = users[0]
    assert [it.id for it in first.items] == ["1", "2", "3"]
    assert [it.label for it in first.items] == ["comedy", "classic", "comedy"]
    assert [(q.id, q.gold) for q in first.queries] == [("9001", "comedy"), ("9002", "romance")]
    assert all(q.profile_ids == {"1", "2", "3"} and q.before is None for q in first.queries)
    assert [it.id for it in first.recent_interactions(2)] == ["2", "3"]
    assert users[1].queries[0].gold == "sci-fi"
    assert load_oppu(hpath, lpath, task="movie_tagging")[1].items[1].label == "dystopia"


def test_oppu_errors_name_file_id_field(tmp_path: Path) -> None:
    hpath, lpath = oppu_files(tmp_path)
    with pytest.raises(DataError, match="task='LaMP_2N'") as exc:
        load_oppu(hpath, lpath, task="news_categorize")
    assert_names(exc, lpath, None, "task")
    labels = json.loads(lpath.read_text())
    labels["golds"].pop()
    write_json(lpath, labels)
    with pytest.raises(DataError, match="no gold") as exc:
        load_oppu(hpath, lpath)
    assert_names(exc, lpath, "9003", "output")


def test_oppu_inline_golds_without_label_file(tmp_path: Path) -> None:
    """user_others.json carries query["gold"] and has no label file."""
    history = [{"user_id": "7", "profile": [{"id": "r1", "text": "ok", "score": "3"}],
                "query": [{"id": "1", "input": REVIEW + "a", "gold": "4"}, {"id": "2", "input": REVIEW + "b",
                                                                            "gold": 2}]}]
    hpath = write_json(tmp_path / "user_others.json", history)
    (user,) = load_oppu(hpath, None, task="product_rating")
    assert [q.gold for q in user.queries] == ["4", "2"]
    del history[0]["query"][1]["gold"]
    write_json(hpath, history)
    with pytest.raises(DataError, match="missing") as exc:
        load_oppu(hpath, None, task="LaMP_3")
    assert_names(exc, hpath, "2", "gold")


def test_a_missing_dataset_folder_names_the_files_it_expected(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="test_questions.json") as exc:
        load_dataset(tmp_path / "absent", split="test")
    assert "{split}" not in str(exc.value)
