"""Data-parallel training across processes: torch DDP, launched by `torchrun` (or any launcher that sets the
same environment: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT).

One process per rank holds the whole model (every embedding table replicated; DDP all-reduces the gradients
each step) and the whole prepared data set; it computes only its share of each global batch and of each
evaluation. The backend is gloo on CPU and NCCL on CUDA unless `--dist-backend` names one. Without those
variables (or with WORLD_SIZE=1) this is a single process and every collective is a no-op, so the
one-process path stays exactly what it was.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

BACKENDS = ("gloo", "nccl")
#: How long a rank waits at a collective (the others may be training the meta generator or writing the
#: checkpoint meanwhile) before the job fails instead of hanging.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=60)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


@dataclass(frozen=True)
class Distributed:
    """Where this process stands in a data-parallel job; `Distributed()` is the single process."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    backend: str | None = None  # None: one process, no process group

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs, trains the meta generator and writes the checkpoint."""
        return self.rank == 0

    # --- set-up -----------------------------------------------------------------------------------------
    @classmethod
    def from_environment(cls, backend: str | None = None, device: str = "cpu") -> Distributed:
        """This process's place in the job torchrun started (a single process without one); initialises
        the process group. `backend` None: NCCL when training on CUDA, gloo otherwise."""
        world = _env_int("WORLD_SIZE", 1)
        if world <= 1:
            return cls()
        import torch.distributed as dist

        chosen = backend or ("nccl" if device.startswith("cuda") else "gloo")
        if chosen not in BACKENDS:
            raise SystemExit(f"--dist-backend {chosen!r}: expected one of {', '.join(BACKENDS)}")
        if chosen == "nccl" and not (torch.cuda.is_available() and dist.is_nccl_available()):
            raise SystemExit("--dist-backend nccl needs CUDA and a torch built with NCCL; use gloo on CPU")
        state = cls(rank=_env_int("RANK", 0), world=world, local_rank=_env_int("LOCAL_RANK", 0),
                    local_world=_env_int("LOCAL_WORLD_SIZE", world), backend=chosen)
        if chosen == "nccl":
            torch.cuda.set_device(state.local_rank)
        if not dist.is_initialized():
            dist.init_process_group(chosen, timeout=COLLECTIVE_TIMEOUT)
        log.info("rank %d of %d (local %d of %d), backend %s", state.rank, world, state.local_rank,
                 state.local_world, chosen)
        return state

    def close(self) -> None:
        if self.active:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()

    def device(self, requested: str) -> str:
        """Each rank its own GPU: "cuda" -> "cuda:LOCAL_RANK"; other devices unchanged."""
        return f"cuda:{self.local_rank}" if self.active and requested == "cuda" else requested

    def threads(self, requested: int | None, default: int = 0) -> int:
        """Torch threads of this process: `requested` (the command line's), else `default` for one process
        (0: torch's own) and, under torchrun, the node's cores shared out among its ranks (at least 1)."""
        if requested:
            return requested
        if not self.active:
            return default
        return max(1, (os.cpu_count() or 1) // self.local_world)

    def materialise_first(self, spec) -> None:
        """A generated or fetched source is made by each node's local rank 0 while its other ranks wait
        (they would write the same cache files); then every rank reads it. A failure there ends the rank,
        and torchrun then stops the others."""
        if not self.active:
            return
        if self.local_rank == 0:
            from dataset.sources import materialise

            materialise(spec)
        self.barrier()

    # --- collectives (no-ops for one process) ----------------------------------------------------------
    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            if self.backend == "nccl":
                dist.barrier(device_ids=[self.local_rank])
            else:
                dist.barrier()

    def _comm_device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over the ranks (float64)."""
        if not self.active:
            return list(values)
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(tensor)
        return tensor.cpu().tolist()

    def gather_rows(self, local: np.ndarray, total: int) -> np.ndarray:
        """The concatenation, in rank order, of every rank's `local` float32 rows (each rank holding its
        `shard_rows(total)` part); every rank gets the whole."""
        if not self.active:
            return local
        import torch.distributed as dist

        sizes = [len(part) for part in np.array_split(np.arange(total), self.world)]
        padded = torch.zeros(max(sizes), dtype=torch.float32, device=self._comm_device())
        padded[:len(local)] = torch.as_tensor(local, dtype=torch.float32)
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        return np.concatenate([part[:size].cpu().numpy() for part, size in zip(parts, sizes, strict=True)])

    # --- sharding ----------------------------------------------------------------------------------------
    def shard(self, rows: np.ndarray) -> np.ndarray:
        """This rank's contiguous part of `rows` (parts differ in size by at most one)."""
        if not self.active:
            return rows
        return np.array_split(rows, self.world)[self.rank]

    def shard_rows(self, total: int) -> np.ndarray:
        return self.shard(np.arange(total))

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model under DDP (one process: the model itself). The rank-0 weights are broadcast here.

        Buffers are synced once here but not before every forward: the models' only buffers are the
        constant item-field tables. Every parameter takes part in every training forward, so there is no
        unused-parameter search."""
        if not self.active:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.local_rank] if self.backend == "nccl" else None
        return DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)


SINGLE = Distributed()


def spawn_environment(rank: int, world: int, port: int) -> dict[str, str]:
    """The variables torchrun sets for one rank of a one-node job on `port`: what a process started by
    `torch.multiprocessing.spawn` puts into `os.environ` before `Distributed.from_environment()`."""
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
