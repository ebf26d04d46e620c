"""The ``ckptd`` command line: run the daemon, query the store, run the demo.

Exit codes: 0 success; 1 nothing to show (no best checkpoint yet, no live daemon
for ``status``); 2 bad usage or configuration; 3 another daemon already follows
the run; 4 the store or a file in it could not be read or written; 5 ``verify``
found a checkpoint whose files do not match its manifest.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ckptd import __version__
from ckptd.errors import CkptdError, ConfigError, DaemonAlreadyRunning, StoreError
from ckptd.logs.detect import FORMATS
from ckptd.protocol import STALE_AFTER_S, RunPaths, heartbeat_age, metrics_to_json
from ckptd.records import CheckpointRecord, Criterion
from ckptd.store import Store

EXIT_OK, EXIT_EMPTY, EXIT_USAGE, EXIT_RUNNING, EXIT_STORE, EXIT_CORRUPT = 0, 1, 2, 3, 4, 5

_EPILOG = """\
examples:
  ckptd run out/ --every-steps 200 --keep-last 2     follow out/logging.jsonl, keep best + last 2
  ckptd ls out/                                      what is retained, newest last
  ckptd best out/                                    path of the best checkpoint (for scripts)
  ckptd demo                                         the seed scenario on a tiny model, in seconds

The trainer side is two calls in the training loop; see README.md."""


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except DaemonAlreadyRunning as exc:
        print(f"ckptd: {exc}", file=sys.stderr)
        return EXIT_RUNNING
    except ConfigError as exc:
        print(f"ckptd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (StoreError, OSError) as exc:
        print(f"ckptd: {exc}", file=sys.stderr)
        return EXIT_STORE
    except CkptdError as exc:
        print(f"ckptd: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ckptd",
        description="Follow a training log, capture the best step, keep best + last N checkpoints.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ckptd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run(commands)
    _add_ls(commands)
    _add_best(commands)
    _add_status(commands)
    _add_verify(commands)
    _add_demo(commands)
    return parser


def _add_run(commands: Any) -> None:
    run = commands.add_parser(
        "run",
        help="follow one run's log and manage its checkpoints (foreground)",
        description="Follow RUN_DIR's training log; on a new best eval, ask the trainer's "
        "CheckpointClient for that step's state, persist it and rotate. Stops on SIGINT/SIGTERM "
        "after persisting what the trainer already handed over.",
    )
    run.add_argument("run_dir", metavar="RUN_DIR", help="the trainer's output directory")
    judged = run.add_argument_group("what is best")
    judged.add_argument("--metric", help="metric to judge (default: eval_loss unless --best is given)")
    judged.add_argument(
        "--mode", choices=("min", "max"), help="default: min if the name has 'loss', else max"
    )
    judged.add_argument(
        "--best",
        action="append",
        default=[],
        metavar="METRIC[:MODE][:K]",
        help="watch another criterion, e.g. eval_accuracy:max:2 (repeatable; tag best:METRIC)",
    )
    judged.add_argument("--min-delta", type=float, default=0.0, help="smallest change that counts (0)")
    kept = run.add_argument_group("what is kept")
    kept.add_argument("--keep-best", type=int, default=1, metavar="K", help="best kept per criterion (1)")
    kept.add_argument("--keep-last", type=int, default=2, metavar="N", help="latest checkpoints kept (2)")
    kept.add_argument(
        "--keep-every", type=int, metavar="M", help="also keep every checkpoint at a multiple of M"
    )
    kept.add_argument(
        "--every-steps", type=int, metavar="M", help="ask the trainer for a capture every M steps"
    )
    kept.add_argument("--store", help="checkpoint directory (default: RUN_DIR/checkpoints)")
    read = run.add_argument_group("what is read")
    read.add_argument("--log", help="log to follow, relative to RUN_DIR (default: logging.jsonl)")
    read.add_argument(
        "--format",
        default="auto",
        choices=FORMATS,
        help="log format (default: auto, from the name and first line)",
    )
    read.add_argument("--step-key", help="dotted JSON key holding the step (default: auto)")
    read.add_argument(
        "--regex",
        metavar="PATTERN",
        help=r"read a text log with a regex: a (?P<step>\d+) group and one group per metric",
    )
    read.add_argument("--poll", action="store_true", help="poll instead of inotify (network filesystems)")
    read.add_argument("--poll-interval", type=float, default=0.5, metavar="S", help="seconds (0.5)")
    run.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    run.set_defaults(handler=_cmd_run)


def _query(commands: Any, name: str, handler: Any, summary: str, description: str, json_help: str) -> Any:
    """A command that reads one run's files: RUN_DIR, --json, and where they are."""
    parser = commands.add_parser(name, help=summary, description=description)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the trainer's output directory")
    parser.add_argument("--json", action="store_true", help=json_help)
    parser.set_defaults(handler=handler)
    return parser


