"""minititans: Titans (Behrouz, Zhong, Mirrokni, 2024) from scratch in NumPy.

The public API (DESIGN, and the API pages of the docs), importable as ``mt.NAME``:

* the neural memory (Section 3): ``init_memory``, ``memory_forward``, ``associative_loss``
  (Eq. 12), ``surprise`` (Eq. 8), ``per_token_surprise``, ``MemoryParams``,
  ``MemoryState``, ``memory_step`` (Eqs. 13–14), ``memory_scan`` (Eqs. 13–18),
  ``MemoryDivergenceError``, the gates (``init_gates``, ``compute_gates``), the parallel
  scan (``associative_scan``, ``linear_recurrence``), the family of rules (``MemoryRule``,
  ``preset``, ``PRESETS``, ``LOSSES``); saving and loading a memory state
  (``save_memory_state``, ``load_memory_state``);
* attention (Eqs. 1–2): ``causal_attention``, ``multi_head_attention`` and the masks
  (``attention_mask``, ``mac_mask`` for Eq. 23, ``sliding_window_mask`` for Eqs. 27 and
  31);
* linear attention and the delta rules (Eqs. 3–5, Appendix C): ``linear_attention``,
  ``linear_attention_recurrent``, ``delta_rule``, ``gated_delta_rule``;
* the models (Section 4): ``Model``, ``ModelConfig``, ``MODEL_NAMES``;
* training and evaluation: ``train``, ``TrainConfig``, ``evaluate``;
* the tasks: ``Batch``, ``NeedleTask``, ``MQARTask``, ``make_task``, ``TASKS``.

Names are imported on first use, so ``import minititans`` (and ``minititans --help``) loads
nothing heavy until a function is called.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_HOMES = {
    ".attention": ("attention_mask", "causal_attention", "mac_mask", "multi_head_attention",
                   "sliding_window_mask"),
    ".linear_attention": ("delta_rule", "gated_delta_rule", "linear_attention",
                          "linear_attention_recurrent"),
    ".memory": ("LOSSES", "PRESETS", "MemoryDivergenceError", "MemoryParams", "MemoryRule",
                "MemoryState", "associative_loss", "associative_scan", "compute_gates",
                "init_gates", "init_memory", "linear_recurrence", "memory_forward",
                "memory_scan", "memory_step", "per_token_surprise", "preset", "surprise"),
    ".io": ("load_memory_state", "save_memory_state"),
    ".models": ("MODEL_NAMES", "Model", "ModelConfig"),
    ".training": ("TrainConfig", "evaluate", "train"),
    ".tasks": ("TASKS", "Batch", "MQARTask", "NeedleTask", "make_task"),
}
_MODULE_OF = {name: module for module, names in _HOMES.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'minititans' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later look-ups do not come back here
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
