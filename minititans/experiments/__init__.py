"""The experiments: one module per table of the paper, each shaped the same way.

Every module has a frozen settings dataclass (its defaults are the command's defaults), a
``*_experiment(settings)`` function that returns a JSON-ready dict of flat rows, a
``format_*_table`` function and a plot in :mod:`minititans.viz`; the command line in
:mod:`minititans.cli` only parses flags into the settings.

* :mod:`.recall` — test-time memorization without training (``minititans recall``, demo
  part 1).
* :mod:`.needle` — single needle in a haystack beyond the attention window, Titans
  Table 2 (``minititans needle``, demo part 2).
* :mod:`.ablation` — the LMM and its ablations, Titans Table 5 (``minititans ablate``).
* :mod:`.lm` — a character-level language model on text that ships with Python, Titans
  Table 1 and Fig. 7 (``minititans lm``).
* :mod:`.mad` — MAD-mini, the synthetic token-mixing suite of the NeurIPS version's
  Table 10 (``minititans mad``).

Jobs (one model, one seed) run in parallel processes through :func:`.pool.run_jobs`.
"""
