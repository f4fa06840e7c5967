"""Training on several processes: torchrun's process group, DDP and FSDP2, and rank 0's role.

`torchrun --nproc_per_node N -m kimbho train ...` (or `kimbho train --nproc N ...`, which runs
torchrun in-process) starts N processes and tells each its RANK, LOCAL_RANK and WORLD_SIZE and
where to meet. Every process builds the same model from the same seed and trains on its own
device (backend nccl on CUDA, gloo on the CPU):

- `train.batch_size` is the global batch. Batch `step` is a pure function of (seed, step)
  (`RandomWindowSampler`) and rank r reads rows [r*B/N, (r+1)*B/N) of it, so the processes share
  exactly the batch one process would read, and a run resumed with another process count simply
  splits it differently.
- `train.parallel=ddp` wraps the training forward pass in DistributedDataParallel (a replica per
  process, gradients averaged during backward); `fsdp` applies FSDP2's `fully_shard` to every
  block and to the whole model, so each process keeps 1/N of the parameters, gradients and
  optimizer state and gathers a block's weights only while it runs. With gradient accumulation,
  gradients are synchronised on the last micro-step only.
- The loss and gradient norm are averaged over processes before the step guard sees them, and a
  stop signal seen by any process is shared, so all processes skip, stop and save at the same
  steps: none is ever left waiting at a collective the others have abandoned.
- Rank 0 alone writes the run directory. A checkpoint holds the full state (weights, and
  optimizer state keyed by parameter name), gathered from the shards, in the single-process
  layout; on resume rank 0 reads it and broadcasts it. Per-process random states (dropout) are
  saved for every rank and restored when the process count is unchanged.
- A collective waits at most `train.dist_timeout` seconds; when a process dies, torchrun stops
  the others, and `--resume` continues from the last complete checkpoint.

A `KimbhoError` met by every process (a bad config, a refused resume) is printed once, by
rank 0; the other processes raise `ReportedElsewhere` and exit quietly.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from ..errors import KimbhoError, ReportedElsewhere
from .optim import MuonWithAdamW, Optimizer

log = logging.getLogger("kimbho")

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """The processes of a run and this one's place among them. With `size == 1` every method is
    a local no-op, so the trainer has one code path."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes logs, metrics and checkpoints."""
        return self.rank == 0

    def rows(self, batch_size: int) -> slice:
        """The rows of a global batch this process reads."""
        share = batch_size // self.size
        return slice(self.rank * share, (self.rank + 1) * share)

    def mean(self, *values: torch.Tensor) -> list[float]:
        """Each scalar averaged over processes (in one collective)."""
        stacked = torch.stack([v.detach().float().reshape(()) for v in values]).to(self.device)
        if self.size > 1:
            dist.all_reduce(stacked)  # SUM: gloo has no AVG
            stacked /= self.size
        return stacked.tolist()

    def max(self, value: int) -> int:
        """The largest of the processes' values."""
        if self.size == 1:
            return value
        t = torch.tensor([value], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def broadcast(self, value: T) -> T:
        """Rank 0's `value` (any picklable object), on every process."""
        if self.size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: T) -> list[T]:
        """Every process's `value`, by rank, on rank 0 (an empty list elsewhere)."""
        if self.size == 1:
            return [value]
        out: list[Any] | None = [None] * self.size if self.is_main else None
        dist.gather_object(value, out, dst=0)
        return out or []

    @contextlib.contextmanager
    def together(self) -> Iterator[None]:
        """Run a block on every process; a `KimbhoError` raised in it on any process is raised on
        all of them once all have finished the block (rank 0 raises the message, the others
        `ReportedElsewhere`), so no process goes on to wait for one that has given up. Other
        exceptions are bugs: they end that process, and torchrun stops the rest."""
        error: KimbhoError | None = None
        try:
            yield
        except KimbhoError as e:
            if self.size == 1:
                raise
            error = e
        if self.size == 1:
            return
        messages: list[str | None] = [None] * self.size
        dist.all_gather_object(messages, None if error is None else str(error))
        failed = [(rank, m) for rank, m in enumerate(messages) if m is not None]
        if not failed:
            return
        if not self.is_main:
            raise ReportedElsewhere(failed[0][1])
        if error is not None:
            raise error
        rank, message = failed[0]
        raise KimbhoError(f"process {rank}: {message}")

    def error(self, message: str) -> KimbhoError:
        """The exception for an error every process meets at the same point (decided from shared
        values): reported by rank 0 only."""
        return KimbhoError(message) if self.is_main else ReportedElsewhere(message)


