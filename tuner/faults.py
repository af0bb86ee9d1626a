"""How a search ends when something outside it goes wrong: a full disk, Ctrl-C, a broken state.

* **Atomic files**: :func:`atomic_write` / :func:`atomic_path` write the platform's own files
  (leaderboard, trials, best config, search.json, test metrics) to a temporary name and
  rename it over the old one, so a full disk never leaves a half-written file.
* **Full disk**: :class:`SearchGuard` keeps a small reserve file in the experiment
  directory, released when the search ends so the Optuna study can still be closed, and
  turns any "no space left" error into one line naming the filesystem. A trial never writes
  a checkpoint that would leave less than the reserve's size free (:func:`ensure_room`), so
  a trial retried or still running after the first failure cannot take the room freed for
  Tune's last experiment state.
* **Ctrl-C**: the first SIGINT asks Tune to stop (it saves the experiment state and stops
  the trials); the CLI then exits 130 with the command that resumes. A second SIGINT raises
  ``KeyboardInterrupt`` at once.
* **Study**: when a search ends in any way, Optuna trials still RUNNING are told FAIL with
  the user attribute ``interrupted`` (the reason); a resumed Tune trial continues as a new
  Optuna trial with the same parameters and intermediate values
  (``PrunedAwareOptunaSearch``).
* **Resume**: :func:`check_resumable` refuses Tune state files that are empty or cut off
  (written while the disk was full) with one line, instead of a restore that quietly starts
  over.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shlex
import shutil
import signal
import sqlite3
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from tuner.errors import TunerError

#: a file the search keeps in its directory and deletes when it ends, so the last writes
#: (the Optuna study's final states) find room on a full disk
RESERVE_NAME = ".mlt-reserve"
RESERVE_BYTES = 1 << 20
#: the logger of Tune's experiment-state uploads (Ray 2.60)
SYNC_LOGGER = "ray.train._internal.syncer"
#: exit status of a search stopped by Ctrl-C (128 + SIGINT)
EXIT_INTERRUPTED = 130
#: user attribute of the Optuna trials a search left unfinished (the reason)
INTERRUPTED_ATTR = "interrupted"


#: free space a trial's checkpoint must leave on the experiment's filesystem
TRIAL_HEADROOM_BYTES = RESERVE_BYTES


class DiskFullError(TunerError):
    """The filesystem of the experiment directory ran out of space."""


# -- atomic files ------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path next to ``path``; renamed over it when the block succeeds.

    On any error the temporary file is removed and ``path`` keeps its previous content.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # the data is on disk before the rename
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` atomically (write, then rename)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


# -- full disk ---------------------------------------------------------------------------


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc`` or an exception it was raised from means "no space left"."""
    seen: set[int] = set()
    if isinstance(exc, DiskFullError):
        return True
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if says_disk_full(str(exc)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def says_disk_full(text: str | None) -> bool:
    """Whether an error's text (e.g. a trial's error file) says "no space left"."""
    return bool(text) and ("No space left on device" in text or "database or disk is full" in text)


def mount_point(path: str | Path) -> Path:
    """The mount point of the filesystem holding ``path`` (or its nearest existing parent)."""
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    dev = path.stat().st_dev
    while path != path.parent and path.parent.stat().st_dev == dev:
        path = path.parent
    return path


def ensure_room(directory: str | os.PathLike[str], nbytes: int) -> None:
    """Refuse (``ENOSPC``) a write of ``nbytes`` into ``directory``'s filesystem that would leave
    less than :data:`TRIAL_HEADROOM_BYTES` free.

    Trials call it before each checkpoint: a trial that fills the disk fails *before* it
    writes, and one that Tune retries (or another still running) finds the same limit, so the
    space the search frees at the first failure stays for Tune's last experiment state. A
    storage URI (``s3://...``) or a directory this node does not see is not checked.
    """
    if not directory or "://" in str(directory):
        return
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return
    if free - nbytes < TRIAL_HEADROOM_BYTES:
        raise OSError(errno.ENOSPC, f"No space left on device for a {nbytes:,}-byte checkpoint "
                      f"({free:,} bytes free; {TRIAL_HEADROOM_BYTES:,} are kept for the search's "
                      f"state)", str(directory))


def tree_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes of the files under ``path`` (a checkpoint directory before its upload)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def disk_full_error(exp_dir: Path) -> DiskFullError:
    """The one-line error for a full filesystem under ``exp_dir``."""
    mount = mount_point(exp_dir)
    usage = shutil.disk_usage(mount)
    return DiskFullError(
        f"no space left on the filesystem at {mount} ({usage.free / 2**20:.1f} MiB free of "
        f"{usage.total / 2**20:.1f} MiB) while writing {exp_dir}; free space there (or pass "
        f"--out on a larger filesystem), then run the same command again to resume")


def raise_if_disk_full(results: Any, exp_dir: Path) -> None:
    """Stop with one line when trials of a finished Tune run failed for lack of space."""
    if _seen["disk_full"]:
        raise disk_full_error(exp_dir)
    for result in results:
        if result.error is not None and is_disk_full(result.error):
            raise disk_full_error(exp_dir)


#: set when a trial failed for lack of space during the current search (driver process)
_seen = {"disk_full": False}


def disk_full_callback(exp_dir: Path) -> Any:
    """A Tune callback that ends the run, as Ctrl-C does, at the first trial that failed for
    lack of space: retrying it or starting others only fills the log. It first deletes the
    reserve file so that Tune's last experiment state fits; the unfinished trials stay
    resumable."""
    from ray.tune import Callback

    class _DiskFullStop(Callback):
        def _check(self, trial: Any) -> None:
            if _seen["disk_full"]:
                return
            full = says_disk_full(_trial_error_text(trial))
            if full:
                _seen["disk_full"] = True
                (exp_dir / RESERVE_NAME).unlink(missing_ok=True)
                tune_stop = signal.getsignal(signal.SIGUSR1)  # Tuner.fit's stop handler
                if callable(tune_stop):
                    tune_stop(signal.SIGUSR1, None)

        def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._check(trial)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._check(trial)

    return _DiskFullStop()


def _trial_error_text(trial: Any) -> str | None:
    """The trial's latest error as text. Tune writes it to the driver's local copy of the trial
    directory (``trial.error_file``) before it calls the callbacks, and uploads it to storage
    only later: reading storage (``trial.get_error()``) missed the first failure and let Tune
    retry the trial."""
    for read in (lambda: Path(trial.error_file).read_text(errors="replace"), trial.get_error):
        try:
            text = read()
        except Exception:  # noqa: BLE001 - an unreadable error file decides nothing
            continue
        if text:
            return str(text)
    return None


class _OnceSyncWarning(logging.Filter):
    """Tune retries a failed sync of the experiment state at every step, each time with a
    traceback; after the first one, drop the repeats."""

    seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if "Last sync command failed" not in record.getMessage():
            return True
        first, self.seen = not self.seen, True
        return first


def _reserve(exp_dir: Path) -> Path | None:
    path = exp_dir / RESERVE_NAME
    try:
        with open(path, "wb") as f:
            f.write(b"\0" * RESERVE_BYTES)
    except OSError as exc:
        path.unlink(missing_ok=True)
        if is_disk_full(exc):
            raise disk_full_error(exp_dir) from None
        raise
    return path


# -- Ctrl-C ------------------------------------------------------------------------------


class _DropTuneHints(logging.Filter):
    """Tune's own SIGINT lines (its handler's warning and the ``Tuner.restore`` hint): the
    platform prints its own, with the command that resumes."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return "Tuner.restore(" not in text and "Stop signal received" not in text


class SearchGuard:
    """Context around a search's Tune run: reserve space, Ctrl-C, full disk, study closing.

    ``interrupted`` is true after the block when the first Ctrl-C stopped the run. On exit,
    the study's trials still RUNNING are closed (:func:`close_experiment_study`).
    """

    def __init__(self, exp_dir: Path) -> None:
        self.exp_dir = exp_dir
        self.interrupted = False
        self._reserve: Path | None = None
        self._saved: dict[str, Any] = {}
        self._filter = _DropTuneHints()
        self._sync_filter = _OnceSyncWarning()

    def __enter__(self) -> SearchGuard:
        self._reserve = _reserve(self.exp_dir)
        _seen["disk_full"] = False
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers belong to the main thread; Tune's own then rule
        self._saved = {
            "sigint": signal.getsignal(signal.SIGINT),
            "sigusr1": signal.getsignal(signal.SIGUSR1),
            "env": os.environ.get("TUNE_DISABLE_SIGINT_HANDLER"),
        }
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # ours forwards the first one to Tune
        signal.signal(signal.SIGINT, self._on_sigint)
        logging.getLogger("ray.tune.tune").addFilter(self._filter)
        logging.getLogger(SYNC_LOGGER).addFilter(self._sync_filter)
        return self

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        tune_stop = signal.getsignal(signal.SIGUSR1)  # installed by Tuner.fit while it runs
        if self.interrupted or not callable(tune_stop) or tune_stop is self._saved["sigusr1"]:
            raise KeyboardInterrupt
        self.interrupted = True
        print("\ninterrupted: saving the search state and stopping the trials "
              "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)
        tune_stop(signum, frame)

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> bool:
        if self._saved:
            signal.signal(signal.SIGINT, self._saved["sigint"])
            if self._saved["env"] is None:
                os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
            else:
                os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = self._saved["env"]
            logging.getLogger("ray.tune.tune").removeFilter(self._filter)
            logging.getLogger(SYNC_LOGGER).removeFilter(self._sync_filter)
        if self._reserve is not None:
            self._reserve.unlink(missing_ok=True)  # room for the study's last writes
        full = is_disk_full(exc) or _seen["disk_full"]
        reason = ("disk full" if full else "interrupted" if self.interrupted or
                  isinstance(exc, KeyboardInterrupt) else "failed" if exc else "ended")
        try:
            closed = close_experiment_study(self.exp_dir, reason)
            if closed:
                print(f"note: {closed} unfinished Optuna trial(s) marked FAIL ({reason}); a "
                      f"resumed search continues them as new trials", file=sys.stderr)
        except Exception as close_exc:  # noqa: BLE001 - never hide the search's own error
            first = (str(close_exc).strip().splitlines() or [type(close_exc).__name__])[0]
            print(f"warning: could not close the Optuna study's unfinished trials: "
                  f"{first[:200]}", file=sys.stderr)
        if full:
            raise disk_full_error(self.exp_dir) from None
        return False


def resume_command(argv: Sequence[str], name: str) -> str:
    """The command line that resumes this search: the same one, with ``--name NAME`` added
    when it had neither ``--name`` nor ``--resume`` (a default, timestamped name)."""
    args = list(argv)
    if not any(a.split("=")[0] in ("--name", "--resume") for a in args):
        args += ["--name", name]
    return "python -m tuner.search " + shlex.join(args)


# -- the study and Tune's state ----------------------------------------------------------


def close_study(storage: Any, study_name: str, reason: str) -> int:
    """Tell FAIL every Optuna trial still RUNNING, with user attribute ``interrupted``.

    Returns how many were closed. A resumed search continues such a trial as a new Optuna
    trial with the same parameters (``PrunedAwareOptunaSearch``).
    """
    import optuna
    from optuna.trial import TrialState

    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:  # the search stopped before its searcher created the study
        return 0
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in running:
        storage.set_trial_user_attr(trial._trial_id, INTERRUPTED_ATTR, reason)
        storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    return len(running)


def close_experiment_study(exp_dir: Path, reason: str) -> int:
    """:func:`close_study` on the experiment's ``optuna.db`` (named after the directory)."""
    from tuner.optuna_search import sqlite_storage

    db = exp_dir / "optuna.db"
    if not db.is_file():
        return 0
    return close_study(sqlite_storage(db), exp_dir.name, reason)


def count_running(db: Path, study_name: str) -> int:
    """RUNNING trials of a study, read without writing to the database (for checks)."""
    if not db.is_file():
        return 0
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as con:
        (count,) = con.execute(
            "SELECT COUNT(*) FROM trials JOIN studies USING (study_id) "
            "WHERE studies.study_name = ? AND trials.state = 'RUNNING'", (study_name,)
        ).fetchone()
    return int(count)


def _broken(path: Path) -> str | None:
    """Why a Tune state file cannot be read back, or None when it looks whole."""
    data = path.read_bytes()
    if not data:
        return "empty (0 bytes)"
    if data[:1] == b"\x80":  # a pickle (search_gen_state-*.json is one too): ends with STOP
        return None if data.endswith(b".") else f"cut off ({len(data)} bytes, an incomplete pickle)"
    try:
        json.loads(data)
    except ValueError:
        return f"cut off ({len(data)} bytes, not valid JSON)"
    return None


def check_resumable(exp_dir: Path) -> None:
    """Refuse (one line) to resume from Tune state files that are empty or cut off.

    Tune copies its experiment state into the experiment directory without a temporary
    file (Ray 2.60), so a full disk leaves them truncated; a restore from them would start
    the search over without saying so.
    """
    states = sorted(exp_dir.glob("experiment_state-*.json"))
    if not states:
        return
    session = states[-1].name[len("experiment_state-"):-len(".json")]
    for name in (states[-1].name, f"searcher-state-{session}.pkl",
                 f"search_gen_state-{session}.json"):
        path = exp_dir / name
        why = _broken(path) if path.is_file() else None
        if why:
            raise TunerError(
                f"cannot resume {exp_dir}: Tune's state file {name} is {why}, probably "
                f"written while the disk was full; its finished trials stay in "
                f"{exp_dir.name}/ (trial directories, optuna.db); start a new search with "
                f"another --name")
