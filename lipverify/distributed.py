"""Sharded audits and certification under ``torchrun`` (torch.distributed).

``torchrun --nproc-per-node=N [--nnodes=M --rdzv-...] -m lipverify audit|certify ...`` starts
N·M processes (ranks). Each loads the same model and the same points; gloo runs on CPU, nccl on
GPU, and rank r of a node uses ``cuda:LOCAL_RANK``.

**audit** (:func:`audit_sharded`). Every rank certifies all the points, so the fingerprint,
``lipschitz_points`` and the attacks' materialisation are those of the global set; the ranks
compare fingerprints and refuse to go on if any differs. Rank 0 sets up the ``.state`` folder,
which every rank must see (a shared filesystem; checked), and computes the Lipschitz bounds and
the GNP checks while the other ranks attack. Attack chunks are whole chunks of
:data:`~lipverify.audits.runner.ATTACK_CHUNK` points, taken in index order from a counter that
all ranks share (torch.distributed's TCPStore), so a rank that finishes early takes the next
chunk; no point is padded or duplicated. Chunk ``c`` keeps its seed ``seed * 100003 + c``
wherever it runs and is saved as ``.state/attacks-NNNNN.pt``. Rank 0 waits for every chunk,
merges them in index order and returns the one report; the others return None. A chunk that
no rank saved fails the job with a message naming it: never a partial report.

**certify** (:func:`certify_batches`). Rank r certifies the batches ``b`` with
``b % world_size == r``; rank 0 gathers them in index order.

**Failures.** torchrun's ``--max-restarts`` restarts every worker with the same arguments;
the CLI then resumes (``TORCHELASTIC_RESTART_COUNT > 0``) in the folder of the first attempt,
whose saved chunks are reused, never recomputed or counted twice.

Collectives run only while the ranks set up, when waiting is short; the long waits (rank 0
for the last chunks) poll the shared counter, so no collective timeout limits a job's length.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from lipverify.atomic import atomic_write_text
from lipverify.errors import InputError, LipverifyError

if TYPE_CHECKING:
    from lipverify.audits.report import AuditReport
    from lipverify.audits.runner import Progress

__all__ = [
    "World", "launched", "world_from_env", "process_group", "broadcast", "all_gather",
    "gather", "agree", "on_main", "Board", "job_board", "audit_sharded", "certify_batches",
]

T = TypeVar("T")
EXIT_BAD_INPUT = 2
_POLL_S = 0.2  # how often rank 0 reads the shared counters while it waits


@dataclass(frozen=True)
class World:
    """This process's place in a torchrun job (defaults: a single process)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    restart: int = 0  # TORCHELASTIC_RESTART_COUNT: how often torchrun restarted the workers
    run_id: str = "none"  # TORCHELASTIC_RUN_ID (torchrun's --rdzv-id)

    @property
    def main(self) -> bool:
        """Rank 0: the rank that writes files and reports."""
        return self.rank == 0


def launched() -> bool:
    """True in a process started by torchrun (or any launcher that sets RANK and
    WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _env_int(name: str, default: int | None = None) -> int:
    text = os.environ.get(name)
    if text is None and default is not None:
        return default
    try:
        return int(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InputError(f"environment variable {name}={text!r} is not an integer; start "
                         "sharded runs with torchrun") from None


def world_from_env() -> World:
    """The :class:`World` that torchrun's environment variables describe."""
    if not launched():
        return World()
    size, rank = _env_int("WORLD_SIZE"), _env_int("RANK")
    if not 0 <= rank < size:
        raise InputError(f"RANK={rank} outside WORLD_SIZE={size}; start sharded runs with "
                         "torchrun")
    return World(rank=rank, size=size, local_rank=_env_int("LOCAL_RANK", 0),
                 restart=_env_int("TORCHELASTIC_RESTART_COUNT", 0),
                 run_id=os.environ.get("TORCHELASTIC_RUN_ID", "none"))


