"""Channel importance: first-order Taylor scores (Molchanov et al. 2019) and captum's grad x activation.

EfficientViT's parameter analysis ranked every prunable channel by |sum(w * dL/dw)| and found that V
and the embedding deserve width while Q/K and the FFN hidden ratio can shrink. This module computes
that score for every channel of a timm ViT/DeiT or EfficientViT (MSRA) model, the activation-based
variant, their rank agreement, the global-budget analysis and the figures.

Choices (documented once, here):
* **Score** of an output channel: |sum over the channel's parameters of w * g|, where g is the gradient
  of the loss summed over all images (gradients are summed over batches, in float64, before the
  product; the loss is summed over images so the score does not depend on how images are batched).
* **Parameters of a channel**: the weight row *and the bias* of that output channel (a pruned channel
  loses both). Where a Conv2d is followed by BatchNorm (timm ``ConvNorm``), the BN weight and bias of
  the same channel count too (pruning the channel removes them as well).
* **Embedding width** (ViT): the patch-embedding conv's output channel c together with column c of
  the cls token, the position embedding (and distillation/register tokens where present): these are
  all summed into the same residual channel before block 0. The rest of the residual stream (norms,
  proj/fc2 outputs) is left out so that no parameter is counted twice. EfficientViT: the last stem
  conv (``patch_embed.conv4``), which sets the width of stage 1. EfficientViT's subsample layers
  (PatchMerging and the residual FFNs around it) are not scored; its blocks are.
* **Normalisation** for ranking channels across layers (see ``normalized_scores``): default ``"block"``
  divides each score by the mean score of all prunable channels in the same block, which removes the
  growth of gradient magnitude with depth but keeps the comparison between components inside a block
  (the question the analysis asks). ``"layer"`` divides by the mean of the (block, component) group
  (per-layer, as Molchanov normalises; it makes every component's mean 1), ``"l2"`` by that group's L2
  norm (Molchanov et al. 2017), ``"none"`` keeps raw scores.
* For Linear layers, sum over tokens of activation * grad equals sum(w * g) over the row plus bias, so
  the two variants agree exactly for ViT q/k/v/proj/FFN; they differ for the embedding (cls/pos) and
  for every ConvNorm (BN output vs conv + BN parameters).
* In a ViT head without q/k norms, Q channel d and K channel d get the same score: both equal
  sum_ij dL/dS_ij * q_id * k_jd * scale, because the attention logit S is bilinear in q and k.
"""
from __future__ import annotations

import copy
import hashlib
import threading
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable, Iterable, Literal, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from analysis.data.images import folder_class_labels, load_folder
from models.registry import MethodNotApplicable

LossTarget = Literal["self", "labels"]
Normalization = Literal["block", "layer", "l2", "none"]
Progress = Callable[[int, "int | None"], None]

COMPONENTS = ("embed", "q", "k", "v", "q_dw", "proj", "ffn_hidden", "dw")
NORMALIZATIONS = ("block", "layer", "l2", "none")
EMBED_BLOCK = -1
_KEYS = ["block", "component", "head", "layer", "channel"]


# ----------------------------------------------------------------------------- channel groups

@dataclass(frozen=True)
class ParamSlice:
    """Output channels [start, stop) of one parameter, indexed along ``channel_dim``."""

    name: str
    start: int
    stop: int
    channel_dim: int = 0


@dataclass(frozen=True)
class ChannelGroup:
    """One prunable unit (e.g. block 3, V of head 1): its channels in a layer's output and its parameters."""

    block: int
    relative_depth: float
    component: str
    head: int
    layer: str  # module whose output holds these channels (for the activation variant)
    start: int
    stop: int
    channel_dim: int  # dim of that module's output that indexes channels: -1 for tokens, 1 for NCHW
    params: tuple[ParamSlice, ...]

    @property
    def size(self) -> int:
        return self.stop - self.start


def _relative_depth(index: int, count: int) -> float:
    return index / max(1, count - 1)


def _own_params(module: nn.Module, path: str, start: int, stop: int) -> list[ParamSlice]:
    """Weight rows and bias entries [start, stop) of a Linear/Conv (output channels are dim 0)."""
    slices = [ParamSlice(f"{path}.weight", start, stop)]
    if getattr(module, "bias", None) is not None:
        slices.append(ParamSlice(f"{path}.bias", start, stop))
    return slices


def _linear_group(block: int, depth: float, component: str, path: str, module: nn.Module,
                  head: int = -1, start: int = 0, stop: int | None = None) -> ChannelGroup:
    stop = module.weight.shape[0] if stop is None else stop
    return ChannelGroup(block, depth, component, head, path, start, stop, -1,
                        tuple(_own_params(module, path, start, stop)))


def _convnorm_group(block: int, depth: float, component: str, path: str, module: nn.Module,
                    head: int = -1, start: int = 0, stop: int | None = None) -> ChannelGroup:
    """A timm ConvNorm (conv without bias, then BN): conv rows plus BN weight and bias of the channel."""
    stop = module.conv.weight.shape[0] if stop is None else stop
    params = (ParamSlice(f"{path}.conv.weight", start, stop),
              ParamSlice(f"{path}.bn.weight", start, stop),
              ParamSlice(f"{path}.bn.bias", start, stop))
    return ChannelGroup(block, depth, component, head, path, start, stop, 1, params)