def _add_store_option(parser: Any) -> None:
    parser.add_argument("--store", help="checkpoint directory (default: where the daemon's state says)")


def _add_ls(commands: Any) -> None:
    ls = _query(
        commands,
        "ls",
        _cmd_ls,
        "list retained checkpoints",
        "List committed checkpoints of RUN_DIR's store, oldest step first. Works with or "
        "without a daemon running.",
        "a JSON list, for scripts",
    )
    _add_store_option(ls)


def _add_best(commands: Any) -> None:
    best = _query(
        commands,
        "best",
        _cmd_best,
        "print the best checkpoint's path",
        "Print the path of the retained checkpoint with the best metric value. "
        "Exit status 1 when there is none.",
        "the checkpoint as a JSON object",
    )
    _add_store_option(best)
    best.add_argument("--metric", help="metric[:min|max] (default: what the daemon judges)")


def _add_status(commands: Any) -> None:
    _query(
        commands,
        "status",
        _cmd_status,
        "is a daemon following RUN_DIR, and how is it doing",
        "Show the daemon's last heartbeat: alive or not, log lag, bests, last verdict, "
        "persists, errors. Exit status 1 when no live daemon follows the run.",
        "status.json plus alive and heartbeat_age_s",
    )


def _add_verify(commands: Any) -> None:
    verify = _query(
        commands,
        "verify",
        _cmd_verify,
        "re-hash retained checkpoints against their manifests",
        "Read every file of each retained checkpoint (or the named ones) and compare its "
        "size and sha256 with MANIFEST.json. Exit status 5 when one does not match.",
        "one object per checkpoint, for scripts",
    )
    _add_store_option(verify)
    verify.add_argument("names", nargs="*", metavar="NAME", help="checkpoints to verify (default: all)")


def _add_demo(commands: Any) -> None:
    demo = commands.add_parser(
        "demo",
        help="run the seed scenario: eval every 50, save every 200, best at a step in between",
        description="Train a tiny torch model on CPU with a real ckptd daemon subprocess and "
        "show that the best eval step is kept, bit-identical, where save_steps=200 loses it.",
    )
    demo.add_argument("--dir", help="run directory to use (default: a fresh temp dir)")
    demo.set_defaults(handler=_cmd_demo)


# -- commands --------------------------------------------------------------------------------


def _cmd_run(args: argparse.Namespace) -> int:
    from ckptd.config import RunConfig
    from ckptd.daemon import RunDaemon

    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s ckptd[%(process)d] %(levelname)s %(message)s",
    )
    primary = [f"{args.metric}:{args.mode}" if args.mode else args.metric] if args.metric else []
    if not primary and not args.best:
        primary = [f"eval_loss:{args.mode}" if args.mode else "eval_loss"]
    config = RunConfig.build(
        args.run_dir,
        best=primary + args.best,
        keep_best=args.keep_best,
        min_delta=args.min_delta,
        log=args.log,
        store=args.store,
        keep_last=args.keep_last,
        keep_every=args.keep_every,
        every_steps=args.every_steps,
        log_format=args.format,
        step_key=args.step_key,
        regex=args.regex,
        poll=args.poll,
        poll_interval=args.poll_interval,
    )
    daemon = RunDaemon(config)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda num, _frame: daemon.request_stop(signal.Signals(num).name))
    return daemon.run()


