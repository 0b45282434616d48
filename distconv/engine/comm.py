"""The process group, error agreement, and gathering each unit's slices on its writer.

NCCL carries tensors when CUDA is available (``--device auto``), gloo otherwise. Control
messages (error agreement) always go over a gloo group so they never need a GPU.

A rank that fails does not wait for the others to agree: it writes its message under the run's
key in the job's store (the one ``init_process_group`` rendezvoused through; the first message
written wins) and raises at once. Every rank waiting on a transfer or an agreement polls that
key and raises the same message, so peers learn within milliseconds, not at ``--timeout``, and
no collective is needed after each unit. After an error the groups are aborted, not finalized
(since torch 2.6 ``destroy_process_group`` waits for pending work, and a transfer to a dead
peer never finishes).
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import inspect
import os
import sys
import time
import traceback
import uuid
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

from distconv.engine.plan import Read, Unit, numel
from distconv.errors import DistconvError, user_error, warn

_ALIGN = 16
# NCCL's watchdog aborts the process (SIGABRT) once a transfer exceeds its group's timeout;
# the data group gets this much longer, so that distconv's own deadline is the one that ends it
_WATCHDOG_MARGIN = datetime.timedelta(seconds=60)
_NOTICE_S = 0.02  # how often a waiting rank looks for a peer's failure in the store
_IN_FLIGHT = 2  # sends a rank leaves unfinished while it goes on to the next units


class Agreed(DistconvError):
    """An error every rank raises with this same message: the first failing rank's."""


