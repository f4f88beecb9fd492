"""Dataset-scale analyses from the command line, on one process or many (torchrun).

    python -m analysis.run TASK --model NAME --data FOLDER --out DIR [options]
    torchrun --nproc_per_node 4 -m analysis.run TASK ...        # one process per GPU (or CPU slot)

TASK is keep-frequency (DynamicViT), tome-merge (ToMe), head-similarity, taylor, frontier or vqa-frontier (a
vision-language model on a questions file: --images FOLDER --questions FILE.jsonl). The folder is streamed
(recursively; class sub-folders give labels) through a DataLoader; each process takes its own shard, keeps
running sums, and rank 0 writes the all-reduced result (the same records the pages show) and ``run.json``.
Every ``--state-every`` batches each process saves its sums to ``DIR/state/rank{r}.pt``; ``--resume``
continues from there. Unreadable images are skipped and listed in ``run.json``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader

from analysis.data.folders import (
    DEFAULT_TIMEOUT_S,
    DatasetError,
    DistEnv,
    FolderImages,
    RankTimeout,
    ResumeError,
    ShardSampler,
    ShardState,
    agree_on_errors,
    all_reduce_sums,
    check_resumable,
    close_distributed,
    describe_table_change,
    gather_lists,
    init_distributed,
    load_state,
    max_over_ranks,
    save_state,
    state_path,
    table_fingerprint,
    wait_for_ranks,
)
from analysis.runs.folders import (
    RUN_FILE,
    forget_finished_run,
    write_json_atomic,
    write_run,
)
from analysis.runs.common import DatasetTask, RunSource, TaskOptions
from analysis.runs.tasks import TASKS
from models.attention_recording import UnsupportedModelError
from models.checkpoints import CheckpointError, WeightsNotFoundError
from models.device import synchronize
from models.registry import get_spec

# ----------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m analysis.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=list(TASKS))
    p.add_argument("--model", required=True, help="registry or timm name, e.g. deit_tiny_patch16_224, efficientvit_m0, "
                                                  "vit_base_patch16_224.augreg_in21k_ft_in1k")
    p.add_argument("--data", "--images", dest="data", required=True,
                   help="image folder (recursive; class sub-folders give labels); vqa-frontier: the folder the "
                        "questions' image names are in")
    p.add_argument("--questions", default=None,
                   help="vqa-frontier: JSON Lines, one question a line: image (file name in --images), question, "
                        "answers (the annotators' answers, optional: without them, agreement with the unreduced "
                        "model is scored)")
    p.add_argument("--out", required=True, help="output folder for the records, run.json and state/")
    p.add_argument("--batch", type=int, default=32, help="images per batch and process")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader worker processes per process (default: the cores available to it, at most 4)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                   help="seconds processes wait for each other under torchrun before the run stops, naming the "
                        "missing rank (default %(default)g)")
    p.add_argument("--device", choices=["cuda", "mps", "cpu"], default=None, help="default: CUDA if present, else CPU")
    p.add_argument("--random-weights", action="store_true", help="untrained weights (figures say so)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed for random weights, so that every process builds the same model")
    p.add_argument("--weights", default=None, help="a checkpoint file for the model")
    p.add_argument("--weights-folder", default=None, help="folder of <model>.safetensors (default: $VITLAB_WEIGHTS_DIR)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N files (sorted paths)")
    p.add_argument("--keep-ratio", type=float, default=0.7, help="keep-frequency: DynamicViT keep ratio rho")
    p.add_argument("--r", default="13", help="tome-merge: tokens merged per block ('13', '13,12,...', 'decreasing:13')")
    p.add_argument("--no-prop-attn", action="store_true",
                   help="tome-merge: without proportional attention (no log-size bias on the attention logits)")
    p.add_argument("--labels", choices=["self", "folder"], default="self",
                   help="taylor: loss against the model's own top-1 (self) or the class sub-folders (folder)")
    p.add_argument("--settings", nargs="+", default=None,
                   help="frontier: points of the backbone, each written as a variant's settings after its @, e.g. "
                        "unreduced tome=4 tome=decreasing:13 tome=8,prop_attn=off evit=0.7,fuse=off rho=0.7 "
                        "(rho=0.7:untrained on a plain DeiT); default: every offered value")
    p.add_argument("--variants", nargs="+", default=None,
                   help="vqa-frontier: variant names (NAME@pumer, NAME@pumer,prune=0,reduce=0-1-2, NAME@tome=8; or "
                        "the part after @ alone); the unreduced model is always scored. Default: the unreduced model, "
                        "each method of the method table for the model at its paper setting and picks, and its "
                        "ablations")
    p.add_argument("--no-timing", action="store_true",
                   help="vqa-frontier: score only, time nothing (the throughput columns stay empty)")
    p.add_argument("--timing-iters", type=int, default=3, help="vqa-frontier: timed forwards per round")
    p.add_argument("--timing-rounds", type=int, default=3, help="vqa-frontier: interleaved timing rounds")
    p.add_argument("--resume", action="store_true", help="continue from DIR/state (same settings and world size)")
    p.add_argument("--state-every", type=int, default=20, help="save each process's state every K batches")
    p.add_argument("--stop-after-batches", type=int, default=None,
                   help="testing aid: save the state after this many batches and stop, as if interrupted")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def task_options(args: argparse.Namespace, device: str = "cpu") -> TaskOptions:
    return TaskOptions(keep_ratio=args.keep_ratio, r=str(args.r), proportional_attention=not args.no_prop_attn,
                       loss_target="labels" if args.labels == "folder" else "self",
                       frontier_settings=tuple(args.settings or ()), variants=tuple(args.variants or ()),
                       timing=not args.no_timing, timing_iters=args.timing_iters, timing_rounds=args.timing_rounds,
                       batch=args.batch, device=device)


def run_source(args: argparse.Namespace, env: DistEnv) -> RunSource:
    return RunSource(args.model, args.data, str(env.device), args.random_weights, args.weights, args.weights_folder,
                     args.limit, args.labels, args.questions)


FILE_TABLE = "files.json"  # in state/: the data's file table, to name what changed when a resume is refused


def run_settings(args: argparse.Namespace, dataset: FolderImages, weights: str,
                 table: list[list] | None = None) -> dict[str, Any]:
    """Everything the result depends on (not batch size, workers or device): checked before resuming.

    ``data_fingerprint`` covers the sorted relative paths, sizes, modification times and labels of the files."""
    seed = {"seed": args.seed} if args.random_weights else {}
    table = dataset.table() if table is None else table
    questions = {"questions": str(Path(args.questions).expanduser().resolve())} if args.questions else {}
    return {"task": args.task, "model": args.model, "weights": weights, **seed, "data": str(dataset.root),
            **questions, "files": len(dataset), "data_fingerprint": table_fingerprint(table), "limit": args.limit,
            "labels": args.labels,
            **TASKS[args.task].settings(task_options(args))}


# ----------------------------------------------------------------------------- the loop

@dataclass
class LoopOutcome:
    """One process's part of this invocation."""

    images_now: int = 0
    loop_s: float = 0.0


