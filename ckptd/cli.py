"""The ``ckptd`` command line: run the daemon, query the store, run the demo.

Exit codes: 0 success; 1 nothing to show (no checkpoint for ``ls``/``verify``, no
best one for ``best``, no live daemon for ``status``); 2 bad usage or configuration,
found before anything is created; 3 another daemon already follows the run; 4 the
store or a file in it could not be read or written; 5 ``verify`` found a checkpoint
whose manifest is unreadable or whose files do not match it; 6 ``run`` (and ``sidecar``, when
CMD succeeded) stopped with acknowledged captures not persisted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ckptd import __version__, settings, stacks
from ckptd.config import MAX_POLL_INTERVAL_S, RunConfig, preflight_store
from ckptd.errors import CkptdError, ConfigError, DaemonAlreadyRunning, StoreError
from ckptd.logs.detect import FORMATS
from ckptd.notify import Notifier
from ckptd.protocol import (
    EXIT_UNPERSISTED,
    NODE_ENV,
    NODE_RANK_VARIABLES,
    ROLES,
    STALE_AFTER_S,
    STATUS_MAX_BYTES,
    RunPaths,
    check_node_id,
    format_bytes,
    heartbeat_age,
    json_safe,
    local_node_id,
    metrics_to_json,
    read_small_json,
    read_status,
    resolve_role,
)
from ckptd.records import CheckpointRecord, Criterion, Mode
from ckptd.store import MANIFEST, Store
from ckptd.text import printable

EXIT_OK, EXIT_EMPTY, EXIT_USAGE, EXIT_RUNNING, EXIT_STORE, EXIT_CORRUPT = 0, 1, 2, 3, 4, 5
_MODES = ("min", "max")

log = logging.getLogger("ckptd.cli")


def _exit_codes(**meanings: str) -> str:
    """The ``--help`` epilog: what each exit status of one command means (keys: ok, empty, ...)."""
    codes = {"ok": EXIT_OK, "empty": EXIT_EMPTY, "usage": EXIT_USAGE, "running": EXIT_RUNNING}
    codes |= {"store": EXIT_STORE, "corrupt": EXIT_CORRUPT, "unpersisted": EXIT_UNPERSISTED}
    lines = [f"  {codes[key]}  {text}" for key, text in meanings.items()]
    return "exit status:\n" + "\n".join(lines)


_USAGE = "bad usage or option value; RUN_DIR missing or a file"
_STORE = "the store or a file in it could not be read or written"

_EPILOG = """\
examples:
  ckptd run out/ --every-steps 200 --keep-last 2     follow out/logging.jsonl, keep best + last 2
  ckptd ls out/                                      what is retained, newest last
  ckptd best out/                                    path of the best checkpoint (for scripts)
  ckptd demo                                         the seed scenario on a tiny model, in seconds

