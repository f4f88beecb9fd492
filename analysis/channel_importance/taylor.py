"""The Taylor pass: gradients of the loss summed over batches on a private copy of the model (the pool of
copies kept between passes), and the plumbing the activation variant shares (loss targets, private copies)."""
from __future__ import annotations

import copy
import threading
import weakref
from dataclasses import dataclass
from typing import Callable, Iterable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from analysis.channel_importance.groups import ChannelGroup, channel_groups
from analysis.channel_importance.scores import TaylorScores, scores_from_groups

LossTarget = Literal["self", "labels"]
Progress = Callable[[int, "int | None"], None]


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
