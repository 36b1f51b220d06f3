r"""The outer loop: train a model's projections, gates, $\mathcal{M}_0$ and persistent tokens.

The inner loop (the memory learning while it reads, Eqs. 13-14) runs inside the forward
pass; the outer loop differentiates through it with autograd (through the numba primitive
when ``backend="numba"``) and takes AdamW steps on

$$\mathcal{L} = -\frac{1}{|\mathcal{A}|}\sum_{t \in \mathcal{A}}
  \log p_\theta(x_{t+1} \mid x_{\le t}),$$

the cross-entropy at the answer positions $\mathcal{A}$ of a task (its ``mask``). The step
size warms up linearly and then follows a cosine; the gradient is clipped to a global norm.

Training is deterministic: the initial parameters come from ``seed`` and the batch of step
``i`` from ``np.random.default_rng([seed, i])``, so a run resumed from a checkpoint (an
``.npz`` read with ``allow_pickle=False``) equals the run straight through.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import autograd.numpy as np
import numpy as onp
from autograd import grad
from autograd.scipy.special import logsumexp
from autograd.tracer import getval
from tqdm.auto import tqdm

from ._checks import check_int
from .io import load_arrays, save_arrays
from .models import Model, ModelConfig, ravel


@dataclass(frozen=True)
class TrainConfig:
    """Outer-loop settings (the paper: AdamW, lr 4e-4, cosine, warm-up; here a tiny model)."""

    steps: int = 200            # optimiser steps
    batch_size: int = 8         # sequences per step
    lr: float = 3e-3            # peak step size (the paper's 4e-4 is for ~400M parameters)
    warmup: int = 20            # linear warm-up steps
    min_lr_ratio: float = 0.1   # the cosine ends at lr * min_lr_ratio
    beta1: float = 0.9          # Adam's first-moment decay
    beta2: float = 0.99         # Adam's second-moment decay
    eps: float = 1e-8
    weight_decay: float = 0.0   # AdamW's decoupled decay (the paper: 0.1)
    clip_norm: float = 1.0      # global gradient norm clip; 0 turns it off
    seed: int = 0               # initial parameters and every batch

    def __post_init__(self):
        check_int("steps", self.steps, minimum=0)
        check_int("batch_size", self.batch_size, minimum=1)
        check_int("warmup", self.warmup, minimum=0)
        check_int("seed", self.seed, minimum=0)
        for name in ("lr", "min_lr_ratio", "beta1", "beta2", "eps", "weight_decay",
                     "clip_norm"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, (int, float)):
                raise TypeError(f"{name} must be a float, got {val!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps!r}")
        for name in ("weight_decay", "clip_norm"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")


_NUMBA_OK = None


def numba_available() -> bool:
    """Whether ``autograd.grad`` runs through ``memory_scan(..., backend="numba")`` here.

    Tried once on a tiny memory (and cached): the kernels or their gradient may be missing
    or fail to compile; then the caller falls back to ``backend="reference"``.
    """
    global _NUMBA_OK
    if _NUMBA_OK is None:
        try:
            from .memory import MemoryState, init_memory, memory_scan

            def f(k):
                W = init_memory(onp.random.default_rng(0), 2, 2, depth=1)
                y, _ = memory_scan(MemoryState.initial(W), k, k, k, alpha=0.1, eta=0.5,
                                   theta=0.1, backend="numba")
                return np.sum(y)

            g = grad(f)(onp.ones((3, 2)))
            _NUMBA_OK = bool(onp.all(onp.isfinite(g)))
        except Exception:  # noqa: BLE001 - any failure means: use the reference backend
            _NUMBA_OK = False
    return _NUMBA_OK


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``cfg.lr`` over ``warmup`` steps, then a cosine to ``min_lr_ratio``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / span)
    floor = cfg.min_lr_ratio
    return cfg.lr * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def cross_entropy(logits, targets, mask):
    """Mean $-\\log p(\\text{target})$ over the positions where ``mask`` is True.

    Args:
        logits: ``(B, T, V)``; targets: ``(B, T)`` ints; mask: ``(B, T)`` bool.
    """
    logp = logits - logsumexp(logits, axis=-1, keepdims=True)  # (B, T, V)
    picked = onp.zeros(onp.shape(logits), dtype=bool)
    onp.put_along_axis(picked, onp.asarray(targets)[..., None], True, axis=-1)
    nll = -np.sum(np.where(picked, logp, 0.0), axis=-1)  # (B, T)
    m = onp.asarray(mask, dtype=float)
    return np.sum(nll * m) / max(1.0, m.sum())


def answer_accuracy(logits, batch) -> tuple[float, float]:
    """``(sequence, token)`` accuracy of the argmax at the answer positions.

    A sequence is right when every one of its answer tokens is right.
    """
    right = (onp.argmax(getval(logits), axis=-1) == batch.targets) | ~batch.mask  # (B, T)
    token = float(((right) & batch.mask).sum() / max(1, batch.mask.sum()))
    return float(onp.mean(onp.all(right, axis=1))), token


def batch_for_step(task, cfg: TrainConfig, step: int):
    """The batch of step ``step``: a function of ``(seed, step)`` only."""
    return task.sample(onp.random.default_rng([cfg.seed, step]), cfg.batch_size)


@dataclass
class TrainState:
    """Everything a resumed run needs: flat parameters, Adam's moments, the step count."""

    params: onp.ndarray
    m: onp.ndarray
    v: onp.ndarray
    step: int