The trainer side is two calls in the training loop; see README.md."""


def main(argv: Sequence[str] | None = None) -> int:
    _ensure_std_streams()
    args = _parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except BrokenPipeError:
        # The reader went away (`ckptd ls | head -1`): nothing is wrong with the store. Point
        # stdout at /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except DaemonAlreadyRunning as exc:
        print(f"ckptd: {exc}", file=sys.stderr)
        return EXIT_RUNNING
    except ConfigError as exc:
        print(f"ckptd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (StoreError, OSError) as exc:
        print(f"ckptd: {_os_error_text(exc)}", file=sys.stderr)
        return EXIT_STORE
    except CkptdError as exc:
        print(f"ckptd: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _ensure_std_streams() -> None:
    """Run with stdout or stderr closed (``ckptd plot RUN >&-``), print into /dev/null rather
    than fail on ``None.write``."""
    if sys.stdout is None:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  # for the life of the process
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115


def _os_error_text(exc: OSError) -> str:
    """Name the path, never a bare ``[Errno 13] Permission denied``."""
    if isinstance(exc, StoreError) or exc.filename is None:
        return str(exc)  # a StoreError already says what it was doing and where
    where = exc.filename if exc.filename2 is None else f"{exc.filename} -> {exc.filename2}"
    return f"cannot access {where}: {exc.strerror or exc}"


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
    _add_sidecar(commands)
    _add_ls(commands)
    _add_best(commands)
    _add_status(commands)
    _add_verify(commands)
    _add_pull(commands)
    _add_export(commands)
    _add_prune(commands)
    _add_request(commands)
    _add_serve(commands)
    _add_gc(commands)
    _add_plot(commands)
    _add_demo(commands)
    return parser


def _add_run(commands: Any) -> None:
    run = commands.add_parser(
        "run",
        help="follow one run's log and manage its checkpoints (foreground)",
        description="Follow RUN_DIR's training log; on a new best eval, ask the trainer's "
        "CheckpointClient for that step's state, persist it and rotate. Stops on SIGINT/SIGTERM "
        "after persisting what the trainer already handed over. Every option is checked, and "
        "the store must be writable, before anything is created.",
        epilog=_exit_codes(
            ok="stopped by SIGINT/SIGTERM after persisting what was acknowledged (SIGHUP reloads)",
            usage="bad option value, or a store that cannot be written",
            running="another daemon already follows RUN_DIR (stop it first)",
            store=_STORE,
            unpersisted="stopped with acknowledged captures not persisted (a full disk?): their "
            "slots are kept for the next `ckptd run`; status.json lists them (unpersisted)",
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument(
        "run_dir", metavar="RUN_DIR", nargs="?", help="the trainer's output directory (or --config's)"
    )
    _add_run_options(run, default_log="logging.jsonl")
    run.set_defaults(handler=_cmd_run)


def _add_run_options(run: argparse.ArgumentParser, default_log: str) -> list[argparse.Action]:
    """Every option of ``ckptd run`` (``ckptd sidecar`` takes them too and passes them on)."""
    before = len(run._actions)
    judged = run.add_argument_group("what is best")
    judged.add_argument("--metric", help="metric to judge (default: eval_loss unless --best is given)")
    judged.add_argument(
        "--mode", choices=("min", "max"), help="default: min if the name has 'loss', else max"
    )
    judged.add_argument(
        "--best",
        action="append",
        metavar="METRIC[:MODE][:K]",
        help="watch another criterion, e.g. eval_accuracy:max:2 (repeatable; tag best:METRIC)",
    )
    judged.add_argument("--min-delta", type=float, help="smallest change that counts (0)")
    kept = run.add_argument_group("what is kept")
    kept.add_argument("--keep-best", type=int, metavar="K", help="best kept per criterion (1)")
    kept.add_argument("--keep-last", type=int, metavar="N", help="latest checkpoints kept (2)")
    kept.add_argument(
        "--keep-every", type=int, metavar="M", help="also keep every checkpoint at a multiple of M"
    )
    kept.add_argument(
        "--every-steps", type=int, metavar="M", help="ask the trainer for a capture every M steps"
    )
    kept.add_argument(
        "--store",
        help="checkpoint directory; a relative path is relative to RUN_DIR, like --log "
        "(default: RUN_DIR/checkpoints)",
    )
    read = run.add_argument_group("what is read")
    read.add_argument("--log", help=f"log to follow, relative to RUN_DIR (default: {default_log})")
    read.add_argument(
        "--format",
        choices=FORMATS,
        help="log format (default: auto, from the name and first line)",
    )
    read.add_argument("--step-key", help="dotted JSON key holding the step (default: auto)")
    read.add_argument(
        "--regex",
        metavar="PATTERN",
        help=r"read a text log with a regex: a (?P<step>\d+) group and one group per metric",
    )
    read.add_argument(
        "--poll",
        action="store_const",
        const=True,
        help="poll instead of inotify (network filesystems)",
    )
    read.add_argument(
        "--poll-interval",
        type=float,
        metavar="S",
        help=f"seconds, > 0 and <= {MAX_POLL_INTERVAL_S:g} (0.5)",
    )
    remote = run.add_argument_group("remote tier (docs/remote.md)")
    remote.add_argument(
        "--remote",
        metavar="URL",
        help="also keep checkpoints in object storage, e.g. s3://bucket/runs/exp1 (pip install "
        "'ckptd[s3]'); credentials and endpoint come from the backend's environment and profiles",
    )
    remote.add_argument("--remote-keep-last", type=int, metavar="N", help="latest kept remotely (2)")
    remote.add_argument(
        "--remote-keep-best", type=int, metavar="K", help="best kept remotely per criterion (as locally)"
    )
    remote.add_argument(
        "--remote-keep-every", type=int, metavar="M", help="also keep every multiple of M remotely"
    )
    run.set_defaults(remote_options=None)  # a table: only in TOML files and $CKPTD_REMOTE_OPTIONS
    nodes = run.add_argument_group("multi-node jobs (docs/distributed.md)")
    nodes.add_argument(
        "--role",
        choices=ROLES,
        help="leader: the node of rank 0 follows the log, judges and commits; follower: another "
        "node's daemon, storing its ranks' parts of sharded captures; auto (default): follower "
        f"when the node rank ({', '.join('$' + v for v in NODE_RANK_VARIABLES)}, first set) is not 0",
    )
    nodes.add_argument(
        "--node-id",
        metavar="ID",
        help="this node's id, the same for its daemon and its ranks (default: $CKPTD_NODE_ID, "
        "else the hostname)",
    )
    nodes.add_argument(
        "--shard-timeout",
        type=float,
        metavar="S",
        help="a sharded (multi-rank) capture still missing a rank's part S seconds after its last "
        "part arrived is removed and reported (600)",
    )
    run.add_argument(
        "--config",
        metavar="FILE",
        help="a TOML file whose [run] table sets these options (and [run] dir the run dir); "
        "precedence: options > CKPTD_* variables > RUN_DIR/ckptd.toml > FILE > defaults",
    )
    run.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    run.add_argument(
        "--log-level",
        choices=settings.LOG_LEVELS,
        help="debug, info (default), warning or error; also $CKPTD_LOG_LEVEL",
    )
    return run._actions[before:]


def _add_sidecar(commands: Any) -> None:
    from ckptd.sidecar import METRICS_LOG

    sidecar = commands.add_parser(
        "sidecar",
        help="run a training command with a daemon tied to its life",
        usage="ckptd sidecar --run-dir DIR [options of ckptd run] [--stop-timeout S] -- CMD [ARG ...]",
        description="Start `ckptd run DIR` with the same options, wait for its heartbeat, then run "
        "CMD with CKPTD_RUN_DIR=DIR, CKPTD_HOOK=1 and ckptd's start-up hook first on PYTHONPATH: in "
        "every Python process of CMD's tree, each transformers Trainer built gets ckptd's callback, "
        f"which writes DIR/{METRICS_LOG} (the log followed unless --log is given) and captures the "
        "best step. SIGINT, SIGTERM and SIGHUP are passed on to CMD (a Ctrl-C in the terminal "
        "reaches CMD directly). When CMD exits the daemon is stopped after persisting what was "
        "acknowledged, what was kept is shown, and CMD's exit status is returned. `ckptd ls DIR`, "
        "`best` and `status` work as for `ckptd run`.",
        epilog=_exit_codes(
            ok="CMD exited with 0 (otherwise: CMD's status, 128+N if signal N killed it)",
            usage="bad option value, a store that cannot be written, or no CMD; nothing was started",
            running="another daemon already follows DIR (stop it first); CMD was not started",
            unpersisted="CMD exited with 0 but the daemon stopped with acknowledged captures not "
            "persisted (a failed CMD's own status wins)",
        )
        + "\n  126  CMD could not be executed\n  127  CMD was not found",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sidecar.add_argument("--run-dir", required=True, metavar="DIR", help="the trainer's output directory")
    actions = _add_run_options(sidecar, default_log=METRICS_LOG)
    sidecar.add_argument(
        "--stop-timeout",
        type=float,
        default=120.0,
        metavar="S",
        help="seconds the daemon may take to persist after CMD exits; then it is killed (120)",
    )
    sidecar.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARG ...]")
    sidecar.set_defaults(handler=_cmd_sidecar, run_options=actions)


def _query(
    commands: Any, name: str, handler: Any, summary: str, description: str, json_help: str, epilog: str
) -> Any:
    """A command that reads one run's files: RUN_DIR, --json, and where they are."""
    parser = commands.add_parser(
        name,
        help=summary,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the trainer's output directory")
    parser.add_argument("--json", action="store_true", help=json_help)
    parser.set_defaults(handler=handler)
    return parser


def _add_store_option(parser: Any) -> None:
    parser.add_argument(
        "--store",
        help="checkpoint directory, relative to RUN_DIR (default: where the daemon's state says)",
    )


def _add_ls(commands: Any) -> None:
    ls = _query(
        commands,
        "ls",
        _cmd_ls,
        "list retained checkpoints",
        "List committed checkpoints of RUN_DIR's store, oldest step first. Works with or "
        "without a daemon running.",
        "a JSON list, for scripts",
        _exit_codes(ok="listed", empty="the store has no checkpoint", usage=_USAGE, store=_STORE),
    )
    _add_store_option(ls)
    _add_remote_option(ls)


def _add_best(commands: Any) -> None:
    best = _query(
        commands,
        "best",
        _cmd_best,
        "print the best checkpoint's path",
        "Print the path of the retained checkpoint with the best metric value. Which way is "
        "better comes from --metric M:MODE or --mode, else from what the daemon recorded "
        "(.ckptd/state.json, then the newest manifest), else from the name (said on stderr).",
        "the checkpoint as a JSON object",
        _exit_codes(
            ok="printed",
            empty="no retained checkpoint has a finite value of the metric",
            usage=_USAGE,
            store=_STORE,
        ),
    )
    _add_store_option(best)
    best.add_argument("--metric", help="METRIC[:min|max] (default: the daemon's first criterion)")
    best.add_argument("--mode", choices=_MODES, help="min or max (default: the mode the daemon recorded)")
    best.add_argument(
        "--remote",
        nargs="?",
        const="",
        metavar="URL",
        help="the best on the remote tier instead; prints its URL (default URL: the daemon's)",
    )


def _add_status(commands: Any) -> None:
    status = _query(
        commands,
        "status",
        _cmd_status,
        "is a daemon following RUN_DIR, and how is it doing",
        "Show the daemon's last heartbeat: alive or not, log lag, bests, last verdict, persists, "
        "errors. Without RUN_DIR: one line per run a node daemon (ckptd serve) adopts under the "
        "roots of --config.",
        "status.json plus alive and heartbeat_age_s (without RUN_DIR: a list of them)",
        _exit_codes(
            ok="a live daemon follows RUN_DIR (without it: every run listed is followed); "
            "--watch stopped by Ctrl-C",
            empty="no live daemon follows it (without RUN_DIR: some run listed is not followed)",
            usage=_USAGE,
        ),
    )
    status.set_defaults(run_dir=None)
    status._actions[-2].nargs = "?"  # RUN_DIR: optional for status alone
    status.add_argument(
        "--config",
        default=DEFAULT_NODE_CONFIG,
        metavar="FILE",
        help=f"without RUN_DIR: the node config whose roots are listed (default {DEFAULT_NODE_CONFIG})",
    )
    status.add_argument(
        "--watch",
        action="store_true",
        help="keep showing it, refreshed every --interval, until Ctrl-C (exit 0): redrawn in place "
        "on a terminal; otherwise one line per change (with --json: one object per change)",
    )
    status.add_argument(
        "--interval", type=float, default=1.0, metavar="S", help="with --watch: seconds between refreshes (1)"
    )


def _add_verify(commands: Any) -> None:
    verify = _query(
        commands,
        "verify",
        _cmd_verify,
        "re-hash retained checkpoints against their manifests",
        "Read every file of each checkpoint directory (or the named ones) and compare its "
        "size and checksum with MANIFEST.json (xxh3_128; sha256 in checkpoints of older "
        "versions). A missing or unreadable manifest is a failure.",
        "one object per checkpoint, for scripts",
        _exit_codes(
            ok="every checkpoint is intact",
            empty="the store has no checkpoint",
            usage=_USAGE + "; a NAME that is not in the store",
            store=_STORE,
            corrupt="a checkpoint whose manifest or files do not match",
        ),
    )
    _add_store_option(verify)
    verify.add_argument("names", nargs="*", metavar="NAME", help="checkpoints to verify (default: all)")
    verify.add_argument(
        "--remote",
        nargs="?",
        const="",
        metavar="URL",
        help="verify the remote tier's checkpoints instead, reading every file back "
        "(default URL: the daemon's)",
    )


def _add_export(commands: Any) -> None:
    export = _query(
        commands,
        "export",
        _cmd_export,
        "write one checkpoint as a safetensors model for serving",
        "Verify checkpoint NAME (default: the best, as `ckptd best` picks it) and write its model "
        "weights into DIR as model.safetensors: a DCP checkpoint (FSDP2) and a ckptd snapshot are "
        'converted (their "model" entry, else every tensor), a save_pretrained layout is copied. '
        "With config.json (--config, else the checkpoint's own) DIR loads with from_pretrained. "
        "DIR is written beside itself and renamed into place; an existing non-empty DIR is never "
        "touched. Converting needs torch (pip install 'ckptd[torch]').",
        "what was written, as a JSON object",
        _exit_codes(
            ok="exported",
            empty="no checkpoint NAME in the store, or no best one",
            usage=_USAGE + "; DIR not empty, a link, or in the store; --config unreadable; no torch",
            store=_STORE + "; or the checkpoint fails verification (nothing written)",
        ),
    )
    _add_store_option(export)
    export.add_argument("name", nargs="?", metavar="NAME", help="checkpoint to export (default: the best)")
    export.add_argument("--to", required=True, metavar="DIR", help="new directory to write the model into")
    export.add_argument("--config", metavar="FILE", help="a model's config.json, copied into DIR")


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
    from ckptd.daemon import RunDaemon

    # `kill -USR1 PID` prints every thread's stack to stderr: a daemon that seems stuck can be
    # looked into without stopping it.
    stacks.install(signal.SIGUSR1)

    logging.basicConfig(
        level=_log_level(args.log_level, "warning" if args.quiet else "info"),
        # One line per event, no colour: journald and `kubectl logs` read it as it is.
        format="%(asctime)s ckptd[%(process)d] %(levelname)s %(message)s",
    )
    config = _run_config(args)
    node_id = _node_id(args.node_id)
    if _role(args) == "follower":
        return _run_follower(config, node_id)
    if not config.run_dir.exists():
        # Trainers often start after the daemon, so this is no error; but a mistyped path
        # would wait forever in silence, so say it where the user is looking.
        log.warning(
            "%s does not exist yet; created it and waiting for %s to appear", config.run_dir, config.log
        )
    daemon = RunDaemon(config, Notifier.from_environ())
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda num, _frame: daemon.request_stop(signal.Signals(num).name))
    # SIGHUP (systemctl reload): the options and files read again; what applies live does.
    signal.signal(signal.SIGHUP, lambda *_: threading.Thread(target=_reload, args=(daemon, args)).start())
    return daemon.run()


