"""BoolQ: yes/no questions on a passage; the model answers ``true`` or ``false``.

LLM-Adapters ``dataset/boolq/test.json``; prompt, decoding and scoring shared by the eight
commonsense benchmarks: :mod:`evaluation.tasks.commonsense`.
"""

from evaluation.tasks.commonsense import commonsense_task

NAME = "boolq"
TASK = commonsense_task(NAME)
TITLE, HEADLINE, MAX_NEW_TOKENS = TASK.title, TASK.headline, TASK.max_new_tokens
load_questions, score, score_files = TASK.load_questions, TASK.score, TASK.score_files