def setup(device: torch.device, timeout_sec: float) -> World:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1), or stay
    one process. A group the caller already initialised is used as it is. On CUDA each process
    takes the GPU of its LOCAL_RANK."""
    if dist.is_available() and dist.is_initialized():
        size, rank = dist.get_world_size(), dist.get_rank()
    else:
        size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if size == 1:
        return World(device=device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise KimbhoError(
                f"process {rank} has local rank {local_rank}, but this machine has "
                f"{torch.cuda.device_count()} GPU(s): start at most one process per GPU"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise KimbhoError(f"training on several processes needs CUDA GPUs or the CPU, not {device.type}")
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            timeout=timedelta(seconds=timeout_sec),
            device_id=device if device.type == "cuda" else None,
        )
        atexit.register(_leave)
    return World(rank=rank, size=size, local_rank=local_rank, device=device)


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_if_in_group(code: int) -> None:
    """End a process of a multi-process run with status `code` at once, skipping the
    interpreter's teardown; return if this process is in no process group. A gloo process that
    tears down its process group after its peer has exited sometimes aborts ("terminate called
    without an active exception", SIGABRT: seen twice here in full runs of the test suite), which
    would turn a finished run into a failed one. By now every collective has completed and every
    file is written and closed, so there is nothing to wait for: the OS closes the connections."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def lost_contact(error: BaseException) -> bool:
    """Whether `error` is a collective failing because another process died (gloo reports a
    closed connection as a plain RuntimeError, NCCL as a DistBackendError)."""
    if isinstance(error, dist.DistError):
        return True
    return any(sign in str(error) for sign in ("gloo", "NCCL", "Connection reset", "Connection closed"))


def split_batch(batch_size: int, micro_batch_size: int | None, processes: int) -> tuple[int, int]:
    """(rows per process, rows per forward pass) of a global batch of `batch_size` rows, or a
    `KimbhoError` saying how to make it divide."""
    if batch_size % processes:
        raise KimbhoError(
            f"train.batch_size={batch_size} does not split evenly over {processes} processes; "
            f"use a multiple of {processes}"
        )
    rows = batch_size // processes
    micro = micro_batch_size or rows
    if rows % micro:
        if processes == 1:
            raise KimbhoError(
                f"train.batch_size={batch_size} is not a multiple of train.micro_batch_size={micro}"
            )
        raise KimbhoError(
            f"train.batch_size={batch_size} is not a multiple of processes x train.micro_batch_size "
            f"= {processes} x {micro} = {processes * micro}"
        )
    return rows, micro


def parallelize(model: nn.Module, world: World, parallel: str) -> nn.Module:
    """The module to run each training micro-step through (`module(inputs, targets)` returns the
    loss): `model` as it is in one process, wrapped in DDP, or, for `fsdp`, sharded in place. Call
    it before building the optimizer (sharding replaces the parameters) and before compiling (DDP
    and FSDP2 are meant to be compiled over, not wrapped around a compiled module)."""
    if world.size == 1:
        if parallel == "fsdp":
            log.warning("train.parallel=fsdp: one process has nothing to shard over; training unsharded")
        return model
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        # Each block is one unit of gathering and freeing; the root holds the embedding, the
        # final norm and the head. FSDP2 keeps the root's weights gathered from forward to
        # backward, where they are needed at once.
        for block in model.blocks:  # type: ignore[union-attr]
            fully_shard(block)
        fully_shard(model)
        # Generation calls `features` and then the head, not `forward`: gather for it too.
        register_fsdp_forward_method(model, "features")
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [world.device.index] if world.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


@contextlib.contextmanager
def gradient_sync(module: nn.Module, enabled: bool) -> Iterator[None]:
    """Within the block (forward and backward of one micro-step through `module`, from
    `parallelize`), whether backward synchronises gradients over processes: with gradient
    accumulation only the last micro-step needs to (DDP's `no_sync`, FSDP2's
    `set_requires_gradient_sync`); earlier ones accumulate locally."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(module, FSDPModule):
        module.set_requires_gradient_sync(enabled)
        yield
    elif isinstance(module, DistributedDataParallel) and not enabled:
        with module.no_sync():
            yield
    else:
        yield


def clip_grad_norm_(parameters: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` that also works on FSDP2's sharded gradients: the norm of
    the whole gradient, the same on every process."""
    from torch.distributed.tensor import DTensor

    params = [p for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])  # type: ignore[misc]
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()  # the shards' partial norms, combined over processes
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's whole state dict, bare parameter names, on rank 0's CPU (empty elsewhere).
    Under FSDP it gathers the shards: every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state: dict[str, Any] = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    return state


