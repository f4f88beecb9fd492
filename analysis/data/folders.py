"""Dataset-scale plumbing: an image folder as a torch Dataset, shards per process, resumable state, collectives.

Everything here works the same in one process and under ``torchrun`` (one process per GPU or CPU slot):
``init_distributed`` reads the launcher's environment, ``ShardSampler`` gives each process its own samples
(never a duplicate), and ``all_reduce_sums`` adds the per-process running sums so that rank 0 can write
the same result a single process would have produced.
"""
from __future__ import annotations

import datetime
import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from analysis.data.images import (ACCEPTED_TYPES, ImageError, NamedImage, class_folder, folder_class_labels, load_image,
                                  to_batch)

NO_LABEL = -1
LABEL_MODES = ("self", "folder")


class DatasetError(ValueError):
    """The folder cannot be used as a dataset (missing, empty, or unlabelled where labels are needed)."""


class ResumeError(RuntimeError):
    """A saved shard state that does not belong to this run (other settings or world size)."""


class RankTimeout(RuntimeError):
    """A process did not reach a meeting point of the run within --timeout (frozen, killed or far slower)."""


DEFAULT_TIMEOUT_S = 600.0  # how long processes wait for each other at a meeting point (torch's default: 30 min)


# ----------------------------------------------------------------------------- the folder dataset

def list_image_files(root: Path, limit: int | None = None) -> list[Path]:
    """Image files under ``root`` (recursive), relative to it, in a fixed sorted order; the first ``limit``."""
    files = sorted(p.relative_to(root) for p in root.rglob("*")
                   if p.is_file() and p.suffix.lower().lstrip(".") in ACCEPTED_TYPES)
    return files[:limit] if limit is not None else files


def folder_labels(files: Sequence[Path]) -> list[int]:
    """ImageNet class index of every file from its class sub-folder; DatasetError when one has none."""
    unlabelled = [str(f) for f in files if class_folder(f) is None]
    if unlabelled:
        raise DatasetError(f"--labels folder needs every image inside a class sub-folder; {len(unlabelled)} are not "
                           f"(e.g. {unlabelled[0]}). Move them into a sub-folder or use --labels self.")
    try:
        return folder_class_labels(files)
    except ValueError as exc:
        raise DatasetError(str(exc)) from exc


class FolderImages(Dataset):
    """Images of a folder, preprocessed by ``transform``; unreadable files come back flagged, not raised.

    ``__getitem__`` returns ``(index, image, label, ok)``; for a corrupt file ``image`` is an empty tensor
    and ``ok`` is False, so that ``collate_readable`` can drop it and the run can report it.
    """

    def __init__(self, root: Path, files: Sequence[Path], transform: Callable, labels: Sequence[int] | None = None):
        self.root = Path(root)
        self.files = list(files)
        self.transform = transform
        self.labels = list(labels) if labels is not None else [NO_LABEL] * len(self.files)

    @classmethod
    def from_folder(cls, folder: str | Path, transform: Callable, limit: int | None = None,
                    label_mode: str = "self") -> "FolderImages":
        root = Path(folder).expanduser().resolve()
        if not root.is_dir():
            raise DatasetError(f"{folder} is not a folder.")
        if label_mode not in LABEL_MODES:
            raise DatasetError(f"--labels must be one of {LABEL_MODES}, not {label_mode!r}.")
        files = list_image_files(root, limit)
        if not files:
            raise DatasetError(f"No images ({', '.join(ACCEPTED_TYPES)}) under {root}.")
        labels = folder_labels(files) if label_mode == "folder" else None
        return cls(root, files, transform, labels)

    def __len__(self) -> int:
        return len(self.files)

    def path(self, index: int) -> str:
        return str(self.files[index])

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, int, bool]:
        try:
            image = load_image(self.root / self.files[index]).image
        except ImageError:
            return index, torch.empty(0), self.labels[index], False
        return index, self.transform(image), self.labels[index], True

    def collate(self, samples: Sequence[tuple[int, torch.Tensor, int, bool]]) -> "Batch":
        """The DataLoader's collate for this dataset (``collate_readable``)."""
        return collate_readable(samples)

    def table(self) -> list[list]:
        """What a resume must find (``file_table``)."""
        return file_table(self)


