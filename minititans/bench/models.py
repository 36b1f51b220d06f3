"""The model rows: tokens/s of the needle experiment's models, training and inference.

For each model of ``minititans needle`` at its settings (:data:`~minititans.experiments.
needle.DEFAULT`, :func:`~minititans.experiments.needle.model_config`) and the passkey
task's vocabulary, two things are timed:

* **train**: one loss + gradient of a batch, as :func:`minititans.training.train` computes
  it (``autograd.grad`` of the cross-entropy of ``model.apply`` over the flat parameters);
  the AdamW step that follows is not included.
* **inference**: ``model.apply`` on plain arrays, no gradient, as
  :func:`~minititans.experiments.needle.evaluate_at` runs it (the bench times whole
  sequences; ``evaluate_at`` gives SWA only the tokens its answer can depend on).

Each row is timed on the reference and, where ``backend="numba"`` changes what the model
computes (:func:`numba_path`), on the numba backend, the two interleaved
(:func:`~minititans.bench.timing.interleaved_best`) so their ratio sees the same load.
Before the timing each backend runs once, untimed, on one sequence of the row's length:
numba's compilation (or its cache load) and first-call costs are excluded. numba runs on
one thread, as each worker of the experiment pool does.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

from .._checks import check_choice, check_int
from .timing import interleaved_best, load_average

WHATS = ("train", "inference")


@dataclass(frozen=True)
class ModelBenchSettings:
    """Which rows to time: ``cases`` of ``(model, what, length)``, all at one batch size."""

    # (model of minititans.experiments.needle.MODELS, "train" | "inference", length)
    cases: tuple = tuple((m, what, n) for m in ("swa", "lmm", "mac", "mag", "mal",
                                                 "linear_attention", "gated_delta", "ttt_linear")
                         for what, n in (("train", 512), ("inference", 512),
                                         ("inference", 4096)))
    batch_size: int = 8        # the needle experiment's training batch
    task: str = "pk"           # the vocabulary (and data) of S-NIAH-PK
    repeats: int = 3           # numba runs per row (the best counts) ...
    ref_repeats: int = 1       # ... and reference runs (seconds each; one is steady enough)

    def __post_init__(self):
        from ..experiments.needle import MODELS, TASKS

        if not isinstance(self.cases, tuple) or not self.cases:
            raise TypeError(f"cases must be a non-empty tuple of (model, what, length), got "
                            f"{self.cases!r}")
        for case in self.cases:
            if not (isinstance(case, tuple) and len(case) == 3):
                raise TypeError(f"each case must be a (model, what, length) tuple, got {case!r}")
            check_choice("model", case[0], MODELS)
            check_choice("what", case[1], WHATS)
            check_int("length", case[2], minimum=1)
        check_choice("task", self.task, TASKS)
        for name in ("batch_size", "repeats", "ref_repeats"):
            check_int(name, getattr(self, name), minimum=1)


FULL = ModelBenchSettings()
# ``bench --quick``: two memories' inference and one training step, about 20 s on 2 cores
QUICK = ModelBenchSettings(cases=(("lmm", "inference", 512), ("mag", "inference", 512),
                                  ("lmm", "train", 512)), repeats=2)


def numba_path(config, what: str, length: int) -> bool:
    """Whether ``backend="numba"`` changes what ``config``'s model computes in this row.

    The Titans run their memory scan in numba (forward, and its VJP in training), linear
    attention and the gated delta rule their recurrence (:mod:`minititans.kernels.delta_vjp`);
    sliding-window attention goes to its numba twin only without a gradient and from
    :data:`~minititans.models.blocks.NUMBA_ATTENTION_MIN_KEYS` keys on.
    """
    from ..models import TITANS
    from ..models.blocks import NUMBA_ATTENTION_MIN_KEYS

    if config.model in TITANS or config.model in ("linear_attention", "gated_delta"):
        return True
    return config.model == "swa" and what == "inference" and length >= NUMBA_ATTENTION_MIN_KEYS


def _runner(model, what, batch):
    """A no-argument function running one ``what`` on ``batch``; ``last`` holds its logits."""
    from autograd import grad
    from autograd.tracer import getval

    from ..models import ravel
    from ..training import cross_entropy

    params = model.init(np.random.default_rng(0))
    last = {}
    if what == "inference":
        def run():
            last["logits"] = model.apply(params, batch.inputs)  # (B, T, V)
        return run, last
    flat, unravel = ravel(params)

    def loss(flat, batch):  # the loss training.train differentiates
        logits = model.apply(unravel(flat), batch.inputs)  # (B, T, V)
        last["logits"] = getval(logits)
        return cross_entropy(logits, batch.targets, batch.mask)

    loss_grad = grad(loss)

    def run():
        last["grad"] = loss_grad(flat, batch)
    return run, last


def bench_batch(task_name: str, what: str, length: int, batch_size: int):
    """``(task, batch)``: the data every row of ``(what, length)`` is timed on (fixed seed)."""
    from ..experiments.needle import make_task

    # training sees needles anywhere, evaluation in the first quarter (as the experiment)
    task = make_task(task_name, length, "anywhere" if what == "train" else "early")
    return task, task.sample(np.random.default_rng([length, batch_size]), batch_size)


def model_rows_of(name, what, length, s: ModelBenchSettings, numba_ok: bool) -> list[dict]:
    """The rows of one case: the reference and (where it has a path) numba, interleaved."""
    from ..experiments.needle import DEFAULT, NAMES, model_config
    from ..models import Model
    from ..tasks import Batch
    from ..training import cross_entropy

    task, batch = bench_batch(s.task, what, length, s.batch_size)
    backends = ["reference"]
    cfg = model_config(name, DEFAULT, task.vocab_size, "numba")
    has_numba = numba_path(cfg, what, length)
    if has_numba and numba_ok:
        backends.insert(0, "numba")
    one = Batch(batch.inputs[:1], batch.targets[:1], batch.mask[:1])
    runs, outs = [], []
    for backend in backends:
        model = Model(model_config(name, DEFAULT, task.vocab_size, backend))
        _runner(model, what, one)[0]()  # warm-up: compile or load the numba cache, untimed
        run, last = _runner(model, what, batch)
        runs.append(run)
        outs.append(last)
    repeats = [s.repeats if b == "numba" else s.ref_repeats for b in backends]
    times = interleaved_best(runs, repeats)
    tokens = s.batch_size * length
    rows = []
    for backend, t, last, n in zip(backends, times, outs, repeats):
        # what the timed runs computed: the batch's loss and, in training, |gradient|
        loss = float(cross_entropy(last["logits"], batch.targets, batch.mask))
        row = dict(model=NAMES[name], what=what, length=length, batch=s.batch_size,
                   backend=backend, tokens_per_s=tokens / t, seconds=t, runs=n, loss=loss,
                   speedup=None)
        if what == "train":
            row["grad_norm"] = float(np.sqrt(np.sum(last["grad"] ** 2)))
        rows.append(row)
    if len(rows) == 2:
        rows[0]["speedup"] = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
    elif not has_numba:
        rows[0]["note"] = "no numba path"
    else:
        rows[0]["note"] = "numba not available"
    return rows


def run_model_bench(settings: ModelBenchSettings = FULL, *, progress: bool = True) -> dict:
    """Time every case of ``settings``; returns ``{"settings", "load_average_start_end",
    "rows"}`` with rows ``{"model", "what", "length", "batch", "backend", "tokens_per_s",
    "seconds", "runs", "loss", "speedup"}`` (``speedup``: numba / reference tokens/s, on the
    numba row; ``None`` on reference rows), training rows also ``"grad_norm"`` and rows
    without a numba row a ``"note"`` saying why.
    """
    if not isinstance(settings, ModelBenchSettings):
        raise TypeError(f"settings must be a ModelBenchSettings, got "
                        f"{type(settings).__name__}")
    import numba
    from tqdm import tqdm

    from ..training import numba_available

    load_start = load_average()
    numba_ok = numba_available()
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    rows = []
    try:
        for case in tqdm(settings.cases, desc="bench models", disable=not progress,
                         file=sys.stderr):
            rows += model_rows_of(*case, settings, numba_ok)
    finally:
        numba.set_num_threads(threads)
    return dict(settings=dict(batch_size=settings.batch_size, task=settings.task,
                              repeats=settings.repeats, ref_repeats=settings.ref_repeats,
                              numba_threads=1, warm_up="one untimed call per backend on one "
                                                       "sequence of the row's length"),
                load_average_start_end=[load_start, load_average()], rows=rows)
