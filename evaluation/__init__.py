"""Evaluation of llava-san models exactly as LLaVA-1.5 evaluates (``docs/benchmarks.md``).

* :mod:`evaluation.tasks` -- one module per benchmark (question readers with LLaVA's prompts,
  scorers, submission writers), each ending in its :class:`~evaluation.tasks.task.Task`, and the
  registry ``get_benchmark(name)``;
* :mod:`evaluation.run` -- ``python -m evaluation``: plan (:mod:`~evaluation.plan`,
  :mod:`~evaluation.resolve`), generate (:mod:`~evaluation.generate`, :mod:`~evaluation.journal`,
  :mod:`~llava_san.inference.loading`, :mod:`~evaluation.launch`), merge (:mod:`~evaluation.shards`),
  score (:mod:`~evaluation.scoring`), report; configured by :class:`evaluation.config.EvalConfig`;
* :mod:`evaluation.score` -- ``python -m evaluation.score BENCHMARK --answers ...``;
* answer normalisation and the VQA soft accuracy live in the library (:mod:`llava_san.normalize`,
  shared with training's easy-vqa check);
* :mod:`evaluation.answers` -- answer files, with missing/duplicate/unknown id reports;
* :mod:`evaluation.report` -- the comparison table (paper reference rows + our runs);
* :mod:`evaluation.sweep` -- mean +- std over a Hydra multirun;
* ``evaluation/notebooks/`` -- results and sweep notebooks built on the two modules above.

Scorers do not depend on the training code (nor on torch); they use the library's dependency-free
:mod:`llava_san.normalize` and :mod:`llava_san.easyvqa_score`.
"""