class Batch(NamedTuple):
    """The readable images of one loader batch, and the dataset indices of the unreadable ones."""

    images: torch.Tensor   # [B, 3, H, W]; B may be 0
    labels: torch.Tensor   # [B] long, NO_LABEL where there is none
    indices: torch.Tensor  # [B] dataset indices of ``images``
    corrupt: list[int]     # dataset indices skipped as unreadable

    @property
    def num_samples(self) -> int:
        """Samples this batch consumed from the shard, corrupt ones included (what resume counts)."""
        return len(self.indices) + len(self.corrupt)


def collate_readable(samples: Sequence[tuple[int, torch.Tensor, int, bool]]) -> Batch:
    """DataLoader collate: stack the readable images, set the corrupt ones aside by index."""
    good = [s for s in samples if s[3]]
    corrupt = [s[0] for s in samples if not s[3]]
    images = torch.stack([s[1] for s in good]) if good else torch.empty(0)
    labels = torch.tensor([s[2] for s in good], dtype=torch.long)
    indices = torch.tensor([s[0] for s in good], dtype=torch.long)
    return Batch(images, labels, indices, corrupt)


def folder_batches(folder: str | Path, transform: Callable, batch_size: int, limit: int | None = None,
                   label_mode: str = "self") -> tuple[Iterator[tuple[torch.Tensor, torch.Tensor]], int]:
    """(images, labels) batches of a folder's readable images, preprocessed by ``transform``, and how many
    loader batches there are (a batch whose images are all unreadable is skipped)."""
    dataset = FolderImages.from_folder(folder, transform, limit, label_mode)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_readable)
    return ((b.images, b.labels) for b in loader if len(b.indices)), len(loader)


def image_batches(images: Sequence[NamedImage], transform: Callable,
                  batch_size: int) -> tuple[Iterator[tuple[torch.Tensor, torch.Tensor]], int]:
    """(images, labels) batches of given images, without labels (NO_LABEL), and how many there are."""
    batch = to_batch(images, transform)
    labels = torch.full((batch.shape[0],), NO_LABEL)
    chunks = [(batch[i:i + batch_size], labels[i:i + batch_size]) for i in range(0, batch.shape[0], batch_size)]
    return iter(chunks), len(chunks)


# ----------------------------------------------------------------------------- what the data are (for resume)

def file_table(dataset: FolderImages) -> list[list]:
    """[relative path, size, mtime in ns, label] of every file, in the dataset's order: what a resume must find."""
    table = []
    for path, label in zip(dataset.files, dataset.labels):
        stat = (dataset.root / path).stat()
        table.append([path.as_posix(), stat.st_size, stat.st_mtime_ns, int(label)])
    return table


def table_fingerprint(table: Sequence[Sequence]) -> str:
    """A short SHA-256 of a file table: equal exactly when paths, sizes, times and labels are."""
    return hashlib.sha256(json.dumps([list(row) for row in table]).encode()).hexdigest()[:16]


def _examples(items: Sequence[str], count: int = 3) -> str:
    return ", ".join(items[:count]) + (", ..." if len(items) > count else "")


def describe_table_change(saved: Sequence[Sequence], current: Sequence[Sequence]) -> str:
    """What changed between two file tables: files gone, files new, files whose size, time or label differ."""
    old, new = {row[0]: list(row[1:]) for row in saved}, {row[0]: list(row[1:]) for row in current}
    changed = sorted(p for p in set(old) & set(new) if old[p] != new[p])
    kinds = ((sorted(set(old) - set(new)), "file(s) gone or renamed"), (sorted(set(new) - set(old)), "new or renamed"),
             (changed, "with another size, modification time or label"))
    return "; ".join(f"{len(paths)} {what} ({_examples(paths)})" for paths, what in kinds if paths) or \
        "the same files in another order"


# ----------------------------------------------------------------------------- sharding

