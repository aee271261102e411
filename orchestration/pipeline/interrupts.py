"""Ctrl-C that is never lost in a long, resumable run (`layerwise run`, `layerwise study`).

Python runs a signal handler at the next bytecode of the main thread. If that bytecode belongs to a weakref
callback that the garbage collector fires (SQLAlchemy's, under MLflow, are common), the KeyboardInterrupt is
raised inside the callback, printed as "Exception ignored" and dropped: the run goes on as if nothing had
happened. So the handler also records the request, and `check()` raises it again at the next stage
boundary. Finished stages are kept, so the rerun resumes from there.
"""

from __future__ import annotations

import signal
import threading

_requested = False


def install() -> None:
    """Route SIGINT through `_on_sigint` (main thread only: Python allows no handler elsewhere)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_sigint)


def requested() -> bool:
    return _requested


def check() -> None:
    """Raise KeyboardInterrupt if Ctrl-C came earlier, even if its first KeyboardInterrupt was swallowed."""
    if _requested:
        raise KeyboardInterrupt("interrupted earlier (SIGINT); stopping at a stage boundary")


def _on_sigint(signum, frame) -> None:
    global _requested
    _requested = True
    raise KeyboardInterrupt
