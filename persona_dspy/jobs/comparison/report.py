"""A comparison's results: per user, per optimizer, pooled; as a table, JSON, CSV and a plot."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from persona_dspy.evaluation.output_counts import counts_line, invalid_warning
from persona_dspy.evaluation.tables import format_table
from persona_dspy.files import write_atomically

VALIDATION_NOTE = (
    "validation slice = the trainset (the user's n_recent latest interactions). With 3 interactions there is no "
    "room for a disjoint slice: any split leaves 1-2 examples to train or to select on. Older interactions as a "
    "separate slice would select on staler preferences than the test queries follow, and PersonaAligner, GEPA and "
    "COPRO use the trainset for selection by default anyway. So val scores are in-sample (demo optimizers even "
    "show the val answers in the prompt); the held-out test queries are the comparison."
)
GUARD_NOTE = (
    "every persona an optimizer proposes passes PersonaGuard (role and rules from the template, injected lines "
    "dropped from the summary, word cap): the aligner's candidates and GEPA's proposals as they are made, every "
    "result (MIPROv2, COPRO, ...) after compile; guard_interventions counts the personas it had to change"
)
FAILED_PREDICTION_NOTE = (
    "a test or validation query whose program raised is scored as an empty answer (LaMP's penalty for an "
    "unusable prediction) and counted in prediction_errors; a user whose every test query raised is a failure"
)


@dataclass
class UserRun:
    """One optimizer on one user: the data it got, its scores, its cost, or where and why it failed."""

    optimizer: str
    user_id: str
    status: str  # ok | failed
    trainset_ids: list[str]
    valset_ids: list[str]
    test_ids: list[str]
    stage: str | None = None  # initial_persona | compile | test | validation, for failures
    error_type: str | None = None
    error: str | None = None
    test: dict[str, float] = field(default_factory=dict)
    val: dict[str, float] = field(default_factory=dict)
    test_predictions: list[dict[str, Any]] = field(default_factory=list)
    val_predictions: list[dict[str, Any]] = field(default_factory=list)
    prediction_errors: int = 0
    compile_usage: dict[str, Any] = field(default_factory=dict)
    eval_usage: dict[str, Any] = field(default_factory=dict)
    compile_seconds: float = 0.0
    eval_seconds: float = 0.0
    instructions: str | None = None
    n_demos: int = 0
    guard_interventions: int = 0
    details: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    """OutputStats.snapshot() of the compile and the scoring (calls, truncations, invalid outputs by step)."""

    @property
    def compile_calls(self) -> int:
        return int(self.compile_usage.get("calls", 0))

    @property
    def eval_calls(self) -> int:
        return int(self.eval_usage.get("calls", 0))


@dataclass
class OptimizerResult:
    """One optimizer over all users: pooled scores (users that completed), summed costs, failures."""

    name: str
    settings: dict[str, Any]
    status: str  # ok | partial | failed
    error: str | None
    n_users: int
    n_users_scored: int
    test: dict[str, float]
    val: dict[str, float]
    compile_calls: int
    eval_calls: int
    compile_tokens: int
    eval_tokens: int
    compile_seconds: float
    eval_seconds: float
    prediction_errors: int
    failures: list[dict[str, Any]]
    users: list[UserRun]
    guard_interventions: int = 0
    outputs: dict[str, Any] = field(default_factory=dict)
    """Every user's output counts for this optimizer, summed."""

    @property
    def invalid_outputs(self) -> int:
        return sum((self.outputs.get("invalid") or {}).values())

    @property
    def wall_seconds(self) -> float:
        return round(self.compile_seconds + self.eval_seconds, 3)

    def _per_scored_user(self, value: float) -> float | None:
        return value / self.n_users_scored if self.n_users_scored else None

    @property
    def compile_calls_per_user(self) -> float | None:
        """Mean compile LM calls over the users that completed (the initial persona call not included)."""
        return self._per_scored_user(sum(u.compile_calls for u in self.users if u.status == "ok"))

    @property
    def eval_calls_per_user(self) -> float | None:
        return self._per_scored_user(sum(u.eval_calls for u in self.users if u.status == "ok"))