class ShardSampler(DistributedSampler):
    """torch's DistributedSampler (no shuffle) minus its padding, optionally skipping a processed prefix.

    DistributedSampler makes every shard equally long by repeating samples at the end of the index list;
    those repeats would be counted twice. With no shuffling the padded positions are the tail of each
    rank's strided shard, so keeping the first ``len(range(rank, n, world))`` indices drops exactly them.
    ``start`` skips the samples of this shard that a resumed run already processed.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, start: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.start = start

    @property
    def shard_size(self) -> int:
        """Real (unpadded) samples of this rank's shard."""
        return len(range(self.rank, len(self.dataset), self.num_replicas))

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, self.shard_size)

    def __len__(self) -> int:
        return max(0, self.shard_size - self.start)


# ----------------------------------------------------------------------------- processes and collectives

@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the run: its rank, the world size, its device and the collectives' device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool = False  # True when init_distributed created the process group (and should destroy it)
    timeout_s: float = DEFAULT_TIMEOUT_S
    barrier_group: Any = field(default=None, compare=False)  # gloo group for monitored barriers (None: the default)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def collective_device(self) -> torch.device:
        """NCCL reduces CUDA tensors; gloo reduces CPU tensors."""
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def pick_device(requested: str | None, local_rank: int) -> torch.device:
    """The requested device (or CUDA when present, else CPU); CUDA gets this process's local GPU."""
    kind = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise DatasetError("--device cuda was asked for but CUDA is not available on this machine.")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(kind)


