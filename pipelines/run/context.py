"""What a stage gets to run with: its directories, a progress line, and work on Ray with retries and failpoints.

Every piece of a stage that runs on Ray goes through its :class:`StageContext`, which gives each the same
treatment: a task that dies (its worker killed, its node lost) is rerun by Ray, one that raises a transient error
(:data:`~pipelines.run.errors.TRANSIENT`) is retried up to :data:`~pipelines.run.errors.TASK_RETRIES` times,
anything else fails the stage at once; the failpoint ``task:<function>`` is hit in every task and
``stage:<name>`` in the driver as each task finishes (or a training step passes); the terminal shows one line
per stage.  The shapes of work: :meth:`StageContext.map` (Ray tasks over a list of arguments),
:meth:`StageContext.map_dataset` (a Ray Data ``flat_map`` over a list of work items),
:meth:`StageContext.run_task` (one task), and :meth:`StageContext.watch_steps` (a training run's step line).
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, TextIO

from pipelines.run import errors, failpoints
from pipelines.run.storage import StageDir


class Progress:
    """A run's console: on a terminal, a live line per piece of work running now (a stage's tasks, a training's
    steps: several stages at once each have theirs), drawn by rich under the lines that stay (notes, summaries);
    elsewhere (a log file, CI) plain lines at a bounded rate."""

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self.stream = stream
        self.live = stream.isatty()
        self._lines: Dict[str, str] = {}
        self._lock = threading.RLock()
        self._display: Any = None  # rich's Live, from the first live line to close()

    def write(self, text: str) -> None:
        """A line that stays (a note, a stage's summary), above the live lines."""
        with self._lock:
            if self._display is not None:
                self._display.console.print(text, markup=False, highlight=False, soft_wrap=True)
            else:
                self.stream.write(text + "\n")
                self.stream.flush()

    def line(self, key: str, text: str, final: bool = False) -> None:
        """Live line ``key`` now reads ``text``; ``final``: its last state, which stays.  Not live: printed as it is
        (callers bound the rate)."""
        if not self.live:
            self.write(text)
            return
        with self._lock:
            new = key not in self._lines  # a line appearing or going is drawn now; a changing one at the next tick
            if final:
                self._lines.pop(key, None)
            else:
                self._lines[key] = text
            self._show(refresh=final or new)
        if final:
            self.write(text)

    def drop(self, label: str) -> None:
        """A stage ended: its live lines (``label`` and ``label <unit>``) go."""
        with self._lock:
            gone = [k for k in self._lines if k == label or k.startswith(label + " ")]
            for key in gone:
                del self._lines[key]
            if gone and self._display is not None:
                self._show(refresh=True)  # now: the next line printed redraws what is live

    def _show(self, refresh: bool = False) -> None:
        from rich.console import Console
        from rich.live import Live
        from rich.text import Text

        if self._display is None:
            self._display = Live(console=Console(file=self.stream), refresh_per_second=4, transient=True,
                                 redirect_stdout=False, redirect_stderr=False)
            self._display.start()
        self._display.update(Text("\n".join(self._lines.values()), no_wrap=True, overflow="ellipsis"),
                             refresh=refresh)

    def close(self) -> None:
        """Stop the live lines (the ones still running are left out: their stages' summaries say how they ended)."""
        with self._lock:
            if self._display is not None:
                self._lines.clear()
                self._display.update("")
                self._display.stop()
                self._display = None

    def update(self, label: str, done: int, total: int, rows: int, started: float) -> None:
        elapsed = max(time.perf_counter() - started, 1e-9)
        rate = rows / elapsed
        eta = elapsed / done * (total - done) if done else float("nan")
        line = f"  {label}: {done}/{total} ({rows} rows, {rate:,.0f} rows/s, ETA {eta:,.0f}s)"
        if self.live or done == total or done % max(1, total // 10) == 0:
            self.line(label, line, final=done == total)


class StepLine:
    """A training stage's progress line, from the states its workers report (``step``, ``total``,
    ``batch_size``, ``samples_per_s``, ``loss``, ``alignment``): live on a terminal, a line every 10 s into a log
    file.  Each new step passed hits the stage's failpoint."""

    def __init__(self, progress: Progress, label: str, name: str) -> None:
        self.progress, self.label, self.name = progress, label, name
        self.last, self.printed, self.step = "", 0.0, 0

    def update(self, state: Dict[str, Any]) -> None:
        if not state:
            return
        if state["step"] > self.step:
            self.step = state["step"]
            failpoints.hit(f"stage:{self.name}")
        if not self.progress.live and time.monotonic() - self.printed < 10.0:  # a log file: a line every 10 s
            return
        self.printed = time.monotonic()
        rate = state["samples_per_s"]
        left = (state["total"] - state["step"]) * state["batch_size"] / max(rate, 1e-9)
        line = (f"  {self.label}: step {state['step']}/{state['total']} | {rate:,.0f} samples/s | "
                f"ETA {left:,.0f}s | loss {state['loss']:.4f}"
                + (f" | alignment {state['alignment']:+.3f}" if state.get("alignment") is not None else ""))
        if line != self.last:
            self.progress.line(self.label, line)
            self.last = line

    def close(self) -> None:
        if self.progress.live and self.last:
            self.progress.line(self.label, self.last, final=True)


def _remote(**resources: Any):
    """:func:`failpoints.run_task` as a Ray remote function with the stage tasks' retries: a killed worker's task
    is rerun by Ray; a transient error (a dropped connection) is retried; bad data is not."""
    import ray

    return ray.remote(failpoints.run_task).options(max_retries=errors.TASK_RETRIES,
                                                   retry_exceptions=list(errors.TRANSIENT), **resources)


# StageContext.map's fan-out: tasks in flight at once per CPU of the cluster, at least (an autoscaled cluster that
# starts with no worker scales up on the tasks it sees waiting) and at most (whatever the cluster); re-read this often
IN_FLIGHT_PER_CPU = 4
MIN_IN_FLIGHT = 64
MAX_IN_FLIGHT = 1024
IN_FLIGHT_REFRESH_S = 10.0


def cluster_cpus() -> int:
    """The CPUs the cluster has now (0 before Ray starts)."""
    import ray

    return int(ray.cluster_resources().get("CPU", 0)) if ray.is_initialized() else 0


def in_flight_bound() -> int:
    """How many of a map's tasks may be in flight: :data:`IN_FLIGHT_PER_CPU` per CPU the cluster has now (enough to
    keep every CPU busy while finished ones are collected), at least :data:`MIN_IN_FLIGHT`, at most
    :data:`MAX_IN_FLIGHT`."""
    return max(1, min(MAX_IN_FLIGHT, max(MIN_IN_FLIGHT, IN_FLIGHT_PER_CPU * cluster_cpus())))


def map_tasks(fn: Callable, tasks: Sequence[tuple], finished: Optional[Callable[[int, int], None]] = None,
              combine: Optional[Callable[[Any, Any], Any]] = None, num_returns: int = 1) -> Any:
    """``[fn(*args) for args in tasks]``, as Ray tasks, in order; ``finished(task, tasks done)`` is called as each
    finishes.  With ``combine``, results are folded as they arrive (``acc = combine(acc, result)``, from ``None``)
    and only the fold is kept.  With ``num_returns`` > 1, ``fn`` returns that many values: the first is fetched
    and each result is ``(first, ref, ...)``, the other values left in the object store.  At most
    :func:`in_flight_bound` tasks are submitted and not yet collected at any time (their arguments are all the
    object store holds for the map; the bound follows the cluster's size, re-read every
    :data:`IN_FLIGHT_REFRESH_S`); more are submitted as they finish."""
    import ray

    remote, point, total = _remote(num_returns=num_returns), f"task:{fn.__name__}", len(tasks)
    bound, checked = in_flight_bound(), time.monotonic()
    results: List[Any] = [None] * total if combine is None else []
    index: Dict[Any, int] = {}  # in flight: (first) ref -> its task's position
    rest: Dict[int, tuple] = {}  # the other refs of a task with num_returns > 1
    submitted, done, acc = 0, 0, None
    while submitted < total or index:
        if time.monotonic() - checked > IN_FLIGHT_REFRESH_S:  # an autoscaled cluster grows (or shrinks)
            bound, checked = in_flight_bound(), time.monotonic()
        while submitted < total and len(index) < bound:
            refs = remote.remote(point, fn, *tasks[submitted])
            if num_returns > 1:
                refs, rest[submitted] = refs[0], tuple(refs[1:])
            index[refs] = submitted
            submitted += 1
        for r in _ready(list(index)):
            i = index.pop(r)
            try:
                value = ray.get(r)
            except Exception as exc:
                _cancel(list(index))  # the stage has failed: stop the rest of its work (none more is sent)
                if isinstance(getattr(exc, "cause", None), errors.InputError):
                    raise exc.cause from None  # bad input: raised as itself (one line naming the file)
                raise
            value = (value, *rest.pop(i)) if num_returns > 1 else value
            if combine is None:
                results[i] = value
            else:
                acc = combine(acc, value)
            done += 1
            if finished is not None:
                finished(i, done)
    return results if combine is None else acc


def _ready(refs: List[Any]) -> List[Any]:
    """The refs of ``refs`` that are done: blocks until one is, then takes every other one done by then (one
    wait per batch, not per task; results stay where they are until fetched)."""
    import ray

    ready, rest = ray.wait(refs, num_returns=1, fetch_local=False)
    if rest:
        more, _ = ray.wait(rest, num_returns=len(rest), timeout=0, fetch_local=False)
        ready += more
    return ready


def _cancel(refs: List[Any]) -> None:
    """Cancel the tasks of ``refs`` and give them (at most 30 s) to stop, before the attempt they write into is
    removed (no late writes into it)."""
    import ray

    for ref in refs:
        ray.cancel(ref, force=True)
    if refs:
        ray.wait(refs, num_returns=len(refs), timeout=30)


_SETTINGS_LOCK = threading.Lock()
_SETTINGS: Dict[str, Any] = {"maps": 0, "saved": None}  # maps holding the settings now (stages run on threads)


@contextlib.contextmanager
def _single_map_settings() -> Iterator[None]:
    """Ray Data settings for a dataset that is one map over a list of work items: the stage prints its own
    progress (no bars or per-dataset log lines), no resources are held back for other operators (there are
    none; on a small node the default reservation halves the tasks that run at once), and a task's exception is
    raised as itself (a bad file's error naming it, not a generic wrapper), once: Ray Data does not also log it
    with a traceback.  Restored on exit."""
    import logging

    import ray.data

    log = logging.getLogger("ray.data")
    data = ray.data.DataContext.get_current()  # one per process: set by the first map in, restored by the last out
    names = ("enable_progress_bars", "op_resource_reservation_enabled", "raise_original_map_exception")
    with _SETTINGS_LOCK:
        if not _SETTINGS["maps"]:
            _SETTINGS["saved"] = (log.level, [getattr(data, n) for n in names])
            log.setLevel(logging.CRITICAL)  # before: turning the bars off logs a warning
            for n, v in zip(names, (False, False, True)):
                setattr(data, n, v)
        _SETTINGS["maps"] += 1
    try:
        yield
    finally:
        with _SETTINGS_LOCK:
            _SETTINGS["maps"] -= 1
            if not _SETTINGS["maps"]:
                level, saved = _SETTINGS["saved"]
                for n, v in zip(names, saved):
                    setattr(data, n, v)
                log.setLevel(max(level, logging.ERROR))


@dataclass
class StageContext:
    """What a stage gets: its output directory, its inputs' committed directories, and work on Ray."""

    out: StageDir
    inputs: Dict[str, StageDir]
    label: str
    progress: Progress
    storage_options: Dict[str, Any] = field(default_factory=dict)
    ray_address: str = "local"
    name: str = ""  # the stage's name (failpoints)

    def note(self, text: str) -> None:
        """A line of its own under the stage's label (``  <label>: <text>``)."""
        self.progress.write(f"  {self.label}: {text}")

    def map(self, fn: Callable, tasks: Sequence[tuple], unit: str = "tasks", rows: Optional[Sequence[int]] = None,
            combine: Optional[Callable[[Any, Any], Any]] = None, num_returns: int = 1) -> Any:
        """:func:`map_tasks`, reporting progress on the stage's line as tasks finish (``rows``: each task's rows)."""
        started, done_rows = time.perf_counter(), [0]

        def finished(i: int, done: int) -> None:
            done_rows[0] += rows[i] if rows else 0
            self.progress.update(f"{self.label} {unit}", done, len(tasks), done_rows[0], started)
            failpoints.hit(f"stage:{self.name}")

        return map_tasks(fn, tasks, finished, combine, num_returns)

    def map_dataset(self, fn: Callable[..., List[Dict[str, Any]]], items: List[Dict[str, Any]], unit: str,
                    total: Optional[int] = None, rows: Optional[str] = None, num_cpus: float = 1.0,
                    fn_kwargs: Optional[Dict[str, Any]] = None) -> List[Dict[str, Any]]:
        """``fn(item, **fn_kwargs)`` for every item, one Ray Data task each (a ``flat_map``: ``fn`` returns a
        list of rows), with the retries and failpoints of :meth:`map`; returns every row, in the order they
        arrive.  Progress counts rows out of ``total`` (default one per item), and the rows they cover from the
        ``rows`` column of each."""
        import ray.data

        # Ray Data (2.60) takes a task's retries (``max_retries``, ``retry_exceptions``) only as remote args, which
        # it warns are deprecated, with no named replacement yet (removed in 2.64, it says): not a warning for every
        # run.  Put first here, after Ray's own filter for its deprecations (added when Ray is imported).
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        task = functools.partial(failpoints.run_task, f"task:{fn.__name__}", fn)
        with _single_map_settings():
            ds = ray.data.from_items(items, override_num_blocks=len(items)).flat_map(
                task, num_cpus=num_cpus, max_retries=errors.TASK_RETRIES, retry_exceptions=list(errors.TRANSIENT),
                fn_kwargs=fn_kwargs or {})
            return self._collect(ds, unit, len(items) if total is None else total, rows)

    def map_actors(self, cls: type, items: List[Dict[str, Any]], unit: str, actors: int,
                   constructor_kwargs: Dict[str, Any], num_cpus: float = 1.0, num_gpus: float = 0.0,
                   rows: Optional[str] = None) -> List[Dict[str, Any]]:
        """``cls(**constructor_kwargs)`` on each of ``actors`` Ray Data actors (what is costly to set up, a model,
        is set up once per actor), called on batches of one item each (``{key: [value]}``; it returns columns of
        rows); returns every row, in the order they arrive, with :meth:`map_dataset`'s progress."""
        import ray.data
        from ray.data import ActorPoolStrategy

        with _single_map_settings():
            ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
                cls, batch_size=1, compute=ActorPoolStrategy(size=actors), fn_constructor_kwargs=constructor_kwargs,
                num_cpus=num_cpus, num_gpus=num_gpus)
            return self._collect(ds, unit, len(items), rows)

    def _collect(self, ds, unit: str, total: int, rows: Optional[str]) -> List[Dict[str, Any]]:
        """Every row of ``ds`` as it arrives, with progress (and the stage's failpoint) per row."""
        started, results, done_rows = time.perf_counter(), [], 0
        for row in ds.iter_rows():
            results.append(row)
            done_rows += row[rows] if rows else 0
            self.progress.update(f"{self.label} {unit}", len(results), total, done_rows, started)
            failpoints.hit(f"stage:{self.name}")
        return results

    def run_task(self, fn: Callable, *args: Any, num_cpus: float = 1, num_gpus: float = 0) -> Any:
        """``fn(*args)`` as one Ray task on ``num_cpus`` / ``num_gpus``, with the retries and failpoints of
        :meth:`map` (and no progress line)."""
        import ray

        value = ray.get(_remote(num_cpus=num_cpus, num_gpus=num_gpus).remote(f"task:{fn.__name__}", fn, *args))
        failpoints.hit(f"stage:{self.name}")
        return value

    @contextlib.contextmanager
    def watch_steps(self, poll: Callable[[], Dict[str, Any]], every: float = 1.0) -> Iterator[None]:
        """While the body runs (a training run), a thread polls ``poll()`` every ``every`` seconds for the
        workers' latest step state and shows it as a :class:`StepLine` (a failed poll is skipped: progress is
        best effort)."""
        done = threading.Event()
        line = StepLine(self.progress, self.label, self.name)

        def follow() -> None:
            while not done.wait(every):
                try:
                    state = poll()
                except Exception:  # noqa: BLE001 - progress is best effort
                    continue
                line.update(state)
            line.close()

        printer = threading.Thread(target=follow, daemon=True)
        printer.start()
        try:
            yield
        finally:
            done.set()
            printer.join(timeout=5)