def _one_node_agent_store() -> bool:
    """torchrun's agent hosts the store and every rank runs on this node."""
    return (os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
            and os.environ.get("LOCAL_WORLD_SIZE") == os.environ.get("WORLD_SIZE")
            and "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ)


def _agent_store(timeout: timedelta = timedelta(minutes=5)) -> Any:
    """A client connection to the store at ``MASTER_ADDR:MASTER_PORT`` (torchrun's)."""
    import torch.distributed as dist

    try:
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    except (KeyError, ValueError):
        raise InputError("MASTER_ADDR and MASTER_PORT are not set; start sharded runs "
                         "with torchrun") from None
    return dist.TCPStore(host, port, is_master=False, timeout=timeout)


def _device(name: str | None, world: World) -> torch.device:
    """CPU, or the GPU ``cuda:LOCAL_RANK`` (any index in ``name`` is replaced by it)."""
    from lipverify.errors import check_device

    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(name).type
    except (RuntimeError, ValueError, TypeError):
        kind = None
    if kind != "cuda":
        return check_device(name)
    if not torch.cuda.is_available():
        raise InputError(f"--device {name!r}: no GPU is available; use --device cpu")
    count = torch.cuda.device_count()
    if world.local_rank >= count:
        raise InputError(f"LOCAL_RANK {world.local_rank} has no GPU: {count} visible here; "
                         f"start at most {count} processes per node (--nproc-per-node)")
    device = torch.device("cuda", world.local_rank)
    torch.cuda.set_device(device)
    return device


@contextmanager
def process_group(device: str | None = None) -> Iterator[tuple[World, torch.device]]:
    """Join torchrun's process group (gloo on CPU, nccl on GPU) for the block; yields this
    process's :class:`World` and device (``cuda:LOCAL_RANK`` on GPU)."""
    import torch.distributed as dist

    world = world_from_env()
    dev = _device(device, world)
    here = False
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if _one_node_agent_store():
            # torchrun keeps its store across restarts, and the default group's keys carry no
            # attempt number: a restarted rank can read the address that a killed rank of the
            # previous attempt published, and fail to connect (pytorch/pytorch#135712,
            # #167288). On one node every rank has the same attempt number: key by it.
            store = dist.PrefixStore(f"lipverify/{world.run_id}/attempt-{world.restart}/pg/",
                                     _agent_store())
            dist.init_process_group(backend=backend, store=store, rank=world.rank,
                                    world_size=world.size)
        else:
            dist.init_process_group(backend=backend)
        here = True
    try:
        # a restart of one node's workers may not raise every node's count: take the largest
        world = replace(world, restart=max(all_gather(world.restart, world)))
        yield world, dev
    finally:
        if here:
            dist.destroy_process_group()


# -- collectives (no-ops for a single process) -------------------------------------------------
def broadcast(obj: T, world: World) -> T:
    """Rank 0's ``obj`` on every rank."""
    if world.size == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(obj: T, world: World) -> list[T]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if world.size == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def gather(obj: T, world: World) -> list[T] | None:
    """Every rank's ``obj``, in rank order, on rank 0; None elsewhere."""
    if world.size == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] | None = [None] * world.size if world.main else None
    dist.gather_object(obj, out, dst=0)
    return out


def _fail_together(world: World, errors: Sequence[BaseException | str | None]) -> None:
    """If any rank failed: rank 0 raises (its own error, else the lowest failing rank's as
    one line), the others exit with status 2 and no message: one error line per job."""
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if not failed:
        return
    if not world.main:
        raise SystemExit(EXIT_BAD_INPUT)
    rank, err = failed[0]
    if isinstance(err, BaseException):
        raise err
    raise InputError(err if rank == 0 else f"rank {rank}: {err}")


def agree(world: World, fn: Callable[[], T]) -> T:
    """Run ``fn`` on every rank. If it raised a :class:`LipverifyError` (bad input) on any
    rank, every rank fails: rank 0 with that one-line error, the others quietly (exit 2)."""
    value: Any = None
    local: LipverifyError | None = None
    try:
        value = fn()
    except LipverifyError as e:
        if world.size == 1:
            raise
        local = e
    texts = all_gather(None if local is None else str(local), world)
    _fail_together(world, [local if world.main and local is not None else t for t in texts])
    return value


