"""What happens when a search re-uses an experiment directory (``--name`` again, ``--resume``).

A search writes ``experiment.json`` into its directory before its first trial: the method and
the resolved space (label view, train and method domains or constants, ASHA budget, search
settings), flattened to ``section.key`` -> value; its fingerprint. Once the search has run to its
end (every trial finished or failed) the record gets ``finished``. A later search into the
same directory:

* continues it only when its fingerprint is the same; otherwise one line names what differs
  and the way forward (a new ``--name``), and nothing in the directory is touched;
* on a finished experiment prints that it is finished and where its results are, and runs,
  re-scores and rewrites nothing (exit status 0).

Where the trials run (``resources``, ``search.max_concurrent``, ``search.max_failures``,
``data.data_dir``) may change between runs. A directory of an older tuner (no
``experiment.json``) is checked by the method its ``search.json`` names.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from tuner.errors import ConfigError

RECORD = "experiment.json"
#: where a search runs, not what it is: free to change when it continues. ``search.order``
#: too: a continued search decides on arrival whatever it was (Tune saves no scheduler,
#: tuner.ordering), and experiments recorded before the setting existed must stay resumable
FREE = frozenset({"search.max_concurrent", "search.max_failures", "data.data_dir",
                  "search.order"})
_SECTIONS = ("data", "train", "params", "asha", "search")


def fingerprint(space: Any) -> dict[str, Any]:
    """The method, space and budget of ``space`` as JSON values keyed ``section.key``."""
    from tuner.space import Domain

    flat: dict[str, Any] = {"method": space.method}
    for section in _SECTIONS:
        for key, value in getattr(space, section).items():
            if f"{section}.{key}" in FREE:
                continue
            if isinstance(value, Domain):
                value = {value.kind: list(value.args), **({"below": value.below}
                                                          if value.below is not None else {})}
            flat[f"{section}.{key}"] = value
    return json.loads(json.dumps(flat, default=str))  # tuples -> lists, as read back


def differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key stored -> current`` for every setting that is not the same, the method first."""
    missing = object()
    out = []
    for key in sorted(set(stored) | set(current), key=lambda k: (k != "method", k)):
        old, new = stored.get(key, missing), current.get(key, missing)
        if old != new:
            show = [("(unset)" if v is missing else json.dumps(v)) for v in (old, new)]
            out.append(f"{key} {show[0]} -> {show[1]}")
    return out


def with_new_defaults(stored: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """``stored`` plus, at its default, every setting the tuner gained after it was recorded
    (e.g. ``data.head_share``): an experiment left at that default stays resumable."""
    from tuner.space import SECTIONS

    out = dict(stored)
    for key in current.keys() - stored.keys():
        section, _, name = key.partition(".")
        defaults = SECTIONS.get(section) or {}
        if name in defaults:
            out[key] = json.loads(json.dumps(defaults[name]))
    return out


def target(args: Any) -> Path | None:
    """The existing directory this command would continue, if any (``--resume`` / ``--name``)."""
    if args.resume:
        path = Path(args.resume)
    elif args.name:
        path = Path(args.out) / args.name
    else:
        return None
    return path.resolve() if path.is_dir() else None


def check_reuse(args: Any, space: Any) -> bool:
    """Refuse to continue an experiment with other settings (one :class:`ConfigError` line);
    True when the experiment is finished (it was reported; nothing is to run)."""
    exp_dir = target(args)
    if exp_dir is None:
        return False
    record = read_record(exp_dir)
    if record is None:
        return _check_legacy(exp_dir, space)
    current = fingerprint(space)
    diff = differences(with_new_defaults(record.get("fingerprint", {}), current), current)
    if diff:
        shown = "; ".join(diff[:4]) + (f"; and {len(diff) - 4} more" if len(diff) > 4 else "")
        state = "finished" if record.get("finished") else "started"
        raise ConfigError(f"experiment {exp_dir} was {state} with other settings ({shown}); it "
                          f"continues only with the same method, space and budget: pass a new "
                          f"--name for this search")
    if record.get("finished"):
        _report_finished(exp_dir, record)
        return True
    return False


def _report_finished(exp_dir: Path, record: dict[str, Any]) -> None:
    tested = "test_metrics.json" if record.get("tested") else "no test score (--no-test)"
    print(f"experiment {exp_dir} is finished ({record.get('trials', '?')} trials, "
          f"{record['finished']}): nothing to run. Results: leaderboard.csv, best_config.yaml, "
          f"{tested}; report: python -m tuner.report {exp_dir}; a new search needs a new --name")


def _check_legacy(exp_dir: Path, space: Any) -> bool:
    """A directory without ``experiment.json``: written by an older tuner, or not a search."""
    try:
        old = json.loads((exp_dir / "search.json").read_text())
    except (OSError, ValueError):
        return False  # no outputs yet: tuner.search decides (resume / start in place / refuse)
    method = old.get("method") if isinstance(old, dict) else None
    if method != space.method:
        raise ConfigError(f"experiment {exp_dir} is a {method!r} search, not {space.method!r}; "
                          f"pass a new --name for this search")
    if (exp_dir / "test_metrics.json").is_file() or not (exp_dir / "best_config.yaml").is_file():
        print(f"experiment {exp_dir} is finished: nothing to run; report: "
              f"python -m tuner.report {exp_dir}; a new search needs a new --name")
        return True
    print(f"warning: {exp_dir} has no {RECORD} (an older tuner): its space and budget cannot "
          f"be checked against this command", file=sys.stderr)
    return False


def read_record(exp_dir: Path) -> dict[str, Any] | None:
    path = exp_dir / RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is unreadable ({exc}); pass a new --name") from None
    if not isinstance(record, dict):
        raise ConfigError(f"{path} is not an experiment record; pass a new --name")
    return record


def write_record(exp_dir: Path, space: Any) -> None:
    """Record the experiment's fingerprint before its first trial (kept when it exists)."""
    exp_dir.mkdir(parents=True, exist_ok=True)
    if not (exp_dir / RECORD).is_file():
        _write(exp_dir, {"method": space.method, "space_file": str(space.path),
                         "fingerprint": fingerprint(space)})


def mark_finished(exp_dir: Path, results: Any, space: Any, tested: bool) -> None:
    """Record that the search ran to its end: every one of its trials finished or failed (an
    interrupted search, whose ``fit`` also returns, stays unfinished and resumable)."""
    done = results.num_terminated + results.num_errors
    record = read_record(exp_dir)
    if record is None or done < len(results) or len(results) < space.search["num_trials"]:
        return
    record.update(finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), trials=len(results), tested=tested)
    _write(exp_dir, record)


def _write(exp_dir: Path, record: dict[str, Any]) -> None:
    tmp = exp_dir / f".{RECORD}.tmp"
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    tmp.replace(exp_dir / RECORD)