@dataclass
class ComparisonReport:
    """All optimizers on the same users; ``table()`` prints it, ``to_json``/``to_csv`` keep it."""

    task: str
    primary_metric: str
    higher_is_better: bool
    metric_keys: list[str]
    lm: dict[str, Any]
    optimizer_lm: dict[str, Any] | None
    offline: bool
    note: str | None
    n_recent: int
    k: int
    seed: int
    user_ids: list[str]
    users: dict[str, dict[str, Any]]
    persona_usage: dict[str, Any]
    results: list[OptimizerResult]
    wall_seconds: float
    notes: list[str]
    versions: dict[str, str]
    created: str
    output_totals: dict[str, Any] = field(default_factory=dict)
    """Output counts over every optimizer and user, the initial personas included."""

    def result(self, name: str) -> OptimizerResult:
        for result in self.results:
            if result.name == name:
                return result
        raise KeyError(f"no optimizer {name!r} in this report; it has {', '.join(r.name for r in self.results)}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for result, out in zip(self.results, data["results"], strict=True):
            out["wall_seconds"] = result.wall_seconds
            out["compile_calls_per_user"] = result.compile_calls_per_user
            out["eval_calls_per_user"] = result.eval_calls_per_user
        return data

    def to_json(self, path: str | Path) -> Path:
        """Everything, as indented JSON, atomically (parent folders are created); returns the path."""
        text = json.dumps(self.to_dict(), indent=2, ensure_ascii=False, default=_json_value) + "\n"
        return write_atomically(Path(path).expanduser(), text.encode("utf-8"))

    def rows(self) -> list[dict[str, Any]]:
        """One flat row per optimizer (what ``to_csv`` writes)."""
        rows = []
        for r in self.results:
            row: dict[str, Any] = {"optimizer": r.name, "status": r.status, "users": r.n_users,
                                   "users_scored": r.n_users_scored,
                                   "primary_metric": self.primary_metric,
                                   "test_primary": r.test.get(self.primary_metric),
                                   "val_primary": r.val.get(self.primary_metric)}
            row.update({f"test_{key}": r.test.get(key) for key in self.metric_keys})
            row.update({f"val_{key}": r.val.get(key) for key in self.metric_keys})
            row.update({"compile_calls": r.compile_calls, "eval_calls": r.eval_calls,
                        "compile_calls_per_user": r.compile_calls_per_user,
                        "eval_calls_per_user": r.eval_calls_per_user,
                        "initial_persona_calls_per_user": self.persona_calls_per_user(r),
                        "compile_tokens": r.compile_tokens, "eval_tokens": r.eval_tokens,
                        "compile_seconds": r.compile_seconds, "eval_seconds": r.eval_seconds,
                        "wall_seconds": r.wall_seconds, "prediction_errors": r.prediction_errors,
                        "guard_interventions": r.guard_interventions, "failures": len(r.failures),
                        "failure_reasons": r.error or "; ".join(f"{f['user_id']}@{f['stage']}: {f['error_type']}"
                                                                f": {f['error']}" for f in r.failures),
                        "lm": self.lm.get("model"), "offline": self.offline, "note": self.note or ""})
            rows.append(row)
        return rows

    def user_rows(self) -> list[dict[str, Any]]:
        """One flat row per optimizer and user (what ``to_user_csv`` writes)."""
        rows = []
        for r in self.results:
            for u in r.users:
                row: dict[str, Any] = {"optimizer": r.name, "user_id": u.user_id, "status": u.status,
                                       "stage": u.stage or "", "error": f"{u.error_type}: {u.error}" if u.error else ""}
                row.update({f"test_{key}": u.test.get(key) for key in self.metric_keys})
                row.update({f"val_{key}": u.val.get(key) for key in self.metric_keys})
                row.update({"compile_calls": u.compile_calls, "eval_calls": u.eval_calls,
                            "compile_tokens": u.compile_usage.get("total_tokens", 0),
                            "eval_tokens": u.eval_usage.get("total_tokens", 0),
                            "compile_seconds": u.compile_seconds, "eval_seconds": u.eval_seconds,
                            "prediction_errors": u.prediction_errors, "n_demos": u.n_demos,
                            "guard_interventions": u.guard_interventions,
                            "trainset_ids": " ".join(u.trainset_ids), "valset_ids": " ".join(u.valset_ids),
                            "offline": self.offline})
                rows.append(row)
        return rows

    def to_csv(self, path: str | Path) -> Path:
        """One row per optimizer; returns the path."""
        return _write_csv(path, self.rows())

    def to_user_csv(self, path: str | Path) -> Path:
        """One row per optimizer and user; returns the path."""
        return _write_csv(path, self.user_rows())

    def save(self, folder: str | Path, stem: str = "comparison") -> dict[str, Path]:
        """``<stem>.json``, ``<stem>.csv`` and ``<stem>_users.csv`` in ``folder``."""
        base = Path(folder).expanduser()
        return {"json": self.to_json(base / f"{stem}.json"), "csv": self.to_csv(base / f"{stem}.csv"),
                "users_csv": self.to_user_csv(base / f"{stem}_users.csv")}

    def persona_calls_per_user(self, result: OptimizerResult) -> float:
        """The initial persona's calls per user, for an optimizer that starts from it (0 for the others)."""
        if result.settings.get("start") != "initial" or not self.users:
            return 0.0
        return self.persona_usage.get("calls", 0) / len(self.users)

    def table(self) -> str:
        """A printable table: one row per optimizer, then the shared costs and any failures."""
        direction = "higher" if self.higher_is_better else "lower"
        header = ["optimizer", "users", *(f"test {k}" for k in self.metric_keys),
                  *(f"val {k}" for k in self.metric_keys), "compile/user", "eval/user", "tokens", "seconds", "guarded",
                  "invalid", "status"]
        rows = [{"optimizer": r.name, "users": f"{r.n_users_scored}/{r.n_users}",
                 **{f"test {k}": r.test.get(k) for k in self.metric_keys},
                 **{f"val {k}": r.val.get(k) for k in self.metric_keys},
                 "compile/user": r.compile_calls_per_user, "eval/user": r.eval_calls_per_user,
                 "tokens": r.compile_tokens + r.eval_tokens, "seconds": r.wall_seconds,
                 "guarded": r.guard_interventions, "invalid": r.invalid_outputs, "status": r.status}
                for r in self.results]
        table = format_table(rows, header, digits=4, formats={"compile/user": ".1f", "eval/user": ".1f",
                                                              "seconds": ".2f"},
                             missing="-", align_numbers_right=True, rule=True)

        lm_text = f"{self.lm.get('model')}" + (f" @ {self.lm['api_base']}" if self.lm.get("api_base") else "")
        if self.optimizer_lm:
            lm_text += f"  optimizer_lm={self.optimizer_lm.get('model')}"
        out = [f"{self.task}: {len(self.user_ids)} users, trainset = {self.n_recent} latest interactions, "
               f"validation slice = trainset; lm={lm_text}; primary={self.primary_metric} ({direction} is better)"]
        if self.note:
            out.append(f"NOTE: {self.note}")
        out.append(table)
        out.append(f"LM calls per user: compile and eval (test + validation) counted apart; the initial persona "
                   f"({self.persona_usage.get('calls', 0)} calls in all) is shared by every optimizer starting from "
                   "it and counted in neither. Scores pool the users that completed. guarded: personas the guard "
                   "had to change (injected lines, rules, length); invalid: model outputs rejected by validation.")
        if self.output_totals:
            out.append(counts_line(self.output_totals))
            warning = invalid_warning(self.output_totals)
            if warning:
                out.append(f"WARNING: {warning}")
        for r in self.results:
            if r.error:
                out.append(f"FAILED {r.name}: {r.error}")
            for failure in r.failures:
                out.append(f"FAILED {r.name} on {failure['user_id']} at {failure['stage']}: "
                           f"{failure['error_type']}: {failure['error']}")
        return "\n".join(out)


def _json_value(value: Any) -> Any:
    """Numbers an optimizer reports as numpy scalars stay numbers; anything else becomes its text."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def _write_csv(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    """Rows as CSV, written atomically like the JSON report (parent folders are created)."""
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["optimizer"])
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    return write_atomically(Path(path).expanduser(), buffer.getvalue().encode("utf-8"))


def plot_score_vs_calls(report: ComparisonReport, path: str | Path | None = None, *,
                        split: Literal["test", "val"] = "test") -> Any:
    """Primary score against LM calls per user spent to get the program (initial persona + compile).

    Returns a matplotlib Figure (built without pyplot, so no backend state changes); saves a PNG when ``path``
    is given. Evaluation calls are left out: they are the same few per user for every optimizer.
    """
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.5, 4.8), layout="constrained")
    axes = figure.add_subplot()
    for index, result in enumerate(report.results):
        score = (result.test if split == "test" else result.val).get(report.primary_metric)
        if score is None or result.compile_calls_per_user is None:
            continue
        calls = result.compile_calls_per_user + report.persona_calls_per_user(result)
        axes.scatter([calls], [score], s=60)
        # alternate label sides: optimizers with equal scores and similar costs would print over each other
        axes.annotate(result.name, (calls, score), textcoords="offset points", fontsize=9,
                      xytext=(6, 6) if index % 2 == 0 else (6, -14))
    direction = "higher" if report.higher_is_better else "lower"
    axes.set_xlabel("LM calls per user to build the program (initial persona + compile)")
    axes.set_ylabel(f"{split} {report.primary_metric} ({direction} is better)")
    title = f"{report.task}: {len(report.user_ids)} users, lm={report.lm.get('model')}"
    if report.offline:
        title += "\noffline stand-in: a plumbing check, not a model's score"
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    if path is not None:
        target = Path(path).expanduser()
        target.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(target, dpi=120)
    return figure
