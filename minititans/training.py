r"""The outer loop: train a model's projections, gates, $\mathcal{M}_0$ and persistent tokens.

The inner loop (the memory learning while it reads, Eqs. 13–14) runs inside the forward
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
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import autograd.numpy as anp
import numpy as np
from autograd import grad
from autograd.scipy.special import logsumexp
from autograd.tracer import getval
from tqdm.auto import tqdm

from ._checks import check_int
from .io import check_float_array, load_arrays, meta_value, save_arrays
from .models import AutoEncoder, Model, ModelConfig, ravel

# what a checkpoint's ``backbone`` names: the class that rebuilds its model
BACKBONES = {"lm": Model, "autoencoder": AutoEncoder}


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
    max_grad_norm: float = 1.0  # clip the outer gradient to this global norm; 0 turns it off
    seed: int = 0               # initial parameters and every batch

    def __post_init__(self):
        check_int("steps", self.steps, minimum=0)
        check_int("batch_size", self.batch_size, minimum=1)
        check_int("warmup", self.warmup, minimum=0)
        check_int("seed", self.seed, minimum=0)
        for name in ("lr", "min_lr_ratio", "beta1", "beta2", "eps", "weight_decay",
                     "max_grad_norm"):
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
        for name in ("weight_decay", "max_grad_norm"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")


_NUMBA_OK = None


def numba_available() -> bool:
    """Whether ``autograd.grad`` runs through ``memory_scan(..., backend="numba")`` here.

    Tried once on a tiny memory (and cached): the kernels or their gradient may be missing
    or fail to compile; then the caller falls back to ``backend="reference"``, and a
    warning says once why (a broken numba installation is not hidden).
    """
    global _NUMBA_OK
    if _NUMBA_OK is None:
        why = None
        try:
            from .memory import MemoryState, init_memory, memory_scan

            def f(k):
                W = init_memory(np.random.default_rng(0), 2, 2, depth=1)
                y, _ = memory_scan(MemoryState.initial(W), k, k, k, alpha=0.1, eta=0.5,
                                   theta=0.1, backend="numba")
                return anp.sum(y)

            g = grad(f)(np.ones((3, 2)))
            if not np.all(np.isfinite(g)):
                why = "its gradient of a tiny scan is not finite"
        except Exception as err:  # noqa: BLE001 - any failure means: use the reference backend
            why = f"{type(err).__name__}: {err}"
        _NUMBA_OK = why is None
        if why is not None:
            warnings.warn(f"the numba backend does not work here ({why}); "
                          "backend='auto' uses the slower reference backend", RuntimeWarning,
                          stacklevel=2)
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
    picked = np.zeros(np.shape(logits), dtype=bool)
    np.put_along_axis(picked, np.asarray(targets)[..., None], True, axis=-1)
    nll = -anp.sum(anp.where(picked, logp, 0.0), axis=-1)  # (B, T)
    m = np.asarray(mask, dtype=float)
    return anp.sum(nll * m) / max(1.0, m.sum())


def answer_accuracy(logits, batch) -> tuple[float, float]:
    """``(sequence, token)`` accuracy of the argmax at the answer positions.

    A sequence is right when every one of its answer tokens is right.
    """
    right = (np.argmax(getval(logits), axis=-1) == batch.targets) | ~batch.mask  # (B, T)
    token = float(((right) & batch.mask).sum() / max(1, batch.mask.sum()))
    return float(np.mean(np.all(right, axis=1))), token


def batch_for_step(task, cfg: TrainConfig, step: int):
    """The batch of step ``step``: a function of ``(seed, step)`` only."""
    return task.sample(np.random.default_rng([cfg.seed, step]), cfg.batch_size)


@dataclass
class TrainState:
    """Everything a resumed run needs: flat parameters, Adam's moments, the step count."""

    params: np.ndarray
    m: np.ndarray
    v: np.ndarray
    step: int


def adamw_step(state: TrainState, g, cfg: TrainConfig) -> tuple[TrainState, float]:
    """Clip ``g`` to ``max_grad_norm``, then one AdamW step; returns the new state and |g|."""
    norm = float(np.sqrt(np.sum(g * g)))
    if cfg.max_grad_norm and norm > cfg.max_grad_norm:
        g = g * (cfg.max_grad_norm / norm)
    t = state.step + 1
    m = cfg.beta1 * state.m + (1 - cfg.beta1) * g
    v = cfg.beta2 * state.v + (1 - cfg.beta2) * g * g
    m_hat = m / (1 - cfg.beta1**t)
    v_hat = v / (1 - cfg.beta2**t)
    lr = learning_rate(state.step, cfg)
    p = state.params - lr * (m_hat / (np.sqrt(v_hat) + cfg.eps) + cfg.weight_decay * state.params)
    return TrainState(p, m, v, t), norm


