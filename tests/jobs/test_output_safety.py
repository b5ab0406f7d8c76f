"""compile fails loudly and early: unwritable output before any LM call, a later write failure per user, an LM
error never producing a "compiled" program, and temp files of a killed write removed by the next run."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from collections import namedtuple
from pathlib import Path

import dspy
import pytest
from loopback_server import loopback_fixture
from persona_dspy.optimizers.persona_aligner import AlignmentError

from persona_dspy import files
from persona_dspy.cli import main
from persona_dspy.files import UnwritableOutputError
from persona_dspy.jobs.compile import SUMMARY_FILE, compile_users, program_path
from persona_dspy.lm import config as lm_module
from persona_dspy.programs import remove_stale_temps
from persona_dspy.testing.offline_lm import OfflineEngine, offline_lm

REPO = Path(__file__).resolve().parents[2]
LAMP3_USER = "A1L7M2JXN4EZCR"

server = loopback_fixture()


@pytest.fixture(scope="module")
def lamp3(sample_memory):
    return sample_memory("LaMP_3", 2)


def _set_read_only(path: Path, on: bool) -> None:
    if os.geteuid() == 0:  # root writes through permission bits; the immutable flag stops it
        subprocess.run(["chattr", "+i" if on else "-i", str(path)], check=True, capture_output=True)
    else:
        path.chmod(0o555 if on else 0o755)


@contextlib.contextmanager
def read_only(path: Path):
    """``path`` as a folder nothing can be created in (skips where the file system cannot do that)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0 and shutil.which("chattr") is None:
        pytest.skip("running as root without chattr: no way to make a folder read-only")
    try:
        _set_read_only(path, True)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"chattr +i is not supported here: {exc.stderr!r}")
    try:
        try:
            (path / "probe").write_text("x")
        except OSError:
            yield path
            return
        pytest.skip("this file system lets writes through a read-only folder")
    finally:
        _set_read_only(path, False)


@pytest.mark.parametrize(("where", "message"), [("", "cannot write in the output folder"),
                                                ("missing/programs", "cannot create the output folder")])
def test_an_unwritable_programs_folder_fails_before_any_lm_call(lamp3, tmp_path, where, message):
    histories, memory = lamp3
    lm = offline_lm()
    with read_only(tmp_path / "ro") as folder, pytest.raises(UnwritableOutputError, match=message):
        compile_users(histories, memory=memory, out_dir=folder / where, lm=lm, progress=False)
    assert lm.engine.calls == 0


def test_a_full_disk_fails_before_any_lm_call(lamp3, tmp_path, monkeypatch):
    histories, memory = lamp3
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(files.shutil, "disk_usage", lambda path: usage(10 << 30, (10 << 30) - 4096, 4096))
    lm = offline_lm()
    with pytest.raises(UnwritableOutputError, match="has 4096 bytes free"):
        compile_users(histories, memory=memory, out_dir=tmp_path / "programs", lm=lm, progress=False)
    assert lm.engine.calls == 0


def test_cli_reports_an_unwritable_folder_on_one_line_with_exit_2(tmp_path, monkeypatch, capsys, server):
    for name in vars(lm_module):
        if name.startswith("ENV_"):
            monkeypatch.delenv(getattr(lm_module, name), raising=False)
    monkeypatch.setenv("PERSONA_DSPY_HOME", str(tmp_path / "home"))
    server.reset()
    with read_only(tmp_path / "ro") as folder:
        code = main(["compile", "--task", "LaMP_3", "--lm", "openai/test-model", "--api-base", server.api_base,
                     "--memory", ":memory:", "--out", str(folder), "--no-progress", "--users", LAMP3_USER])
    _, err = capsys.readouterr()
    assert code == 2
    assert err.startswith("persona-dspy: error: cannot write in the output folder") and err.count("\n") == 1, err
    assert server.stats()["chat_requests"] == 0