def adamw_step(state: TrainState, g, cfg: TrainConfig) -> tuple[TrainState, float]:
    """Clip ``g`` to ``clip_norm``, then one AdamW step; returns the new state and |g|."""
    norm = float(onp.sqrt(onp.sum(g * g)))
    if cfg.clip_norm and norm > cfg.clip_norm:
        g = g * (cfg.clip_norm / norm)
    t = state.step + 1
    m = cfg.beta1 * state.m + (1 - cfg.beta1) * g
    v = cfg.beta2 * state.v + (1 - cfg.beta2) * g * g
    m_hat = m / (1 - cfg.beta1**t)
    v_hat = v / (1 - cfg.beta2**t)
    lr = learning_rate(state.step, cfg)
    p = state.params - lr * (m_hat / (onp.sqrt(v_hat) + cfg.eps) + cfg.weight_decay * state.params)
    return TrainState(p, m, v, t), norm


def _check_model(model):
    if not isinstance(model, Model):
        raise TypeError(f"model must be a Model (Model(ModelConfig(...))), got "
                        f"{type(model).__name__}")


def init_state(model: Model, cfg: TrainConfig) -> TrainState:
    flat, _ = ravel(model.init(onp.random.default_rng(cfg.seed)))
    return TrainState(flat, onp.zeros_like(flat), onp.zeros_like(flat), 0)


def save_checkpoint(path, state: TrainState, model: Model, cfg: TrainConfig) -> Path:
    """Write ``state`` and both configs to an ``.npz``, atomically (see :mod:`minititans.io`).

    The arrays are the flat parameters and Adam moments; the configs travel as JSON
    metadata, so loading never unpickles anything.
    """
    if not isinstance(state, TrainState):
        raise TypeError(f"state must be a TrainState, got {type(state).__name__}")
    _check_model(model)
    n = ravel(model.init(onp.random.default_rng(0)))[0].size
    if onp.shape(state.params) != (n,):
        raise ValueError(f"state has {onp.size(state.params)} parameters, the model "
                         f"{model.config.model!r} of this config {n}: it is another model's state")
    arrays = dict(params=state.params, m=state.m, v=state.v, step=onp.int64(state.step))
    meta = {"model_config": json.loads(model.config.to_json()), "train_config": asdict(cfg)}
    return save_arrays(path, arrays, kind="checkpoint", meta=meta)


def load_checkpoint(path) -> tuple[TrainState, Model, TrainConfig, dict]:
    """Read a checkpoint: ``(state, model, train_config, params)`` (params as a tree).

    A missing, truncated, pickled or wrong-version file raises a clear error
    (:func:`minititans.io.load_arrays`).
    """
    f, meta = load_arrays(path, kind="checkpoint")
    for name in ("params", "m", "v", "step"):
        if name not in f:
            raise ValueError(f"{path} is missing the array {name!r}")
    state = TrainState(f["params"], f["m"], f["v"], int(f["step"]))
    model = Model(ModelConfig.from_json(json.dumps(meta["model_config"])))
    cfg = TrainConfig(**meta["train_config"])
    template, unravel = ravel(model.init(onp.random.default_rng(0)))
    if template.shape != state.params.shape:
        raise ValueError(f"checkpoint has {state.params.size} parameters, the model "
                         f"{template.size}")
    return state, model, cfg, unravel(state.params)