def _check_model(model):
    if not isinstance(model, Model):
        raise TypeError(f"model must be a Model (Model(ModelConfig(...))), got "
                        f"{type(model).__name__}")


def init_state(model: Model, cfg: TrainConfig) -> TrainState:
    flat, _ = ravel(model.init(np.random.default_rng(cfg.seed)))
    return TrainState(flat, np.zeros_like(flat), np.zeros_like(flat), 0)


def _check_train_state(state: TrainState, model: Model, cfg: TrainConfig) -> TrainState:
    """A TrainState passed as ``resume``: the checks :func:`load_checkpoint` makes on a file."""
    n = ravel(model.init(np.random.default_rng(0)))[0].size
    for name in ("params", "m", "v"):
        arr = np.asarray(getattr(state, name))
        if arr.dtype not in (np.float32, np.float64) or arr.shape != (n,):
            raise ValueError(f"resume.{name} must be a float vector of shape ({n},) for this "
                             f"model, got dtype {arr.dtype} and shape {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"resume.{name} contains NaN or inf")
    step = check_int("resume.step", state.step, minimum=0)
    if step > cfg.steps:
        raise ValueError(f"resume.step = {step} is past cfg.steps = {cfg.steps}")
    return state


def _check_task_record(task_name, length) -> None:
    from .tasks import TASKS

    if task_name is not None and task_name not in TASKS:
        raise ValueError(f"task_name must be one of {', '.join(TASKS)} or None, got "
                         f"{task_name!r}")
    if length is not None:
        check_int("length", length, minimum=1)


def save_checkpoint(path, state: TrainState, model: Model, cfg: TrainConfig, *,
                    task_name: str | None = None, length: int | None = None) -> Path:
    """Write ``state`` and both configs to an ``.npz``, atomically (see :mod:`minititans.io`).

    The arrays are the flat parameters and Adam moments; the configs, and the task the run
    trains on (``task_name``, one of :data:`minititans.tasks.TASKS`, and its ``length``)
    when given, travel as JSON metadata, so loading never unpickles anything and
    ``minititans train --resume`` continues on the same task; so does the model's
    ``backbone`` (``"lm"``, or ``"autoencoder"`` for an
    :class:`~minititans.models.AutoEncoder`), which :func:`load_checkpoint` rebuilds.
    """
    if not isinstance(state, TrainState):
        raise TypeError(f"state must be a TrainState, got {type(state).__name__}")
    _check_model(model)
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    _check_task_record(task_name, length)
    n = ravel(model.init(np.random.default_rng(0)))[0].size
    if np.shape(state.params) != (n,):
        raise ValueError(f"state has {np.size(state.params)} parameters, the model "
                         f"{model.config.model!r} of this config {n}: it is another model's state")
    for name in ("m", "v"):
        if np.shape(getattr(state, name)) != (n,):
            raise ValueError(f"state.{name} must have shape ({n},) like the parameters, got "
                             f"{np.shape(getattr(state, name))}")
    check_int("state.step", state.step, minimum=0)
    arrays = dict(params=state.params, m=state.m, v=state.v, step=np.int64(state.step))
    meta = {"model_config": json.loads(model.config.to_json()), "train_config": asdict(cfg),
            "task": task_name, "length": length, "backbone": model.backbone}
    return save_arrays(path, arrays, kind="checkpoint", meta=meta)


def _read_checkpoint(path):
    """Load and check every array and metadata key of a checkpoint (see load_checkpoint)."""
    f, meta = load_arrays(path, kind="checkpoint")
    expected = ("params", "m", "v", "step")
    for name in expected:
        if name not in f:
            raise ValueError(f"{path} is missing the array {name!r}")
    extra = sorted(set(f) - set(expected))
    if extra:
        raise ValueError(f"{path} holds unexpected arrays {extra}")
    for key in ("model_config", "train_config"):
        meta_value(path, meta, key, lambda c: isinstance(c, dict), "a JSON object")
    backbone = meta.get("backbone", "lm")  # absent in older checkpoints: a plain model
    if backbone not in BACKBONES:
        raise ValueError(f"{path} has metadata 'backbone' = {backbone!r}, expected one of "
                         f"{', '.join(map(repr, BACKBONES))}")
    try:
        model = BACKBONES[backbone](ModelConfig.from_json(json.dumps(meta["model_config"])))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path} has metadata 'model_config' that is not a valid "
                         f"ModelConfig: {e}") from e
    try:
        cfg = TrainConfig(**meta["train_config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path} has metadata 'train_config' that is not a valid "
                         f"TrainConfig: {e}") from e
    task_name, length = meta.get("task"), meta.get("length")  # absent in older checkpoints
    try:
        _check_task_record(task_name, length)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path} has bad metadata 'task'/'length': {e}") from e
    template, unravel = ravel(model.init(np.random.default_rng(0)))
    n = template.size
    if f["params"].shape != (n,):
        raise ValueError(f"{path}: array 'params' has shape {f['params'].shape}, but the "
                         f"recorded model ({model.config.model!r}) has {n} parameters")
    params = check_float_array(path, "params", f["params"], shape=(n,))
    m = check_float_array(path, "m", f["m"], shape=(n,))
    v = check_float_array(path, "v", f["v"], shape=(n,))
    if np.any(v < 0):
        raise ValueError(f"{path}: array 'v' (Adam's second moment) has negative entries")
    step = f["step"]
    if step.shape != () or step.dtype.kind not in "iu":
        raise ValueError(f"{path}: array 'step' must be an integer scalar, got dtype "
                         f"{step.dtype} and shape {step.shape}")
    step = int(step)
    if not 0 <= step <= cfg.steps:
        raise ValueError(f"{path}: array 'step' = {step} must be in [0, {cfg.steps}] (the "
                         "recorded train_config's steps)")
    state = TrainState(params, m, v, step)
    return state, model, cfg, unravel(params), task_name, length


