"""Stopping a run cleanly: a signal asks, the training loop saves a checkpoint at the end of its step and stops.

Apart from the recipe so that a study worker (whose watchdog asks when its driver dies) can ask without a signal.
"""

from __future__ import annotations

import contextlib
import signal
import threading

STOP = threading.Event()  # set by a signal handler: the run saves a checkpoint at the next step and stops


@contextlib.contextmanager
def stop_on_signals(second_stops_at_once: bool = True):
    """Turn SIGINT/SIGTERM into a clean stop: the step in flight finishes, a checkpoint is saved, then
    :class:`Interrupted` is raised. A second signal stops at once (a person pressing Ctrl-C again), unless
    ``second_stops_at_once`` is off: a study worker hears only machines (its driver, the driver's death), for
    which every signal repeats the one request to stop after a checkpoint."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if STOP.is_set() and second_stops_at_once:
            raise KeyboardInterrupt
        STOP.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        STOP.clear()