class TurnsReadOnly(OfflineEngine):
    """A server whose first answer comes as the programs folder turns read-only (a remount, a full quota)."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = folder
        self.locked = False

    def complete(self, request):
        if not self.locked:
            _set_read_only(self.folder, True)
            self.locked = True
        return super().complete(request)


def test_a_write_that_fails_later_fails_each_user_with_its_reason(lamp3, tmp_path):
    histories, memory = lamp3
    out = tmp_path / "programs"
    with read_only(tmp_path / "check"):  # skips where a folder cannot be made read-only
        pass
    engine = TurnsReadOnly(out)
    lm = dspy.LM("offline/turns-read-only", engine=engine, cache=False, num_retries=0)
    try:
        summary = compile_users(histories, memory=memory, out_dir=out, lm=lm, workers=1, progress=False)
    finally:
        _set_read_only(out, False)
    assert engine.locked and summary.count("failed") == len(histories)
    for result in summary.results:
        assert result.error.startswith("OSError: cannot save the program to ") and result.lm_calls > 0
    assert summary.summary_error and SUMMARY_FILE in summary.summary_error
    assert "summary not written" in summary.table() and not list(out.glob("*.json"))


_QUERY = re.compile(r"\[\[ ## query ## \]\]\n(.*?)(?:\n\[\[ ## |\Z)", re.S)


class FailsOnOneItem(OfflineEngine):
    """A server that errors when asked to answer one interaction (``times`` times, then answers; -1: always)."""

    def __init__(self, marker: str, times: int = -1) -> None:
        super().__init__()
        self.marker = marker
        self.times = times
        self.failures = 0

    def complete(self, request):
        asked = _QUERY.findall("\n".join(m.text or "" for m in request.messages))  # demonstrations come first
        if asked and self.marker in asked[-1] and self.times != 0:
            self.times -= 1
            self.failures += 1
            raise RuntimeError("server error 500 while answering")
        return super().complete(request)


def test_an_lm_error_on_an_alignment_item_never_produces_a_compiled_program(lamp3, tmp_path):
    histories, memory = lamp3
    victim = histories[0]
    marker = victim.recent_interactions(2)[-1].fields["text"][:40]
    first = compile_users([victim], memory=memory, out_dir=tmp_path, lm=offline_lm(), n_recent=2, progress=False)
    assert first.results[0].status == "compiled"
    path = program_path(tmp_path, victim.user_id)
    saved = path.read_bytes()

    broken = FailsOnOneItem(marker)
    lm = dspy.LM("offline/broken", engine=broken, cache=False, num_retries=0)
    failed = compile_users([victim], memory=memory, out_dir=tmp_path, lm=lm, n_recent=3, progress=False)
    [result] = failed.results
    assert result.status == "failed" and result.error.startswith(AlignmentError.__name__), result.error
    assert "after 2 attempt(s)" in result.error and broken.failures == 2  # retried once, then failed
    assert path.read_bytes() == saved  # the old program is kept, not replaced by one scored on a missing answer

    again = compile_users([victim], memory=memory, out_dir=tmp_path, lm=offline_lm(), n_recent=3, progress=False)
    assert again.results[0].status == "realigned"  # not taken as current: the next run aligns it again


def test_a_transient_lm_error_is_retried(lamp3, tmp_path):
    histories, memory = lamp3
    victim = histories[1]
    flaky = FailsOnOneItem(victim.recent_interactions(3)[-1].fields["text"][:40], times=1)
    lm = dspy.LM("offline/flaky", engine=flaky, cache=False, num_retries=0)
    summary = compile_users([victim], memory=memory, out_dir=tmp_path, lm=lm, progress=False)
    assert summary.results[0].status == "compiled" and flaky.failures == 1


STUCK_WRITER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from persona_dspy import files

    def stuck(fd):  # the data is in the temp file; the writer dies before fsync and rename
        print("IN WRITE", flush=True)
        time.sleep(120)

    os.fsync = stuck
    files.write_atomically(Path(sys.argv[1]), b"{" * 200000)
""")


def _killed_mid_write(target: Path) -> Path:
    """Run a writer of ``target``, kill -9 it inside the write, and return the temp file it left."""
    proc = subprocess.Popen([sys.executable, "-c", STUCK_WRITER, str(target)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "IN WRITE", proc.stderr.read()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    [left] = [p for p in target.parent.iterdir() if p.name.endswith(".tmp")]
    assert f"pid{proc.pid}@" in left.name and left.stat().st_size == 200000
    return left


def test_temp_files_of_a_killed_write_are_removed_by_the_next_run(lamp3, tmp_path):
    histories, memory = lamp3
    out = tmp_path / "programs"
    stale = [_killed_mid_write(out / "alice.json"),
             _killed_mid_write(out / "alice.json.versions" / "20250101T120000.000000Z.json")]
    live_writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = out / re.sub(r"pid\d+@", f"pid{live_writer.pid}@", stale[0].name)
        live.write_bytes(b"being written")  # a live process's write in progress: never touched
        summary = compile_users(histories[:1], memory=memory, out_dir=out, lm=offline_lm(), progress=False)
        assert summary.count("compiled") == 1
        assert not any(path.exists() for path in stale) and live.exists()
        assert sorted(p.name for p in out.rglob("*.tmp")) == [live.name]
    finally:
        live_writer.kill()
        live_writer.wait(timeout=30)
    assert remove_stale_temps(out) == [live] and not list(out.rglob("*.tmp"))