def load_checkpoint(path) -> tuple[TrainState, Model, TrainConfig, dict]:
    """Read a checkpoint: ``(state, model, train_config, params)`` (params as a tree).

    A missing, truncated, pickled or wrong-version file raises a clear error
    (:func:`minititans.io.load_arrays`), and so does any array that does not fit the
    recorded model and config: ``params``, ``m`` and ``v`` must be finite float vectors of
    the model's parameter count (``v`` >= 0), ``step`` an integer in ``[0, steps]``; a
    missing or malformed metadata key is a ``ValueError`` naming it.
    """
    return _read_checkpoint(path)[:4]


def checkpoint_task(path) -> tuple[str | None, int | None]:
    """The ``(task_name, length)`` a checkpoint records (``None`` when it does not)."""
    return _read_checkpoint(path)[4:]


def train(model: Model, task, cfg: TrainConfig, *, resume=None, checkpoint=None,
          checkpoint_every: int = 0, until: int | None = None, progress: bool = True,
          desc: str | None = None, task_name: str | None = None):
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
        task_name: the name of ``task`` (one of :data:`minititans.tasks.TASKS`), recorded in
            the checkpoints with the task's length; a checkpoint that records another task
            is refused as ``resume``.

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
    _check_task_record(task_name, None)
    length = getattr(task, "length", None) if task_name is not None else None
    check_int("checkpoint_every", checkpoint_every, minimum=0)
    if resume is None:
        state = init_state(model, cfg)
    elif isinstance(resume, TrainState):
        state = _check_train_state(resume, model, cfg)
    else:
        state, saved_model, saved_cfg, _, saved_task, saved_length = _read_checkpoint(resume)
        if saved_model.config != model.config:
            raise ValueError("the checkpoint was written by a model with another config")
        if task_name is not None and saved_task is not None and (
                (saved_task, saved_length) != (task_name, length)):
            raise ValueError(f"the checkpoint trained on {saved_task!r} at length "
                             f"{saved_length}, not {task_name!r} at length {length}")
        changed = sorted(k for k, val in asdict(saved_cfg).items()
                         if k != "steps" and getattr(cfg, k) != val)
        if changed:
            warnings.warn(f"resuming with a train config that differs from the checkpoint's "
                          f"in {', '.join(changed)}: the run will not equal one straight "
                          "through", RuntimeWarning, stacklevel=2)
    _, unravel = ravel(model.init(np.random.default_rng(0)))
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
            save_checkpoint(checkpoint, state, model, cfg, task_name=task_name, length=length)
    if checkpoint is not None:
        save_checkpoint(checkpoint, state, model, cfg, task_name=task_name, length=length)
    return unravel(state.params), state, history


def evaluate(model: Model, params, task, *, num_samples: int = 64, seed: int = 10_000,
             batch_size: int = 16) -> dict:
    """Answer accuracy on ``num_samples`` fresh sequences (forward passes only).

    Returns:
        ``{"accuracy", "sequence_accuracy", "token_accuracy", "loss"}``; ``accuracy`` is the
        task's own ``metric`` (whole answers for the needle, single queries for MQAR).
    """
    rng = np.random.default_rng(seed)
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
