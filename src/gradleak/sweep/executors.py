"""Where a sweep's groups run: this process, worker processes, or Ray tasks.

Every executor runs each group's task with one intra-op thread (LeNet-sized
work is a chain of small ops that threads only slow down), and sends what the
task emits back to the runner in this process, which alone writes files.
"""

from __future__ import annotations

import ctypes
import functools
import multiprocessing
import os
import queue
import signal
import socket
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import torch

from gradleak.attacks.threads import attack_threads
from gradleak.errors import ConfigError, GradleakError
from gradleak.sweep.runner import Attachments, Group, Row, Task

Receive = Callable[[int, Row, Attachments | None], None]

RAY_EXTRA = 'pip install -c constraints.txt "gradleak[ray]"'


def cpu_count() -> int:
    """The cores this process may use (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def make_executor(workers: int | None = None, ray: str | None = None) -> Any:
    """The executor for ``--workers N`` and ``--ray ADDRESS``.

    Args:
        workers: Worker processes (default: the CPU cores); 1 runs in this process.
            With ``ray="local"`` it is the number of CPUs the local Ray gets.
        ray: None, "local", "auto" or "HOST:PORT".
    """
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers must be 1 or more, got {workers}")
    if ray is not None:
        return RayExecutor(ray, cpus=workers)
    count = cpu_count() if workers is None else workers
    return InProcess() if count == 1 else Processes(count)


class _Closing:
    """Executors are context managers: Ray connects once and disconnects at the end."""

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        pass


class InProcess(_Closing):
    """Groups one after another in this process: the reference executor."""

    name = "this process"

    def run(self, task: Task, context: Any, groups: Sequence[Group], receive: Receive) -> list[str]:
        with attack_threads("cpu"):  # the workers' choice, here too
            for index, group in enumerate(groups):
                task(context, group.spec, lambda row, files, i=index: receive(i, row, files))
        return []


# --------------------------------------------------------------------------
# Worker processes


class Processes(_Closing):
    """N worker processes, each taking the next group as it finishes one.

    Workers are started with "spawn" (a fresh interpreter: no state of this
    process, threads included, is inherited) on the first `run` and serve
    every later one until `close` (each start costs seconds: importing
    torch).  They die with this process (Linux: PR_SET_PDEATHSIG) and
    ignore Ctrl-C, which this process handles by ending them.  A worker that
    dies mid-group is reported and not replaced; the others go on.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.name = f"{workers} worker processes"
        self._procs: list[Any] = []
        self._inboxes: list[Any] = []
        self._outbox: Any = None
        self._dead: set[int] = set()

    def __enter__(self) -> Processes:
        # Started now, the workers import torch while this process reads the data.
        self._start()
        return self

    def _start(self) -> None:
        spawn = multiprocessing.get_context("spawn")
        self._outbox = spawn.Queue()
        self._inboxes = [spawn.Queue() for _ in range(self.workers)]
        self._procs = [
            spawn.Process(target=_worker_main, args=(w, inbox, self._outbox), daemon=True)
            for w, inbox in enumerate(self._inboxes)
        ]
        for proc in self._procs:
            proc.start()

    def close(self) -> None:
        for worker, inbox in enumerate(self._inboxes):
            if worker not in self._dead:
                inbox.put(None)
        for proc in self._procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        self._procs, self._inboxes = [], []

    def run(self, task: Task, context: Any, groups: Sequence[Group], receive: Receive) -> list[str]:
        if not groups:
            return []
        previous = signal.getsignal(signal.SIGTERM)
        # `kill` of this process: end like Ctrl-C (workers stopped, files closed).
        signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            if not self._procs:
                self._start()
            return self._serve(task, context, groups, receive)
        except BaseException:
            for proc in self._procs:  # an interrupt or an error: nothing more to wait for
                proc.kill()
            self._dead = set(range(len(self._procs)))
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _serve(
        self, task: Task, context: Any, groups: Sequence[Group], receive: Receive
    ) -> list[str]:
        busy: dict[int, int] = {}  # worker -> the group it is running
        upcoming = list(range(len(groups)))
        failures: list[str] = []

        def hand_out(worker: int) -> None:
            if upcoming:
                index = upcoming.pop(0)
                busy[worker] = index
                self._inboxes[worker].put((task, context, index, groups[index].spec))

        for worker in range(len(self._procs)):
            if worker not in self._dead:
                hand_out(worker)
        while busy:
            try:
                message = self._outbox.get(timeout=0.5)
            except queue.Empty:
                for worker in list(busy):
                    proc = self._procs[worker]
                    if not proc.is_alive():
                        failures.append(_died(worker, proc.pid, proc.exitcode, groups, busy))
                        self._dead.add(worker)
                        del busy[worker]
                continue
            kind, worker, index, *payload = message
            if kind == "row":
                receive(index, *payload)
            elif kind == "done":
                del busy[worker]
                hand_out(worker)
            elif kind == "error":
                raise _rebuild(*payload)
        if upcoming:  # every worker died
            failures.append(f"no worker left for {len(upcoming)} groups")
        return failures