def default_workers() -> int:
    """DataLoader workers per process: the cores this process may use, shared by torchrun's local processes, <= 4."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(4, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def die_with_parent(worker_id: int) -> None:
    """DataLoader worker start: on Linux, be killed with the main process instead of outliving it by ~5 s."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        parent = os.getppid()
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the main process died before the request took effect
            os._exit(1)


def make_loader(dataset: FolderImages, sampler: ShardSampler, args: argparse.Namespace, env: DistEnv) -> DataLoader:
    return DataLoader(dataset, batch_size=args.batch, sampler=sampler, num_workers=args.workers,
                      collate_fn=dataset.collate, pin_memory=env.device.type == "cuda",
                      persistent_workers=False, worker_init_fn=die_with_parent if args.workers else None)


def _progress(total: int, env: DistEnv, disabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc=f"rank 0 of {env.world_size}", disable=disabled or not env.is_main,
                file=sys.stderr)


def run_shard(task: DatasetTask, dataset: FolderImages, state: ShardState, args: argparse.Namespace,
              env: DistEnv, path: Path) -> LoopOutcome:
    """Stream this process's shard (after what ``state`` already covers) into the task's sums, saving state."""
    sampler = ShardSampler(dataset, env.world_size, env.rank, start=state.processed)
    outcome = LoopOutcome()
    bar = _progress(len(sampler), env, args.no_progress)
    start = time.perf_counter()
    for step, batch in enumerate(make_loader(dataset, sampler, args, env), start=1):
        if len(batch.indices):
            task.update_batch(batch, env.device)
        state.corrupt += [dataset.path(i) for i in batch.corrupt]
        state.processed += batch.num_samples
        outcome.images_now += len(batch.indices)
        bar.update(batch.num_samples)
        if step == args.stop_after_batches:
            break  # the state is saved below, as after a finished shard
        if step % args.state_every == 0:
            state.sums = task.sums
            save_state(state, path)
    synchronize(env.device)
    outcome.loop_s = time.perf_counter() - start
    bar.close()
    state.sums = task.sums
    save_state(state, path)
    return outcome


def check_same_data(saved: dict, settings: dict, saved_table: Path, table: list[list]) -> None:
    """Refuse (ResumeError) to resume over other data than the interrupted run saw, naming what changed."""
    before, now = saved.get("data_fingerprint"), settings["data_fingerprint"]
    if before is None or before == now:
        return  # a state saved before fingerprints existed: only the number of files is compared
    try:
        change = describe_table_change(json.loads(saved_table.read_text()), table)
    except (OSError, ValueError, TypeError, IndexError):
        change = f"fingerprint {before} -> {now}"
    raise ResumeError(f"Cannot resume: the images under {settings['data']} changed since the interrupted run "
                      f"({change}). Put them back as they were, or start over without --resume.")