def is_vit(model: nn.Module) -> bool:
    blocks = getattr(model, "blocks", None)
    return (hasattr(model, "patch_embed") and isinstance(blocks, nn.Sequential) and len(blocks) > 0
            and all(hasattr(b, "attn") and hasattr(b.attn, "qkv") and hasattr(b, "mlp") for b in blocks))


def is_efficientvit_msra(model: nn.Module) -> bool:
    from timm.models.efficientvit_msra import EfficientVitMsra

    return isinstance(model, EfficientVitMsra)


def _vit_embed_group(model: nn.Module) -> ChannelGroup:
    proj = model.patch_embed.proj
    width = proj.weight.shape[0]
    params = _own_params(proj, "patch_embed.proj", 0, width)
    for token in ("cls_token", "dist_token", "reg_token", "pos_embed"):
        if isinstance(getattr(model, token, None), nn.Parameter):
            params.append(ParamSlice(token, 0, width, channel_dim=-1))
    return ChannelGroup(EMBED_BLOCK, 0.0, "embed", -1, "patch_embed", 0, width, -1, tuple(params))


def _vit_qkv_groups(block: int, depth: float, attn: nn.Module, path: str) -> list[ChannelGroup]:
    """The qkv Linear's rows are laid out (q|k|v, head, head_dim), as timm's Attention reshapes them."""
    heads, head_dim = attn.num_heads, attn.qkv.weight.shape[0] // (3 * attn.num_heads)
    width = heads * head_dim
    return [_linear_group(block, depth, comp, path, attn.qkv, head=h,
                          start=c * width + h * head_dim, stop=c * width + (h + 1) * head_dim)
            for c, comp in enumerate(("q", "k", "v")) for h in range(heads)]


def _vit_groups(model: nn.Module) -> list[ChannelGroup]:
    count = len(model.blocks)
    groups = [_vit_embed_group(model)]
    for i, blk in enumerate(model.blocks):
        depth = _relative_depth(i, count)
        groups += _vit_qkv_groups(i, depth, blk.attn, f"blocks.{i}.attn.qkv")
        groups.append(_linear_group(i, depth, "proj", f"blocks.{i}.attn.proj", blk.attn.proj))
        groups.append(_linear_group(i, depth, "ffn_hidden", f"blocks.{i}.mlp.fc1", blk.mlp.fc1))
    return groups


def _cascaded_attention_groups(block: int, depth: float, attn: nn.Module, path: str) -> list[ChannelGroup]:
    """Each head's qkv ConvNorm outputs (q | k | v) = (key_dim | key_dim | val_dim); q then goes through dws[h]."""
    kd, vd = attn.key_dim, attn.val_dim
    groups = []
    for h, qkv in enumerate(attn.qkvs):
        for comp, (start, stop) in zip(("q", "k", "v"), ((0, kd), (kd, 2 * kd), (2 * kd, 2 * kd + vd))):
            groups.append(_convnorm_group(block, depth, comp, f"{path}.qkvs.{h}", qkv, h, start, stop))
        groups.append(_convnorm_group(block, depth, "q_dw", f"{path}.dws.{h}", attn.dws[h], h))
    groups.append(_convnorm_group(block, depth, "proj", f"{path}.proj.1", attn.proj[1]))
    return groups


def _efficientvit_groups(model: nn.Module) -> list[ChannelGroup]:
    from timm.models.efficientvit_msra import EfficientVitBlock

    blocks = [(p, m) for p, m in model.named_modules() if isinstance(m, EfficientVitBlock)]
    groups = [_convnorm_group(EMBED_BLOCK, 0.0, "embed", "patch_embed.conv4", model.patch_embed.conv4)]
    for i, (path, blk) in enumerate(blocks):
        depth = _relative_depth(i, len(blocks))
        groups.append(_convnorm_group(i, depth, "dw", f"{path}.dw0.m", blk.dw0.m))
        groups.append(_convnorm_group(i, depth, "ffn_hidden", f"{path}.ffn0.m.pw1", blk.ffn0.m.pw1))
        groups += _cascaded_attention_groups(i, depth, blk.mixer.m.attn, f"{path}.mixer.m.attn")
        groups.append(_convnorm_group(i, depth, "dw", f"{path}.dw1.m", blk.dw1.m))
        groups.append(_convnorm_group(i, depth, "ffn_hidden", f"{path}.ffn1.m.pw1", blk.ffn1.m.pw1))
    return groups


