"""How a compile runs, as one value shared by the threaded ``compile_users`` and ``compile_on_ray``.

Where programs go, the agent (``mode``, ``k``), what each user is aligned on (``n_recent``), the aligner's own
settings, which users, and ``workers`` (threads; on Ray, threads per worker process). The LMs and the memory are
not settings but resources, passed beside it under the same names on both paths (``lm``, ``optimizer_lm``,
``memory``). Frozen and picklable: it travels to Ray workers as is.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

from persona_dspy.agent.persona_agent import DEFAULT_MODE, AgentMode
from persona_dspy.jobs.alignment import DEFAULT_RECENT

MODES = get_args(AgentMode)
NOT_ALIGNER_SETTINGS = ("self", "metric", "task_lm", "optimizer_lm")
"""PersonaAligner's parameters a compile sets itself; every other one may be in ``aligner_settings``."""


@dataclass(frozen=True)
class CompileConfig:
    """One compile's settings (module docstring); ``aligner_settings`` go to PersonaAligner unchanged."""

    out_dir: Path
    mode: AgentMode = DEFAULT_MODE
    k: int = 5
    n_recent: int = DEFAULT_RECENT
    workers: int = 4
    users: tuple[str, ...] | None = None
    force: bool = False
    aligner_settings: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        object.__setattr__(self, "aligner_settings", dict(self.aligner_settings))
        if self.users is not None:
            if isinstance(self.users, str):
                raise ValueError(f"users must be a list of user ids, got the string {self.users!r}")
            object.__setattr__(self, "users", tuple(self.users))
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.k < 1 or self.n_recent < 1:
            raise ValueError(f"k and n_recent must be >= 1, got {self.k} and {self.n_recent}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.aligner_settings:
            known = aligner_settings()
            unknown = set(self.aligner_settings) - set(known)
            if unknown:
                raise ValueError(f"unknown aligner setting(s) {', '.join(sorted(unknown))}; "
                                 f"known: {', '.join(known)}")

    @classmethod
    def of(cls, config: CompileConfig | None = None, **settings: Any) -> CompileConfig:
        """``config`` (or the defaults) with ``settings`` by name: its fields, or the aligner's settings."""
        fields = {f.name for f in dataclasses.fields(cls)}
        own = {key: value for key, value in settings.items() if key in fields}
        aligner = {key: value for key, value in settings.items() if key not in fields}
        if aligner:
            earlier = config.aligner_settings if config is not None else {}
            own["aligner_settings"] = {**earlier, **own.get("aligner_settings", {}), **aligner}
        if config is None:
            if "out_dir" not in own:
                raise TypeError("a compile needs out_dir (or a CompileConfig)")
            return cls(**own)
        return dataclasses.replace(config, **own) if own else config

    @property
    def settings(self) -> dict[str, Any]:
        """What a saved program records as its alignment settings (a change re-aligns it)."""
        return {"mode": self.mode, "k": self.k, "n_recent": self.n_recent, **self.aligner_settings}

    def copy(self, **changes: Any) -> CompileConfig:
        return CompileConfig.of(self, **changes)



def aligner_settings() -> tuple[str, ...]:
    """The settings PersonaAligner takes besides its metric and LMs (read from its signature)."""
    from persona_dspy.optimizers.persona_aligner import PersonaAligner

    names = inspect.signature(PersonaAligner.__init__).parameters
    return tuple(name for name in names if name not in NOT_ALIGNER_SETTINGS)
