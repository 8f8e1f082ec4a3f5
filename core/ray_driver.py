"""The one Ray driver: one task per unit of work (a shard, a chunk of images), bounded in flight.

``with ray_session(workers, address) as ray:`` joins the cluster at ``address`` / ``$RAY_ADDRESS``, or
starts a local instance that listens on loopback only (an unauthenticated Ray cluster reachable from
the network would run anyone's code), without a dashboard, and shuts down only what it started.
``run_tasks(fn, tasks, ...)`` runs ``fn(*args)`` for each ``(key, args)`` of ``tasks``: in this process when ``ray`` is
None, otherwise as Ray tasks with at most ``in_flight_per_worker x workers`` queued (``ray.wait``), each
retried by Ray when its worker dies. ``on_result(key, result, error)`` is called in the driver as each
finishes, in completion order; errors of the ``expected`` classes are handed to it, others propagate.

:func:`interruptible` turns SIGTERM and SIGINT into :class:`Interrupted` in the driver, so a batch
job can record what is finished and say so in one line instead of dying in a traceback (Ray's own
SIGTERM handler prints a crash dump; it is replaced while the block runs).
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal

log = logging.getLogger("segswap")

# Tasks queued per worker: enough to keep workers busy while results come back, few enough that a
# cluster-sized job does not submit thousands of tasks at once.
IN_FLIGHT_PER_WORKER = 2
# Ray re-runs a task whose worker process died (OOM killer, node lost) this many times.
MAX_RETRIES = 3


class Interrupted(BaseException):
    """SIGTERM or SIGINT arrived; ``signum`` says which (exit status 128 + signum by convention)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# The signal that interrupted the running interruptible() block, if any. Native code that calls back
# into Python (numba's compiled blend does, to unpickle constants) turns the Interrupted raised there
# into an error of its own (SystemError), which an ``except Exception`` would then take for a failure
# and the ignored later signals could not repeat: the record lets the job still stop.
_pending: list[int] = []


def raise_if_interrupted() -> None:
    """Raise :class:`Interrupted` if a signal arrived in the running block and its exception was
    turned into another one on the way (call it where a broad ``except`` keeps a batch going)."""
    if _pending:
        raise Interrupted(_pending[0])


@contextlib.contextmanager
def interruptible():
    """While the block runs, SIGTERM/SIGINT raise :class:`Interrupted` (once; later ones are ignored
    until the block has cleaned up), then the previous handlers come back. An exception of another
    kind that leaves the block after a signal arrived becomes that Interrupted."""
    def handler(signum, _frame):
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, signal.SIG_IGN)
        _pending.append(signum)
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    _pending.clear()
    try:
        yield
    except Exception as e:
        if _pending:
            raise Interrupted(_pending[0]) from e
        raise
    finally:
        _pending.clear()
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def ray_session(workers: int, address: str | None = None):
    """Yields the ``ray`` module connected to a cluster; None when ``workers == 0`` (in-process)."""
    if workers <= 0:
        yield None
        return
    # Must be in the environment before ray.init: a local instance then binds to loopback only.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    started = False
    if not ray.is_initialized():
        # ray.init installs its own SIGTERM handler (a crash dump); keep the driver's instead.
        handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            log.info("joining the Ray cluster at %s", address)
            ray.init(address=address, log_to_driver=True)
        else:
            log.info("starting a local Ray instance with %d workers (loopback only, no dashboard)", workers)
            ray.init(num_cpus=workers, include_dashboard=False, _node_ip_address="127.0.0.1",
                     configure_logging=False)
        started = True
        for s, h in handlers.items():
            signal.signal(s, h)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def run_tasks(fn, tasks, on_result, *, ray=None, workers: int = 1, expected: tuple = (),
              max_retries: int = MAX_RETRIES, in_flight_per_worker: int = IN_FLIGHT_PER_WORKER) -> None:
    """``fn(*args)`` for every ``(key, args)`` in ``tasks``, in-process (``ray=None``) or one Ray task each."""
    if ray is None:
        for key, args in tasks:
            try:
                result = fn(*args)
            except expected as e:
                on_result(key, None, e)
                continue
            on_result(key, result, None)
        return
    lost = (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError, ray.exceptions.OutOfMemoryError)
    remote = ray.remote(num_cpus=1, max_retries=max_retries)(fn)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    max_in_flight = max(1, in_flight_per_worker * max(workers, cpus))
    # Interrupted or failed, tasks still queued end with the session (ray.shutdown stops the workers):
    # cancelling them here races with their completion and crashes Ray's core worker (Ray 2.60).
    queue, pending = list(tasks), {}
    while queue or pending:
        while queue and len(pending) < max_in_flight:
            key, args = queue.pop(0)
            pending[remote.remote(*args)] = key
        ready, _ = ray.wait(list(pending), num_returns=1)
        key = pending.pop(ready[0])
        try:
            result = ray.get(ready[0])
        except expected as e:  # a RayTaskError is also an instance of the task's exception class
            on_result(key, None, e)
            continue
        except lost as e:
            # Lost after Ray's retries: hand it on and finish the others; a rerun redoes this one.
            on_result(key, None, e)
            continue
        on_result(key, result, None)