def _cmd_ls(args: argparse.Namespace) -> int:
    store = _store_for(args)
    records = store.list()
    metric = _criterion_for(args).metric
    if args.json:
        print(json.dumps([_record_json(store, r) for r in records], indent=1))
        return EXIT_OK
    if not records:
        print(f"no checkpoints in {store.root}", file=sys.stderr)
        return EXIT_OK
    rows = [("STEP", "TAGS", metric.upper(), "SIZE", "AGE", "NAME")]
    now = time.time()
    for r in records:
        late = "" if r.requested_step in (None, r.step) else f" (asked {r.requested_step})"
        rows.append(
            (
                f"{r.step}{late}",
                ",".join(r.tags) or "-",
                _fmt_metric(r.metrics.get(metric)),
                _fmt_bytes(r.nbytes),
                _fmt_age(now - r.created),
                r.name,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return EXIT_OK


def _cmd_best(args: argparse.Namespace) -> int:
    from ckptd.policy import BestN

    store = _store_for(args)
    criterion = _criterion_for(args)
    records = store.list()
    kept = BestN(criterion, 1).preserve(records)
    best = next((r for r in records if r.name in kept), None)
    if best is None:
        print(
            f"ckptd: no checkpoint with a finite {criterion.metric} in {store.root} "
            f"({len(records)} checkpoint(s) in all)",
            file=sys.stderr,
        )
        return EXIT_EMPTY
    print(json.dumps(_record_json(store, best), indent=1) if args.json else store.path_of(best.name))
    return EXIT_OK


def _cmd_status(args: argparse.Namespace) -> int:
    paths = RunPaths(Path(args.run_dir))
    if not paths.run_dir.is_dir():
        raise ConfigError(f"run directory {paths.run_dir} does not exist")
    age = heartbeat_age(paths)
    try:
        status = json.loads(paths.status.read_bytes()) if age is not None else {}
    except (OSError, ValueError):
        status = {}
    alive = age is not None and age <= STALE_AFTER_S
    if args.json:
        print(json.dumps({**status, "alive": alive, "heartbeat_age_s": age}, indent=1))
    elif age is None:
        print(f"no ckptd daemon has followed {paths.run_dir}")
    else:
        _print_status(status, alive, age)
    return EXIT_OK if alive else EXIT_EMPTY


def _print_status(status: dict[str, Any], alive: bool, age: float) -> None:
    state = "running" if alive else f"not running ({status.get('state', 'no heartbeat')})"
    print(f"daemon      {state}, pid {status.get('pid')} on {status.get('host')}")
    if alive:
        rss, anon = (_fmt_bytes(int(status.get(k) or 0)) for k in ("rss_bytes", "rss_anon_bytes"))
        print(f"heartbeat   {age:.1f} s ago, RSS {rss} ({anon} anonymous)")
    print(f"log         {status.get('log')} ({status.get('log_format')}, {status.get('watcher')})")
    print(f"lag         {status.get('log_lag_bytes')} bytes unread")
    for metric, best in (status.get("bests") or {}).items():
        print(f"best        {metric} {_fmt_metric(best.get('value'))} at step {best.get('step')}")
    verdict = status.get("last_verdict")
    if verdict:
        print(f"last        step {verdict['eval_step']}: {verdict['action']} ({verdict['reason']})")
    print(f"persisted   {status.get('persisted')} checkpoint(s), {status.get('pending_acks')} pending")
    malformed = status.get("malformed_lines") or {}
    if malformed:
        print("malformed   " + ", ".join(f"{n} {kind}" for kind, n in sorted(malformed.items())))
    if status.get("last_error"):
        print(f"last error  {status['last_error']}")


def _cmd_verify(args: argparse.Namespace) -> int:
    store = _store_for(args)
    names = args.names or [r.name for r in store.list()]
    results = []
    for name in names:
        started = time.monotonic()
        problems = store.verify(name)
        results.append({"name": name, "ok": not problems, "problems": problems})
        if not args.json:
            verdict = "ok" if not problems else "CORRUPT: " + "; ".join(problems)
            print(f"{name}  {verdict}  ({time.monotonic() - started:.1f} s)", flush=True)
    if args.json:
        print(json.dumps(results, indent=1))
    elif not names:
        print(f"no checkpoints in {store.root}", file=sys.stderr)
    return EXIT_OK if all(r["ok"] for r in results) else EXIT_CORRUPT


def _cmd_demo(args: argparse.Namespace) -> int:
    from ckptd.demo import run_demo

    return run_demo(Path(args.dir) if args.dir else None)


# -- helpers --------------------------------------------------------------------------------


def _saved_state(run_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads(RunPaths(run_dir).state.read_bytes())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _store_for(args: argparse.Namespace) -> Store:
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} does not exist")
    if args.store:
        return Store(run_dir / args.store)
    saved = _saved_state(run_dir).get("store")
    return Store(Path(saved) if isinstance(saved, str) else RunPaths(run_dir).default_store)


def _criterion_for(args: argparse.Namespace) -> Criterion:
    spec = getattr(args, "metric", None)
    if not spec:
        criteria = _saved_state(Path(args.run_dir)).get("criteria") or ["eval_loss"]
        spec = str(criteria[0])
    try:
        return Criterion.parse(spec)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def _record_json(store: Store, record: CheckpointRecord) -> dict[str, Any]:
    return {
        "name": record.name,
        "step": record.step,
        "requested_step": record.requested_step,
        "path": str(store.path_of(record.name)),
        "tags": list(record.tags),
        "metrics": metrics_to_json(record.metrics),
        "bytes": record.nbytes,
        "created": record.created,
    }


def _fmt_metric(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"


def _fmt_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    size = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        size /= 1024
        if size < 1024:
            return f"{size:.1f} {unit}"
    return f"{size / 1024:.1f} TiB"


def _fmt_age(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    if seconds < 86400:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds / 86400:.0f}d"


if __name__ == "__main__":
    sys.exit(main())
