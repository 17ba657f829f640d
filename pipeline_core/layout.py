"""Where this process stands in a scaled-out run: its rank under a launcher, its shard, and the parts it may take.

torchrun and `accelerate launch` start one process per device and tell each its RANK, LOCAL_RANK and WORLD_SIZE;
schedulers that fan out tasks (Airflow mapped tasks, Slurm arrays, Kubernetes indexed Jobs) give `--num-shards N
--shard-index I`, or `auto` to read the index from the scheduler's environment. Both compose: the ranks of a shard
share its parts.

A shard is a fixed, contiguous block of parts (a sixth of the input for shard 0 of 6: a scheduler sizes a task's
timeout and retries it alone). Within a shard the processes share the parts dynamically through claims
(output/claims.py): each starts at its own slice of the block and, when done, takes whatever is left, so a slow
process never leaves the others idle while parts remain.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from pipeline_core.errors import UsageError

log = logging.getLogger("batchrun")

# (variable, what sets it) read by `--shard-index auto`, in this order
SHARD_INDEX_SOURCES = (("JOB_COMPLETION_INDEX", "a Kubernetes indexed Job"),
                       ("SLURM_ARRAY_TASK_ID", "a Slurm job array"))


@dataclass(frozen=True)
class Layout:
    rank: int = 0
    world_size: int = 1
    local_rank: int | None = None  # set under a launcher
    local_world_size: int = 1
    shard_index: int = 0
    num_shards: int = 1
    # under a launcher: which launch this process belongs to (its rendezvous) and the launcher's restart count, so
    # that a rank waits for its own rank 0 and a start is not locked out by its own group (output/lock.py)
    launch: str | None = None
    attempt: int = 0

    @property
    def launched(self) -> bool:
        return self.world_size > 1

    @property
    def shows_progress(self) -> bool:
        """One process of a launched group shows the job's progress; every shard shows its own."""
        return self.rank == 0

    def labels(self) -> dict:
        """What a worker record says about this process."""
        labels = {"rank": self.rank, "world_size": self.world_size, "local_rank": self.local_rank,
                  "shard_index": self.shard_index, "num_shards": self.num_shards}
        if self.launched:
            labels.update(launch=self.launch, attempt=self.attempt)
        return labels

    def log_fields(self) -> dict:
        """What each JSON log line says about this process."""
        return {"rank": self.rank, "world_size": self.world_size, "shard_index": self.shard_index,
                "num_shards": self.num_shards}

    def tag(self) -> str:
        """Short, for every log line of a scaled-out process: "rank 1/2", "shard 0/3"."""
        words = []
        if self.num_shards > 1:
            words.append(f"shard {self.shard_index}/{self.num_shards}")
        if self.launched:
            words.append(f"rank {self.rank}/{self.world_size}")
        return " ".join(words)

    def describe(self) -> str:
        words = []
        if self.launched:
            words.append(f"rank {self.rank} of {self.world_size} (local rank {self.local_rank})")
        if self.num_shards > 1:
            words.append(f"shard {self.shard_index} of {self.num_shards}")
        return ", ".join(words) or "one process"


def layout_from(num_shards: str | None, shard_index: str | None, env: Mapping[str, str] = os.environ) -> Layout:
    """The layout of this process: the launcher's variables and the --num-shards / --shard-index options."""
    if (num_shards is None) != (shard_index is None):
        raise UsageError("--num-shards and --shard-index go together: --num-shards 4 --shard-index 0 "
                         "(or --shard-index auto under a Kubernetes indexed Job or a Slurm array)")
    shards, index = 1, 0
    if num_shards is not None:
        shards = _count(num_shards, env)
        index = _index(shard_index, env)
        if index >= shards:
            raise UsageError(f"--shard-index must be below --num-shards ({shards}), got {index}")
    world = int(env.get("WORLD_SIZE", "1"))
    local_rank = env.get("LOCAL_RANK")
    # torchrun (and accelerate launch, which runs it) gives every rank of a launch, on every node, the same
    # rendezvous address and run id; the restart count grows with each --max-restarts restart of the group
    launch = f"{env.get('MASTER_ADDR', '')}:{env.get('MASTER_PORT', '')}/{env.get('TORCHELASTIC_RUN_ID', '')}"
    return Layout(rank=int(env.get("RANK", "0")), world_size=world,
                  local_rank=int(local_rank) if local_rank is not None and world > 1 else None,
                  local_world_size=int(env.get("LOCAL_WORLD_SIZE", "1")), shard_index=index, num_shards=shards,
                  launch=launch if world > 1 else None, attempt=int(env.get("TORCHELASTIC_RESTART_COUNT", "0")))