def channel_groups(model: nn.Module) -> list[ChannelGroup]:
    """Every prunable channel group of a timm ViT/DeiT or EfficientViT (MSRA) model with a classification head."""
    if getattr(model, "num_classes", None) == 0:
        raise MethodNotApplicable("Taylor importance needs a classification loss, and this model has no "
                                  "classification head (timm num_classes=0: a feature backbone such as DINOv2).")
    if is_efficientvit_msra(model):
        return _efficientvit_groups(model)
    if is_vit(model):
        return _vit_groups(model)
    raise MethodNotApplicable(f"Channel importance supports timm ViT/DeiT and EfficientViT (MSRA) models, "
                              f"not {type(model).__name__}.")


# ----------------------------------------------------------------------------- results

@dataclass
class TaylorScores:
    """One row per channel (parallel numpy columns); ``score`` is |accumulated importance| (raw)."""

    model: str
    method: str  # "taylor" or "activation"
    loss_target: str
    num_images: int
    block: np.ndarray
    relative_depth: np.ndarray
    component: np.ndarray
    head: np.ndarray
    layer: np.ndarray
    channel: np.ndarray
    score: np.ndarray

    def __len__(self) -> int:
        return len(self.score)

    def to_dataframe(self, normalize: Normalization = "block") -> pd.DataFrame:
        """Every row with its raw ``score`` and ``normalized`` score (see ``normalized_scores``)."""
        df = pd.DataFrame({"model": self.model, "method": self.method, "block": self.block,
                           "relative_depth": self.relative_depth, "component": self.component,
                           "head": self.head, "layer": self.layer, "channel": self.channel,
                           "score": self.score})
        df["normalized"] = normalized_scores(self, normalize)
        return df

    def normalized(self, normalize: Normalization = "block") -> np.ndarray:
        return normalized_scores(self, normalize)

    def component_summary(self, keep_fraction: float = 0.5, normalize: Normalization = "block") -> pd.DataFrame:
        return component_summary(self, keep_fraction, normalize)


def scores_from_groups(groups: Sequence[ChannelGroup], vectors: Sequence[np.ndarray], *, model: str,
                        method: str, loss_target: str, num_images: int) -> TaylorScores:
    """Flatten per-group channel vectors into per-channel rows (channel = index within the group)."""
    sizes = [g.size for g in groups]

    def column(values) -> np.ndarray:
        return np.repeat(np.asarray(values), sizes)

    return TaylorScores(
        model=model, method=method, loss_target=loss_target, num_images=num_images,
        block=column([g.block for g in groups]).astype(np.int64),
        relative_depth=column([g.relative_depth for g in groups]).astype(np.float64),
        component=column([g.component for g in groups]).astype(object),
        head=column([g.head for g in groups]).astype(np.int64),
        layer=column([g.layer for g in groups]).astype(object),
        channel=np.concatenate([np.arange(s) for s in sizes]).astype(np.int64),
        score=np.abs(np.concatenate(vectors)).astype(np.float64),
    )


# ----------------------------------------------------------------------------- shared plumbing

def _model_name(model: nn.Module, name: str | None) -> str:
    if name:
        return name
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


def _read_only_alias(t: torch.Tensor) -> torch.Tensor:
    """The same storage without autograd history (a copy only for inference tensors, which autograd refuses)."""
    return t.clone() if t.is_inference() else t.detach()


def private_copy(model: nn.Module) -> nn.Module:
    """A structural copy in eval mode whose parameters and buffers alias the original's storage.

    The copy has its own Parameter objects (own ``requires_grad`` and ``.grad``), modules, training
    flags and hook tables, so the shared (cached) model is never touched; nothing here writes to parameter
    or buffer values, so sharing their storage is safe and saves copying every weight per call.
    EfficientViT keeps a per-device attention-bias cache on its attention modules; the copy starts
    with an empty one (the original's entry may be an inference-mode tensor).

    Written by hand rather than with ``copy.deepcopy`` (with a memo for the tensors): deepcopy walks every
    Python object of the module tree and cost more than the forward and backward of a small model.
    """
    aliases: dict[int, torch.Tensor] = {}  # keeps tied parameters tied

    def alias(t: torch.Tensor | None, parameter: bool):
        if t is None:
            return None
        if id(t) not in aliases:
            data = _read_only_alias(t)
            aliases[id(t)] = nn.Parameter(data, requires_grad=False) if parameter else data
        return aliases[id(t)]

    def clone(module: nn.Module) -> nn.Module:
        new = copy.copy(module)  # a new __dict__ holding the same values; the mutable ones are replaced below
        for key, value in module.__dict__.items():
            if key.endswith("_hooks") or key.endswith("_hooks_with_kwargs") or key.endswith("_hooks_always_called"):
                new.__dict__[key] = type(value)()
        new._parameters = {k: alias(v, True) for k, v in module._parameters.items()}
        new._buffers = {k: alias(v, False) for k, v in module._buffers.items()}
        new._modules = {k: None if v is None else clone(v) for k, v in module._modules.items()}
        if isinstance(getattr(module, "attention_bias_cache", None), dict):
            new.attention_bias_cache = {}
        return new

    return clone(model).eval()


def clear_attention_bias_caches(model: nn.Module) -> None:
    """Only ever called on a private copy: a cached bias from the previous batch must not be reused."""
    for m in model.modules():
        if isinstance(getattr(m, "attention_bias_cache", None), dict):
            m.attention_bias_cache = {}


