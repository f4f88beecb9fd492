
import pytest
import torch
from safetensors.torch import save_file

from analysis.data.images import imagenet_label, load_image, to_batch
from models.checkpoints import CheckpointError, WeightsNotFoundError, read_state_dict
from models.loading import build_random, load_model
from models.registry import get_spec
from models.weights import HUB, LOCAL, MISSING, WEIGHTS_DIR_ENV, resolve, status


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from models import weights

    weights.host_reachable.cache_clear()
    yield
    weights.host_reachable.cache_clear()


@pytest.mark.shared
def test_real_deit_tiny_through_the_weights_folder_sees_a_drake(shared_dir, monkeypatch):
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(shared_dir / "weights"))
    loaded = load_model("deit_tiny_patch16_224")
    assert loaded.weights.kind == LOCAL and not loaded.weights.is_random
    image = load_image(shared_dir / "images" / "photo_2.jpg")
    with torch.inference_mode():
        top1 = loaded.model(to_batch([image], loaded.transform)).argmax(-1).item()
    assert imagenet_label(top1) == "drake"


@pytest.mark.shared
def test_resolver_file_loads_like_timm_pretrained(shared_dir, deit_tiny_real):
    path = shared_dir / "weights" / "deit_tiny_patch16_224.safetensors"
    loaded = load_model("deit_tiny_patch16_224", user_file=path)
    ours = loaded.model.state_dict()
    for key, value in deit_tiny_real.state_dict().items():
        torch.testing.assert_close(ours[key], value, rtol=0, atol=0)


@pytest.mark.shared
def test_status_reports_local_and_missing(shared_dir, offline):
    assert status(get_spec("deit_tiny_patch16_224"), shared_dir / "weights").kind == LOCAL
    source = status(get_spec("deit_small_patch16_224"), shared_dir / "weights")
    assert source.kind == MISSING and "deit_small_patch16_224.safetensors" in source.location


def test_missing_weights_message_names_file_and_folder(tmp_path, monkeypatch, offline):
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(tmp_path))
    with pytest.raises(WeightsNotFoundError) as err:
        load_model("efficientvit_m0")
    message = str(err.value)
    assert "efficientvit_m0.safetensors" in message and str(tmp_path) in message
    assert "efficientvit_m0.r224_in1k" in message


def test_hub_is_chosen_when_reachable(monkeypatch, tmp_path):
    from models import weights

    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(weights, "host_reachable", lambda *a, **k: True)
    monkeypatch.setattr(weights, "in_hf_cache", lambda spec: False)
    source = resolve(get_spec("efficientvit_m0"))
    assert source.kind == HUB and source.location == "efficientvit_m0.r224_in1k"


def _tiny_state(name="efficientvit_m0"):
    return build_random(get_spec(name)).state_dict()


@pytest.mark.parametrize("wrapper", ["model", "state_dict", None])
def test_official_wrappers_and_pth_round_trip(tmp_path, wrapper):
    state = _tiny_state()
    path = tmp_path / "efficientvit_m0.pth"
    torch.save({wrapper: state} if wrapper else state, path)
    loaded = load_model("efficientvit_m0", user_file=path)
    torch.testing.assert_close(loaded.model.state_dict()["patch_embed.conv1.conv.weight"],
                               state["patch_embed.conv1.conv.weight"])


def test_data_parallel_prefix_is_stripped(tmp_path):
    state = {f"module.{k}": v for k, v in _tiny_state().items()}
    path = tmp_path / "m.pth"
    torch.save(state, path)
    loaded = load_model("efficientvit_m0", user_file=path)
    assert loaded.weights.kind == LOCAL
    key = "patch_embed.conv1.conv.weight"
    torch.testing.assert_close(loaded.model.state_dict()[key], state[f"module.{key}"])


def test_weights_folder_finds_name_dot_safetensors(tmp_path, monkeypatch):
    save_file({k: v.contiguous() for k, v in _tiny_state().items()}, str(tmp_path / "efficientvit_m0.safetensors"))
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(tmp_path))
    loaded = load_model("efficientvit_m0")
    assert loaded.weights.kind == LOCAL and loaded.weights.location.endswith("efficientvit_m0.safetensors")


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    state = _tiny_state()
    state.pop("head.linear.weight")
    state["extra.layer.weight"] = torch.zeros(3)
    path = tmp_path / "bad.pth"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError) as err:
        load_model("efficientvit_m0", user_file=path)
    message = str(err.value)
    assert "Missing 1 keys: head.linear.weight" in message
    assert "Unexpected 1 keys: extra.layer.weight" in message


def test_wrong_model_size_names_the_shape_mismatch(tmp_path):
    path = tmp_path / "m1.pth"
    torch.save(_tiny_state("efficientvit_m1"), path)
    with pytest.raises(CheckpointError, match="Shape mismatch"):
        load_model("efficientvit_m0", user_file=path)


class ArbitraryObject:
    """Stands for any pickled object a checkpoint could smuggle in."""


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": _tiny_state(), "extra": ArbitraryObject()}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        read_state_dict(path)


def test_a_full_dynamicvit_training_checkpoint_loads(tmp_path, training_checkpoint):
    """DeiT's / DynamicViT's main.py saves args (an argparse.Namespace) next to the weights: allowed, and nothing
    else is (the test above)."""
    from models.dynamicvit import build_dynamicvit, load_official_checkpoint

    model = build_dynamicvit("dynamicvit_deit_256_patch16_224", depth=4, embed_dim=64, num_heads=2,
                             pruning_locations=(1, 2, 3)).eval()
    path = training_checkpoint(tmp_path / "checkpoint.pth", model, "deit")
    fresh = build_dynamicvit("dynamicvit_deit_256_patch16_224", depth=4, embed_dim=64, num_heads=2,
                             pruning_locations=(1, 2, 3))
    load_official_checkpoint(fresh, path)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


