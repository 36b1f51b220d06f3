"""The Titans (Section 4) and their baselines, behind one interface.

```python
config = ModelConfig(model="mac", vocab_size=32)
model = Model(config)                    # or init(rng, config) / apply(params, tokens, config)
params = model.init(rng)                 # a pytree of float arrays (dicts, MemoryParams)
logits = model.apply(params, tokens)     # tokens (T,) or (B, T) ints -> (T, V) or (B, T, V)

state = model.initial_state(batch_size=1)          # read a long sequence in pieces
logits, state = model.stream(params, piece, state)  # pieces == one apply on the whole
new = model.generate(params, prompt, 100, rng, temperature=0.8, top_k=5)
```

A model is: token embedding, ``num_layers`` blocks (the mixer of ``config.model`` plus a
feed-forward layer, each pre-norm with a residual), a final norm and a linear head
(:mod:`~minititans.models.forward`); :mod:`~minititans.models.stream` reads it in pieces
and samples from it.
"""

from __future__ import annotations

from .autoencoder import AutoEncoder, model_for, position_code
from .config import MODEL_NAMES, TITANS, ModelConfig
from .forward import DISPLAY_NAMES, LAYERS, STREAM_LAYERS, apply, check_params_fit, init
from .model import Model
from .stream import check_state, generate, initial_state, sample, stream
from .tree import ravel, tree_leaves, tree_map

__all__ = ["DISPLAY_NAMES", "LAYERS", "MODEL_NAMES", "STREAM_LAYERS", "TITANS", "AutoEncoder",
           "Model", "ModelConfig", "apply", "check_params_fit", "check_state", "generate",
           "init", "initial_state", "model_for", "position_code", "ravel", "sample", "stream",
           "tree_leaves", "tree_map"]