def _count(value: str, env: Mapping[str, str]) -> int:
    if value == "auto":
        if "SLURM_ARRAY_TASK_COUNT" not in env:
            raise UsageError("--num-shards auto reads SLURM_ARRAY_TASK_COUNT (a Slurm job array), which is not set; "
                             "give the number of shards: --num-shards 4")
        return _positive("SLURM_ARRAY_TASK_COUNT", env["SLURM_ARRAY_TASK_COUNT"], minimum=1)
    return _positive("--num-shards", value, minimum=1)


def _index(value: str, env: Mapping[str, str]) -> int:
    if value != "auto":
        return _positive("--shard-index", value, minimum=0)
    for variable, _ in SHARD_INDEX_SOURCES:
        if variable in env:
            index = _positive(variable, env[variable], minimum=0)
            if variable == "SLURM_ARRAY_TASK_ID":  # arrays may be numbered from 1 (--array=1-4)
                index -= _positive("SLURM_ARRAY_TASK_MIN", env.get("SLURM_ARRAY_TASK_MIN", "0"), minimum=0)
            return index
    where = " or ".join(f"{variable} ({what})" for variable, what in SHARD_INDEX_SOURCES)
    raise UsageError(f"--shard-index auto reads {where}; neither is set: give the index, --shard-index 0")


def _positive(name: str, value: str, minimum: int) -> int:
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or number < minimum:
        raise UsageError(f"{name} must be an integer of at least {minimum}, got {value!r}")
    return number


def check_device_map(device_map, layout: Layout) -> None:
    """A model spread over a node's devices takes all of them: one process per node, refused before loading."""
    if device_map is not None and layout.local_world_size > 1:
        raise UsageError(
            f"model.device_map={device_map!r} spreads one model over this node's devices, but the launcher started "
            f"{layout.local_world_size} processes on this node; start one process per node "
            "(torchrun --nproc-per-node 1, accelerate launch --num_processes = number of machines) or remove "
            "model.device_map to run one model per device"
        )


@dataclass
class Share:
    """The parts this process may compute, and the order it tries them in."""

    layout: Layout
    total_parts: int | None  # None until a stream of unknown length has been read to its end
    # blocks need the total: the parts of a stream of unknown length are dealt round-robin, for good (learning
    # the total at the stream's end must not move any part to another shard)
    round_robin: bool = field(init=False)

    def __post_init__(self):
        self.round_robin = self.total_parts is None

    def parts(self) -> range:
        """The shard's parts (a known total only): a contiguous block balanced to within one part, or every
        num_shards-th part when dealt round-robin."""
        shards, index = self.layout.num_shards, self.layout.shard_index
        if self.round_robin:
            return range(index, self.total_parts, shards)
        return range(self.total_parts * index // shards, self.total_parts * (index + 1) // shards)

    def includes(self, index: int) -> bool:
        if self.round_robin:
            return index % self.layout.num_shards == self.layout.shard_index
        return index in self.parts()

    def last(self) -> int | None:
        """The last part of the share, when known: a sequential read can stop after it."""
        if self.round_robin or self.layout.num_shards == 1:
            return None
        block = self.parts()
        return block[-1] if block else -1

    def order(self) -> list[int]:
        """The shard's parts, starting at this rank's slice: ranks meet only once their own slices are done."""
        block = list(self.parts())
        start = len(block) * self.layout.rank // self.layout.world_size
        return block[start:] + block[:start]
