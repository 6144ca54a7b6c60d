"""`python -m evaluation` progress: a bar of answered / total on a terminal (resumed answers counted), a log
line when stderr is a file or a pipe."""
import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _evaluate(folder, limit, stderr=subprocess.PIPE):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", COLUMNS="120")
    return subprocess.Popen([sys.executable, "-m", "evaluation", f"hydra.run.dir={folder}", "benchmarks=[easyvqa]",
                             f"limit={limit}", "max_new_tokens=2", "batch_size=2", "num_workers=0",
                             f"paths.cache_dir={ROOT / '.cache'}"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)


def _on_a_terminal(folder, limit):
    """Run with stderr on a pseudo-terminal; returns (exit status, what the terminal showed)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a terminal has a size
    proc = _evaluate(folder, limit, stderr=slave)
    os.close(slave)
    chunks = []

    def read():
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # the terminal closed with the process
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read)
    reader.start()
    proc.communicate(timeout=300)
    reader.join(timeout=30)
    os.close(master)
    return proc.returncode, b"".join(chunks).decode("utf-8", "replace")


def test_a_log_line_when_stderr_is_not_a_terminal(tmp_path):
    proc = _evaluate(tmp_path / "eval", 6)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert re.search(r"easyvqa\.jsonl: 6/6 answered \([\d.]+ questions/s", out + err), (out + err)[-3000:]
    assert "|" not in err  # no bar drawn into a log


def test_a_bar_on_a_terminal_counting_resumed_answers(tmp_path):
    folder = tmp_path / "eval"
    rc, shown = _on_a_terminal(folder, 4)
    assert rc == 0, shown[-3000:]
    assert re.search(r"easyvqa\.jsonl: 100%\|[^|]*\| 4/4", shown), shown[-3000:]
    # the same folder with more questions: the 4 answered ones count from the start
    rc, shown = _on_a_terminal(folder, 8)
    assert rc == 0, shown[-3000:]
    counts = [int(n) for n in re.findall(r"easyvqa\.jsonl:\s+\d+%\|[^|]*\|\s*(\d+)/8", shown)]
    assert counts and counts[0] == 4 and counts[-1] == 8, shown[-3000:]
    assert "answered (" not in shown  # no periodic log line on a terminal
