"""Sweeps: a grid of independent offline simulations (policy x batch cap x chunk x QPS x seeds x workloads x
presets x what the predictor knew), run on a local process pool or on Ray.

Each cell is one ``block.offline.Study.run``; nothing here simulates or routes, so a sweep measures exactly what
``block simulate`` would. Results stream into the workspace's store as each cell finishes (a ``sweep_cells`` row,
and the cell's run folder under ``<workspace>/runs/<sweep>/<cell>``), and a cell is keyed by a hash of its
config and of the code that decides its result (``code_version``): a rerun of a sweep, after a crash or Ctrl-C
or with a grown grid, runs only the cells the store lacks, and a rerun after the simulator, a policy or a
scenario changed runs them all again instead of mixing results of two codes.

Ray is the engine for grids that outgrow one machine (``pip install 'block-workbench[ray]'``): with
``ray_address`` the cells are Ray tasks of one CPU each, on the cluster at that address (``auto``, ``ray://…``),
on a Ray instance this process already started (a notebook's ``ray.init()``), or on a new local one
(``local``). The cluster's workers need this package installed, like any Ray job's dependencies.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import importlib
import itertools
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pandas as pd
from tqdm import tqdm

import block
import simulator
from block.offline import ClusterSpec, Honesty, Scenario, Study, as_fleet, get_cluster
from block.policies import make_policy
from simulator.fleet import Fleet
from simulator.metrics import summarize
from simulator.workload import Request, lengths_source
from store.collector import Store
from store.schema import RunRow, SweepCellRow
from workbench.experiments import run_folder_name, write_run_folder

ScenarioFactory = Callable[[], Scenario]  # module-level (picklable): the workers build the scenario themselves
LengthEstimator = Callable[[Sequence[Request]], list[int]]
MODES = {"honest": Honesty(), "oracle-lengths": Honesty(oracle_lengths=True),
         "oracle-timing": Honesty(oracle_timing=True),
         "oracle-timing+oracle-lengths": Honesty(oracle_timing=True, oracle_lengths=True)}


@functools.cache
def code_version() -> str:
    """A hash of every source file that decides a cell's result: the simulator, the policies and predictor
    (``block``), and how a cell becomes a study (this module and the scenarios). Coarse on purpose: a change
    that cannot move a result (a docstring) also recomputes the cells. Not covered: the data a cell reads
    (a trace or profile under ``BLOCK_DATA_DIR``) and the installed libraries."""
    here = Path(__file__).resolve()
    files = [(root, f) for root in (Path(p.__file__).resolve().parent for p in (simulator, block))
             for f in sorted(root.rglob("*.py"))]
    digest = hashlib.sha256()
    for root, f in (*files, (here.parent, here), (here.parent, here.with_name("scenarios.py"))):
        digest.update(f"{root.name}/{f.relative_to(root)}\0".encode())
        digest.update(f.read_bytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Cell:
    """One simulation of a sweep: everything that decides its result, and nothing else (its key hashes this)."""

    policy: str
    qps: float
    seed: int
    workload: str = "synthetic"  # a lengths source (synthetic, alpaca, a trace name) or a scenario of the grid
    preset: str = "demo"
    instances: int | None = None  # None: the preset's
    max_num_seqs: int | None = None  # batch cap; None: the preset's
    max_num_batched_tokens: int | None = None  # chunk; None: the preset's
    requests: int = 2000  # a scenario builds its own requests and ignores this and ``replay``
    replay: bool = False  # replay a timed trace's arrivals (time-scaled to qps) instead of Poisson
    mode: str = "honest"  # what the predictor knew: a key of MODES
    slo_ttft: float | None = None  # for goodput
    slo_e2e: float | None = None
    give_up_ttft: float | None = None  # stop a run once its P99 TTFT is certain to exceed this
    estimator: str = ""  # the label of the grid's length estimator, for policies that use one honestly

    def __post_init__(self) -> None:
        # 4 and 4.0 are the same QPS and must be the same cell (the key hashes the JSON)
        for name in ("qps", "slo_ttft", "slo_e2e", "give_up_ttft"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, float(value))
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; modes: {', '.join(MODES)}")

    def config(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def key(self) -> str:
        """The cell's config and the code's version: the same key means the same result."""
        return hashlib.sha256(orjson.dumps({"config": self.config(), "code": code_version()},
                                           option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]

    def spec(self) -> ClusterSpec | Fleet:
        """The preset, fleet or compact cluster (``4xA100-80G,8xA30``) with the cell's batch cap and chunk (on
        every group of a fleet) and instance count (homogeneous clusters only)."""
        cluster = get_cluster(self.preset)
        caps = {k: v for k, v in (("max_num_seqs", self.max_num_seqs),
                                  ("max_num_batched_tokens", self.max_num_batched_tokens)) if v is not None}
        if isinstance(cluster, ClusterSpec):
            return dataclasses.replace(cluster, **caps, **({} if self.instances is None else
                                                           {"instances": self.instances}))
        if self.instances is not None:
            raise ValueError(f"cell {self.preset!r}: a fleet's instance count is its groups'; do not override it")
        return dataclasses.replace(cluster, groups=tuple(dataclasses.replace(g, **caps) for g in cluster.groups))


@dataclass
class Grid:
    """The cross product of its axes, as cells. Cells whose mode gives a policy nothing it uses are left out:
    oracle lengths change only policies that read length estimates, so ``least_requests`` runs once, honest."""

    policies: Sequence[str]
    qps: Sequence[float]
    seeds: Sequence[int] = (0,)
    workloads: Sequence[str] = ("synthetic",)
    presets: Sequence[str] = ("demo",)
    max_num_seqs: Sequence[int | None] = (None,)
    max_num_batched_tokens: Sequence[int | None] = (None,)
    modes: Sequence[str] = ("honest",)
    requests: int = 2000
    replay: bool = False
    slo_ttft: float | None = None
    slo_e2e: float | None = None
    give_up_ttft: float | None = None
    scenarios: Mapping[str, ScenarioFactory] = field(default_factory=dict)
    length_estimator: LengthEstimator | None = None
    estimator_label: str = ""

    def cells(self) -> list[Cell]:
        """Every cell, checked before any runs: a bad name fails here with the name, not in a worker."""
        for name, values in (("policies", self.policies), ("qps", self.qps), ("seeds", self.seeds),
                             ("workloads", self.workloads), ("presets", self.presets), ("modes", self.modes)):
            if not values:
                raise ValueError(f"sweep grid: {name} is empty")
        if self.length_estimator is not None and not self.estimator_label:
            raise ValueError("sweep grid: a length estimator needs an estimator_label (it is part of each cell's key)")
        if any(q <= 0 for q in self.qps):
            raise ValueError(f"sweep grid: every QPS must be positive, got {list(self.qps)}")
        uses_lengths = {p: make_policy(p).uses_length_estimates for p in self.policies}
        for preset in self.presets:
            get_cluster(preset)
        for workload in self.workloads:
            if workload not in self.scenarios:
                lengths_source(workload, 0)  # an unknown name or missing data file fails here
        cells = []
        for preset, workload, seqs, chunk, mode, policy, qps, seed in itertools.product(
                self.presets, self.workloads, self.max_num_seqs, self.max_num_batched_tokens, self.modes,
                self.policies, self.qps, self.seeds):
            honesty = MODES.get(mode)
            if honesty is None:
                raise ValueError(f"sweep grid: unknown mode {mode!r}; modes: {', '.join(MODES)}")
            if honesty.oracle_lengths and not uses_lengths[policy]:
                continue
            if uses_lengths[policy] and not honesty.oracle_lengths and self.length_estimator is None:
                raise ValueError(f"sweep grid: policy {policy!r} needs length estimates; give the grid a length "
                                 "estimator or run it in mode oracle-lengths (labelled oracle)")
            cells.append(Cell(policy, qps, seed, workload, preset, None, seqs, chunk, self.requests, self.replay,
                              mode, self.slo_ttft, self.slo_e2e, self.give_up_ttft,
                              self.estimator_label if uses_lengths[policy] and not honesty.oracle_lengths else ""))
        for cell in cells:
            for group in as_fleet(cell.spec()).groups:
                group.validate(f"cell {cell.preset!r}")  # an impossible batch cap or chunk fails here
        return cells

    def config(self) -> dict:
        """The grid as JSON-able data (the sweep's ``runs`` row): axes, and the names of scenarios and estimator."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in ("scenarios", "length_estimator")}
        return {k: list(v) if isinstance(v, tuple | list) else v for k, v in out.items()} | {
            "scenarios": sorted(self.scenarios)}


@dataclass
class CellResult:
    cell: Cell
    summary: dict
    records: pd.DataFrame
    gave_up: bool
    wall_s: float


_SCENARIO_CACHE: dict[str, Scenario] = {}  # per worker process: a scenario's traces are built once


def run_cell(cell: Cell, scenario: ScenarioFactory | None = None,
             length_estimator: LengthEstimator | None = None) -> CellResult:
    """One cell, in whichever process runs it: a ``Study`` and its ``run``, summarised with the cell's SLOs."""
    start = time.perf_counter()
    built = None
    if scenario is not None:
        if cell.workload not in _SCENARIO_CACHE:
            _SCENARIO_CACHE[cell.workload] = scenario()
        built = _SCENARIO_CACHE[cell.workload]
    study = Study(cell.spec(), cell.workload, cell.requests, dataclasses.replace(MODES[cell.mode]), cell.replay,
                  length_estimator=length_estimator if cell.estimator else None, scenario=built)
    result = study.run(cell.policy, cell.qps, cell.seed, give_up_ttft=cell.give_up_ttft)
    summary = dict(result.summary)
    if not result.gave_up and (cell.slo_ttft is not None or cell.slo_e2e is not None):
        summary |= summarize(result.records, slo_ttft=cell.slo_ttft, slo_e2e=cell.slo_e2e)
    summary["gave_up"] = result.gave_up
    return CellResult(cell, summary, result.records, result.gave_up, time.perf_counter() - start)


def _number(summary: dict, name: str) -> float | None:
    value = summary.get(name)
    return None if value is None else float(value)


def cell_row(sweep: str, result: CellResult, folder: Path) -> SweepCellRow:
    cell, s = result.cell, result.summary
    groups = as_fleet(cell.spec()).groups
    seqs, chunks = {g.max_num_seqs for g in groups}, {g.max_num_batched_tokens for g in groups}
    return SweepCellRow(
        run_id=sweep, cell=cell.key, policy=cell.policy, workload=cell.workload, preset=cell.preset,
        instances=sum(g.count for g in groups), max_num_seqs=seqs.pop() if len(seqs) == 1 else None,
        max_num_batched_tokens=chunks.pop() if len(chunks) == 1 else None,
        qps=cell.qps, seed=cell.seed, mode=cell.mode, config=orjson.dumps(cell.config()).decode(),
        gave_up=result.gave_up, completed=int(s.get("completed", 0)), p50_ttft=_number(s, "p50_ttft"),
        p99_ttft=_number(s, "p99_ttft"), p50_e2e=_number(s, "p50_e2e"), p99_e2e=_number(s, "p99_e2e"),
        goodput=_number(s, "goodput"), request_throughput=_number(s, "request_throughput"),
        preemptions=None if s.get("preemptions") is None else int(s["preemptions"]), wall_s=result.wall_s,
        finished_at=time.time(), folder=str(folder))


@dataclass
class SweepReport:
    sweep: str
    cells: int  # in the grid
    skipped: int  # already in the store when the sweep started
    ran: int  # finished by this call
    failed: list[tuple[Cell, str]]
    wall_s: float
    backend: str
    interrupted: bool = False

    @property
    def line(self) -> str:
        state = "interrupted (rerun to resume)" if self.interrupted else "done"
        return (f"sweep {self.sweep}: {state}: {self.ran} cells run, {self.skipped} already done, "
                f"{len(self.failed)} failed, of {self.cells}, in {self.wall_s:.1f} s on {self.backend}")


Job = tuple[Cell, ScenarioFactory | None, LengthEstimator | None]
Outcomes = Iterator[tuple[Cell, CellResult | BaseException]]  # a cell, and its result or why it failed


def _ignore_sigint() -> None:
    """Pool workers leave Ctrl-C to the sweep, which stops them itself (a terminal sends it to all of them)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class LocalPool:
    """A process pool that outlives one ``run_cells`` call: a capacity search runs its rounds on one pool, so
    each worker builds a scenario (traces, warm-up) once, not once a round. The workers fork from a server
    process that has imported the simulator once, not from this process (which holds the database and a
    progress thread). ``stop`` terminates the workers rather than letting them finish their cells."""

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"a sweep needs at least one worker, got {workers}")
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["workbench.sweep"])
        self.workers = workers
        self._before = set(multiprocessing.active_children())
        self.executor = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_ignore_sigint)

    def stop(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        for proc in set(multiprocessing.active_children()) - self._before:
            proc.terminate()
        self.executor.shutdown(wait=True)

    def __enter__(self) -> LocalPool:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.executor.shutdown(wait=True)
        else:
            self.stop()


def _local_results(jobs: list[Job], pool: LocalPool) -> Outcomes:
    """Cells on the pool, yielded as they finish. Stopped early (Ctrl-C, an error), the pool is stopped: its
    workers are terminated rather than left to finish their cells."""
    finished = False
    try:
        futures: dict[Future, Cell] = {pool.executor.submit(run_cell, *job): job[0] for job in jobs}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                exc = fut.exception()
                if isinstance(exc, BrokenProcessPool):  # every cell left would fail the same way
                    raise RuntimeError(f"the sweep's process pool broke (a worker died): {exc}") from exc
                yield futures[fut], exc if exc is not None else fut.result()
        finished = True
    finally:
        if not finished:
            pool.stop()


class _Interrupts:
    """Ctrl-C between cells stops the sweep at once; during the write of a cell (its folder, then its row) it
    is held until the write ends, so no cell is half-recorded and DuckDB is not interrupted mid-transaction."""

    def __init__(self) -> None:
        self.writing = False
        self.pending = False
        self._previous: object = None

    def __enter__(self) -> _Interrupts:
        installable = threading.current_thread() is threading.main_thread()
        if installable and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)  # type: ignore[arg-type]

    def _handler(self, signum: int, frame: object) -> None:
        if self.writing:
            self.pending = True
        else:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def writing_cell(self) -> Iterator[None]:
        self.writing = True
        try:
            yield
        finally:
            self.writing = False
        if self.pending:
            raise KeyboardInterrupt


def _import_ray():
    try:
        import ray
    except ImportError as exc:
        raise ImportError("a sweep on Ray needs ray: pip install 'block-workbench[ray]'") from exc
    return ray


def _ray_results(jobs: list[Job], address: str, workers: int | None) -> Outcomes:
    """Cells as Ray tasks (one CPU each), yielded as they finish; unfinished tasks are cancelled on the way out.
    ``local`` starts a Ray instance of ``workers`` CPUs (default: all) in this process, for this sweep."""
    ray = _import_ray()
    if not ray.is_initialized():
        try:
            if address == "local":
                ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=address, log_to_driver=False)
        except ConnectionError as exc:
            raise RuntimeError(f"cannot reach a Ray cluster at {address!r}: {exc}") from exc
    task = ray.remote(num_cpus=1, max_retries=0)(run_cell)
    refs = {task.remote(*job): job[0] for job in jobs}
    pending = list(refs)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                try:
                    yield refs[ref], ray.get(ref)
                except ray.exceptions.RayError as exc:
                    yield refs[ref], exc
    finally:
        for ref in pending:
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)


def finished_cells(store: Store, sweep: str) -> set[str]:
    return set(store.query("SELECT cell FROM sweep_cells WHERE run_id = ?", [sweep]).frame()["cell"])


def run_sweep(grid: Grid, store: Store, sweep: str, *, workers: int | None = None, ray_address: str | None = None,
              progress: bool = True, runs_root: str | Path | None = None) -> SweepReport:
    """Run the grid's cells that ``store`` does not hold yet for ``sweep``, writing each as it finishes."""
    return run_cells(grid.cells(), store, sweep, scenarios=grid.scenarios, length_estimator=grid.length_estimator,
                     config=grid.config(), policies=grid.policies, workers=workers, ray_address=ray_address,
                     progress=progress, runs_root=runs_root)


def run_cells(cells: Sequence[Cell], store: Store, sweep: str, *,
              scenarios: Mapping[str, ScenarioFactory] | None = None, length_estimator: LengthEstimator | None = None,
              config: Mapping | None = None,
              policies: Sequence[str] = (), workers: int | None = None, ray_address: str | None = None,
              pool: LocalPool | None = None, progress: bool = True,
              runs_root: str | Path | None = None) -> SweepReport:
    """The cells ``store`` does not hold yet for ``sweep``, writing each as it finishes: a grid's, or any list (a
    capacity search asks for the next rates round by round, each a call of this under one sweep name, on one
    ``pool``; without one, a pool of ``workers`` is made for this call).

    A cell's run folder is written first and its ``sweep_cells`` row last, in one transaction: the row is the
    mark that the cell is done, so a cell killed between the two is simply run again. Ctrl-C stops the
    sweep with what finished kept (``interrupted``); a failing cell is reported and the others go on.
    """
    if not sweep:
        raise ValueError("a sweep needs a name")
    if len({c.key for c in cells}) != len(cells):
        raise ValueError("sweep grid: an axis repeats a value (two cells have the same config)")
    if workers is not None and workers < 1:
        raise ValueError(f"a sweep needs at least one worker, got {workers}")
    root = Path(runs_root) if runs_root else store.path.parent / "runs" / run_folder_name(sweep)
    names = policies or sorted({c.policy for c in cells})
    store.insert_rows([RunRow(run_id=sweep, started_at=time.time(), label="sweep", policy=",".join(names),
                              config=orjson.dumps(dict(config or {})).decode())])
    done = finished_cells(store, sweep)
    todo = [c for c in cells if c.key not in done]
    backend = (f"ray ({ray_address})" if ray_address
               else f"local pool ({pool.workers if pool else workers or os.cpu_count()} workers)")
    report = SweepReport(sweep, len(cells), len(cells) - len(todo), 0, [], 0.0, backend)
    jobs: list[Job] = [(c, (scenarios or {}).get(c.workload), length_estimator if c.estimator else None) for c in todo]
    if not jobs:
        return report
    start = time.perf_counter()
    bar = tqdm(total=len(cells), initial=report.skipped, desc=f"sweep {sweep}", unit="cell", disable=not progress,
               smoothing=0.1)
    own_pool = None
    if ray_address:
        results = _ray_results(jobs, ray_address, workers)
    else:
        if pool is None:
            pool = own_pool = LocalPool(min(len(jobs), workers or os.cpu_count() or 1))
        results = _local_results(jobs, pool)
    try:
        with _Interrupts() as interrupts:
            for cell, outcome in results:
                if isinstance(outcome, BaseException):
                    report.failed.append((cell, f"{type(outcome).__name__}: {outcome}".splitlines()[0]))
                    bar.write(f"cell {cell.key} ({cell.policy} qps={cell.qps} seed={cell.seed} {cell.workload}) "
                              f"failed: {report.failed[-1][1]}")
                else:
                    folder = root / cell.key
                    with interrupts.writing_cell():
                        write_run_folder(folder, {"sweep": sweep, "cell": cell.key, **cell.config()},
                                         outcome.records, outcome.summary)
                        store.insert_rows([cell_row(sweep, outcome, folder)])
                    report.ran += 1
                bar.update(1)
    except KeyboardInterrupt:
        report.interrupted = True
    finally:
        with contextlib.suppress(Exception):
            results.close()
        if own_pool is not None:
            own_pool.executor.shutdown(wait=True)
        bar.close()
        report.wall_s = time.perf_counter() - start
    return report


def _resolve_workload(name: str) -> tuple[str, ScenarioFactory | None]:
    """``module:function`` names a scenario factory; anything else is a lengths source."""
    if ":" not in name:
        return name, None
    module, _, attr = name.partition(":")
    try:
        factory = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"workload {name!r}: cannot import the scenario factory ({exc})") from exc
    if not callable(factory):
        raise ValueError(f"workload {name!r}: {attr} is not callable")
    return name, factory


