"""The process's CPU math threads for dygraph execution, kept across Paddle Inference runs.

Running a Paddle Inference predictor resets the calling thread's math-thread count (seen with Paddle 2.6.2: the
dygraph run after it used 1 thread instead of the 2 set before): dygraph results then differ in their last bits
(a pruned det's output digest changed) and training runs slower. :func:`set_threads` records the count and
:func:`restore` re-applies it; the Paddle predictors call :func:`restore` after every run.
"""

_threads = None


def set_threads(threads):
    """Set (and remember) the CPU math threads of dygraph execution (Paddle 2.6 has no public setter)."""
    global _threads
    from paddle.base import core

    _threads = int(threads)
    core.set_num_threads(_threads)


def restore():
    """Re-apply the count of the last :func:`set_threads` call (nothing when it was never called)."""
    if _threads is not None:
        from paddle.base import core

        core.set_num_threads(_threads)


def current():
    """The count of the last :func:`set_threads` call, or None."""
    return _threads