def resume_state(task: DatasetTask, settings: dict, args: argparse.Namespace, env: DistEnv, path: Path,
                 table: list[list] | None = None) -> ShardState:
    """This process's saved state when resuming (checked against the settings and the data), else a fresh one."""
    fresh = ShardState(settings, env.rank, env.world_size)
    error = None
    if args.resume and not path.is_file() and env.is_main:
        print(f"No saved state at {path}: starting from the beginning.", file=sys.stderr)
    if args.resume and path.is_file():
        try:
            saved = load_state(path)
            if table is not None:
                check_same_data(saved.settings, settings, path.parent / FILE_TABLE, table)
            older = "data_fingerprint" not in saved.settings  # saved by a version without data fingerprints
            check_resumable(saved, {k: v for k, v in settings.items() if not (older and k == "data_fingerprint")},
                            env)
            task.load_sums(saved.sums)
            fresh = saved
        except (ResumeError, ValueError, RuntimeError, KeyError) as exc:
            error = str(exc) if isinstance(exc, ResumeError) else f"Cannot resume from {path}: {exc}"
    agree_on_errors(error, env)
    fresh.sums = task.sums
    return fresh


# ----------------------------------------------------------------------------- results

def run(args: argparse.Namespace, env: DistEnv) -> int:
    started = time.perf_counter()
    out = Path(args.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)  # random weights must be the same model in every process
    options = task_options(args, str(env.device))
    opened = TASKS[args.task].open(run_source(args, env), options)
    task, dataset = opened.task, opened.dataset
    table = dataset.table()
    settings = run_settings(args, dataset, opened.weights, table)
    path = state_path(out, env.rank)
    state = resume_state(task, settings, args, env, path, table)
    resumed_from = state.processed
    if env.is_main:
        forget_finished_run(out)  # the folder's state/ moves on: an old run.json no longer describes it
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path.parent / FILE_TABLE, table, indent=None)
    load_s = time.perf_counter() - started

    outcome = run_shard(task, dataset, state, args, env, path)
    if args.stop_after_batches is not None:
        if env.is_main:
            print(f"Stopped after {args.stop_after_batches} batch(es) as asked; state in {path.parent}. "
                  f"Continue with --resume.", file=sys.stderr)
        return 0

    progress = {"now.images": outcome.images_now, "now.resumed": resumed_from}
    wait_for_ranks(env, "the final all-reduce of the sums")
    sums = all_reduce_sums({**task.sums, **{k: torch.tensor(float(v)) for k, v in progress.items()}}, env)
    corrupt = sorted(gather_lists(state.corrupt, env))
    loop_s = max_over_ranks(outcome.loop_s, env)
    if not env.is_main:
        return 0
    record = task.complete(task.result(sums), options)
    images_now = int(sums["now.images"].item())
    info = {
        "task": args.task, "settings": settings, "note": task.note,
        "model": {"name": args.model, "weights": opened.weights,
                  "random_weights": opened.random_weights, "parameters": opened.parameters},
        "run": {"world_size": env.world_size, "device": env.device.type, "batch": args.batch,
                "workers": args.workers, "resumed": bool(args.resume), "samples_resumed": int(sums["now.resumed"].item()),
                "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "torch": torch.__version__},
        "counts": {"files": len(dataset), "images_seen": int(sums["images"].item()),
                   "corrupt_skipped": len(corrupt), "corrupt_paths": corrupt,
                   "images_this_invocation": images_now},
        "timings": {"setup_s": round(load_s, 3), "loop_s": round(loop_s, 3),
                    "total_s": round(time.perf_counter() - started, 3),
                    "images_per_s": round(images_now / loop_s, 3) if loop_s > 0 else None},
    }
    files = write_run(out, args.task, record, info)
    print(f"{args.task}: {info['counts']['images_seen']} images ({len(corrupt)} corrupt skipped) on "
          f"{env.world_size} process(es), {info['timings']['images_per_s']} img/s; wrote {', '.join(files)} "
          f"and {RUN_FILE} to {out}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run one task; returns the exit status (2 with a clear message for bad input)."""
    args = build_parser().parse_args(argv)
    try:
        get_spec(args.model)  # a registry name or any timm model name
    except (KeyError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.batch < 1 or args.state_every < 1 or args.timing_iters < 1 or args.timing_rounds < 1:
        print("error: --batch, --state-every, --timing-iters and --timing-rounds must be at least 1.", file=sys.stderr)
        return 2
    if args.timeout <= 0 or (args.workers is not None and args.workers < 0):
        print("error: --timeout must be positive and --workers at least 0.", file=sys.stderr)
        return 2
    if args.workers is None:
        args.workers = default_workers()
    try:
        env = init_distributed(args.device, args.timeout)
    except RankTimeout as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        return run(args, env)
    except RankTimeout as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (DatasetError, ResumeError, WeightsNotFoundError, CheckpointError, UnsupportedModelError,
            ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        close_distributed(env)


if __name__ == "__main__":
    sys.exit(main())