def train(model: Model, task, cfg: TrainConfig, *, resume=None, checkpoint=None,
          checkpoint_every: int = 0, until: int | None = None, progress: bool = True,
          desc: str | None = None):
    """Train ``model`` on ``task`` for ``cfg.steps`` steps (continuing ``resume`` if given).

    Args:
        model: a :class:`~minititans.models.Model` whose ``vocab_size`` fits the task.
        task: anything with ``sample(rng, batch_size) -> Batch``.
        cfg: the :class:`TrainConfig`.
        resume: a :class:`TrainState` or a checkpoint path to continue from.
        checkpoint: a path; written every ``checkpoint_every`` steps (if > 0) and at the end.
        until: stop after this many steps (the schedule still spans ``cfg.steps``): a run
            interrupted on purpose, to be resumed.
        progress: show a tqdm bar with the loss and answer accuracy.

    Returns:
        ``(params, state, history)``: the trained parameter tree, the final TrainState, and
        a list of ``{"step", "loss", "accuracy", "grad_norm"}`` per step.
    """
    _check_model(model)
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    if not callable(getattr(task, "sample", None)):
        raise TypeError(f"task must have a sample(rng, batch_size) method (NeedleTask, "
                        f"MQARTask), got {type(task).__name__}")
    if resume is not None and not isinstance(resume, (TrainState, str, os.PathLike)):
        raise TypeError(f"resume must be a TrainState or a checkpoint path, got "
                        f"{type(resume).__name__}")
    if resume is None:
        state = init_state(model, cfg)
    elif isinstance(resume, TrainState):
        state = resume
    else:
        state, saved_model, _, _ = load_checkpoint(resume)
        if saved_model.config != model.config:
            raise ValueError("the checkpoint was written by a model with another config")
    _, unravel = ravel(model.init(onp.random.default_rng(0)))
    seen = {}

    def loss(flat, batch):
        logits = model.apply(unravel(flat), batch.inputs)  # (B, T, V)
        seen["logits"] = getval(logits)
        return cross_entropy(logits, batch.targets, batch.mask)

    loss_grad = grad(loss)
    history = []
    stop = cfg.steps if until is None else min(cfg.steps, check_int("until", until, minimum=0))
    bar = tqdm(range(state.step, stop), desc=desc or model.name, disable=not progress,
               leave=False, initial=state.step, total=cfg.steps)
    for step in bar:
        batch = batch_for_step(task, cfg, step)
        g = loss_grad(state.params, batch)
        value = float(cross_entropy(seen["logits"], batch.targets, batch.mask))
        seq, tok = answer_accuracy(seen["logits"], batch)
        acc = tok if getattr(task, "metric", "sequence") == "token" else seq
        state, norm = adamw_step(state, g, cfg)
        history.append({"step": step, "loss": value, "accuracy": acc, "grad_norm": norm})
        bar.set_postfix(loss=f"{value:.3f}", acc=f"{acc:.2f}")
        if checkpoint is not None and checkpoint_every and state.step % checkpoint_every == 0:
            save_checkpoint(checkpoint, state, model, cfg)
    if checkpoint is not None:
        save_checkpoint(checkpoint, state, model, cfg)
    return unravel(state.params), state, history


def evaluate(model: Model, params, task, *, num_samples: int = 64, seed: int = 10_000,
             batch_size: int = 16) -> dict:
    """Answer accuracy on ``num_samples`` fresh sequences (forward passes only).

    Returns:
        ``{"accuracy", "sequence_accuracy", "token_accuracy", "loss"}``; ``accuracy`` is the
        task's own ``metric`` (whole answers for the needle, single queries for MQAR).
    """
    rng = onp.random.default_rng(seed)
    seq_right, tok_right, tokens, losses, n = 0.0, 0.0, 0, 0.0, 0
    while n < num_samples:
        batch = task.sample(rng, min(batch_size, num_samples - n))
        logits = model.apply(params, batch.inputs)
        seq, tok = answer_accuracy(logits, batch)
        B, k = len(batch.inputs), int(batch.mask.sum())
        seq_right += seq * B
        tok_right += tok * k
        tokens += k
        losses += float(cross_entropy(logits, batch.targets, batch.mask)) * B
        n += B
    seq, tok = seq_right / n, tok_right / max(1, tokens)
    return {"accuracy": tok if getattr(task, "metric", "sequence") == "token" else seq,
            "sequence_accuracy": seq, "token_accuracy": tok, "loss": losses / n}
