"""``tuner.cli.exit_now``: a command's fast exit keeps its exit code and runs its exit hooks."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, body: str) -> subprocess.CompletedProcess:
    script = tmp_path / "driver_script.py"  # not cmd.py: that shadows the stdlib module
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


def test_the_search_driver_imports_no_heavy_extras(tmp_path):
    """The driver's start-up path: neither the evaluator nor the data path imports
    scikit-learn, SciPy or torchvision (0.8-0.9 s each), and Tune's start does not import
    MLflow for its usage tag of the callbacks (0.6 s) unless a tracker already did."""
    proc = _run(tmp_path, """
        import sys
        import tuner.search, tuner.trainable
        import ray.tune
        from ray.air._internal import usage
        from ray.tune import Callback
        import ray.tune.tune as tune_module
        original = usage.tag_callbacks
        heavy = ("sklearn", "scipy", "torchvision", "mlflow", "iterstrat")
        print(sorted({k.split(".")[0] for k in sys.modules if k.split(".")[0] in heavy}))
        with tuner.search.light_callback_usage_tag():
            assert tune_module.air_usage.tag_callbacks is not original  # what tune.run calls
            tune_module.air_usage.tag_callbacks([Callback()])
            print("mlflow" in sys.modules)
        print(usage.tag_callbacks is original)
        """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:3] == ["[]", "False", "True"]