def _role(args: argparse.Namespace) -> str:
    try:
        return resolve_role(args.role)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _node_id(given: str | None) -> str:
    """The node id, checked, exported as $CKPTD_NODE_ID (the daemon and, under the sidecar, the
    command's ranks read it there)."""
    try:
        node_id = check_node_id(given) if given else local_node_id()
    except ValueError as exc:
        raise ConfigError(f"--node-id / ${NODE_ENV}: {exc}") from None
    os.environ[NODE_ENV] = node_id
    return node_id


def _run_follower(config: RunConfig, node_id: str) -> int:
    from ckptd.daemon.follower import FollowerDaemon

    daemon = FollowerDaemon(config.run_dir, config.store, node_id)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda num, _frame: daemon.request_stop(signal.Signals(num).name))
    return daemon.run()


def _reload(daemon: Any, args: argparse.Namespace) -> None:
    """Off the signal handler (it reads files): rebuild the run's config, hand it over."""
    try:
        daemon.reconfigure(_run_config(args))
    except CkptdError as exc:
        log.error("reload failed, the old settings stay: %s", exc)


def _run_config(args: argparse.Namespace, default_log: str | None = None) -> RunConfig:
    """The options of ``ckptd run`` merged with its config files and ``CKPTD_*`` variables,
    checked (and the store probed) before anything is created. ``default_log``: the log when
    no layer names one (the sidecar's own metrics log)."""
    file = settings.load_file(args.config, tables=("run",)) if args.config else None
    run_dir = args.run_dir or (file.run_dir if file else None)
    if run_dir is None:
        raise ConfigError("which run? give RUN_DIR, or [run] dir in the --config file")
    own = settings.run_file_of(Path(run_dir))
    given = {key: getattr(args, key) for key in settings.RUN_KEYS}
    layers = [{"log": default_log}, file.run if file else {}, own.run if own else {}]
    options = settings.merged(*layers, settings.environment_layer(), given)
    config = settings.run_config(run_dir, options)
    # A read-only store would otherwise surface only at the first best eval, too late.
    preflight_store(config.store)
    return config


def _cmd_sidecar(args: argparse.Namespace) -> int:
    from ckptd.sidecar import METRICS_LOG, Sidecar

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise ConfigError("no command to run: ckptd sidecar --run-dir DIR [options] -- CMD [ARG ...]")
    if not args.stop_timeout > 0:
        raise ConfigError(f"--stop-timeout must be a number of seconds > 0, not {args.stop_timeout}")
    config = _run_config(args, default_log=METRICS_LOG)
    args.log = str(config.log)  # the daemon follows what the layers chose, said explicitly
    sidecar = Sidecar(
        config.run_dir,
        _options_argv(args.run_options, args),
        command,
        stop_timeout=args.stop_timeout,
        summary=lambda: _sidecar_summary(config.run_dir),
        follower_node=_node_id(args.node_id) if _role(args) == "follower" else None,
    )
    return sidecar.run()


def _options_argv(actions: list[argparse.Action], args: argparse.Namespace) -> list[str]:
    """The options as given, back to command-line form (``--flag=value``: a value may start with -)."""
    argv: list[str] = []
    for action in actions:
        if not action.option_strings:
            continue
        flag, value = action.option_strings[-1], getattr(args, action.dest)
        if action.nargs == 0:  # store_true
            argv += [flag] if value else []
        elif isinstance(value, list):
            argv += [f"{flag}={item}" for item in value]
        elif value is not None and value != action.default:
            argv.append(f"{flag}={value}")
    return argv


def _sidecar_summary(run_dir: Path) -> None:
    """One screen on stderr (stdout is the command's): what is kept, the best's path, counts."""
    query = argparse.Namespace(
        run_dir=str(run_dir), store=None, json=False, metric=None, mode=None, remote=None
    )
    store = _store_for(query)
    records = store.list()
    status = _saved_status(run_dir)
    persisted = status.get("persisted")
    this_run = f"; the daemon persisted {persisted} this time" if isinstance(persisted, int) else ""
    if isinstance(status.get("last_error"), str):
        # A watched metric the log never held (--metric eval_loss on Lightning's val_loss) is
        # said here too, where the user looks when the run ends, not only in the daemon's log.
        print(f"ckptd sidecar: the daemon's last error: {status['last_error']}", file=sys.stderr)
    if not records:
        # Captures the daemon could not persist were captured: asking whether the trainer did
        # would send the user the wrong way (the line after the summary says what happened).
        unpersisted = isinstance(status.get("unpersisted"), list) and bool(status["unpersisted"])
        asked = " (did the trainer log an eval to the followed log, and capture?"
        why = f"; see `ckptd status {run_dir}`" if unpersisted else f"{asked} see `ckptd status {run_dir}`)"
        print(f"ckptd sidecar: no checkpoint kept in {store.root}{this_run}{why}", file=sys.stderr)
        return
    print(f"ckptd sidecar: {len(records)} checkpoint(s) kept in {store.root}{this_run}", file=sys.stderr)
    with contextlib.redirect_stdout(sys.stderr):
        _cmd_ls(query)
        print("best: ", end="", flush=True)
        _cmd_best(query)


