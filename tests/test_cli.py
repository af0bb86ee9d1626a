"""``tuner.cli.exit_now``: a command's fast exit keeps its exit code and runs its exit hooks."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, body: str) -> subprocess.CompletedProcess:
    script = tmp_path / "cmd.py"
    script.write_text(textwrap.dedent(body))
    return subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def test_exit_now_runs_atexit_hooks_flushes_output_and_keeps_the_code(tmp_path):
    out = tmp_path / "hook.txt"
    proc = _run(tmp_path, f"""
        import atexit, sys
        from tuner.cli import exit_now
        atexit.register(lambda: open({str(out)!r}, "w").write("ran"))
        sys.stdout.write("unflushed line")  # no newline: left in the buffer of a pipe
        exit_now(3)
        """)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "unflushed line"
    assert out.read_text() == "ran"


def test_exit_now_waits_for_a_writing_thread(tmp_path):
    out = tmp_path / "thread.txt"
    proc = _run(tmp_path, f"""
        import threading, time
        from tuner.cli import exit_now
        def write():
            time.sleep(0.5)
            open({str(out)!r}, "w").write("done")
        threading.Thread(target=write).start()  # not a daemon: the exit must wait for it
        exit_now(0)
        """)
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() == "done"
