"""Where knowledge lives: DeepSpeed ZeRO-3 probes and gathers appear in one library module only."""
import io
import re
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "llava_san"
ZERO3_ONLY = ("ds_id", "ds_status", "ds_shape", "ds_numel", "GatheredParameters")
HOME = "llava_san/distributed/zero3.py"


def _code_names(path: Path) -> set[str]:
    """The identifiers and string contents of a module's code (comments and docstrings count too:
    a name explained elsewhere is knowledge elsewhere)."""
    words: set[str] = set()
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if tok.type in (tokenize.NAME, tokenize.STRING, tokenize.COMMENT):
            words.update(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", tok.string))
    return words


def test_zero3_knowledge_lives_in_one_module():
    offenders = {}
    for path in sorted(LIBRARY.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel == HOME:
            continue
        found = sorted(set(ZERO3_ONLY) & _code_names(path))
        if found:
            offenders[rel] = found
    assert not offenders, f"ZeRO-3 internals outside {HOME}: {offenders}"


def test_the_home_module_exists():
    assert (ROOT / HOME).is_file()
