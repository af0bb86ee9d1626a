"""python -m tuner.dashboard EXPERIMENT_DIR: an experiment's Optuna study in optuna-dashboard.

Finds ``EXPERIMENT_DIR/optuna.db`` and the study in it (named after the directory, as
``python -m tuner.search`` names it; a renamed directory whose database holds a single study
uses that one), then serves optuna-dashboard (history, per-epoch intermediate values, PRUNED
trials, parallel coordinates, importance) on ``http://127.0.0.1:8080`` until Ctrl-C
(``--port``; ``0`` picks a free port; the URL is printed first). It works during a search too.

Needs the ``dashboard`` extra (``pip install -e '.[dashboard]'``, part of ``dev``). The
dashboard can also rename or delete studies and tell trials, so it listens on the loopback
address unless ``--host`` says otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sqlite3
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from tuner.cli import run_cli
from tuner.errors import ConfigError, DataError

__all__ = ["find_study", "main", "serve"]

LOOPBACK = ("127.0.0.1", "localhost")


def find_study(experiment: str | Path) -> tuple[Path, int, str]:
    """``(optuna.db, study id, study name)`` of an experiment directory.

    The database is only read here (SQLite read-only mode), so a directory that is not an
    experiment is refused without a file being created or changed.
    """
    exp = Path(experiment)
    hint = "pass the directory that python -m tuner.search printed (experiments/NAME)"
    if not exp.is_dir():
        raise DataError(f"experiment directory {exp} does not exist; {hint}")
    db = exp / "optuna.db"
    if not db.is_file():
        raise DataError(f"{exp} is not an experiment directory (no optuna.db in it); {hint}")
    try:
        uri = f"{db.resolve().as_uri()}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as con:
            studies = con.execute("SELECT study_id, study_name FROM studies ORDER BY study_id").fetchall()
    except sqlite3.Error as exc:
        raise DataError(f"{db} is not an Optuna study database ({exc}); {hint}") from exc
    named = [(i, n) for i, n in studies if n == exp.name]
    if named or len(studies) == 1:
        study_id, name = (named or studies)[0]
        return db, int(study_id), str(name)
    raise DataError(f"{db} holds {len(studies)} studies ({', '.join(n for _, n in studies) or 'none'}) "
                    f"and none is named {exp.name!r}; {hint}")


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - base signature
        """No line per request (the dashboard polls every few seconds)."""


def serve(db: Path, host: str = "127.0.0.1", port: int = 8080) -> WSGIServer:
    """optuna-dashboard's WSGI app over ``db``, bound to ``host:port`` (not yet serving).

    ``server.serve_forever()`` serves it (as ``optuna_dashboard.run_server`` does, with the
    standard library's single-threaded WSGI server); ``server.server_port`` is the port.
    """
    try:
        import optuna_dashboard
    except ImportError as exc:
        raise ConfigError("optuna-dashboard is not installed; install the extra: "
                          "pip install -e '.[dashboard]' (or pip install optuna-dashboard)") from exc
    from tuner.optuna_search import sqlite_storage

    try:
        app = optuna_dashboard.wsgi(sqlite_storage(db))
    except RuntimeError as exc:  # a database of another Optuna schema version
        raise DataError(f"{db} cannot be opened by this Optuna ({exc})") from exc
    try:
        return make_server(host, port, app, handler_class=_QuietHandler)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); "
                          "pass another --port (0 = any free port)") from exc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tuner.dashboard", description=__doc__.split("\n")[0])
    p.add_argument("experiment", help="experiment directory written by python -m tuner.search")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 = any free port)")
    return p


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port} is not a port number; use 0..65535 (0 = any free port)")
    db, study_id, name = find_study(args.experiment)
    server = serve(db, args.host, args.port)
    url_host = "127.0.0.1" if args.host in ("", "0.0.0.0") else args.host
    print(f"optuna-dashboard for study {name!r} at "
          f"http://{url_host}:{server.server_port}/dashboard/studies/{study_id} (Ctrl-C stops it)",
          flush=True)
    if args.host not in LOOPBACK:
        print(f"warning: listening on {args.host}: anyone who reaches this port can rename or "
              "delete the study", file=sys.stderr, flush=True)
    # The server runs in a thread and Ctrl-C reaches this one: a KeyboardInterrupt raised
    # inside a request is caught by wsgiref's handler (it logs it and serves on), so with
    # serve_forever() in the main thread a Ctrl-C during a request was lost.
    # a process started in the background (nohup, `cmd &` in a script) inherits SIGINT
    # ignored, and Python then never raises KeyboardInterrupt: Ctrl-C / SIGINT must stop it
    signal.signal(signal.SIGINT, signal.default_int_handler)
    thread = threading.Thread(target=server.serve_forever, name="dashboard", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.5)
    except KeyboardInterrupt:
        print("dashboard stopped", flush=True)
    finally:
        stopper = threading.Thread(target=server.shutdown, daemon=True)
        stopper.start()
        stopper.join(5)  # a request stuck on a dead client does not hold the exit
        server.server_close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
