"""Shared fixtures: the real DeiT-Tiny weights and photographs from ../shared."""
from __future__ import annotations

import collections
import gc
import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import torch

# One OpenMP thread in every process the suite starts (workers, Streamlit servers, CLIs, timing workers), before
# torch is loaded: the workers already share the cores, and a second OpenMP thread spinning at each barrier while
# its sibling waits for a core doubled a Streamlit server's CPU time on a loaded 2-core machine. A test that is about
# threads sets them itself.
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DEIT_TINY_WEIGHTS = SHARED / "weights" / "deit_tiny_patch16_224.safetensors"
SHARED_IMAGES = sorted((SHARED / "images").glob("photo_*.jpg"))


# The suite runs in parallel workers (pytest-xdist, `-n auto` in pytest.ini): one per core plus one for the
# real-browser tests, which mostly wait on their Streamlit server and chromium; at most four workers, each on one
# torch thread, so the workers share the cores instead of oversubscribing them.
MAX_WORKERS = 4
BROWSER_GROUP = "browser"
BROWSER_MODULE_PREFIX = "tests/test_browser"  # every real-browser test lives in tests/test_browser*.py


def pytest_xdist_auto_num_workers(config):
    return max(1, min(MAX_WORKERS, (os.cpu_count() or 1) + 1))


def work_unit(nodeid: str) -> str:
    """A module's tests stay on one worker (its module-scoped model or server is built once); every real-browser
    test goes to one worker, which shares one Streamlit server (``app_url``)."""
    module = nodeid.split("::")[0]
    return BROWSER_GROUP if module.startswith(BROWSER_MODULE_PREFIX) else module


def pytest_xdist_make_scheduler(config, log):
    # xdist's own `--dist loadgroup` renames node ids, which pytest 9 no longer allows: our units, by hand.
    from xdist.scheduler import LoadScopeScheduling

    class WorkUnitScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return WorkUnitScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    """The browser unit first, then the others by size, so that the longest unit is never the tail of the run
    (pytest.ini turns off xdist's own reordering by size, which would put the browser unit, few but long tests,
    last). A browser test outside tests/test_browser*.py would get a server of its own: refused."""
    for item in items:
        if item.get_closest_marker("browser") and work_unit(item.nodeid) != BROWSER_GROUP:
            raise pytest.UsageError(f"{item.nodeid}: real-browser tests live in {BROWSER_MODULE_PREFIX}*.py")
    sizes = collections.Counter(work_unit(item.nodeid) for item in items)
    items.sort(key=lambda item: (work_unit(item.nodeid) != BROWSER_GROUP, -sizes[work_unit(item.nodeid)]))


def pytest_configure(config):
    config.addinivalue_line("markers", "shared: needs ../shared/weights or ../shared/images")
    config.addinivalue_line("markers", "browser: drives a real chromium")
    if os.environ.get("PYTEST_XDIST_WORKER"):  # torch only in the workers: the controller starts them 2 s sooner
        import torch

        torch.set_num_threads(1)


def _lighten_apptest():
    """Two costs of Streamlit's AppTest that check nothing of ours. Each new AppTest scans every installed
    distribution's metadata for custom components (none is installed, and the packages do not change during a run):
    scanned once per process. And while a page script runs, the test's thread wakes every millisecond to look through
    the script's whole event list for the end, taking the GIL from the script thread each time: it looks every 5 ms.
    Measured on two page-test modules in one process: 81 -> 70 CPU-s for the scan, -> 68 for the polling."""
    import functools

    from streamlit.components.v2 import manifest_scanner
    from streamlit.testing.v1 import local_script_runner

    manifest_scanner.scan_component_manifests = functools.cache(manifest_scanner.scan_component_manifests)
    local_script_runner.require_widgets_deltas = _wait_for_script_end


