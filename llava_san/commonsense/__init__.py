"""LLM-Adapters' commonsense reasoning setup (the SAN paper's LLaMA experiments, Table 2).

* :mod:`.prompt`: ``generate_prompt`` (training text with ``output``; evaluation prompt without);
* :mod:`.extract`: ``extract_answer`` and ``BENCHMARKS`` (our name -> LLM-Adapters folder, answer style);
* :mod:`.encode`: tokenization of the prompt for a causal LM, as LLM-Adapters' tokenizer calls;
* :mod:`.beam`: batched 4-beam search (``commonsense_evaluate.py``'s decoding), imported on use (torch).
"""

from .encode import IGNORE_INDEX, encode_prompt, encode_train, tokenize
from .extract import BENCHMARKS, CommonsenseBenchmark, benchmark, extract_answer, is_correct, response_text
from .prompt import RESPONSE_SPLIT, eval_prompt, generate_prompt, train_prompt

__all__ = [
    "BENCHMARKS",
    "IGNORE_INDEX",
    "RESPONSE_SPLIT",
    "CommonsenseBenchmark",
    "benchmark",
    "encode_prompt",
    "encode_train",
    "eval_prompt",
    "extract_answer",
    "generate_prompt",
    "is_correct",
    "response_text",
    "tokenize",
    "train_prompt",
]
