"""minititans: Titans (Behrouz, Zhong, Mirrokni, 2024) from scratch in NumPy.

The public API (see docs/ and DESIGN): the neural memory (``init_memory``,
``memory_forward``, ``associative_loss``, ``surprise``, ``MemoryState``, ``memory_step``,
``memory_scan``), attention (``causal_attention``), linear attention and the delta rule.
"""

from .attention import attention_mask, causal_attention, multi_head_attention
from .linear_attention import (
    delta_rule,
    gated_delta_rule,
    linear_attention,
    linear_attention_recurrent,
)
from .memory import (
    LOSSES,
    PRESETS,
    MemoryDivergenceError,
    MemoryParams,
    MemoryRule,
    MemoryState,
    associative_loss,
    associative_scan,
    compute_gates,
    init_gates,
    init_memory,
    linear_recurrence,
    memory_forward,
    memory_scan,
    memory_step,
    per_token_surprise,
    preset,
    surprise,
)

__version__ = "0.1.0"

__all__ = [
    "attention_mask", "causal_attention", "delta_rule", "gated_delta_rule", "linear_attention",
    "linear_attention_recurrent", "multi_head_attention",
    "LOSSES", "PRESETS", "MemoryDivergenceError", "MemoryParams", "MemoryRule", "MemoryState",
    "associative_loss", "associative_scan", "compute_gates", "init_gates", "init_memory",
    "linear_recurrence", "memory_forward", "memory_scan", "memory_step", "per_token_surprise",
    "preset", "surprise",
]