def _label_tensor(labels, batch_size: int, device: torch.device) -> torch.Tensor:
    """Class indices for a batch: one per image, or one index broadcast to every image."""
    if labels is None:
        raise ValueError("loss_target='labels' needs a label for every batch (got None).")
    targets = torch.as_tensor(labels, device=device).long().reshape(-1)
    if targets.numel() == 1:
        targets = targets.expand(batch_size)
    if targets.numel() != batch_size:
        raise ValueError(f"{targets.numel()} labels for a batch of {batch_size} images.")
    return targets


def check_loss_target(loss_target: str) -> None:
    if loss_target not in ("self", "labels"):
        raise ValueError(f"loss_target must be 'self' or 'labels', not {loss_target!r}.")


def _targets(logits: torch.Tensor, labels, loss_target: LossTarget) -> torch.Tensor:
    """Class indices for the loss: the model's own top-1 (pseudo-labels) or the given labels."""
    if loss_target == "self":
        return logits.detach().argmax(-1)
    check_loss_target(loss_target)
    return _label_tensor(labels, logits.shape[0], logits.device)


def summed_loss(logits: torch.Tensor, labels, loss_target: LossTarget, reduction: str = "sum") -> torch.Tensor:
    return F.cross_entropy(logits, _targets(logits, labels, loss_target), reduction=reduction)