def _died(
    worker: int, pid: int | None, code: int | None, groups: Sequence[Group], busy: dict
) -> str:
    how = (
        f"signal {signal.Signals(-code).name}"
        if code is not None and code < 0
        else f"exit code {code}"
    )
    items = len(groups[busy[worker]].keys)
    return f"worker {worker} (process {pid}) died ({how}) in a group of {items} items"


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _worker_main(worker: int, inbox: Any, outbox: Any) -> None:
    """A worker's loop: take a group, run its task, send every row, say done."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    import gradleak.attacks.engine  # noqa: F401 - warm: every task uses it, import it while idle

    while True:
        job = inbox.get()
        if job is None:
            return
        task, context, index, spec = job
        try:
            task(context, spec, functools.partial(_send, outbox, worker, index))
        except GradleakError as error:
            outbox.put(("error", worker, index, type(error).__name__, str(error)))
            return
        except Exception as error:  # a bug: the parent shows it, with its type
            outbox.put(("error", worker, index, type(error).__name__, _describe(error)))
            return
        outbox.put(("done", worker, index))


def _send(outbox: Any, worker: int, index: int, row: Row, files: Attachments | None) -> None:
    outbox.put(("row", worker, index, row, files))


def _describe(error: BaseException) -> str:
    import traceback

    return "".join(traceback.format_exception(error)).strip()


def _rebuild(kind: str, message: str) -> BaseException:
    """A worker's error, raised again here (user errors keep their one line)."""
    import gradleak.errors as errors

    cls = getattr(errors, kind, None)
    if isinstance(cls, type) and issubclass(cls, GradleakError):
        return cls(message)
    return RuntimeError(f"a worker failed with {kind}:\n{message}")