def test_a_namespace_does_not_let_other_objects_through(tmp_path):
    import argparse

    path = tmp_path / "evil_training.pth"
    torch.save({"model": _tiny_state(), "args": argparse.Namespace(lr=1e-3), "extra": ArbitraryObject()}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        read_state_dict(path)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"\x00" * 64])
def test_empty_and_garbage_files_are_refused(tmp_path, content):
    for suffix in (".pth", ".safetensors"):
        path = tmp_path / f"bad{suffix}"
        path.write_bytes(content)
        with pytest.raises(CheckpointError):
            read_state_dict(path)


def test_nonexistent_user_file(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        load_model("efficientvit_m0", user_file=tmp_path / "nope.pth")


def test_dynamicvit_official_release_is_downloaded_once_and_cached(tmp_path, monkeypatch):
    """Online, a DynamicViT without a local file comes from its official URL, in the official format."""
    from models import loading, weights
    from models.dynamicvit import build_dynamicvit
    from models.weights import URL

    official = build_dynamicvit("dynamicvit_deit_256_patch16_224")
    downloads = []

    def fake_download(url, dst, progress=True):
        downloads.append(url)
        torch.save({"model": official.state_dict()}, dst)

    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(tmp_path / "empty"))
    monkeypatch.setattr(weights, "host_reachable", lambda *a, **k: True)
    monkeypatch.setattr(loading, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    for _ in range(2):
        loaded = load_model("dynamicvit_deit_256_patch16_224")
        assert loaded.weights.kind == URL and "cloud.tsinghua.edu.cn" in loaded.weights.location
        torch.testing.assert_close(loaded.model.state_dict()["score_predictor.0.in_conv.1.weight"],
                                   official.state_dict()["score_predictor.0.in_conv.1.weight"])
    assert len(downloads) == 1


def test_failed_download_says_where_to_put_the_file(tmp_path, monkeypatch):
    from models import loading, weights

    def broken_download(url, dst, progress=True):
        raise ConnectionError("connection reset")

    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(weights, "host_reachable", lambda *a, **k: True)
    monkeypatch.setattr(loading, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.setattr(torch.hub, "download_url_to_file", broken_download)
    with pytest.raises(WeightsNotFoundError, match="dynamicvit_deit_256_patch16_224.safetensors") as err:
        load_model("dynamicvit_deit_256_patch16_224")
    assert "connection reset" in str(err.value)
    assert not (tmp_path / "cache" / "dynamicvit_deit_256_patch16_224.pth").exists()


def test_every_weights_kind_has_a_description():
    from models.weights import WeightsKind, WeightsSource

    for kind in WeightsKind:
        assert WeightsSource(kind, "somewhere").description


def test_status_is_what_resolve_decides(tmp_path, offline):
    from models.weights import status

    save_file({k: v.contiguous() for k, v in _tiny_state().items()}, str(tmp_path / "efficientvit_m0.safetensors"))
    spec = get_spec("efficientvit_m0")
    assert status(spec, tmp_path) == resolve(spec, folder=tmp_path)
    assert status(spec, tmp_path, user_file=tmp_path / "efficientvit_m0.safetensors").kind == LOCAL
    missing = status(get_spec("efficientvit_m1"), tmp_path)
    assert missing.kind == MISSING and "efficientvit_m1.safetensors" in missing.location


def test_vilt_folder_goes_through_the_one_resolver(tmp_path, offline):
    """ViLT's save_pretrained folder is found in the weights folder by its registry entry, like any file."""
    spec = get_spec("vilt_b32_vqa")
    with pytest.raises(WeightsNotFoundError) as err:
        resolve(spec, folder=tmp_path)
    assert f"hf download dandelin/vilt-b32-finetuned-vqa --local-dir {tmp_path / 'vilt-b32-finetuned-vqa'}" in str(err.value)
    assert any("offline" in line for line in err.value.tried)
    (tmp_path / "vilt-b32-finetuned-vqa").mkdir()
    source = resolve(spec, folder=tmp_path)
    assert source.kind == LOCAL and source.location == str(tmp_path / "vilt-b32-finetuned-vqa")


def test_offline_resolution_is_fast_and_asks_the_network_once(tmp_path, monkeypatch, offline):
    """A missing model fails at once offline: no connection is attempted while HF_HUB_OFFLINE is set."""
    import socket
    import time

    def no_connections(*args, **kwargs):
        raise AssertionError("the resolver tried the network although offline")

    monkeypatch.setattr(socket, "create_connection", no_connections)
    start = time.perf_counter()
    with pytest.raises(WeightsNotFoundError):
        load_model("vilt_b32_vqa", weights_folder=tmp_path)
    assert time.perf_counter() - start < 2.0


def test_a_truncated_safetensors_file_is_called_truncated(tmp_path):
    """Issue 30: a cut-short download was told it "is not a PyTorch or safetensors checkpoint"."""
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.randn(64, 64), "b": torch.randn(8)}, str(path))
    whole = path.read_bytes()
    assert read_state_dict(path)["a"].shape == (64, 64)
    for cut in (len(whole) - 100, 12):  # in the tensor data; in the header itself
        path.write_bytes(whole[:cut])
        with pytest.raises(CheckpointError) as caught:
            read_state_dict(path)
        message = str(caught.value)
        assert "w.safetensors is truncated" in message and f"has {cut:,}" in message, message
        assert "not a PyTorch" not in message