@dataclasses.dataclass
class Comm:
    """This process's place in the run, and the groups it talks over."""

    rank: int
    world: int
    device: torch.device
    owns_group: bool
    control: dist.ProcessGroup | None  # gloo, for agreement (main thread)
    data: dist.ProcessGroup | None  # the tensors' backend, for gathering (main thread)
    overlap_reads: bool = True
    timeout_s: float = 1800.0
    staging: "HostBuffers" = dataclasses.field(default_factory=lambda: HostBuffers(pin=True))
    store: Any = None  # the job's store, where a failing rank leaves its message (None: world 1)
    key: str = ""  # this run's failure key in ``store``
    sends: list[list[Any]] = dataclasses.field(default_factory=list)  # unfinished sends, oldest first
    _noticed: float = 0.0

    @classmethod
    def setup(cls, device: str = "auto", timeout_s: float = 1800.0, quiet: bool = False) -> "Comm":
        """Reuse an existing default group (post-training hook), else create one.

        Under torchrun/Slurm the environment names rank and world; a plain process runs as a
        group of one (megatron-core's ``load`` needs a process group even then). Whether the
        data group is NCCL on GPUs or gloo is agreed by all ranks over gloo before any NCCL
        group exists (``decide_device``). Rank 0 warns when some rank has a GPU and yet gloo is
        chosen, and notes it (unless ``quiet``) when no rank sees one.
        """
        if device not in ("auto", "cpu", "cuda"):
            raise DistconvError(f"--device {device}: choose auto, cpu or cuda")
        owns = not dist.is_initialized()
        timeout = datetime.timedelta(seconds=timeout_s)
        if owns:  # megatron-core's loads only need CPU collectives: gloo suffices by default
            if "WORLD_SIZE" in os.environ:
                dist.init_process_group("gloo", timeout=timeout)
            else:
                dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        world = dist.get_world_size()
        # The default group is left to megatron-core's loads (the reader thread); the main
        # thread talks over its own groups so the two never interleave collectives. A
        # caller's NCCL default group would put two NCCL communicators to work at once on
        # one GPU, which can deadlock, so then reads do not run ahead.
        overlap = "nccl" not in str(dist.get_backend()).lower()
        control = dist.new_group(backend="gloo", timeout=timeout) if world > 1 else None
        comm = cls(dist.get_rank(), world, torch.device("cpu"), owns, control, None, overlap, timeout_s=timeout_s)
        try:
            if world > 1:
                comm.store = _job_store()
                comm.key = f"distconv/failed/{comm.shared_token()}"
            index = _visible_gpu(device, owns)
            mine = None if index is None else (os.uname().nodename, _gpu_id(index))
            gpus = comm.collect(mine)
            use_cuda, note = decide_device(device, gpus)
            if note and comm.rank == 0:
                if any(gpus):
                    warn(note)
                elif not quiet:
                    print(f"distconv: {note}", file=sys.stderr, flush=True)
            if use_cuda:
                comm.device = torch.device("cuda", index)
                if owns:  # in the hook the caller's current device and memory statistics are kept
                    torch.cuda.set_device(index)
                    torch.cuda.reset_peak_memory_stats(comm.device)  # the report's peak is this run's
            if world > 1:
                comm.data = _data_group(comm.device if use_cuda else None, timeout)
        except BaseException:
            comm.close()
            raise
        return comm

    def close(self, clean: bool = False) -> None:
        """End the groups this run made. ``clean``: every rank got here; the sends and the GPU's
        transfers are finished, the ranks meet at a barrier, and the groups are destroyed. After
        an error nothing is waited for: a transfer to a dead or hung peer never finishes, so the
        groups are aborted (``abort_group``), the run's own default group too."""
        _unpin_default_group()
        if clean:
            self.flush()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            if self.control is not None:
                dist.barrier(group=self.control)
            if self.store is not None and self.rank == 0:  # every rank is past any use of the key
                try:
                    self.store.delete_key(self.key)
                except Exception:  # noqa: BLE001 - a store that cannot delete keeps one short key
                    pass
        self.sends.clear()
        self.staging.clear()
        end = dist.destroy_process_group if clean else abort_group
        for group in (self.data, self.control):
            if group is not None:
                end(group)
        self.data = self.control = None
        if self.owns_group and dist.is_initialized():
            end(None)
        self.store = None

    def agree(self, error: BaseException | None) -> None:
        """Collective: if any rank failed, every rank raises ``DistconvError`` with one message.

        The message is rank 0's own when it failed, else the first failing rank's. A rank that
        failed elsewhere meanwhile (``fail``) never comes here: the others, polling the store
        while they wait, raise its message.
        """
        if self.world == 1:
            if error is not None:
                raise self.fail(error) from error
            return
        flag = torch.tensor([0 if error is None else 1])
        self.wait([dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.control, async_op=True)], poll=True)
        if not flag.item():
            return
        messages: list[str | None] = [None] * self.world
        dist.all_gather_object(messages, None if error is None else str(_readable(error, self.world)), group=self.control)
        rank, message = next((r, m) for r, m in enumerate(messages) if m is not None)
        raise Agreed(message if rank == 0 else f"{message} (on rank {rank})") from error

    def fail(self, error: BaseException) -> DistconvError:
        """This rank failed: the error every rank raises for it, left in the store for the others
        (a failure learned from a peer, or one after a peer's, yields the first one's message).
        The data group is then aborted (``_drop_data``): only after the message is in the store, so
        that a peer whose transfer with this rank breaks finds this rank's cause there, not its own
        "lost contact"."""
        try:
            return self._agree(error)
        finally:
            self._drop_data(error)

    def _agree(self, error: BaseException) -> DistconvError:
        if isinstance(error, Agreed):
            return error
        mine = str(_readable(error, self.world))
        if self.rank != 0:
            mine = f"{mine} (on rank {self.rank})"
        if self.store is None:
            return DistconvError(mine) if self.world > 1 else Agreed(mine)
        try:
            first = self.store.compare_set(self.key, "", mine).decode()
        except Exception:  # noqa: BLE001 - the store is gone too (its host died): keep our own message
            return DistconvError(mine)
        return Agreed(first)

    def _drop_data(self, error: BaseException) -> None:
        """Abort the data group and let go of it: gloo closes its connections only once the group
        is freed, and that is what ends a peer's wait on a transfer with this rank (a gloo
        transfer cannot be polled), so the frames of ``error``'s traceback let go of it too."""
        if self.data is None:
            return
        group, self.data = self.data, None
        self.sends.clear()
        abort_group(group)
        del group
        if error.__traceback__ is not None:
            traceback.clear_frames(error.__traceback__)
        gc.collect()

    def check(self, error: BaseException | None = None) -> None:
        """Raise ``error`` as every rank will (``fail``), or a peer's failure once one is in the store.
        The store is asked at most every few milliseconds."""
        if error is not None:
            raise self.fail(error) from error
        now = time.monotonic()
        if self.store is None or now - self._noticed < _NOTICE_S:
            return
        self._noticed = now
        try:
            failed = self.store.check([self.key])
            message = self.store.get(self.key).decode() if failed else None
        except Exception:  # noqa: BLE001 - the store's host is gone: the transfers' own errors tell
            return
        if message is not None:
            raise Agreed(message)

    def collect(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, on every rank (over the gloo control group)."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.control)
        return out

    def shared_token(self) -> str:
        """A random token chosen by rank 0 and known to every rank."""
        token = [uuid.uuid4().hex[:8]]
        if self.world > 1:
            dist.broadcast_object_list(token, src=0, group=self.control)
        return token[0]

    def gather(self, unit: Unit, mine: list[torch.Tensor], dtype: torch.dtype,
               on_device: bool = False) -> list[torch.Tensor] | None:
        """Assemble the unit's parts on its writer rank from every rank's slices.

        Returns the parts on the writer, None elsewhere. A rank's slices travel as one packed
        message; the writer posts its receives as one batch (``batch_isend_irecv``: under NCCL
        on the group's one communicator, not one per rank pair; gloo sends each on its own).
        Where a single read is the whole part, that tensor is used as is. ``on_device``: on
        GPUs the parts are assembled where the messages arrive, and stay there (what follows,
        the family's transform, the NaN check and FP8's quantization, runs on the device, and
        each output is copied back once as it is written); else they are assembled on the host.
        A sender goes on to the next units with up to ``_IN_FLIGHT`` sends unfinished, so that a
        unit's transfer to one writer overlaps with the next one's to another. Any failure here
        is every rank's (``fail``): the peers waiting on this rank learn it from the store.
        """
        try:
            return self._gather(unit, mine, dtype, on_device)
        except Exception as e:
            raise self.fail(e) from e

    def _gather(self, unit: Unit, mine: list[torch.Tensor], dtype: torch.dtype,
                on_device: bool) -> list[torch.Tensor] | None:
        where = self.device if on_device else torch.device("cpu")
        dst = unit.writer
        if self.rank != dst:
            if mine:
                packed = _pack(mine, unit.reads_of(self.rank), dtype, self.device)
                works = dist.batch_isend_irecv([dist.P2POp(dist.isend, packed, dst, group=self.data)])
                self.sends.append([works, packed])  # the buffer lives until its send finished
                while len(self.sends) > _IN_FLIGHT:
                    self.wait(self.sends.pop(0)[0])
            else:
                self.check()
            return None
        full: list[torch.Tensor | None] = [None] * len(unit.parts)
        for read, t in zip(unit.reads_of(dst), mine):
            place(full, unit, read, t, dtype, device=where, adopt=True)
        pending = []
        for src in range(self.world):
            reads = unit.reads_of(src) if src != dst else []
            if reads:
                pending.append((src, reads, torch.empty(_packed_size(reads, dtype), dtype=torch.uint8, device=self.device)))
        if pending:
            ops = [dist.P2POp(dist.irecv, buf, src, group=self.data) for src, _, buf in pending]
            self.wait(dist.batch_isend_irecv(ops))
        for src, reads, buf in pending:
            # on the device: placed from the message itself; else one copy to the host first
            here = buf if buf.device == where else self.staging.copy(src, buf)
            for read, t in zip(reads, _unpack(here, reads, dtype)):
                place(full, unit, read, t, dtype, device=where)
        return full  # type: ignore[return-value]

    def flush(self) -> None:
        """Wait for this rank's unfinished sends."""
        while self.sends:
            self.wait(self.sends.pop(0)[0])

    def wait(self, works: list[Any], poll: bool | None = None) -> None:
        """Wait for transfers or a control collective. Where their completion can be polled (NCCL
        transfers, gloo collectives: ``poll``, by default on GPUs) a peer's failure in the store
        ends the wait at once (``check``), and past the run's timeout it fails like any other
        fault (on GPUs ``Work.wait`` does not block the CPU, and a dead peer would stall the GPU
        until NCCL's watchdog aborts the process). A gloo transfer blocks until it is done, its
        peer's group is freed (``_drop_data``) or gloo's timeout (the run's)."""
        self.check()
        if self.device.type == "cuda" if poll is None else poll:
            deadline = time.monotonic() + self.timeout_s
            pause = 0.0001
            while not all(w.is_completed() for w in works):
                self.check()
                if time.monotonic() > deadline:
                    raise DistconvError(f"a transfer between ranks did not finish within {self.timeout_s:g} s "
                                        "(--timeout): a peer rank died or hangs")
                time.sleep(pause)
                pause = min(pause * 2, 0.002)
        try:
            for work in works:
                work.wait()
        except Exception as e:  # a peer that failed first closed its connections: its message
            raise self.fail(e) from e


def _readable(error: BaseException, world: int) -> DistconvError:
    """``error`` as one readable line: distconv's own, memory that ran out, or (with peers) a
    transfer that failed because contact with another rank was lost, as the command line words them."""
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return DistconvError(f"out of memory ({user_error(error)})")
    text = str(error).lower()
    lost = isinstance(error, dist.DistBackendError) or (isinstance(error, RuntimeError) and (
        "gloo" in text or "connection" in text or "timed out" in text))
    if world > 1 and lost:
        return DistconvError(f"lost contact with another rank ({user_error(error)})")
    return user_error(error)


def _job_store() -> Any:
    """The store the job's default group rendezvoused through (torchrun's agent holds it, so it
    outlives a rank that died); None where torch does not say."""
    get = getattr(distributed_c10d, "_get_default_store", None)
    try:
        return get() if get is not None else None
    except (RuntimeError, ValueError):
        return None


def abort_group(group: dist.ProcessGroup | None) -> None:
    """End a process group after an error (None: the default one, and with it every group). A
    group with NCCL is aborted: its pending transfers are dropped, not finalized (which since
    torch 2.6 ``destroy_process_group`` does, waiting on a transfer to a dead peer until the
    watchdog kills the process): ``distributed_c10d._abort_process_group``, which also forgets the
    group (read in torch 2.13.0 and 2.14.1); else ``ProcessGroup.abort``, then destroy. A gloo-only
    group is destroyed: gloo has nothing to finalize, and destroying it also stops its threads."""
    try:
        nccl = "nccl" in str(dist.get_backend(group)).lower()
    except (RuntimeError, ValueError):  # already gone
        return
    abort = getattr(distributed_c10d, "_abort_process_group", None)
    if nccl and abort is not None:
        try:
            abort(group)
            return
        except (RuntimeError, ValueError, AttributeError):  # a build without it: the older way
            pass
    pg = group if group is not None else distributed_c10d.GroupMember.WORLD
    if nccl and pg is not None and hasattr(pg, "abort"):
        try:
            pg.abort()
        except RuntimeError:
            pass
    try:
        dist.destroy_process_group(group)
    except (RuntimeError, ValueError, AssertionError):  # already forgotten
        pass


def _data_group(device: torch.device | None, timeout: datetime.timedelta) -> dist.ProcessGroup:
    """The group the tensors travel over: gloo, or NCCL on ``device`` with its communicator made
    now (``device_id``, torch 2.6 and later), which batched transfers then share instead of
    NCCL making one per rank pair inside the first gather."""
    if device is None:
        return dist.new_group(backend="gloo", timeout=timeout)
    return dist.new_group(backend="nccl", timeout=timeout + _WATCHDOG_MARGIN, device_id=device)


def local_gpu(env: dict[str, str], device_count: int) -> int:
    """The GPU a process started by torchrun or srun takes: its local rank (``LOCAL_RANK``,
    else ``SLURM_LOCALID``, else 0) on the devices it sees. With one device per task (Slurm
    ``--gpus-per-task``) every task takes its own device 0; with more local ranks than devices
    two ranks land on one GPU, which ``decide_device`` finds."""
    local = int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", "0")))
    return local % device_count


def _visible_gpu(device: str, owns: bool) -> int | None:
    """This rank's GPU for ``device``, or None when it has none to offer."""
    if device == "cpu" or not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        return None
    if not owns:  # the post-training hook: the caller's device, if it uses CUDA at all (asking
        # for the current device of a process that never used CUDA would open a context on GPU 0)
        return torch.cuda.current_device() if torch.cuda.is_initialized() else None
    return local_gpu(dict(os.environ), torch.cuda.device_count())


def _gpu_id(index: int) -> str:
    """What tells two GPUs of one node apart, whatever each process sees: the device UUID."""
    uuid_ = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    return str(uuid_) if uuid_ is not None else f"ordinal {index}"


def decide_device(device: str, gpus: list[tuple[str, str] | None]) -> tuple[bool, str | None]:
    """From every rank's ``(host, GPU id)`` (None: no GPU), whether to gather over NCCL on GPUs:
    the same list on every rank, so the same choice.

    NCCL needs one distinct GPU per rank. ``--device cuda`` without that is an error;
    ``--device auto`` then gathers over gloo, with a note saying why, also when no rank sees a
    GPU (a Slurm job that asked for none, say); a rank alone gathers nothing and gets no note.
    """
    if device == "cpu":
        return False, None
    ranks: dict[tuple[str, str], list[int]] = {}
    for rank, gpu in enumerate(gpus):
        if gpu is not None:
            ranks.setdefault(gpu, []).append(rank)
    missing = [r for r, gpu in enumerate(gpus) if gpu is None]
    shared = next((f"ranks {', '.join(map(str, rs))} would share GPU {gpu[1]} on {gpu[0]}"
                   for gpu, rs in ranks.items() if len(rs) > 1), None)
    problem = (f"rank {missing[0]} has no CUDA device" if missing else shared)
    if problem is None:
        return True, None
    if device == "cuda":
        raise DistconvError(f"--device cuda: {problem} (NCCL needs one GPU per rank); "
                            "start at most one rank per GPU, or use --device cpu")
    if len(gpus) == 1 and not ranks:
        return False, None
    why = problem if ranks else "no rank sees a CUDA device"
    return False, f"gathering over gloo on the CPU: {why} (--device cpu chooses this without a note)"


def _unpin_default_group() -> None:
    """Let the default group die when its owner destroys it.

    ``torch.distributed.nn.functional`` evaluates ``group=group.WORLD`` at import. torch's DCP
    imports it, and distconv imports DCP inside its first ``export``: in the post-training hook,
    after ``init_process_group``, so those functions keep the default group as a default. Then
    ``destroy_process_group()`` cannot free it, its gloo worker threads run on into interpreter
    exit, and one that drops a finished collective's tensors then needs the GIL and aborts the
    process ("terminate called without an active exception"). ``None`` (what an import before
    ``init_process_group`` stores) means the same: the current default group.
    """
    world = dist.group.WORLD
    functional = sys.modules.get("torch.distributed.nn.functional")
    if world is None or functional is None:
        return
    for fn in vars(functional).values():
        if inspect.isfunction(fn) and fn.__defaults__ and any(d is world for d in fn.__defaults__):
            fn.__defaults__ = tuple(None if d is world else d for d in fn.__defaults__)


class HostBuffers:
    """One host byte buffer per source rank, grown as needed and reused unit after unit, so
    the writer holds at most one message per peer on the host. ``pin``: page-locked (GPU -> CPU
    is a DMA copy) by this class itself (``cudaHostRegister``), so ``clear`` hands the pages
    back to the system; torch's pinned-memory cache would keep them for the rest of the process."""

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self._held: dict[int, torch.Tensor] = {}
        self._pinned: set[int] = set()  # data pointers registered with CUDA

    def take(self, src: int, nbytes: int) -> torch.Tensor:
        """``nbytes`` bytes of ``src``'s buffer; valid until the next ``take`` for ``src``."""
        held = self._held.get(src)
        if held is None or held.numel() < nbytes:
            self._release(src)
            held = self._held[src] = torch.empty(nbytes, dtype=torch.uint8)
            if self.pin and nbytes and torch.cuda.is_initialized():
                if int(torch.cuda.cudart().cudaHostRegister(held.data_ptr(), nbytes, 0)) == 0:
                    self._pinned.add(held.data_ptr())  # else it stays pageable: slower, still right
        return held[:nbytes]

    def copy(self, src: int, buf: torch.Tensor) -> torch.Tensor:
        """``buf`` (one message from ``src``) copied into ``src``'s buffer."""
        return self.take(src, buf.numel()).copy_(buf)

    def pinned_bytes(self) -> int:
        """The bytes this object holds page-locked now."""
        return sum(t.numel() for t in self._held.values() if t.data_ptr() in self._pinned)

    def _release(self, src: int) -> None:
        held = self._held.pop(src, None)
        if held is not None and held.data_ptr() in self._pinned:
            self._pinned.discard(held.data_ptr())
            torch.cuda.cudart().cudaHostUnregister(held.data_ptr())

    def clear(self) -> None:
        """Drop every buffer, unpinned first."""
        for src in list(self._held):
            self._release(src)


def place(full: list[torch.Tensor | None], unit: Unit, read: Read, t: torch.Tensor, dtype: torch.dtype,
          fill: bool = False, device: torch.device | None = None, adopt: bool = False) -> None:
    """Put a read's data where it lands in its part (made on first use, on ``device``, the host by
    default: empty, or zeros with ``fill`` where reads may leave rows uncovered: padding rows).
    ``adopt``: ``t`` is the caller's to give away (a read's own tensor, not a view of a reused
    buffer), and if it is the whole part it becomes the part (seen in the part's shape: a stored
    tensor's leading layer or expert axis dropped): no copy."""
    shape = unit.parts[read.part].shape
    if (adopt and full[read.part] is None and t.numel() == numel(shape) and t.is_contiguous() and t.dtype == dtype
            and t.device == torch.device(device or "cpu")):
        full[read.part] = t.view(shape)
        return
    if full[read.part] is None:
        full[read.part] = (torch.zeros if fill else torch.empty)(shape, dtype=dtype, device=device)
    target = full[read.part][read.dest]
    target.copy_(t.reshape(target.shape))


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _nbytes(read: Read, dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for s in read.sizes:
        n *= s
    return n


def _packed_size(reads: list[Read], dtype: torch.dtype) -> int:
    """The size of the message holding ``reads``: what the sender packs, the receiver expects."""
    return sum(_aligned(_nbytes(r, dtype)) for r in reads)


def check_slices(reads: list[Read], tensors: list[torch.Tensor], dtype: torch.dtype) -> None:
    """Loaded slices must be the planned ones, in dtype and element count: sender and receiver
    size a message each from the plan, and a mismatch would hang or garble the transfer."""
    if len(tensors) != len(reads):
        raise DistconvError(f"internal: {len(tensors)} slices loaded for {len(reads)} planned reads")
    for r, t in zip(reads, tensors):
        if t.dtype != dtype or t.numel() * t.element_size() != _nbytes(r, dtype):
            raise DistconvError(f"internal: {r.key} at {list(r.offsets)} was loaded as {t.dtype} {list(t.shape)}, "
                                f"planned {dtype} {list(r.sizes)}")


def _pack(tensors: list[torch.Tensor], reads: list[Read], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One contiguous byte buffer of ``_packed_size(reads, dtype)`` bytes holding every tensor,
    each at an aligned offset; checked against the plan first."""
    check_slices(reads, tensors, dtype)
    buf = torch.empty(_packed_size(reads, dtype), dtype=torch.uint8, device=device)
    offset = 0
    for t, r in zip(tensors, reads):
        raw = t.contiguous().reshape(-1).view(torch.uint8)
        buf[offset : offset + raw.numel()].copy_(raw, non_blocking=True)
        offset += _aligned(_nbytes(r, dtype))
    return buf


def _unpack(buf: torch.Tensor, reads: list[Read], dtype: torch.dtype) -> list[torch.Tensor]:
    out, offset = [], 0
    for r in reads:
        n = _nbytes(r, dtype)
        out.append(buf[offset : offset + n].view(dtype).reshape(r.sizes))
        offset += _aligned(n)
    return out