def per_channel_sum(t: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """Sum over every dim except ``channel_dim`` (vectorised, no per-channel loop)."""
    t = t.movedim(channel_dim, 0)
    return t.reshape(t.shape[0], -1).sum(1)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _sized(batches) -> int | None:
    try:
        return len(batches)
    except TypeError:
        return None


# ----------------------------------------------------------------------------- Taylor (weights)

def scored_parameter_names(groups: Sequence[ChannelGroup]) -> set[str]:
    return {s.name for g in groups for s in g.params}


@dataclass
class _TaylorWorkspace:
    """What a Taylor pass needs besides its sums: the channel groups, a private copy in which only the
    scored parameters take gradients, and those parameters by name."""

    groups: list[ChannelGroup]
    work: nn.Module
    params: dict[str, nn.Parameter]
    row_keys: list[tuple[str, int]]
    fingerprint: tuple

    @staticmethod
    def fingerprint_of(model: nn.Module) -> tuple:
        # Which tensors the copy aliases: a parameter or buffer replaced on the model makes a new workspace.
        return tuple((id(t), t.data_ptr()) for t in model.state_dict(keep_vars=True).values())

    @classmethod
    def build(cls, model: nn.Module) -> "_TaylorWorkspace":
        groups = channel_groups(model)
        work = private_copy(model)
        scored = scored_parameter_names(groups)
        params = {n: p for n, p in work.named_parameters() if n in scored}
        for name, p in work.named_parameters():
            p.requires_grad_(name in scored)
        row_keys = list(dict.fromkeys((s.name, s.channel_dim) for g in groups for s in g.params))
        return cls(groups, work, params, row_keys, cls.fingerprint_of(model))


class _WorkspacePool:
    """Private copies kept per model between Taylor passes, one per concurrent pass.

    Building the copy and the channel groups costs about half a forward of a small model (EfficientViT-M0:
    17 ms against a 30 ms forward at batch 8), and the page runs one pass per image set on the same cached
    model. A pass takes a free copy or builds one; Streamlit's sessions run in threads, so two passes on the
    same model at once get two copies. Weakly keyed: a model's copies go when it does.
    """

    def __init__(self) -> None:
        self._free: "weakref.WeakKeyDictionary[nn.Module, list[_TaylorWorkspace]]" = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def acquire(self, model: nn.Module) -> _TaylorWorkspace:
        fingerprint = _TaylorWorkspace.fingerprint_of(model)
        with self._lock:
            free = self._free.get(model, [])
            while free:
                workspace = free.pop()
                if workspace.fingerprint == fingerprint:
                    return workspace
        return _TaylorWorkspace.build(model)

    def release(self, model: nn.Module, workspace: _TaylorWorkspace) -> None:
        with self._lock:
            self._free.setdefault(model, []).append(workspace)


_WORKSPACES = _WorkspacePool()


class TaylorSums:
    """Running float64 sums of dL/dw for every scored parameter: the one accumulator behind
    ``taylor_importance`` (the page) and ``analysis.run taylor``.

    Works on a private copy of the model in which only the scored parameters take gradients. ``sums`` is a
    flat dict of tensors sized from the model (so the sums of several processes add up with one all_reduce);
    ``update`` adds one batch's gradients of the summed loss, ``result`` takes |sum(w * g)| per channel once.
    """

    def __init__(self, model: nn.Module, loss_target: LossTarget = "self", model_name: str | None = None) -> None:
        check_loss_target(loss_target)
        self.loss_target, self.model_name = loss_target, _model_name(model, model_name)
        self._model, self._workspace = model, _WORKSPACES.acquire(model)
        workspace = self._workspace
        self.groups, self.work, self.params, self.row_keys = (workspace.groups, workspace.work, workspace.params,
                                                              workspace.row_keys)
        self.sums = {"images": torch.zeros((), dtype=torch.float64, device=_model_device(model))}
        self.sums.update({f"grad.{n}": torch.zeros_like(p, dtype=torch.float64) for n, p in self.params.items()})

    def release(self) -> None:
        """Hands the private copy back for the next accumulator on the same model (no update after this)."""
        if self._workspace is not None:
            _WORKSPACES.release(self._model, self._workspace)
            self._workspace = None

    @property
    def images(self) -> int:
        return int(self.sums["images"].item())

    def update(self, images: torch.Tensor, labels=None) -> None:
        """One forward and backward of a batch; ``labels`` are used only for ``loss_target='labels'``."""
        names = list(self.params)
        with torch.inference_mode(False), torch.enable_grad():
            clear_attention_bias_caches(self.work)  # private copy: a cached bias must not outlive its batch
            loss = summed_loss(self.work(images), labels, self.loss_target)
            grads = torch.autograd.grad(loss, [self.params[n] for n in names], allow_unused=True)
        for name, grad in zip(names, grads):
            if grad is not None:
                self.sums[f"grad.{name}"].add_(grad.detach())  # promoted to float64 in place
        self.sums["images"] += images.shape[0]

    def result(self, sums: dict[str, torch.Tensor] | None = None) -> TaylorScores:
        """Scores from ``sums`` (this accumulator's own by default, or all-reduced ones)."""
        sums = self.sums if sums is None else sums
        # In numpy, once per pass: a few hundred small products and sums, where torch's per-call overhead
        # (about 8 us against numpy's 1) made this step a quarter of a forward of EfficientViT-M0.
        row_sums = {}
        for name, channel_dim in self.row_keys:
            grad = sums[f"grad.{name}"].detach().cpu().numpy()
            product = grad * self.params[name].detach().float().cpu().numpy()  # float64 by promotion
            by_channel = product.swapaxes(0, channel_dim)  # the other dims are all summed: their order is free
            row_sums[(name, channel_dim)] = by_channel.reshape(by_channel.shape[0], -1).sum(1)
        vectors = [sum(row_sums[(s.name, s.channel_dim)][s.start:s.stop] for s in g.params) for g in self.groups]
        return scores_from_groups(self.groups, vectors, model=self.model_name, method="taylor",
                                   loss_target=self.loss_target, num_images=int(sums["images"].item()))


def taylor_importance(model: nn.Module, batches: Iterable, loss_target: LossTarget = "self",
                      progress: Progress | None = None, model_name: str | None = None) -> TaylorScores:
    """First-order Taylor importance |sum_w w * dL/dw| of every prunable channel.

    ``batches`` yields ``(x, y)`` with ``y`` None for ``loss_target='self'`` (cross-entropy against the
    model's own top-1) or class indices / one class index for ``'labels'``. Works on a private copy
    (eval mode: no dropout, BN running statistics); only the scored parameters get gradients, which
    skips the weight gradients of fc2, norms and the head. Gradients are summed over batches (``TaylorSums``).
    """
    sums = TaylorSums(model, loss_target, model_name)
    try:
        device, total = _model_device(model), _sized(batches)
        for done, (x, labels) in enumerate(batches, start=1):
            sums.update(x.to(device), labels)
            if progress is not None:
                progress(done, total)
        if sums.images == 0:
            raise ValueError("No images: channel importance needs at least one batch.")
        return sums.result()
    finally:
        sums.release()


# ----------------------------------------------------------------------------- activation (captum)

def _unique_layers(groups: Sequence[ChannelGroup]) -> list[str]:
    return list(dict.fromkeys(g.layer for g in groups))


def _channel_dims(groups: Sequence[ChannelGroup]) -> dict[str, int]:
    return {g.layer: g.channel_dim for g in groups}


def _per_example_loss_fn(work: nn.Module, loss_target: LossTarget) -> Callable:
    """captum's forward function: one cross-entropy per example (so no target index is needed)."""

    def forward(x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        clear_attention_bias_caches(work)
        return summed_loss(work(x), labels, loss_target, reduction="none")

    return forward


def activation_importance(model: nn.Module, batches: Iterable, loss_target: LossTarget = "self",
                          progress: Progress | None = None, model_name: str | None = None) -> TaylorScores:
    """Activation-based Taylor importance through captum's ``LayerGradientXActivation``.

    For the same layers as ``taylor_importance``: grad x activation of each layer's output, summed over
    images and tokens/space per channel, accumulated (signed) over batches, abs at the end.
    """
    from captum.attr import LayerGradientXActivation

    check_loss_target(loss_target)
    groups = channel_groups(model)
    work = private_copy(model)
    work.requires_grad_(False)  # only gradients w.r.t. layer outputs are needed
    layer_names = _unique_layers(groups)
    channel_dims = _channel_dims(groups)
    modules = dict(work.named_modules())
    explainer = LayerGradientXActivation(_per_example_loss_fn(work, loss_target),
                                         [modules[n] for n in layer_names])
    device, total, images = _model_device(work), _sized(batches), 0
    sums: dict[str, torch.Tensor] = {}
    with torch.inference_mode(False), torch.enable_grad():
        for done, (x, labels) in enumerate(batches, start=1):
            x = x.to(device).requires_grad_(True)  # gives captum a graph to differentiate through
            extra = None
            if loss_target == "labels":
                extra = (_label_tensor(labels, x.shape[0], device),)
            attributions = explainer.attribute(x, additional_forward_args=extra)
            for name, attr in zip(layer_names, attributions):
                channel_sum = per_channel_sum(attr.detach(), channel_dims[name])
                sums[name] = sums[name] + channel_sum if name in sums else channel_sum
            images += x.shape[0]
            if progress is not None:
                progress(done, total)
    if images == 0:
        raise ValueError("No images: channel importance needs at least one batch.")
    vectors = [sums[g.layer][g.start:g.stop].double().cpu().numpy() for g in groups]
    return scores_from_groups(groups, vectors, model=_model_name(model, model_name), method="activation",
                               loss_target=loss_target, num_images=images)


# ----------------------------------------------------------------------------- analysis

def _normalization_keys(normalize: Normalization) -> list[str]:
    if normalize == "block":
        return ["block"]
    if normalize in ("layer", "l2"):
        return ["block", "component"]
    raise ValueError(f"normalize must be one of {NORMALIZATIONS}, not {normalize!r}.")


def normalized_scores(scores: TaylorScores, normalize: Normalization = "block") -> np.ndarray:
    """Scores made comparable across layers: divided by their group's mean (or L2 norm for ``'l2'``).

    Groups whose scores are all zero stay zero.
    """
    raw = np.asarray(scores.score, dtype=np.float64)
    if normalize == "none":
        return raw.copy()
    df = pd.DataFrame({"block": scores.block, "component": scores.component, "score": raw})
    grouped = df.groupby(_normalization_keys(normalize), sort=False)["score"]
    if normalize == "l2":
        scale = grouped.transform(lambda s: float(np.sqrt(np.square(s).sum())))
    else:
        scale = grouped.transform("mean")
    scale = scale.to_numpy()
    return np.divide(raw, scale, out=np.zeros_like(raw), where=scale > 0)


def global_keep_mask(scores: TaylorScores, keep_fraction: float, normalize: Normalization = "block") -> np.ndarray:
    """Rank all channels globally by normalised importance and keep the top ``keep_fraction``."""
    if not 0.0 <= keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in [0, 1], not {keep_fraction}.")
    values = normalized_scores(scores, normalize)
    n_keep = int(round(keep_fraction * len(values)))
    order = np.argsort(-values, kind="stable")
    keep = np.zeros(len(values), dtype=bool)
    keep[order[:n_keep]] = True
    return keep


def _component_order(components: Iterable[str]) -> list[str]:
    present = set(components)
    return [c for c in COMPONENTS if c in present] + sorted(present - set(COMPONENTS))


def budget_keep_fraction(scores: TaylorScores, keep_fraction: float,
                         normalize: Normalization = "block") -> pd.DataFrame:
    """The paper's analysis: after a global top-``keep_fraction`` cut, the fraction kept per block and component."""
    df = pd.DataFrame({"block": scores.block, "relative_depth": scores.relative_depth,
                       "component": scores.component,
                       "kept": global_keep_mask(scores, keep_fraction, normalize)})
    out = (df.groupby(["block", "relative_depth", "component"], sort=True)["kept"]
           .agg(channels="size", kept="sum").reset_index())
    out["fraction_kept"] = out["kept"] / out["channels"]
    return out


def component_summary(scores: TaylorScores, keep_fraction: float = 0.5,
                      normalize: Normalization = "block") -> pd.DataFrame:
    """Per component: channels, mean raw and normalised score, and the fraction kept under the budget."""
    df = pd.DataFrame({"component": scores.component, "score": scores.score,
                       "normalized": normalized_scores(scores, normalize),
                       "kept": global_keep_mask(scores, keep_fraction, normalize)})
    out = df.groupby("component").agg(channels=("score", "size"), mean_score=("score", "mean"),
                                      mean_normalized=("normalized", "mean"),
                                      fraction_kept=("kept", "mean"))
    return out.loc[_component_order(out.index)].reset_index()


def no_ranking_reason(scores: TaylorScores) -> str | None:
    """Why these scores support no budget result, or None when they do.

    A component whose channels all score exactly the same cannot be ranked: a global budget would cut it
    by tie-breaking order alone. That happens when no gradient reaches it (untrained EfficientViT: timm
    zero-initialises the last BatchNorm of every residual branch), never in a trained network.
    """
    frame = pd.DataFrame({"component": scores.component, "score": scores.score})
    spread = frame.groupby("component")["score"].agg(["size", "min", "max"])
    tied = spread[(spread["size"] > 1) & (spread["max"] - spread["min"] <= 1e-12 * spread["max"].abs().clip(lower=1.0))]
    if tied.empty:
        return None
    values = ", ".join(f"{c} = {row['min']:.3g}" for c, row in tied.loc[_component_order(tied.index)].iterrows())
    return (f"Every channel of {', '.join(_component_order(tied.index))} has the same score ({values}): no "
            "gradient separates them, as with untrained weights, so they cannot be ranked and no budget result "
            "(which component keeps its width) is stated.")


QK_SAME_NOTE = (
    "Q and K score the same, channel by channel, and that follows from the maths, not from these images: a "
    "channel's Taylor score |Σ w·∂L/∂w| over the weights that make it equals |Σ q_j·∂L/∂q_j| over the tokens, and "
    "with attention logits S = q·kᵀ·scale, both Σ_t q_j(t)·∂L/∂q_j(t) and Σ_t k_j(t)·∂L/∂k_j(t) equal "
    "scale·Σ over query-key pairs of ∂L/∂S·q_j·k_j. In the chart above, their lines lie on each other (q wide "
    "and faint underneath, k dashed on top).")


def qk_scores_identical(scores: TaylorScores, tolerance: float = 1e-4) -> bool:
    """Whether every Q channel scores what the K channel of the same block, head and index scores (to
    ``tolerance`` of the largest of them): the identity behind ``QK_SAME_NOTE``."""
    frame = scores.to_dataframe("none")
    keys = ["block", "head", "channel"]
    q = frame[frame["component"] == "q"].set_index(keys)["score"]
    k = frame[frame["component"] == "k"].set_index(keys)["score"]
    if q.empty or len(q) != len(k):
        return False
    q, k = q.sort_index(), k.sort_index()
    if not q.index.equals(k.index):
        return False
    scale = max(float(np.abs(q).max()), float(np.abs(k).max()))
    return bool(scale > 0 and (np.abs(q.to_numpy() - k.to_numpy()) <= tolerance * scale).all())


def p_value_text(p: float) -> str:
    """A p-value as people write it: '0.032', '4.1e-05', '< 1e-300'; never 0.0000000000000009."""
    if np.isnan(p):
        return "n/a"
    if p < 1e-300:
        return "< 1e-300"
    return f"{p:.3f}" if p >= 1e-3 else f"{p:.1e}"


def rank_agreement(a: TaylorScores, b: TaylorScores) -> pd.DataFrame:
    """Spearman rank correlation of two score sets, per component and over all channels (``'all'``)."""
    from scipy.stats import spearmanr

    left = a.to_dataframe("none")[_KEYS + ["score"]]
    right = b.to_dataframe("none")[_KEYS + ["score"]]
    both = left.merge(right, on=_KEYS, suffixes=("_a", "_b"))
    if len(both) != len(left) or len(both) != len(right):
        raise ValueError("The two score sets do not describe the same channels (different models?).")

    def row(name: str, part: pd.DataFrame) -> dict:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # constant input -> nan, reported as such
            result = spearmanr(part["score_a"], part["score_b"])
        return {"component": name, "spearman": float(result.statistic), "p_value": float(result.pvalue),
                "channels": len(part)}

    rows = [row(c, both[both["component"] == c]) for c in _component_order(both["component"])]
    rows.append(row("all", both))
    return pd.DataFrame(rows)


def combined_table(taylor: TaylorScores, activation: TaylorScores | None = None,
                   normalize: Normalization = "block") -> pd.DataFrame:
    """Every channel's scores in one table (the CSV download): Taylor, and activation where given."""
    df = taylor.to_dataframe(normalize).rename(columns={"score": "taylor", "normalized": "taylor_normalized"})
    df = df.drop(columns=["method"])
    if activation is not None:
        act = activation.to_dataframe(normalize)[_KEYS + ["score", "normalized"]]
        act = act.rename(columns={"score": "activation", "normalized": "activation_normalized"})
        df = df.merge(act, on=_KEYS, how="left")
    return df


# ----------------------------------------------------------------------------- figures

def _title(text: str, note: str) -> str:
    return f"{text} {note}".strip()


def component_importance_figure(scores: TaylorScores, normalize: Normalization = "block", note: str = ""):
    """Bar per component: mean normalised importance over its blocks (error bar: spread over blocks)."""
    import plotly.express as px

    df = scores.to_dataframe(normalize)
    per_block = df.groupby(["component", "block"])["normalized"].mean().reset_index()
    bars = per_block.groupby("component")["normalized"].agg(["mean", "std"]).fillna(0.0)
    bars = bars.loc[_component_order(bars.index)].reset_index()
    fig = px.bar(bars, x="component", y="mean", error_y="std",
                 labels={"mean": f"mean importance ({normalize}-normalised)", "component": "component"},
                 title=_title(f"{scores.model}: channel importance per component ({scores.method})", note))
    return fig


def head_importance_figure(scores: TaylorScores, normalize: Normalization = "block", note: str = ""):
    """Heatmaps of mean normalised importance per head (x) and block (y), one panel each for Q, K and V."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    df = scores.to_dataframe(normalize)
    df = df[df["component"].isin(["q", "k", "v"])]
    fig = make_subplots(rows=1, cols=3, subplot_titles=("Q", "K", "V"), shared_yaxes=True)
    for col, comp in enumerate(("q", "k", "v"), start=1):
        grid = df[df["component"] == comp].pivot_table(index="block", columns="head", values="normalized",
                                                       aggfunc="mean")
        fig.add_trace(go.Heatmap(z=grid.to_numpy(), x=[f"h{h}" for h in grid.columns], y=list(grid.index),
                                 coloraxis="coloraxis",
                                 hovertemplate="block %{y}, %{x}: %{z:.3f}<extra>" + comp.upper() + "</extra>"),
                      row=1, col=col)
    fig.update_layout(coloraxis={"colorscale": "Viridis", "colorbar": {"title": "importance"}},
                      title=_title(f"{scores.model}: per-head Q/K/V importance ({normalize}-normalised)", note))
    fig.update_yaxes(title_text="block", autorange="reversed", row=1, col=1)
    return fig


def fraction_kept_figure(budget: pd.DataFrame, keep_fraction: float, model: str = "", note: str = ""):
    """Lines over depth: fraction of each component's channels kept under the global budget."""
    import plotly.express as px

    budget = budget.sort_values(["component", "relative_depth"])
    fig = px.line(budget, x="relative_depth", y="fraction_kept", color="component", markers=True,
                  category_orders={"component": _component_order(budget["component"])},
                  hover_data=["block", "channels", "kept"],
                  labels={"relative_depth": "relative depth (0 = first block)",
                          "fraction_kept": "fraction of channels kept"},
                  title=_title(f"{model}: channels kept with a global {keep_fraction:.0%} budget", note))
    fig.add_hline(y=keep_fraction, line_dash="dot", line_color="gray")
    fig.update_yaxes(range=[-0.02, 1.02])
    # Q and K keep (nearly) the same fractions (QK_SAME_NOTE): Q wide underneath, K dashed on top, both visible.
    fig.update_traces(selector={"name": "q"}, line_width=6, opacity=0.6)
    fig.update_traces(selector={"name": "k"}, line_dash="dash", marker_symbol="x")
    return fig


def taylor_vs_activation_figure(taylor: TaylorScores, activation: TaylorScores,
                                normalize: Normalization = "block", note: str = ""):
    """Scatter of both scores per channel (log axes), coloured by component; overall Spearman in the title."""
    import plotly.express as px

    agreement = rank_agreement(taylor, activation)
    rho = float(agreement.loc[agreement["component"] == "all", "spearman"].iloc[0])
    df = combined_table(taylor, activation, normalize)
    df = df[(df["taylor_normalized"] > 0) & (df["activation_normalized"] > 0)]
    fig = px.scatter(df, x="taylor_normalized", y="activation_normalized", color="component",
                     category_orders={"component": _component_order(df["component"])},
                     hover_data=["block", "head", "channel", "layer"], log_x=True, log_y=True, opacity=0.6,
                     labels={"taylor_normalized": "Taylor |Σ w·∂L/∂w|",
                             "activation_normalized": "captum |Σ a·∂L/∂a|"},
                     title=_title(f"{taylor.model}: Taylor vs activation importance, Spearman ρ = {rho:.3f}", note))
    fig.update_traces(marker={"size": 4})
    return fig


# ----------------------------------------------------------------------------- inputs for the page and CLI

def labelled_folder(folder, limit: int | None = None):
    """Images under ``folder/<class>/...`` with the ImageNet index of their class sub-folder.

    Returns (images, labels, messages); files directly in ``folder`` and unreadable files are skipped
    with a message; a sub-folder that names no ImageNet class raises ValueError.
    """
    from pathlib import Path


    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ValueError(f"{folder} is not a folder.")
    found, messages = load_folder(root)
    images, labels = [], []
    for image, label in zip(found, folder_class_labels([image.name for image in found])):
        if label is None:
            messages.append(f"{image.name}: not inside a class sub-folder, skipped.")
            continue
        images.append(image)
        labels.append(label)
    if limit is not None and len(images) > limit:
        messages.append(f"Using {limit} of {len(images)} images.")
        images, labels = images[:limit], labels[:limit]
    return images, labels, messages


def split_batches(x: torch.Tensor, labels: Sequence[int] | torch.Tensor | None, batch_size: int) -> list[tuple]:
    """(x, y) chunks of at most ``batch_size`` images, y a tensor of class indices, None when there are no labels."""
    y = None if labels is None else torch.as_tensor(labels, dtype=torch.long)
    return [(x[i:i + batch_size], None if y is None else y[i:i + batch_size]) for i in range(0, len(x), batch_size)]


def inputs_digest(x: torch.Tensor, labels: Sequence[int] | None = None) -> str:
    """A SHA-256 of the images' pixels and the labels: what a cached score is keyed by."""
    digest = hashlib.sha256(x.detach().cpu().contiguous().numpy().tobytes())
    if labels is not None:
        digest.update(repr([int(label) for label in labels]).encode())
    return digest.hexdigest()