def full_optimizer_state(model: nn.Module, optimizer: Optimizer) -> dict[str, Any]:
    """The optimizer's whole state keyed by parameter name (so it loads whatever the process
    count or sharding), on rank 0's CPU (empty elsewhere). Every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, _parts(optimizer), options=options)


def load_full_state(
    model: nn.Module,
    optimizer: Optimizer,
    weights: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    world: World,
    with_optimizer: bool = True,
    strict: bool = True,
) -> None:
    """Load a full state (from `full_weights` and `full_optimizer_state`), which only rank 0 needs
    to have read: it is broadcast to the others, and sharded again under FSDP. `with_optimizer`
    (the same on every process) False leaves the optimizer as it is; `strict` False loads
    `weights` that hold only some of the model's tensors (a LoRA run's adapters)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=world.size > 1, strict=strict)
    set_model_state_dict(model, dict(weights), options=options)
    if with_optimizer:
        state = _keyed_by_name(model, optimizer, optimizer_state)
        set_optimizer_state_dict(model, _parts(optimizer), state, options=options)


def _parts(optimizer: Optimizer) -> list[torch.optim.Optimizer]:
    """The torch optimizers behind `optimizer`: Muon's recipe is two of them (see `optim.py`)."""
    return [optimizer.muon, optimizer.adamw] if isinstance(optimizer, MuonWithAdamW) else [optimizer]


def _keyed_by_name(model: nn.Module, optimizer: Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """Optimizer state keyed by parameter name. Checkpoints from before multi-process training
    hold `optimizer.state_dict()`, keyed by each parameter's position in the param groups: the
    optimizer built the same way has the parameters in the same order."""
    groups = state.get("param_groups", [])
    if not groups or not isinstance(groups[0]["params"][0], int):
        return state
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    return {
        "state": {order[i]: value for i, value in state["state"].items()},
        "param_groups": [{**group, "params": [order[i] for i in group["params"]]} for group in groups],
    }


def launch(processes: int, kimbho_args: list[str]) -> int:
    """`kimbho train --nproc N`: run `kimbho <kimbho_args>` on N processes of this machine through
    torchrun (`torch.distributed.run --standalone --nproc_per_node N`, in this process so that a
    failure ends in one line, not torchrun's traceback). Returns the exit status."""
    import signal

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if processes < 1:
        raise KimbhoError(f"--nproc must be at least 1, got {processes}")
    if "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise KimbhoError("--nproc starts torchrun itself; under torchrun (or srun) leave it out")
    if "OMP_NUM_THREADS" not in os.environ and not torch.cuda.is_available():
        # torchrun would give each CPU process one thread; share the cores instead.
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
    args = parse_args(["--standalone", f"--nproc-per-node={processes}", "--module", "kimbho", *kimbho_args])
    # torchrun's agent logs each process it stops; the one line below says what matters.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(args)
    except ChildFailedError as e:
        # A process that ended with status 1 has printed why (a Python error, or losing contact
        # with the others). One killed by a signal (SIGKILL from the out-of-memory killer, a
        # crash) could not: name it. SIGTERM is torchrun stopping the others once one failed; a
        # SIGABRT next to a reported error came from a process exiting as the job went down
        # (seen once here, in gloo's teardown), so neither is the cause.
        failures = sorted(e.failures.items())
        reported = any(f.exitcode == 1 for _, f in failures)
        followers = {1, -signal.SIGTERM, *([-signal.SIGABRT] if reported else [])}
        causes = [(r, f) for r, f in failures if f.exitcode not in followers]
        if reported and not causes:
            return 1
        rank, failure = causes[0] if causes else e.get_first_failure()
        how = (
            f"was killed by {signal.Signals(-failure.exitcode).name}"
            if failure.exitcode < 0
            else f"exited with status {failure.exitcode}"
        )
        raise KimbhoError(
            f"training process {rank} {how}, so torchrun stopped the others; continue from the "
            f"last complete checkpoint with --resume"
        ) from None
    except SignalException as e:
        # Forwarded to the processes, which finished their step and saved a checkpoint.
        return 128 + int(e.sigval)
    return 0
