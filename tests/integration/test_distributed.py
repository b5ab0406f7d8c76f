"""compile on a local Ray cluster: the same programs as the threads, a worker killed mid-run, a dead model server.

One cluster of 2 CPUs serves the session (``ray_cluster`` in conftest); every test skips, saying why, without Ray.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from loopback_server import LoopbackServer, loopback_fixture

from persona_dspy.cli import main
from persona_dspy.data.lamp import dataset_dir, load_dataset
from persona_dspy.jobs.compile import compile_users, program_path
from persona_dspy.jobs.distributed import MemorySpec, batch_size, compile_on_ray
from persona_dspy.lm.build import build_lm
from persona_dspy.lm.config import lm_config
from persona_dspy.memory.episodic import EpisodicMemory
from persona_dspy.programs import load_program, program_state

pytestmark = pytest.mark.usefixtures("ray_cluster")
server = loopback_fixture()


def program(out: Path, user: str) -> dict:
    """What must not differ between two runs: the program state, persona, scores and how alignment went."""
    document = json.loads(program_path(out, user).read_text())
    meta = document["metadata"]
    alignment = {key: value for key, value in meta["alignment"].items() if key != "seconds"}
    return {"state": program_state(document), "persona": meta["persona"], "dev_scores": meta["dev_scores"],
            "alignment": alignment, "trainset": meta["trainset"], "started_from": meta["started_from"]}


def test_ray_compiles_the_same_programs_as_threads(server, tmp_path, capsys):
    histories = load_dataset(dataset_dir("LaMP_3"))[:4]
    server.reset()
    lm = build_lm("openai/test-model", server.api_base, num_retries=0)
    with EpisodicMemory.for_task("LaMP_3", tmp_path / "mem-threads") as memory:
        memory.add_histories(histories)
        threaded = compile_users(histories, memory=memory, out_dir=tmp_path / "threads", lm=lm, workers=2,
                                 progress=False, iterations=1)
    assert threaded.count("compiled") == 4
    argv = ["compile", "--task", "LaMP_3", "--max-users", "4", "--iterations", "1", "--lm", "openai/test-model",
            "--api-base", server.api_base, "--retries", "0", "--memory", str(tmp_path / "mem-ray"),
            "--out", str(tmp_path / "ray"), "--workers", "2", "--ray", "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "compiled 4" in printed and "on Ray (local): 2 processes x 2 threads" in printed
    for history in histories:
        assert program(tmp_path / "ray", history.user_id) == program(tmp_path / "threads", history.user_id)
    summary = json.loads((tmp_path / "ray" / "compile_summary.json").read_text())
    assert summary["compiled"] == 4 and summary["cluster"]["processes"] == 2
    assert summary["lm_calls"] == threaded.lm_calls  # the same calls, made in other processes
    assert main(argv) == 0  # a rerun on the cluster: every program is current
    assert "skipped (current) 4" in capsys.readouterr().out


def _ray_workers_running(name: str) -> list[int]:
    """Pids of processes Ray titled ``ray::<name>`` (a worker while it runs that task)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(f"ray::{name}".encode()):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def test_a_worker_killed_mid_run_loses_no_program_and_its_users_are_retried(tmp_path):
    if not Path("/proc/self/cmdline").exists():
        pytest.skip("finding Ray's worker processes reads /proc (Linux)")
    histories = load_dataset(dataset_dir("LaMP_3"))[:6]
    out = tmp_path / "programs"
    killed: dict[str, object] = {}

    def kill_a_worker() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            written = sorted(out.glob("*.json"))
            workers = _ray_workers_running("compile_batch")
            if written and workers:
                killed["programs"] = {path.name: path.read_bytes() for path in written}
                os.kill(workers[0], signal.SIGKILL)
                killed["pid"] = workers[0]
                return
            time.sleep(0.05)

    with LoopbackServer(latency=0.1) as slow:
        killer = threading.Thread(target=kill_a_worker, daemon=True)
        killer.start()
        summary = compile_on_ray(histories, out_dir=out, lm=lm_config("openai/test-model", slow.api_base),
                                 memory=MemorySpec("LaMP_3", str(tmp_path / "mem")), workers=1, batch=3,
                                 progress=False, iterations=1)
        killer.join(timeout=5)
    assert "pid" in killed, "no worker was caught running a batch"
    assert summary.count("failed") == 0, [r.error for r in summary.results if r.error]
    assert summary.count("compiled") == 6  # those the dead worker wrote too, read back from their files
    for name, content in killed["programs"].items():  # what was written before the kill is there, untouched
        assert (out / name).read_bytes() == content
    with EpisodicMemory.for_task("LaMP_3", tmp_path / "mem") as memory:
        for history in histories:
            load_program(program_path(out, history.user_id), memory, user_id=history.user_id, task="LaMP_3")
    again = compile_on_ray(histories, out_dir=out, lm=lm_config("offline"),
                           memory=MemorySpec("LaMP_3", str(tmp_path / "mem")), workers=1, progress=False,
                           iterations=1)
    assert again.count("skipped") == 6  # a rerun finds every user done


def test_a_dead_model_server_does_not_stop_the_run(server, tmp_path):
    histories = load_dataset(dataset_dir("LaMP_3"))[:2]
    pool = f"{server.api_base},http://127.0.0.1:9/v1"  # nothing listens on port 9
    summary = compile_on_ray(histories, out_dir=tmp_path / "programs",
                             lm=lm_config("openai/test-model", pool, num_retries=1, timeout=10),
                             memory=MemorySpec("LaMP_3", str(tmp_path / "mem")), workers=2, progress=False,
                             iterations=1)
    assert summary.count("compiled") == 2, [r.error for r in summary.results]
    assert summary.lm["servers"] == [server.api_base, "http://127.0.0.1:9/v1"]


def test_batches_follow_the_measured_time_per_user():
    assert batch_size(4, None, 100, 2) == 8  # unmeasured: two users per thread
    assert batch_size(4, 2.0, 1000, 2, target=20.0) == 40  # 10 rounds of 4 threads fill 20 s
    assert batch_size(4, 2.0, 30, 2, target=20.0) == 15  # never more than an even share of what is left
    assert batch_size(4, 60.0, 100, 2, target=20.0) == 4  # a slow user: still one per thread
    assert batch_size(4, 2.0, 6, 2) == 4  # the tail: a thread each rather than half-empty tasks
    assert batch_size(4, 2.0, 1, 2) == 1 and batch_size(4, 2.0, 0, 2) == 0


def test_a_memory_of_one_process_cannot_be_shared(tmp_path):
    with pytest.raises(ValueError, match="':memory:' lives in one process"):
        MemorySpec("LaMP_3", ":memory:")
    histories = load_dataset(dataset_dir("LaMP_3"))[:1]
    with EpisodicMemory.for_task("LaMP_3", tmp_path / "mem"):  # this process holds the folder alone
        with pytest.raises(ValueError, match="open for itself; close it before compiling on Ray"):
            compile_on_ray(histories, out_dir=tmp_path / "out", lm=lm_config("offline"),
                           memory=MemorySpec("LaMP_3", str(tmp_path / "mem")), progress=False)
