"""Evaluation of llava-san models exactly as LLaVA-1.5 evaluates (``docs/benchmarks.md``).

* :mod:`evaluation.tasks` -- one module per benchmark (question readers with LLaVA's prompts,
  scorers, submission writers) and the registry ``get_benchmark(name)``;
* :mod:`evaluation.score` -- ``python -m evaluation.score BENCHMARK --answers ...``;
* :mod:`llava_san.normalize` -- the official answer normalisers and the VQA soft accuracy;
* :mod:`evaluation.answers` -- answer files, with missing/duplicate/unknown id reports;
* :mod:`evaluation.report` -- the comparison table (paper reference rows + our runs);
* :mod:`evaluation.sweep` -- mean +- std over a Hydra multirun;
* ``evaluation/notebooks/`` -- results and sweep notebooks built on the two modules above.

Scorers do not depend on the training code (nor on torch).
"""