def _die_with_parent() -> None:
    """Ask Linux to kill this worker when its parent dies (kill -9 included)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # the parent was already gone
        os._exit(1)


# --------------------------------------------------------------------------
# Ray


class RayExecutor(_Closing):
    """Groups as Ray tasks (one CPU each), on a local Ray or a cluster.

    ADDRESS "local" starts Ray on this machine with `cpus` CPUs (default:
    the cores here) and its temporary folder under the system's temp dir;
    "auto" and "HOST:PORT" join a running cluster (``ray start --head``).
    The store, resume and report stay here, on the driver; each task builds
    its victims itself from the data folder, so only small specs travel.
    Nothing is sent anywhere else: usage statistics and the dashboard are off.
    """

    def __init__(self, address: str, cpus: int | None = None) -> None:
        if not address:
            raise ConfigError("--ray needs an address: local, auto or HOST:PORT")
        self.address = address
        self.cpus = cpus
        self.name = f"Ray ({address})"
        self._ray: Any = None

    def __enter__(self) -> RayExecutor:
        self._start()  # a dead address or a missing extra fails before any work
        return self

    def _start(self) -> None:
        if self._ray is None:
            ray = _import_ray()
            self._connect(ray)
            self._ray = ray

    def close(self) -> None:
        if self._ray is not None:
            self._ray.shutdown()  # a joined cluster keeps running; a local Ray ends here
            self._ray = None

    def run(self, task: Task, context: Any, groups: Sequence[Group], receive: Receive) -> list[str]:
        self._start()
        ray = self._ray
        remote = ray.remote(num_cpus=1, max_retries=0, num_returns="streaming")(_ray_group)
        context_ref = ray.put(context)
        streams = {
            remote.remote(task, context_ref, group.spec): index
            for index, group in enumerate(groups)
        }
        failures: list[str] = []
        while streams:
            ready, _ = ray.wait(list(streams), num_returns=1, timeout=1.0)
            for stream in ready:
                index = streams[stream]
                try:
                    row, files = ray.get(next(stream))
                except StopIteration:
                    del streams[stream]
                    continue
                except ray.exceptions.RayTaskError as error:
                    cause = error.cause if hasattr(error, "cause") else None
                    if isinstance(cause, GradleakError):
                        raise type(cause)(str(cause)) from None
                    raise RuntimeError(f"a Ray task failed:\n{error}") from None
                except ray.exceptions.RayError as error:
                    items = len(groups[index].keys)
                    first = str(error).strip().splitlines()[0] if str(error) else ""
                    failures.append(
                        f"a Ray task died ({type(error).__name__}: {first}) "
                        f"in a group of {items} items"
                    )
                    del streams[stream]
                    continue
                receive(index, row, files)
        return failures

    def _connect(self, ray: Any) -> None:
        """ray.init for the address: start a local Ray, or join a cluster."""
        common = dict(
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=True,
            logging_level="ERROR",
        )
        if self.address == "local":
            ray.init(
                num_cpus=self.cpus or cpu_count(),
                _temp_dir=_ray_temp_dir(),
                **common,
            )
            return
        if self.address != "auto":
            _check_reachable(self.address)
        try:
            ray.init(address=self.address, **common)
        except (ConnectionError, RuntimeError, ValueError) as error:
            first = str(error).strip().splitlines()[0] if str(error) else type(error).__name__
            raise ConfigError(
                f"could not join the Ray cluster at {self.address} ({first}); start one with "
                "'ray start --head' or use --ray local"
            ) from None


def _ray_group(task: Task, context: Any, spec: Any):  # noqa: ANN201 - a Ray generator
    """One group as a Ray streaming task: yields (row, attachments) as items end."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    rows: queue.SimpleQueue = queue.SimpleQueue()
    # The task calls emit from inside; the generator hands each item on as
    # soon as the task has produced it, by running the task in a thread.
    import threading

    failure: list[BaseException] = []

    def work() -> None:
        try:
            task(context, spec, lambda row, files: rows.put((row, files)))
        except BaseException as error:  # re-raised in the generator below
            failure.append(error)
        finally:
            rows.put(None)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    while True:
        item = rows.get()
        if item is None:
            break
        yield item
    thread.join()
    if failure:
        raise failure[0]


def _import_ray() -> Any:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    try:
        import ray
    except ImportError:
        raise ConfigError(f"--ray needs the Ray extra: {RAY_EXTRA}") from None
    return ray


def _ray_temp_dir() -> str:
    # Ray's socket paths must stay short (Unix sockets: 107 bytes).
    path = os.path.join(tempfile.gettempdir(), f"gradleak-ray-{os.getuid()}")
    os.makedirs(path, exist_ok=True)
    return path


def _check_reachable(address: str, timeout: float = 3.0) -> None:
    """Fail in seconds, not minutes, when nobody listens at HOST:PORT."""
    host, sep, port = address.rpartition(":")
    if address.startswith("ray://"):
        host, sep, port = address[len("ray://") :].rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"--ray expects local, auto or HOST:PORT, got {address!r}")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as error:
        raise ConfigError(
            f"no Ray cluster answers at {address} ({error.strerror or error}); start one with "
            "'ray start --head --port PORT' there, or use --ray local"
        ) from None