def init_distributed(requested_device: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistEnv:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK and join the process group (NCCL on CUDA, gloo otherwise).

    Without those variables this is a one-process run and no group is created. A group that already
    exists (e.g. ``main`` called several times in one torchrun process) is reused, not re-created.
    Collectives give up after ``timeout_s``; ``wait_for_ranks`` names the process that did not come.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(requested_device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = False
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None,
                                    timeout=datetime.timedelta(seconds=timeout_s))
        except dist.DistStoreError as exc:
            raise _not_joined(exc, backend, rank, world_size, timeout_s) from exc
        owns = True
    barriers = None
    if world_size > 1 and dist.get_backend() != "gloo":  # monitored barriers exist only in gloo
        barriers = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return DistEnv(rank, world_size, local_rank, device, owns, timeout_s, barriers)


def wait_for_ranks(env: DistEnv, point: str) -> None:
    """Meet every process at ``point`` within ``env.timeout_s``; RankTimeout naming the ones missing otherwise."""
    if not env.distributed:
        return
    try:
        dist.monitored_barrier(group=env.barrier_group, timeout=datetime.timedelta(seconds=env.timeout_s),
                               wait_all_ranks=True)
    except RuntimeError as exc:
        found = re.search(r"Ranks? ([\d, ]+?) failed to pass monitoredBarrier", str(exc))
        ranks = found.group(1) if found else "0" if env.rank != 0 else "another"
        who = f"{'ranks' if ',' in ranks else 'rank'} {ranks}"
        raise _rank_timeout(f"{who} did not reach {point}", env.rank, env.timeout_s) from exc


def _rank_timeout(what: str, rank: int, timeout_s: float) -> RankTimeout:
    return RankTimeout(f"{what} within --timeout {timeout_s:g} s (frozen, killed or much slower), so rank {rank} "
                       f"stops too; raise --timeout if the processes are only slow.")


def _not_joined(exc: Exception, backend: str, rank: int, world_size: int, timeout_s: float) -> RankTimeout:
    """A process missing while the group is set up. Gloo waits for each rank's address under a store key ending in
    the rank (``wait timeout after 5000ms, keys: /default_pg/0//cpu//0/1``), the first missing one; a rank 0 that
    hosts the store itself (env:// without torchrun) counts the processes (``1/2 clients joined``)."""
    text = str(exc)
    address = re.search(r"keys: \S*/(\d+)$", text) if backend == "gloo" else None
    clients = re.search(r"(\d+)/(\d+) clients joined", text)
    if address:
        others = "" if world_size == 2 else " (and perhaps others)"
        what = f"rank {address.group(1)}{others} did not join the process group"
    elif clients:
        what = f"only {clients.group(1)} of {clients.group(2)} processes joined the process group"
    else:
        what = f"a process of the {world_size} did not join the process group ({text})"
    return _rank_timeout(what, rank, timeout_s)


def close_distributed(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sums(sums: dict[str, torch.Tensor], env: DistEnv) -> dict[str, torch.Tensor]:
    """Element-wise sum of every tensor over all processes (one flat float64 all_reduce); CPU results.

    Every rank must hold the same names and shapes (accumulators are sized from the model, not the data).
    """
    names = sorted(sums)
    if not env.distributed:
        return {n: sums[n].detach().cpu() for n in names}
    flat = torch.cat([sums[n].detach().reshape(-1).to(torch.float64) for n in names]).to(env.collective_device)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    out, offset = {}, 0
    for n in names:
        count = sums[n].numel()
        out[n] = flat[offset:offset + count].cpu().reshape(sums[n].shape).to(sums[n].dtype)
        offset += count
    return out


def max_over_ranks(value: float, env: DistEnv) -> float:
    """The largest of each process's ``value`` (e.g. the slowest loop time)."""
    if not env.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=env.collective_device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def gather_lists(items: list, env: DistEnv) -> list:
    """Concatenate every process's list (picklable items), in rank order, on every process."""
    if not env.distributed:
        return list(items)
    gathered: list[list] = [[] for _ in range(env.world_size)]
    dist.all_gather_object(gathered, list(items))
    return [item for part in gathered for item in part]


def agree_on_errors(message: str | None, env: DistEnv) -> None:
    """Raise on every process if any one of them failed (else the others would wait in a collective forever)."""
    wait_for_ranks(env, "the settings check")
    messages = [m for m in gather_lists([message], env) if m]
    if messages:
        raise ResumeError(messages[0] if len(set(messages)) == 1 else " | ".join(sorted(set(messages))))


# ----------------------------------------------------------------------------- resumable shard state

@dataclass
class ShardState:
    """What one process has done so far: its settings, samples consumed from its shard, sums, corrupt files."""

    settings: dict[str, Any]
    rank: int
    world_size: int
    processed: int = 0           # samples of this rank's shard consumed (corrupt ones included)
    corrupt: list[str] = field(default_factory=list)
    sums: dict[str, torch.Tensor] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"settings": self.settings, "rank": self.rank, "world_size": self.world_size,
                "processed": self.processed, "corrupt": list(self.corrupt),
                "sums": {k: v.detach().cpu() for k, v in self.sums.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ShardState":
        return cls(dict(data["settings"]), int(data["rank"]), int(data["world_size"]), int(data["processed"]),
                   list(data["corrupt"]), dict(data["sums"]))


def state_path(out_dir: str | Path, rank: int) -> Path:
    return Path(out_dir) / "state" / f"rank{rank}.pt"


def save_state(state: ShardState, path: Path) -> None:
    """Write atomically (temporary file, then os.replace) so an interruption never leaves half a state."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state.to_dict(), tmp)
    os.replace(tmp, path)


def load_state(path: Path) -> ShardState:
    """Read a state written by ``save_state`` (tensors and plain Python only: ``weights_only=True``)."""
    return ShardState.from_dict(torch.load(path, map_location="cpu", weights_only=True))


def settings_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'name: saved -> now' for every setting that differs."""
    keys = sorted(set(saved) | set(current))
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


def check_resumable(state: ShardState, settings: dict[str, Any], env: DistEnv) -> None:
    """Refuse (ResumeError) a state from another world size, another rank or other settings."""
    if state.world_size != env.world_size:
        raise ResumeError(f"Cannot resume: the saved state was written by {state.world_size} process(es) but this "
                          f"run has {env.world_size}. Resume with --nproc_per_node/--nnodes giving "
                          f"{state.world_size} processes, or start over without --resume.")
    if state.rank != env.rank:
        raise ResumeError(f"Cannot resume: state file of rank {state.rank} found where rank {env.rank} expected it.")
    differences = settings_differences(state.settings, settings)
    if differences:
        raise ResumeError("Cannot resume: the saved state was made with other settings ("
                          + "; ".join(differences) + "). Use the same settings, or start over without --resume.")