def _cmd_ls(args: argparse.Namespace) -> int:
    from ckptd.policy import BestN

    store = _store_for(args)
    records = store.list()
    located = _locations(args, Path(args.run_dir), records, store.lineage())
    where: dict[str, str] = {}
    if located is not None:
        records, where = located
    if not records:
        return _nothing_in(store, args.json)
    criterion = _criterion_for(args, store, records)
    metric = criterion.metric
    # Tags say what each capture was for; a best:M tag stays when a better best comes. The
    # mark says which one is the best now, as `ckptd best` would answer.
    best = BestN(criterion, 1).preserve(records)
    if args.json:
        listed = [
            {**_record_json(store, r), "best": r.name in best, **({"where": where[r.name]} if where else {})}
            for r in records
        ]
        print(json.dumps(listed, indent=1))
        return EXIT_OK
    rows = [("STEP", "TAGS", metric.upper(), "SIZE", "AGE", "NAME", *(("WHERE",) if where else ()))]
    now = time.time()
    for r in records:
        late = "" if r.requested_step in (None, r.step) else f" (asked {r.requested_step})"
        rows.append(
            (
                f"{r.step}{late}",
                printable(",".join(r.tags) or "-"),
                _fmt_metric(r.metrics.get(metric)) + (" *" if r.name in best else ""),
                format_bytes(r.nbytes),
                _fmt_age(now - r.created),
                r.name,
                *((where[r.name],) if where else ()),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    if best:
        print(f"* the best by {metric} ({criterion.mode})")
    return EXIT_OK


def _nothing_in(store: Store, as_json: bool) -> int:
    """An empty store is "nothing to show" (exit 1) for people and scripts alike."""
    print(f"ckptd: no checkpoints in {store.root}", file=sys.stderr)
    if as_json:
        print("[]")
    return EXIT_EMPTY


def _best_of(
    args: argparse.Namespace, store: Store, records: list[CheckpointRecord]
) -> tuple[CheckpointRecord | None, Criterion]:
    """The best of ``records`` as ``ckptd best`` picks it (``export`` takes the same one)."""
    from ckptd.policy import BestN

    criterion = _criterion_for(args, store, records, warn=bool(records))  # no guess to own up to
    kept = BestN(criterion, 1).preserve(records)
    return next((r for r in records if r.name in kept), None), criterion


def _cmd_best(args: argparse.Namespace) -> int:
    if args.remote is not None:
        return _best_remote(args)
    store = _store_for(args)
    records = store.list()
    best, criterion = _best_of(args, store, records)
    if best is None:
        print(
            f"ckptd: no checkpoint with a finite {criterion.metric} in {store.root} "
            f"({len(records)} checkpoint(s) in all)",
            file=sys.stderr,
        )
        if args.json:
            print("null")  # scripts always get a JSON document, as ls and verify give []
        return EXIT_EMPTY
    if best.requested_step not in (None, best.step):
        # The weights are of a later step than the eval that ranks them: say so where scripts
        # do not read it (a trainer that was past the eval step when it captured).
        print(
            f"ckptd: note: {best.name} holds step {best.step}, captured after the eval at step "
            f"{best.requested_step} that ranks it best",
            file=sys.stderr,
        )
    print(json.dumps(_record_json(store, best), indent=1) if args.json else store.path_of(best.name))
    return EXIT_OK


def _best_remote(args: argparse.Namespace) -> int:
    remote = _need_remote(args, _run_dir(args))
    records = remote.list(_store_for(args).lineage())  # the best of this run, not of a neighbour
    best, criterion = _best_of(args, _store_for(args), records)
    if best is None:
        print(f"ckptd: no checkpoint with a finite {criterion.metric} on {remote.url}", file=sys.stderr)
        print("null" if args.json else "", end="\n" if args.json else "")
        return EXIT_EMPTY
    location = f"{remote.url.rstrip('/')}/{best.name}"
    found = {"name": best.name, "step": best.step, "url": location}
    print(json.dumps(found, indent=1) if args.json else location)
    return EXIT_OK


def _cmd_status(args: argparse.Namespace) -> int:
    if args.watch:
        return _watch_status(args)
    if args.run_dir is None:
        return _node_status(args)
    paths = RunPaths(_run_dir(args))
    age = heartbeat_age(paths)
    try:
        # Bounded, regular files only: a FIFO or a link to /dev/zero planted there must not hang.
        status = read_small_json(paths.status, STATUS_MAX_BYTES) if age is not None else {}
    except (OSError, ValueError, RecursionError) as exc:
        status = {"state": f"unreadable status.json ({exc})"}
    if not isinstance(status, dict):
        status = {"state": f"unreadable status.json ({type(status).__name__})"}
    # A fresh mtime on a file that says nothing (damaged, replaced) is no daemon's heartbeat.
    alive = age is not None and age <= STALE_AFTER_S and "pid" in status and status.get("state") != "stopped"
    if args.json:
        print(json.dumps(json_safe({**status, "alive": alive, "heartbeat_age_s": age}), indent=1))
    elif age is None:
        print(f"no ckptd daemon has followed {paths.run_dir}")
    else:
        _print_status(status, alive, age)
    return EXIT_OK if alive else EXIT_EMPTY


def _daemon_state(status: dict[str, Any], alive: bool, age: float) -> str:
    if alive:
        return "running"
    if status.get("state") == "running":
        # A clean halt writes state=stopped; "running" with a stale heartbeat means it never could.
        return (
            "not running (the daemon stopped without saying so: killed or crashed; "
            f"last heartbeat {age:.0f} s ago)"
        )
    return f"not running ({_shown(status, 'state') if 'state' in status else 'no heartbeat'})"


def _print_status(status: dict[str, Any], alive: bool, age: float) -> None:
    # status.json may come from another version of ckptd or be damaged: every field read here
    # is type-checked, and what is not as expected shows as "?", never as a traceback.
    def field(key: str) -> str:
        return _shown(status, key)

    print(f"daemon      {_daemon_state(status, alive, age)}, pid {field('pid')} on {field('host')}")
    if alive:
        rss, anon = (format_bytes(_number(status.get(k))) for k in ("rss_bytes", "rss_anon_bytes"))
        print(f"heartbeat   {age:.1f} s ago, RSS {rss} ({anon} anonymous)")
    print(f"log         {field('log')} ({field('log_format')}, {field('watcher')})")
    lag = status.get("log_lag_bytes")
    print(f"lag         {'unknown' if lag is None else format_bytes(_number(lag))} unread")
    for c in _dicts(status.get("criteria")):
        print(f"watching    {_shown(c, 'metric')} ({_shown(c, 'mode')}), keep best {_shown(c, 'keep')}")
    bests = status.get("bests")
    for metric, best in bests.items() if isinstance(bests, dict) else ():
        if isinstance(best, dict):
            value = _fmt_metric(_float(best.get("value")))
            print(f"best        {printable(metric)} {value} at step {_shown(best, 'step')}")
    verdict = status.get("last_verdict")
    if isinstance(verdict, dict):
        v = {k: _shown(verdict, k) for k in ("eval_step", "action", "reason")}
        print(f"last        step {v['eval_step']}: {v['action']} ({v['reason']})")
    print(f"persisted   {field('persisted')} checkpoint(s), {field('pending_acks')} pending")
    _print_unpersisted(status.get("unpersisted"))
    _print_followers(status.get("followers"))
    _print_remote(status.get("remote"))
    malformed = status.get("malformed_lines")
    if isinstance(malformed, dict) and malformed:
        print("malformed   " + printable(", ".join(f"{n} {kind}" for kind, n in sorted(malformed.items()))))
    trainer = status.get("trainer")
    if isinstance(trainer, dict) and trainer.get("skipped_captures"):
        t = {k: _shown(trainer, k) for k in ("skipped_captures", "last_skip_step", "last_skip_reason")}
        print(
            f"trainer     skipped {t['skipped_captures']} capture(s), "
            f"last at step {t['last_skip_step']}: {t['last_skip_reason']}"
        )
        causes = trainer.get("skipped_by_cause")
        if isinstance(causes, dict) and causes:
            shown = ", ".join(f"{n} {c}" for c, n in sorted(causes.items()))
            print(f"            by cause: {printable(shown)}")
    if isinstance(trainer, dict) and trainer.get("staging") == "disk":
        print("staging     on local disk (shared memory too small for the state; slower captures)")
    notes = status.get("log_notes")
    for note in notes if isinstance(notes, list) else ():
        print(f"note        {printable(note)}")
    if status.get("last_error"):
        print(f"last error  {field('last_error')}")


def _print_unpersisted(unpersisted: object) -> None:
    """Acknowledged captures whose persist failed and is retried: a best there exists nowhere
    else (the trainer moved on), so each gets its own line, in capitals."""
    for entry in _dicts(unpersisted):
        what = "the BEST at step" if entry.get("best") is True else "step"
        tags = entry.get("tags")
        tagged = f" ({printable(', '.join(map(str, tags)))})" if isinstance(tags, list) and tags else ""
        print(
            f"NOT ON DISK {what} {_shown(entry, 'step')}{tagged}, {_shown(entry, 'tries')} failed "
            f"tries, slot kept: {_shown(entry, 'error')}"
        )


def _print_remote(remote: object) -> None:
    """The remote tier's line: uploads done and pending, the one under way, the last error."""
    if not isinstance(remote, dict):
        return
    listed = remote.get("pending")
    pending = listed if isinstance(listed, list) else []
    uploading = f", uploading {_shown(remote, 'uploading')}" if remote.get("uploading") else ""
    print(
        f"remote      {_shown(remote, 'url')}: {_shown(remote, 'uploaded')} uploaded, "
        f"{len(pending)} pending (kept locally until uploaded){uploading}"
    )
    if remote.get("last_error"):
        print(f"            last error: {_shown(remote, 'last_error')}")
    dropped = remote.get("not_uploaded")
    for entry in dropped[-3:] if isinstance(dropped, list) else ():
        if isinstance(entry, dict):
            print(f"            not uploaded: {_shown(entry, 'name')}: {_shown(entry, 'why')}")


def _print_followers(followers: object) -> None:
    """One line per follower node of a multi-node job (docs/distributed.md)."""
    for node, report in followers.items() if isinstance(followers, dict) else ():
        if not isinstance(report, dict):
            continue
        alive = report.get("alive") is True
        state = "alive" if alive else f"NO HEARTBEAT (last {_shown(report, 'age_s')} s ago)"
        if report.get("state") == "stopped":
            state = "stopped"
        error = f"; last error: {_shown(report, 'last_error')}" if report.get("last_error") else ""
        print(
            f"follower    node {printable(node)}: {state}, {_shown(report, 'parts_stored')} part(s) stored, "
            f"{_shown(report, 'pending_acks')} pending{error}"
        )


def _shown(data: dict[str, Any], key: str) -> str:
    """A field of a file ckptd does not control, fit for a terminal (escapes made visible)."""
    value = data.get(key)
    return "?" if isinstance(value, (dict, list)) or value is None else printable(value)


def _dicts(value: object) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _number(value: object) -> int:
    return (
        int(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
        else 0
    )


def _float(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _watch_status(args: argparse.Namespace) -> int:
    """``status --watch``: one run, or every run the node config's roots hold (found anew each time)."""
    from ckptd import watch

    if not 0.05 <= args.interval <= 3600:
        raise ConfigError(f"--interval must be a number of seconds from 0.05 to 3600, not {args.interval}")
    if args.run_dir is not None:
        run_dir = _run_dir(args)
        return watch.watch(lambda: [watch.sample(run_dir)], interval=args.interval, as_json=args.json)
    from ckptd.node.discover import find_runs

    node = settings.load_file(args.config).serve_settings()
    return watch.watch(
        lambda: [watch.sample(c.run_dir) for c in find_runs(node)], interval=args.interval, as_json=args.json
    )


def _cmd_verify(args: argparse.Namespace) -> int:
    if args.remote is not None:
        return _verify_remote(args)
    store = _store_for(args)
    # Every directory named like a checkpoint, not only those whose manifest reads:
    # an unreadable manifest is exactly what verify exists to report.
    present = store.checkpoint_dirs()
    unknown = [name for name in args.names if name not in present]
    if unknown:
        raise ConfigError(f"no checkpoint named {', '.join(unknown)} in {store.root} (see ckptd ls)")
    names = args.names or present
    if not names:
        return _nothing_in(store, args.json)
    # Progress on a terminal only: a log file or a pipe gets the one line per checkpoint.
    live = not args.json and sys.stderr.isatty()
    results = [result for name in names if (result := _verify_one(store, name, args.json, live))]
    if args.json:
        print(json.dumps(results, indent=1))
    return EXIT_OK if all(r["ok"] for r in results) else EXIT_CORRUPT


def _verify_one(store: Store, name: str, quiet: bool, live: bool = False) -> dict[str, Any] | None:
    """One checkpoint's verdict, printed unless ``quiet``; None if it was rotated out meanwhile.
    ``live``: a progress line on stderr, redrawn in place as the files are hashed."""
    started = time.monotonic()
    meter = _Meter(name, _manifest_bytes(store, name)) if live else None
    try:
        problems = _problems_of(store, name, meter)
    finally:
        if meter is not None:
            meter.clear()
    if problems is None:
        return None
    if not quiet:
        verdict = "ok" if not problems else "CORRUPT: " + "; ".join(problems)
        print(f"{name}  {verdict}  ({time.monotonic() - started:.1f} s)", flush=True)
    return {"name": name, "ok": not problems, "problems": problems}


def _problems_of(store: Store, name: str, meter: _Meter | None = None) -> list[str] | None:
    try:
        store.read(name)  # every field ls, best and retention rely on, not only the hashes
        problems = store.verify(name, meter)
    except FileNotFoundError:
        if not store.path_of(name).exists():
            return None  # a running daemon's retention removed it: nothing to report
        return [f"manifest {MANIFEST} is missing"]
    except (StoreError, ValueError) as exc:
        if isinstance(exc, StoreError) and exc.action:
            raise  # could not read it (permissions, I/O): a store error, not a corrupt checkpoint
        problem = getattr(exc, "problem", None) or str(exc)
        return [problem if problem.startswith("manifest") else f"manifest: {problem}"]
    return None if not store.path_of(name).exists() else problems


def _cmd_export(args: argparse.Namespace) -> int:
    from ckptd import export
    from ckptd._torch import TorchMissingError

    store = _store_for(args)
    name = args.name or _best_name(args, store)
    if name is None or name not in store.checkpoint_dirs():
        if name is not None:
            print(f"ckptd: no checkpoint named {name} in {store.root} (see ckptd ls)", file=sys.stderr)
        if args.json:
            print("null")  # as `best --json` answers when there is nothing
        return EXIT_EMPTY
    # Verifying a large checkpoint takes a while: the same progress line as verify's, on a terminal.
    meter = _Meter(name, _manifest_bytes(store, name)) if not args.json and sys.stderr.isatty() else None
    config = Path(args.config) if args.config else None
    try:
        done = export.export(store, name, Path(args.to), config, meter)
    except TorchMissingError as exc:
        raise ConfigError(str(exc)) from exc  # the install hint, without a traceback
    finally:
        if meter is not None:
            meter.clear()
    if args.json:
        print(json.dumps(done.to_json(), indent=1))
    else:
        size = format_bytes(done.nbytes)
        print(f"exported {done.name} (step {done.step}): {done.tensors} tensors, {size} in {done.to}")
    return EXIT_OK


def _best_name(args: argparse.Namespace, store: Store) -> str | None:
    """The best checkpoint's name, or None (said on stderr) when no checkpoint has the metric."""
    records = store.list()
    best, criterion = _best_of(args, store, records)
    if best is None:
        print(f"ckptd: no checkpoint with a finite {criterion.metric} in {store.root}", file=sys.stderr)
    return best.name if best is not None else None


def _cmd_demo(args: argparse.Namespace) -> int:
    from ckptd.demo import run_demo

    return run_demo(Path(args.dir) if args.dir else None)


# -- the remote tier (docs/remote.md) ----------------------------------------------------------


def _add_remote_option(parser: Any) -> None:
    parser.add_argument(
        "--remote",
        metavar="URL",
        help="the remote tier, e.g. s3://bucket/runs/exp1 (default: the daemon's, as status.json, "
        "the run's ckptd.toml or $CKPTD_REMOTE name it)",
    )


def _remote_for(args: argparse.Namespace, run_dir: Path) -> Any:
    """The run's ``RemoteStore``: ``--remote``, else the URL the daemon reports, else the run's
    settings; its options from the run's settings (credentials: the backend's environment).
    None when the run has no remote."""
    from ckptd.remote import RemoteError, RemoteStore

    own = settings.run_file_of(run_dir)
    layered = settings.merged(own.run if own else {}, settings.environment_layer())
    reported = _saved_status(run_dir).get("remote")
    url = getattr(args, "remote", None) or (reported.get("url") if isinstance(reported, dict) else None)
    url = url if isinstance(url, str) and url else layered.get("remote")
    if not url:
        return None
    try:
        return RemoteStore(url, layered.get("remote_options") or {})
    except RemoteError as exc:
        raise ConfigError(str(exc)) from exc


def _need_remote(args: argparse.Namespace, run_dir: Path) -> Any:
    remote = _remote_for(args, run_dir)
    if remote is None:
        raise ConfigError(f"{run_dir} has no remote tier: give --remote URL")
    return remote


def _where(name: str, local: set[str], remote: set[str] | None, pending: set[str]) -> str:
    """Where a checkpoint lives: local, remote, both, or uploading (local, upload pending)."""
    if remote is None:
        return "uploading" if name in pending else "local"
    if name in local and name in remote:
        return "both"
    if name in remote:
        return "remote"
    return "uploading" if name in pending else "local"


def _locations(
    args: argparse.Namespace, run_dir: Path, local: list[CheckpointRecord], lineage: frozenset[str]
) -> Any:
    """(every record, remote-only ones included; name -> where) when the run has a remote,
    else None. A remote that cannot be listed is said on stderr; local ones stay listed."""
    from ckptd.protocol import read_pending_uploads
    from ckptd.remote import RemoteError

    remote = _remote_for(args, run_dir)
    if remote is None:
        return None
    try:
        pending = set(read_pending_uploads(RunPaths(run_dir)))
    except ValueError:
        pending = set()
    try:
        # Only this run's: a remote prefix shared with another run lists its checkpoints too.
        remote_records = remote.list(lineage)
        on_remote: set[str] | None = {r.name for r in remote_records}
    except RemoteError as exc:
        print(f"ckptd: cannot list {remote.url}: {exc.problem}", file=sys.stderr)
        remote_records, on_remote = [], None
    names = {r.name for r in local}
    only_remote = [r for r in remote_records if r.name not in names]
    records = sorted([*local, *only_remote], key=lambda r: (r.step, r.name))
    return records, {r.name: _where(r.name, names, on_remote, pending) for r in records}


def _add_pull(commands: Any) -> None:
    pull = _query(
        commands,
        "pull",
        _cmd_pull,
        "fetch a checkpoint from the remote tier and verify it",
        "Download checkpoint NAME (default: the remote's best) from the run's remote tier into the "
        "new directory DIR, checking every file against its manifest's checksum. DIR appears only "
        "once complete (written beside it, then renamed).",
        "the checkpoint fetched, as a JSON object",
        _exit_codes(
            ok="fetched and verified",
            empty="no such checkpoint on the remote",
            usage=_USAGE + "; no remote; DIR exists",
            store="the remote could not be read, or DIR not written",
            corrupt="a file does not match its manifest (nothing is left in DIR)",
        ),
    )
    pull.add_argument(
        "name", nargs="?", metavar="NAME", help="checkpoint to fetch (default: the remote's best)"
    )
    pull.add_argument("--to", required=True, metavar="DIR", help="new directory to write it into")
    _add_store_option(pull)
    pull.add_argument("--metric", help="METRIC[:min|max] that picks the best (default: the daemon's)")
    pull.add_argument("--mode", choices=("min", "max"), help=argparse.SUPPRESS)
    _add_remote_option(pull)


def _cmd_pull(args: argparse.Namespace) -> int:
    from ckptd.remote import RemoteError

    run_dir = _run_dir(args)
    remote = _need_remote(args, run_dir)
    target = Path(args.to)
    if target.exists() or target.is_symlink():
        raise ConfigError(f"{target} exists; pull into a new directory")
    records = remote.list()
    mine = [r for r in records if r.run_id in _store_for(args).lineage()]
    name = args.name or _remote_best_name(args, mine)
    if name is None or name not in {r.name for r in records}:
        print(f"ckptd: no checkpoint {name or '(best)'} on {remote.url}", file=sys.stderr)
        return EXIT_EMPTY
    partial = target.with_name(f".{target.name}.pulling-{os.getpid()}")
    try:
        transfer = remote.download(name, partial)
        os.rename(partial, target)
    except RemoteError as exc:
        _remove_tree(partial)
        print(f"ckptd: {exc}", file=sys.stderr)
        return EXIT_CORRUPT if "mismatch" in exc.problem or "bytes" in exc.problem else EXIT_STORE
    except BaseException:
        _remove_tree(partial)
        raise
    result = {"name": name, "to": str(target), "files": transfer.files, "bytes": transfer.nbytes}
    print(json.dumps(result, indent=1) if args.json else f"{name}: {transfer.files} file(s), "
          f"{format_bytes(transfer.nbytes)} verified, in {target}")  # fmt: skip
    return EXIT_OK


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _remote_best_name(args: argparse.Namespace, records: list[CheckpointRecord]) -> str | None:
    best, _ = _best_of(args, _store_for(args), records)
    return None if best is None else best.name


def _verify_remote(args: argparse.Namespace) -> int:
    from ckptd.remote import RemoteError

    remote = _need_remote(args, _run_dir(args))
    present = [r.name for r in remote.list()]
    unknown = [name for name in args.names if name not in present]
    if unknown:
        raise ConfigError(f"no checkpoint named {', '.join(unknown)} on {remote.url}")
    names = args.names or present
    if not names:
        print(f"ckptd: no checkpoints on {remote.url}", file=sys.stderr)
        print("[]" if args.json else "", end="\n" if args.json else "")
        return EXIT_EMPTY
    results = []
    for name in names:
        started = time.monotonic()
        try:
            problems = remote.verify(name)
        except RemoteError as exc:
            problems = [exc.problem]
        results.append({"name": name, "ok": not problems, "problems": problems})
        if not args.json:
            verdict = "ok" if not problems else "CORRUPT: " + "; ".join(problems)
            print(f"{name}  {printable(verdict)}  ({time.monotonic() - started:.1f} s)", flush=True)
    if args.json:
        print(json.dumps(results, indent=1))
    return EXIT_OK if all(r["ok"] for r in results) else EXIT_CORRUPT


# -- helpers --------------------------------------------------------------------------------


_STATE_MAX_BYTES = 16 << 20  # a state.json is KiBs: /dev/zero behind a link stops here


def _saved_status(run_dir: Path) -> dict[str, Any]:
    return read_status(RunPaths(run_dir))


def _saved_state(run_dir: Path) -> dict[str, Any]:
    try:
        data = read_small_json(RunPaths(run_dir).state, _STATE_MAX_BYTES)
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _run_dir(args: argparse.Namespace) -> Path:
    run_dir = Path(args.run_dir)
    if run_dir.is_file():
        raise ConfigError(f"{run_dir} is a file, not a run directory")
    if not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} does not exist")
    return run_dir


def _store_for(args: argparse.Namespace) -> Store:
    run_dir = _run_dir(args)
    if args.store:
        return Store(run_dir / args.store)
    saved = _saved_state(run_dir).get("store")
    return Store(Path(saved) if isinstance(saved, str) else RunPaths(run_dir).default_store)


def _criterion_for(
    args: argparse.Namespace, store: Store, records: list[CheckpointRecord], *, warn: bool = False
) -> Criterion:
    """What "best" means, most explicit first: ``--metric M:MODE`` or ``--mode``; the mode the
    daemon recorded in state.json; the one in the newest manifest; last, a guess from the name
    (said on stderr when ``warn``: guessing max for ``eval_wer`` would pick the worst model).
    """
    metric, mode = _explicit(getattr(args, "metric", None), getattr(args, "mode", None))
    recorded = _state_modes(Path(args.run_dir))
    if metric is None:
        metric = next(iter(recorded), None) or _manifest_metric(store, records)
    mode = mode or recorded.get(metric) or _manifest_modes(store, records, metric).get(metric)
    if mode is None:
        mode = Criterion.default_mode(metric)
        if warn:
            print(
                f"ckptd: no mode recorded for {metric} (not in .ckptd/state.json nor in a manifest); "
                f"guessing {mode} from its name; say --metric {metric}:min or --mode to be sure",
                file=sys.stderr,
            )
    return Criterion(metric, mode)


def _explicit(spec: str | None, mode: str | None) -> tuple[str | None, Mode | None]:
    """``--metric M[:MODE]`` and ``--mode`` as given; a mode only when the user typed one."""
    if not spec:
        return None, _mode_or_none(mode)
    try:
        criterion = Criterion.parse(spec)
    except ValueError as exc:
        raise ConfigError(f"--metric: {exc}") from exc
    typed = spec.partition(":")[2].strip() or None
    if typed and mode and typed != mode:
        raise ConfigError(f"--metric {spec} and --mode {mode} disagree; give the mode once")
    return criterion.metric, _mode_or_none(typed or mode)


def _mode_or_none(mode: object) -> Mode | None:
    return mode if mode in _MODES else None  # type: ignore[return-value]


def _state_modes(run_dir: Path) -> dict[str, Mode]:
    """``criteria`` of state.json (``["eval_wer:min", ...]``) as {metric: mode}, in order."""
    modes: dict[str, Mode] = {}
    criteria = _saved_state(run_dir).get("criteria")
    for spec in criteria if isinstance(criteria, list) else []:
        metric, _, mode = str(spec).partition(":")
        if metric and _mode_or_none(mode):
            modes.setdefault(metric, mode)  # type: ignore[arg-type]
    return modes


def _manifest_modes(store: Store, records: list[CheckpointRecord], metric: str | None) -> dict[str, Mode]:
    """The ``criteria`` of the newest manifest that has some (naming ``metric``, when given)."""
    for record in sorted(records, key=lambda r: r.created, reverse=True):
        try:
            raw = store.manifest(record.name).get("criteria")
        except (OSError, ValueError):
            continue  # rotated out or unreadable: an older manifest may still tell
        modes = {str(k): v for k, v in raw.items() if _mode_or_none(v)} if isinstance(raw, dict) else {}
        if modes and (metric is None or metric in modes):
            return modes
    return {}


def _manifest_metric(store: Store, records: list[CheckpointRecord]) -> str:
    # Manifests keep their keys sorted, not in the daemon's order: prefer the usual default.
    metrics = list(_manifest_modes(store, records, None))
    return "eval_loss" if not metrics or "eval_loss" in metrics else metrics[0]


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


# -- node mode and operations ---------------------------------------------------------------------

DEFAULT_NODE_CONFIG = "/etc/ckptd/ckptd.toml"


def _add_serve(commands: Any) -> None:
    serve = commands.add_parser(
        "serve",
        help="node mode: follow every run under the configured roots (systemd service)",
        description="Adopt every run under [serve] roots of FILE that opts in (a ckptd.toml in "
        "its directory, or a log matching an [serve] adopt glob) and follow each as `ckptd run` "
        "would, in this one process. As root, each user's runs are served by a worker running "
        "as that user. SIGHUP reloads FILE (policy changes apply to running runs at once); "
        "SIGTERM drains (persists in flight finish, up to drain_timeout); a second SIGTERM exits "
        "at once. Speaks systemd's notify protocol when NOTIFY_SOCKET is set.",
        epilog=_exit_codes(
            ok="drained and stopped; with --check: FILE is valid",
            empty="the drain deadline passed with a persist unfinished",
            usage="FILE is missing or invalid (the message names the key)",
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--config", default=DEFAULT_NODE_CONFIG, metavar="FILE", help="node config (TOML)")
    serve.add_argument("--check", action="store_true", help="validate FILE and list what it would serve")
    serve.add_argument("--log-level", choices=settings.LOG_LEVELS, help="default: [serve] log_level, info")
    serve.add_argument("--worker-uid", type=int, help=argparse.SUPPRESS)  # started by a root daemon
    serve.set_defaults(handler=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    from ckptd.node import serve

    stacks.install(signal.SIGUSR1)
    file = settings.load_file(args.config)
    logging.basicConfig(
        level=_log_level(args.log_level, file.serve_settings().log_level),
        # The thread is the run: each run's daemon runs on a thread named after its run dir.
        format="%(asctime)s ckptd[%(process)d] %(levelname)s [%(threadName)s] %(message)s",
    )
    return serve(Path(args.config), worker_uid=args.worker_uid, check=args.check)


def _log_level(given: str | None, default: str) -> int:
    """--log-level, else $CKPTD_LOG_LEVEL, else ``default``, as a logging level."""
    level = given or os.environ.get("CKPTD_LOG_LEVEL") or default
    if level.lower() not in settings.LOG_LEVELS:
        raise ConfigError(f"$CKPTD_LOG_LEVEL={level!r}: must be one of {', '.join(settings.LOG_LEVELS)}")
    return int(getattr(logging, level.upper()))


def _node_status(args: argparse.Namespace) -> int:
    from ckptd.node.discover import find_runs

    node = settings.load_file(args.config).serve_settings()
    rows = []
    for candidate in find_runs(node):
        paths = RunPaths(candidate.run_dir)
        age = heartbeat_age(paths)
        status = _saved_status(candidate.run_dir) if age is not None else {}
        alive = age is not None and age <= STALE_AFTER_S
        rows.append({**status, "run_dir": str(candidate.run_dir), "alive": alive, "heartbeat_age_s": age})
    if args.json:
        print(json.dumps(rows, indent=1))
    for row in [] if args.json else rows:
        bests = row["bests"] if isinstance(row.get("bests"), dict) else {}
        shown = ", ".join(
            f"{m}={_fmt_metric(_float(b.get('value')))}@{_shown(b, 'step')}"
            for m, b in bests.items()
            if isinstance(b, dict)
        )
        state = "running" if row["alive"] else "not followed"
        lag = _float(row.get("log_lag_seconds")) or 0.0
        print(f"{row['run_dir']}  {state}  lag {lag:.1f} s  {shown or 'no best yet'}")
    if not rows and not args.json:
        print(f"no run opts in under {', '.join(map(str, node.roots))}")
    return EXIT_OK if all(row["alive"] for row in rows) else EXIT_EMPTY


def _add_prune(commands: Any) -> None:
    prune = _query(
        commands,
        "prune",
        _cmd_prune,
        "apply the retention policy now",
        "Delete the checkpoints the policy does not keep, now, under the store lock the daemon's "
        "rotation holds (a persist in flight is never touched; a best the daemon's state names "
        "never goes). The policy is the one the daemon last reported, or the --keep-* options.",
        "the checkpoints deleted (or, with --dry-run, that would be)",
        _exit_codes(ok="pruned (or nothing to prune)", usage=_USAGE + "; no policy known", store=_STORE),
    )
    _add_store_option(prune)
    prune.add_argument("--dry-run", action="store_true", help="say what would go, delete nothing")
    prune.add_argument("--keep-last", type=int, metavar="N", help="latest kept (default: the daemon's)")
    prune.add_argument("--keep-best", type=int, metavar="K", help="best kept per criterion")
    prune.add_argument("--keep-every", type=int, metavar="M", help="also keep multiples of M")


def _cmd_prune(args: argparse.Namespace) -> int:
    from ckptd import ops

    run_dir = _run_dir(args)
    overrides = {k: getattr(args, k) for k in ("keep_last", "keep_best", "keep_every")}
    for key, value in overrides.items():
        if value is not None and value < (0 if key == "keep_last" else 1):
            raise ConfigError(f"--{key.replace('_', '-')} must be >= {0 if key == 'keep_last' else 1}")
    policy = ops.recorded_policy(run_dir, {k: v for k, v in overrides.items() if v is not None})
    store = _store_for(args)
    doomed = ops.prune(store, run_dir, policy, dry_run=args.dry_run)
    if args.json:
        print(json.dumps([_record_json(store, r) for r in doomed], indent=1))
        return EXIT_OK
    verb = "would delete" if args.dry_run else "deleted"
    print(f"policy: {policy.describe()}")
    for record in doomed:
        print(f"{verb} {record.name}")
    if not doomed:
        print("nothing to prune")
    return EXIT_OK


def _add_request(commands: Any) -> None:
    request = _query(
        commands,
        "request",
        _cmd_request,
        "ask the trainer for a snapshot at its next step (save now)",
        "Ask the daemon following RUN_DIR to have the trainer capture its state at the next "
        "step boundary; the checkpoint is tagged TAG and rotated like any other.",
        "the request as a JSON object",
        _exit_codes(
            ok="asked (a live daemon follows the run)",
            empty="no live daemon follows it",
            usage=_USAGE,
        ),
    )
    request.add_argument("--tag", default="manual", help="tag of the checkpoint (default: manual)")


def _cmd_request(args: argparse.Namespace) -> int:
    from ckptd.protocol import write_request

    paths = RunPaths(_run_dir(args))
    age = heartbeat_age(paths)
    if age is None or age > STALE_AFTER_S:
        print(f"ckptd: no live daemon follows {paths.run_dir}; nothing asked", file=sys.stderr)
        return EXIT_EMPTY
    path = write_request(paths, args.tag)
    if args.json:
        print(json.dumps({"run_dir": str(paths.run_dir), "tag": args.tag, "request": str(path)}))
    else:
        print(f"asked for a snapshot tagged {args.tag} at the trainer's next step")
    return EXIT_OK


def _add_gc(commands: Any) -> None:
    gc = commands.add_parser(
        "gc",
        help="remove staging dirs in shared memory that no run can use any more",
        description="Look at every ckptd-* staging dir of the shared-memory root (/dev/shm, or "
        "$CKPTD_SHM_ROOT), untouched for --grace seconds, and remove those whose run dir is "
        "gone or now belongs to another run, and those whose run has no live daemon (no fresh "
        "heartbeat, no process holding its lock), no trainer holding its client lock and no "
        "pending ack naming one of their slots. A dir that still holds an acknowledged "
        "snapshot is never removed (the next daemon start persists it); its other slots are. "
        "Whatever cannot be read (a run dir, its state, an ack) keeps the dir. `ckptd serve` "
        "does this every minute, a daemon at its start.",
        epilog=_exit_codes(ok="swept (or nothing to sweep)", store="a staging dir could not be removed"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gc.add_argument("--dry-run", action="store_true", help="say what would go, remove nothing")
    gc.add_argument(
        "--grace", type=float, default=600.0, metavar="S", help="left alone if touched within S s (600)"
    )
    gc.add_argument("--json", action="store_true", help="the swept dirs and slots as a JSON list")
    gc.set_defaults(handler=_cmd_gc)


def _cmd_gc(args: argparse.Namespace) -> int:
    from ckptd import sweep

    if not args.grace >= 0:
        raise ConfigError(f"--grace must be a number of seconds >= 0, not {args.grace}")
    orphans, unknown = sweep.find_orphans(grace=args.grace)
    failed = 0
    swept: list[sweep.Orphan] = []
    for orphan in orphans:
        if args.dry_run:
            swept.append(orphan)
            continue
        try:
            if sweep.remove(orphan):
                swept.append(orphan)
            else:
                print(f"left {orphan.path}: in use again, or gone already", file=sys.stderr)
        except OSError as exc:
            failed += 1
            print(f"ckptd: cannot remove {orphan.path}: {exc.strerror or exc}", file=sys.stderr)
    if args.json:
        rows = [{"path": str(o.path), "run_dir": o.run_dir, "why": o.why, "bytes": o.nbytes} for o in swept]
        print(json.dumps(rows, indent=1))
    else:
        verb = "would remove" if args.dry_run else "removed"
        for orphan in swept:
            print(f"{verb} {orphan.path} ({format_bytes(orphan.nbytes)}): {orphan.why}")
        for path in unknown:
            print(f"left {path}: it does not say which run it belongs to", file=sys.stderr)
        if not swept:
            print("nothing to sweep")
    return EXIT_STORE if failed else EXIT_OK


class _Meter:
    """``verify``'s progress line on a terminal: percent, bytes, speed; at most 10 redraws a second."""

    def __init__(self, name: str, total: int) -> None:
        self.name, self.total = name, total
        self.done = 0
        self.started = time.monotonic()
        # The first chunk draws at once (a hot page cache hashes a checkpoint in less than a
        # redraw interval, and a terminal should still see that something happened).
        self.drawn = self.started - 1.0

    def __call__(self, nbytes: int) -> None:
        self.done += nbytes
        now = time.monotonic()
        if now - self.drawn < 0.1:
            return
        self.drawn = now
        rate = self.done / max(now - self.started, 1e-9)
        share = f"{100 * self.done / self.total:.0f}% of {format_bytes(self.total)}, " if self.total else ""
        speed = format_bytes(int(rate))
        sys.stderr.write(f"\r\x1b[K{self.name}  {share}{format_bytes(self.done)} at {speed}/s")
        sys.stderr.flush()

    def clear(self) -> None:
        if self.done:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def _manifest_bytes(store: Store, name: str) -> int:
    """What the manifest says the files weigh (0 when it cannot tell): the meter's 100%."""
    try:
        files = store.manifest(name).get("files")
    except (OSError, ValueError):
        return 0
    if not isinstance(files, dict):
        return 0
    return sum(_number(entry.get("bytes")) for entry in files.values() if isinstance(entry, dict))


def _add_plot(commands: Any) -> None:
    from ckptd.plot import MAX_LISTED_SAVES, MAX_PANELS

    plot = _query(
        commands,
        "plot",
        _cmd_plot,
        "draw the watched metric over steps, with what was kept",
        "Draw each watched metric over steps, read from the log the daemon follows (as status.json, "
        "the run's ckptd.toml and CKPTD_* variables name it, else detected), or from the checkpoints' "
        "manifests when the log is gone. Marks every retained checkpoint (best, periodic, other), the "
        "best eval, and where a save every --save-steps (default: the daemon's --every-steps) alone "
        "would have landed. Colour only on a terminal.",
        "the series and markers as a JSON object (ignores --width); non-finite values are the "
        'strings "nan", "inf", "-inf"; per panel, save_steps is the schedule, would_save its first '
        f"{MAX_LISTED_SAVES} steps within the plotted range, would_save_count how many in all",
        _exit_codes(
            ok="drawn",
            empty="nothing to plot: no eval in the log and no checkpoint, or no value of --metric",
            usage=_USAGE + "; --png without matplotlib (pip install 'ckptd[plot]')",
            store=_STORE,
        ),
    )
    _add_store_option(plot)
    plot.add_argument(
        "--metric", help=f"METRIC[:min|max]: one panel (default: one per criterion, at most {MAX_PANELS})"
    )
    plot.add_argument("--png", metavar="FILE.png", help="also write a PNG image (needs matplotlib)")
    plot.add_argument(
        "--png-size", default="1000x400", metavar="WxH", help="the PNG's size in pixels (1000x400)"
    )
    plot.add_argument(
        "--width", type=int, metavar="N", help="columns, 30 to 1000 (default: the terminal's width)"
    )
    plot.add_argument(
        "--save-steps", type=int, metavar="S", help="mark a save every S steps (default: the daemon's)"
    )


def _cmd_plot(args: argparse.Namespace) -> int:
    import shutil

    from ckptd import plot
    from ckptd.text import printable

    if not args.run_dir:
        raise ConfigError("RUN_DIR must not be empty")
    # JSON has no width; a narrow terminal gets the narrowest picture, only a --width is refused.
    width = 0 if args.json else plot.text_width(args.width, shutil.get_terminal_size().columns)
    if args.save_steps is not None and args.save_steps < 1:
        raise ConfigError(f"--save-steps must be >= 1, not {args.save_steps}")
    size = _png_size(args.png_size)
    png = None if args.png is None else plot.png_path(args.png)
    data = plot.load_plot(_run_dir(args), _store_for(args), metric=args.metric, save_steps=args.save_steps)
    if data.empty or data.missing:
        print("\n".join(plot.empty_message(data, args.run_dir)), file=sys.stderr)
        if args.json:
            print(json.dumps(plot.to_json(data), indent=1, allow_nan=False))
        return EXIT_EMPTY
    if png is not None:
        try:
            plot.write_png(data, png, size)
        except ImportError as exc:  # missing, or there but broken (a bad .so)
            raise ConfigError(f"{plot.PNG_HINT} ({printable(exc)})") from exc
    if args.json:
        print(json.dumps(plot.to_json(data), indent=1, allow_nan=False))
    else:
        print("\n".join(plot.render_all(data, width, colour=sys.stdout.isatty())))
    return EXIT_OK


def _png_size(text: str) -> tuple[int, int]:
    import re

    from ckptd.text import printable

    # fullmatch and [0-9]: isdigit() takes "²", and "$" lets a trailing newline through.
    found = re.fullmatch(r"([0-9]+)x([0-9]+)", text, re.IGNORECASE)
    sides = (int(found[1]), int(found[2])) if found else (0, 0)
    if not all(100 <= side <= 10000 for side in sides):
        raise ConfigError(
            f"--png-size must be WIDTHxHEIGHT in pixels, 100 to 10000 each, not {printable(repr(text))}"
        )
    return sides