def _csv(kind: Callable[[str], object]) -> Callable[[str], list]:
    def parse(text: str) -> list:
        try:
            return [None if x == "preset" else kind(x) for x in text.split(",") if x]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}") from exc
    return parse


def cmd_sweep(args: argparse.Namespace) -> int:
    workloads = [_resolve_workload(w) for w in args.workloads.split(",") if w]
    grid = Grid(args.policies.split(","), args.qps, args.seeds, [w for w, _ in workloads], args.clusters or ["demo"],
                args.max_num_seqs, args.chunks, args.modes.split(","), args.requests, args.replay, args.slo_ttft,
                args.slo_e2e, args.give_up_ttft, {w: f for w, f in workloads if f is not None})
    grid.cells()  # a bad grid fails before the workspace is touched
    store = Store(Path(args.workspace) / "block.duckdb")
    try:
        report = run_sweep(grid, store, args.name, workers=args.workers, ray_address=args.ray_address,
                           progress=not args.no_progress and sys.stderr.isatty())
    finally:
        store.close()
    print(report.line)
    for cell, message in report.failed:
        print(f"  failed {cell.key}: {cell.policy} qps={cell.qps} seed={cell.seed} {cell.workload}: {message}")
    return 130 if report.interrupted else (1 if report.failed else 0)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """``block sweep``: registered by workbench.cli."""
    p = sub.add_parser("sweep", help="a grid of offline simulations on a process pool or Ray, resumable")
    p.add_argument("--name", required=True, help="the sweep's name: rerun the same name to resume it")
    p.add_argument("--workspace", default="workspace", help="folder of block.duckdb and runs/")
    p.add_argument("--policies", default="round_robin,least_requests,block", help="comma-separated policies")
    p.add_argument("--qps", type=_csv(float), default=[4.0, 6.0, 8.0], help="comma-separated arrival rates")
    p.add_argument("--seeds", type=_csv(int), default=[0], help="comma-separated seeds")
    p.add_argument("--workloads", default="synthetic",
                   help="lengths sources (synthetic, alpaca, a trace name) or scenario factories module:function")
    p.add_argument("--cluster", action="append", dest="clusters",
                   help="a preset, a fleet preset or COUNTxGPU[:tpN],... (repeat for several; default: demo)")
    p.add_argument("--max-num-seqs", type=_csv(int), default=[None], help="batch caps ('preset': the preset's)")
    p.add_argument("--chunks", type=_csv(int), default=[None], help="max batched tokens ('preset': the preset's)")
    p.add_argument("--modes", default="honest", help=f"what the predictor knows: {', '.join(MODES)}")
    p.add_argument("--requests", type=int, default=2000, help="requests per cell")
    p.add_argument("--replay", action="store_true", help="replay a timed trace's arrivals, time-scaled to --qps")
    p.add_argument("--slo-ttft", type=float, help="TTFT SLO (s) for goodput")
    p.add_argument("--slo-e2e", type=float, help="E2E SLO (s) for goodput")
    p.add_argument("--give-up-ttft", type=float, help="stop a cell once its P99 TTFT is certain to exceed this")
    p.add_argument("--workers", type=int, help="local pool size (default: CPU count)")
    p.add_argument("--ray-address", help="run the cells on Ray: auto, ray://host:port, or local (a new instance)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it shows only on a terminal)")
    p.set_defaults(func=cmd_sweep)
