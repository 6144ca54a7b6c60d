"""ARC-Challenge (ARC-c): the hard ARC questions; ``answer1`` .. ``answer5``.

LLM-Adapters ``dataset/ARC-Challenge/test.json``; prompt, decoding and scoring shared by the eight
commonsense benchmarks: :mod:`evaluation.tasks.commonsense`.
"""

from evaluation.tasks.commonsense import commonsense_task

NAME = "arc_challenge"
TASK = commonsense_task(NAME)
TITLE, HEADLINE, MAX_NEW_TOKENS = TASK.title, TASK.headline, TASK.max_new_tokens
load_questions, score, score_files = TASK.load_questions, TASK.score, TASK.score_files