def _wait_for_script_end(runner, timeout: float = 3) -> None:
    """Streamlit's ``require_widgets_deltas``, polling every 5 ms instead of every 1 ms."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.005)
        if runner.script_stopped():
            return
    runner.request_stop()
    runner.join()
    raise RuntimeError(f"AppTest script run timed out after {timeout}(s)")


def pytest_collection_finish(session):
    """Where tests run (each worker; not xdist's controller, which collects nothing): AppTest lightened, then the
    collected modules (torch, timm, streamlit, the tests), which live as long as the run, kept from the cyclic
    garbage collector's walks, which also run less often. About 6 % less CPU in the page tests, whose reruns
    allocate many small objects; memory is still freed by reference counting as before."""
    _lighten_apptest()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


# CI sets this so that a missing ../shared or browser fails the run instead of skipping silently.
REQUIRE_ALL = os.environ.get("VITLAB_REQUIRE_ALL") == "1"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not DEIT_TINY_WEIGHTS.exists():
        message = "../shared/weights/deit_tiny_patch16_224.safetensors is not present"
        if REQUIRE_ALL:
            pytest.fail(message)
        pytest.skip(message)
    return SHARED


@pytest.fixture(scope="session")
def deit_tiny_real(shared_dir):
    """timm DeiT-Tiny with the real ImageNet weights, in eval mode. Never mutate it in a test."""
    import timm

    model = timm.create_model(
        "deit_tiny_patch16_224",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(DEIT_TINY_WEIGHTS)),
    )
    return model.eval()


@pytest.fixture(scope="session")
def shared_photos(shared_dir):
    from PIL import Image

    return [Image.open(p).convert("RGB") for p in SHARED_IMAGES]


@pytest.fixture(scope="session")
def deit_tiny_batch(deit_tiny_real, shared_photos) -> torch.Tensor:
    """The five shared photos preprocessed with DeiT-Tiny's own timm data config."""
    import timm.data
    import torch

    cfg = timm.data.resolve_data_config({}, model=deit_tiny_real)
    tf = timm.data.create_transform(**cfg)
    return torch.stack([tf(im) for im in shared_photos])


@pytest.fixture
def real_weights_folder(shared_dir, monkeypatch):
    """The app's environment with ../shared/weights as the weights folder and the hub switched off."""
    monkeypatch.setenv("VITLAB_WEIGHTS_DIR", str(shared_dir / "weights"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def downloads(monkeypatch):
    """Every file a page offers for download in an AppTest run, by file name: {name: bytes}."""
    from streamlit.runtime.media_file_manager import MediaFileManager
    from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage

    files: dict[str, bytes] = {}
    original = MemoryMediaFileStorage.load_and_get_id
    original_deferred = MediaFileManager.add_deferred

    def record(self, path_or_data, mimetype, kind, filename=None):
        if filename and isinstance(path_or_data, bytes):
            files[filename] = path_or_data
        return original(self, path_or_data, mimetype, kind, filename)

    def record_deferred(self, data_callable, mimetype, coordinates, file_name=None, **kwargs):
        files[file_name] = data_callable()  # what a click would download
        return original_deferred(self, data_callable, mimetype, coordinates, file_name=file_name, **kwargs)

    monkeypatch.setattr(MemoryMediaFileStorage, "load_and_get_id", record)
    monkeypatch.setattr(MediaFileManager, "add_deferred", record_deferred)
    return files


@pytest.fixture(scope="session")
def training_checkpoint():
    """``save(path, model, layout)`` writes ``model`` in a full official *training* layout, with real optimizer,
    scheduler and scaler states: ``"deit"`` is DeiT's / DynamicViT's ``main.py`` (``model``, ``optimizer``,
    ``lr_scheduler``, ``epoch``, ``scaler``, ``args`` as an ``argparse.Namespace``); ``"lightning"`` is a
    PyTorch Lightning checkpoint as METER's training writes it (``state_dict``, ``optimizer_states``,
    ``lr_schedulers``, ``callbacks``, ``hyper_parameters``, ``epoch``, ``global_step``). ``state_dict`` replaces
    the model's own (for files in an official key layout)."""
    import argparse

    import torch

    def save(path, model, layout, state_dict=None):
        params = [p.detach().clone().requires_grad_(True) for p in model.parameters()][:4]  # model untouched
        optimizer = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.05)
        sum(p.sum() for p in params).backward()
        optimizer.step()  # the optimizer state holds exp_avg / exp_avg_sq tensors, as a real run's does
        optimizer.zero_grad(set_to_none=True)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        weights = dict(state_dict if state_dict is not None else model.state_dict())
        if layout == "deit":
            args = argparse.Namespace(model="deit_small_patch16_224", base_rate=0.7, lr=5e-4, epochs=30,
                                      batch_size=96, data_path="/data/imagenet", output_dir="logs/dynamicvit",
                                      distill=True, drop_path=0.1, resume="")
            checkpoint = {"model": weights, "optimizer": optimizer.state_dict(),
                          "lr_scheduler": scheduler.state_dict(), "epoch": 29,
                          "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                                     "growth_interval": 2000, "_growth_tracker": 17},
                          "args": args}
        elif layout == "lightning":
            checkpoint = {"epoch": 9, "global_step": 12345, "pytorch-lightning_version": "1.3.2",
                          "state_dict": weights, "callbacks": {"ModelCheckpoint": {"best_model_score": 0.77}},
                          "optimizer_states": [optimizer.state_dict()],
                          "lr_schedulers": [scheduler.state_dict()], "native_amp_scaling_state": {"scale": 1024.0},
                          "hparams_name": "config",
                          "hyper_parameters": {"config": {"exp_name": "finetune_vqa", "image_size": 576,
                                                          "max_text_len": 50, "learning_rate": 5e-6,
                                                          "loss_names": {"vqa": 1, "itm": 0}}}}
        else:
            raise ValueError(layout)
        torch.save(checkpoint, path)
        return path

    return save


# The real-browser tests' servers (tests/browser_support.py): one for the whole run (the browser tests share a worker),
# or a fresh one per test.
@pytest.fixture(scope="session")
def app_url(tmp_path_factory):
    """The shared server. Its roofline is cached beforehand (small sizes), so that "Where the time goes" does not
    measure the machine first and nothing is written to the user's own cache."""
    from browser_support import running_app

    from analysis.timing import roofline

    cache = tmp_path_factory.mktemp("roofline") / "roofline.json"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(roofline.CACHE_ENV, str(cache))
        roofline.store(roofline.machine_roofline("cpu", matmul_sizes=(512,), copy_mib=32))  # cached even under load
    with running_app({roofline.CACHE_ENV: str(cache)}) as url:
        yield url


@pytest.fixture
def fresh_app_url():
    """A server nobody has visited yet: its first request goes straight to a page URL."""
    from browser_support import running_app

    with running_app() as url:
        yield url


@pytest.fixture
def timing_in_this_process(monkeypatch):
    """The throughput page's timing worker run in the test's own process: the page's request goes through
    ``run_in_fresh_process`` and the worker as it would, spec and answer through JSON, only the new process is left
    out (about 5 s of CPU a run for its imports). For page tests about what the page shows; the worker process has
    its own tests (tests/test_timing_request.py, the real-browser throughput test, the typed-ViT page test). The
    thread count the request sets is restored after."""
    import json

    import torch

    from analysis.timing import fresh_process
    from analysis.timing import request as timing

    def run(module, spec, env=None, progress=None, on_measure=None, timeout=None):
        assert module == "analysis.timing.request", module
        threads = torch.get_num_threads()
        try:
            answer = timing.worker(json.loads(json.dumps(spec)), progress, on_measure)
        finally:
            torch.set_num_threads(threads)
        return json.loads(json.dumps(answer))

    monkeypatch.setattr(fresh_process, "run_in_fresh_process", run)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests, restored after: two threads per process on 2 busy shared cores are
    many times slower than one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
