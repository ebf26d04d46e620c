"""``kill -USR1 PID``: every thread's stack on stderr, for a daemon that seems stuck.

Not ``faulthandler.register(all_threads=True)``: its C-level handler walks other threads'
frames while they run, and crashed ``ckptd run`` with SIGSEGV about once in ten dumps here
(a watcher thread starting or ending). This handler runs in the main thread between two
bytecodes, holding the GIL, so no other thread's frames move while they are read; a main
thread blocked on a lock or a syscall is interrupted and runs it too.
"""

from __future__ import annotations

import signal
import sys
import threading
import traceback
from typing import TextIO


def dump_all_threads(out: TextIO | None = None) -> None:
    out = out or sys.stderr
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    for ident, frame in sys._current_frames().items():
        print(f"Thread {ident:#x} ({names.get(ident, '?')}) (most recent call first):", file=out)
        for entry in reversed(traceback.extract_stack(frame)):
            print(f'  File "{entry.filename}", line {entry.lineno} in {entry.name}', file=out)
        print(file=out)
    out.flush()


def install(signum: int = signal.SIGUSR1) -> None:
    signal.signal(signum, lambda _signum, _frame: dump_all_threads())
