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

(``minititans --help`` does not import the package's heavy parts: the command line lives in
:mod:`minititans.cli`, which imports an experiment only when its command runs.)
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
__all__ = sorted(name for names in _HOMES.values() for name in names)

# imported at once, not on first use: a lazy look-up would lose ``linear_attention`` to the
# submodule of the same name, which Python binds on the package when anything imports it
for _module, _names in _HOMES.items():
    _mod = importlib.import_module(_module, __name__)
    for _name in _names:
        globals()[_name] = getattr(_mod, _name)
del _module, _names, _mod, _name