def on_main(world: World, fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and hand its result to every rank; a
    :class:`LipverifyError` there fails every rank (rank 0 with the error)."""
    if world.size == 1:
        return fn()
    value: Any = None
    error: LipverifyError | None = None
    if world.main:
        try:
            value = fn()
        except LipverifyError as e:
            error = e
    box = broadcast((value, None if error is None else str(error)), world)
    _fail_together(world, [error if world.main else box[1]])
    return box[0]


# -- the shared counters -----------------------------------------------------------------------
class Board:
    """Counters and values shared by the ranks of one job, under ``prefix``: the TCPStore that
    torchrun hosts at ``MASTER_ADDR:MASTER_PORT``, through a connection of this object's own
    (make one per thread)."""

    def __init__(self, prefix: str) -> None:
        import torch.distributed as dist

        self.prefix = prefix
        self._store = dist.PrefixStore(prefix, _agent_store())

    def add(self, key: str, amount: int = 1) -> int:
        """Add ``amount`` to counter ``key`` (atomically, for all ranks); the new value."""
        return int(self._store.add(key, amount))

    def count(self, key: str) -> int:
        return self.add(key, 0)

    def set(self, key: str, value: str) -> None:
        self._store.set(key, value)

    def get(self, key: str) -> str | None:
        """The value of ``key``, None if no rank has set it."""
        if not self._store.check([key]):
            return None
        return self._store.get(key).decode()


def job_board(world: World) -> Board:
    """The board of the whole job: its keys outlive torchrun's restarts of the workers."""
    return Board(f"lipverify/{world.run_id}/job/")


# -- audits ------------------------------------------------------------------------------------
def _claim_chunks(plan: Any, state: Any, pending: Sequence[int], board: Board,
                  world: World) -> list[int]:
    """Take chunks from ``pending`` in order until none is left; attack and save each."""
    from lipverify.audits.runner import chunk_counts, chunk_name, compute_chunk

    mine = []
    while True:
        i = board.add("next") - 1
        if i >= len(pending):
            return mine
        c = pending[i]
        chunk = compute_chunk(plan, c)
        state.save(chunk_name(c), chunk)
        points, found = chunk_counts(plan, chunk, c)
        board.set(f"owner/{c}", str(world.rank))
        board.add("points", points)
        board.add("violations", found)
        board.add("done")  # last: whoever sees it counted also sees the file and the owner
        mine.append(c)


class _Watcher(threading.Thread):
    """Rank 0: reports the whole job's attack progress from the shared counters."""

    def __init__(self, prefix: str, progress: Progress, total: int, done: int,
                 violations: int) -> None:
        super().__init__(daemon=True)
        self.prefix, self.progress = prefix, progress
        self.total, self.done, self.violations = total, done, violations
        self.stop = threading.Event()

    def run(self) -> None:
        board = Board(self.prefix)  # a connection of its own
        last = None
        while True:
            stopping = self.stop.is_set()  # one more reading after the stop: the final one
            now = (board.count("points"), board.count("violations"))
            if now != last:
                self.progress.attacks_update(self.total, self.done + now[0],
                                             self.violations + now[1])
                last = now
            if stopping:
                return
            self.stop.wait(_POLL_S)


def audit_sharded(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    state_dir: str | Path,
    world: World | None = None,
    progress: Progress | Callable[[str], None] | None = None,
    provenance: dict | None = None,
    **options: Any,
) -> AuditReport | None:
    """:func:`lipverify.audits.audit` across the ranks of a torchrun job.

    Call it on every rank with the same model, points and ``options`` (the keyword arguments
    of ``audit``) and the same ``state_dir``, a folder every rank sees. Returns the report on
    rank 0 (the same as a single-process audit's, up to the provenance: timings, world size,
    which rank attacked which chunk) and None on the others. ``progress`` is used on rank 0.
    """
    from lipverify.audits.runner import (
        _CHUNK_KEYS,
        AuditState,
        Progress,
        _as_progress,
        assemble_report,
        attack_context,
        chunk_counts,
        chunk_name,
        gnp_stage,
        lipschitz_stage,
        merge_attacks,
        plan_audit,
    )

    world = world or world_from_env()
    tracker = _as_progress(progress) if world.main else Progress()
    state_dir = Path(state_dir)
    plan = agree(world, lambda: plan_audit(model, x, y, progress=tracker, **options))
    digest = hashlib.sha256(plan.fingerprint.encode()).hexdigest()
    digests = all_gather(digest, world)
    _fail_together(world, [
        None if d == digests[0] else "audits other weights, points or options than rank 0 (the "
        "fingerprints differ): give every rank the same checkpoint, data and options"
        for d in digests])

    state: AuditState | None = None

    def setup() -> tuple[str, list[int], int, int]:
        nonlocal state
        state = AuditState(state_dir, plan.fingerprint)
        token = uuid.uuid4().hex
        atomic_write_text(state_dir / "job", token)
        pending, done, found = [], 0, 0
        if "attacks" in plan.checks:
            for c in range(plan.n_chunks):
                saved = state.load(chunk_name(c), _CHUNK_KEYS)  # a foreign file is refused
                if saved is None:
                    pending.append(c)
                else:
                    points, v = chunk_counts(plan, saved, c)
                    done, found = done + points, found + v
        return token, pending, done, found

    token, pending, done0, found0 = on_main(world, setup)

    def join() -> AuditState:
        seen = (state_dir / "job").read_text() if (state_dir / "job").is_file() else None
        if seen != token:
            raise InputError(f"{state_dir} is not shared: rank {world.rank} does not see what "
                             "rank 0 wrote there; give --out a folder on a filesystem that "
                             "every node shares")
        return AuditState(state_dir, plan.fingerprint, join=True)

    if world.main:
        agree(world, lambda: None)
    else:
        state = agree(world, join)
    prefix = f"lipverify/{world.run_id}/{world.restart}/{token}/"
    board = Board(prefix)

    watcher = None
    if world.main and "attacks" in plan.checks:
        watcher = _Watcher(prefix, tracker, plan.n_points, done0, found0)
        tracker.stage_begin("attacks")
        watcher.start()
    try:
        lip = gnp = None
        if world.main and "lipschitz" in plan.checks:
            lip = lipschitz_stage(plan, state, tracker)
        if world.main and "gnp" in plan.checks:
            gnp = gnp_stage(plan, state, tracker)
        result = None
        if "attacks" in plan.checks:
            start = time.time()
            with attack_context(plan) as materialized:
                _claim_chunks(plan, state, pending, board, world)
            if not world.main:
                return None
            while board.count("done") < len(pending):
                time.sleep(_POLL_S)
            chunks = []
            for c in range(plan.n_chunks):
                chunk = state.load(chunk_name(c), _CHUNK_KEYS)
                if chunk is None:
                    sl = plan.chunk_slice(c)
                    raise RuntimeError(
                        f"attack chunk {c} (points {sl.start}-{sl.stop - 1}) is missing from "
                        f"{state_dir} although a rank reported it done; no report was written; "
                        "rerun with --resume")
                chunks.append(chunk)
            result = merge_attacks(plan, chunks, materialized)
            plan.timings["attacks_seconds"] = round(time.time() - start, 3)
    finally:
        if watcher is not None:
            watcher.stop.set()
            watcher.join()
            tracker.stage_end("attacks")
    if not world.main:
        return None
    by_rank: dict[str, list[int]] = {}
    for c in pending:
        by_rank.setdefault(board.get(f"owner/{c}") or "?", []).append(c)
    prov = {
        "world_size": world.size,
        "attack_chunks_by_rank": {r: by_rank[r] for r in sorted(by_rank, key=str)},
        "attack_chunks_reused": (plan.n_chunks - len(pending)
                                 if "attacks" in plan.checks else 0),
        **(provenance or {}),
    }
    return assemble_report(plan, lip=lip, gnp=gnp, attacks=result, provenance=prov)


# -- certification -----------------------------------------------------------------------------
def certify_batches(
    certify_batch: Callable[[int, int], tuple[torch.Tensor, ...]],
    n: int,
    batch_size: int,
    world: World,
) -> list[tuple[torch.Tensor, ...]] | None:
    """Call ``certify_batch(start, stop)`` for this rank's batches (``b % size == rank``) and
    return every batch's result in index order on rank 0 (None on the others)."""
    starts = list(range(0, n, batch_size))
    mine = {s: tuple(t.cpu() for t in certify_batch(s, min(s + batch_size, n)))
            for i, s in enumerate(starts) if i % world.size == world.rank}
    parts = gather(mine, world)
    if parts is None:
        return None
    merged: dict[int, tuple[torch.Tensor, ...]] = {}
    for part in parts:
        merged.update(part)
    missing = [s for s in starts if s not in merged]
    if missing:
        raise RuntimeError(f"certification batches starting at {missing[:5]} are missing")
    return [merged[s] for s in starts]

