"""One compile configuration, the same value on threads and on Ray."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from persona_dspy import CompileConfig
from persona_dspy.jobs.compile import compile_users, program_path
from persona_dspy.jobs.distributed import MemorySpec, compile_on_ray
from persona_dspy.lm.config import lm_config
from persona_dspy.programs import program_state
from persona_dspy.testing.offline_lm import offline_lm


@pytest.fixture(scope="module")
def lamp3(sample_memory):
    return sample_memory("LaMP_3")


def test_settings_by_name_make_or_change_one_config(tmp_path):
    config = CompileConfig.of(out_dir=str(tmp_path), workers=2, k=3, iterations=1, users=["a", "b"])
    assert config.out_dir == tmp_path and config.users == ("a", "b") and config.workers == 2
    assert config.aligner_settings == {"iterations": 1}
    assert config.settings == {"mode": "demos", "k": 3, "n_recent": config.n_recent, "iterations": 1}
    changed = config.copy(batch_size=2, force=True)
    assert changed.aligner_settings == {"iterations": 1, "batch_size": 2} and changed.force and not config.force
    assert pickle.loads(pickle.dumps(changed)) == changed  # it travels to Ray workers as is
    assert CompileConfig.of(config) is config


@pytest.mark.parametrize(("settings", "message"), [
    ({"workers": 0}, "workers must be >= 1"),
    ({"mode": "chat"}, "mode must be one of demos, rag, react, none"),
    ({"iteratons": 2}, "unknown aligner setting.*iteratons.*known: batch_size, iterations"),
    ({"users": "u1"}, "a list of user ids"),
])
def test_a_setting_that_cannot_work_is_refused_up_front(tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        CompileConfig.of(out_dir=tmp_path, **settings)
    with pytest.raises(TypeError, match="out_dir"):
        CompileConfig.of(workers=2)


def test_a_config_compiles_what_the_same_settings_by_name_compile(lamp3, tmp_path):
    histories, memory = lamp3
    by_name = compile_users(histories[:2], memory=memory, out_dir=tmp_path / "a", lm=offline_lm(), workers=2,
                            iterations=1, progress=False)
    config = CompileConfig(tmp_path / "b", workers=2, aligner_settings={"iterations": 1})
    by_value = compile_users(histories[:2], config, memory=memory, lm=lm_config("offline"), progress=False)
    assert [r.status for r in by_name.results] == [r.status for r in by_value.results] == ["compiled"] * 2
    assert by_name.settings == by_value.settings and by_value.workers == 2
    for history in histories[:2]:
        a, b = (json.loads(Path(program_path(tmp_path / out, history.user_id)).read_text()) for out in "ab")
        assert program_state(a) == program_state(b) and a["metadata"]["persona"] == b["metadata"]["persona"]
        assert a["metadata"]["alignment_settings"] == b["metadata"]["alignment_settings"]


def test_ray_takes_lm_configs_not_lm_objects(tmp_path, lamp3):
    histories, _ = lamp3
    with pytest.raises(TypeError, match="LM objects do not travel"):
        compile_on_ray(histories[:1], CompileConfig(tmp_path), lm=offline_lm(),  # type: ignore[arg-type]
                       memory=MemorySpec("LaMP_3", str(tmp_path / "mem")))
