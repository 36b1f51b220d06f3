"""The neural long-term memory (Titans Section 3): model, loss, update, scan, presets."""

from .gates import compute_gates, init_gates
from .loss import LOSSES, associative_loss, per_token_surprise, surprise
from .models import MemoryParams, forward_per_token, init_memory, memory_forward
from .parallel_scan import associative_scan, linear_recurrence, linear_recurrence_loop
from .presets import PRESETS, MemoryRule, preset
from .scan import memory_scan
from .update import MemoryDivergenceError, MemoryState, memory_step

__all__ = [
    "LOSSES", "PRESETS", "MemoryDivergenceError", "MemoryParams", "MemoryRule", "MemoryState",
    "associative_loss", "associative_scan", "compute_gates", "forward_per_token", "init_gates",
    "init_memory", "linear_recurrence", "linear_recurrence_loop", "memory_forward",
    "memory_scan", "memory_step", "per_token_surprise", "preset", "surprise",
]
