"""A numpy-packed index over a LLaVA records file (JSON array or JSON lines).

LLaVA keeps ``json.load(open(data_path))`` -- 665K Python dicts -- in the dataset. Every forked
dataloader worker then slowly copies that heap (reference counts and the cyclic GC write to every
object), ~720 MB per worker after one pass. Here the file is scanned once, in fixed-size chunks,
and only four numpy arrays survive (~24 bytes a record, ~16 MB for 665K records):

* ``offsets`` (int64) / ``nbytes`` (int32): where each record's JSON text lives in the file;
* ``lengths`` (int32): LLaVA's modality length (word count, negative for text-only records);
* ``positions`` (int32): the record's position in the file (for messages).

A record is read back with ``os.pread`` and ``json.loads`` when a worker needs it, so no parsed
record stays alive in the parent and the workers share nothing but a few numpy buffers. ``pread``
(rather than ``mmap``) keeps the file's page cache out of every worker's private memory.

Records that fail :func:`llava_san.data.records.check_record` are left out of the index and
counted by reason (``bad_counts``, ``bad_examples``); with ``on_bad_sample="raise"`` the first one
raises. A non-UTF-8 or malformed file always raises ``ValueError`` naming the file, line and column.
"""
from __future__ import annotations

import codecs
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import numpy as np

from .errors import BadSample, BadSampleError
from .records import check_record

_CHUNK = 8 << 20  # bytes decoded at a time while scanning
_MAX_RECORD = 64 << 20  # a single record larger than this is treated as malformed JSON
_WS = " \t\n\r"


@dataclass
class IndexStats:
    """What the scan found: records kept, records left out (by reason, with a few messages)."""

    total: int = 0
    kept: int = 0
    bad_counts: dict[str, int] = field(default_factory=dict)
    bad_examples: dict[str, list[str]] = field(default_factory=dict)
    build_seconds: float = 0.0

    @property
    def bad(self) -> int:
        """Number of records left out."""
        return sum(self.bad_counts.values())


class RecordIndex:
    """Packed index of one records file; ``index[i]`` parses and returns record ``i``.

    Build it with :meth:`build`; take train/val splits with :meth:`subset`. The object is cheap to
    pickle (spawned workers) and re-opens the file lazily in each process.
    """

    def __init__(self, path: str, offsets: np.ndarray, nbytes: np.ndarray, lengths: np.ndarray,
                 positions: np.ndarray, file_size: int, file_mtime_ns: int,
                 stats: Optional[IndexStats] = None):
        self.path = os.fspath(path)
        self.offsets = np.ascontiguousarray(offsets, dtype=np.int64)
        self.nbytes = np.ascontiguousarray(nbytes, dtype=np.int32)
        self.lengths = np.ascontiguousarray(lengths, dtype=np.int32)
        self.positions = np.ascontiguousarray(positions, dtype=np.int32)
        self.file_size = int(file_size)
        self.file_mtime_ns = int(file_mtime_ns)
        self.stats = stats or IndexStats(total=len(self.offsets), kept=len(self.offsets))
        self._fd: Optional[int] = None
        self._fd_pid: Optional[int] = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, path: str, on_bad_sample: str = "skip", max_examples: int = 5,
              check: Optional[Callable[[Any, int, str], int]] = None) -> "RecordIndex":
        """Scan ``path`` (a JSON array of records, or JSON lines) into a packed index.

        Args:
            path: the records file (``llava_v1_5_mix665k.json`` or a ``.jsonl``).
            on_bad_sample: ``"skip"`` leaves structurally bad records out (counted in ``stats``);
                ``"raise"`` raises :class:`BadSampleError` on the first one.
            max_examples: messages kept per reason for the report.
            check: ``check(record, position, path) -> length`` raising :class:`BadSample`; default
                :func:`~llava_san.data.records.check_record` (LLaVA records). The length is what the
                sampler groups by (LLaVA's modality length: negative for text-only records).

        Raises:
            ValueError: the file is not UTF-8 or not valid JSON (names file, line, column).
        """
        if on_bad_sample not in ("skip", "raise"):
            raise ValueError(f"on_bad_sample must be 'skip' or 'raise', got {on_bad_sample!r}")
        check = check or check_record
        path = os.fspath(path)
        t0 = time.perf_counter()
        st = os.stat(path)
        stats = IndexStats()
        # Small Python buffers flushed into numpy blocks keep the peak low for 665K records.
        buf_off, buf_len, buf_mlen, buf_pos = [], [], [], []
        chunks_off, chunks_len, chunks_mlen, chunks_pos = [], [], [], []

        def flush():
            if buf_off:
                chunks_off.append(np.asarray(buf_off, np.int64))
                chunks_len.append(np.asarray(buf_len, np.int32))
                chunks_mlen.append(np.asarray(buf_mlen, np.int32))
                chunks_pos.append(np.asarray(buf_pos, np.int32))
                buf_off.clear(), buf_len.clear(), buf_mlen.clear(), buf_pos.clear()

        for position, (start, length, rec) in enumerate(_scan(path)):
            stats.total += 1
            try:
                mlen = check(rec, position, path)
            except BadSample as bad:
                if on_bad_sample == "raise":
                    raise BadSampleError(bad.message, bad.reason) from None
                stats.bad_counts[bad.reason] = stats.bad_counts.get(bad.reason, 0) + 1
                examples = stats.bad_examples.setdefault(bad.reason, [])
                if len(examples) < max_examples:
                    examples.append(bad.message)
                continue
            if length >= 2**31:
                raise ValueError(f"{path}: record #{position} is larger than 2 GiB")
            buf_off.append(start)
            buf_len.append(length)
            buf_mlen.append(mlen)
            buf_pos.append(position)
            if len(buf_off) >= 65536:
                flush()
            del rec
        flush()

        def cat(parts, dtype):
            return np.concatenate(parts) if parts else np.zeros(0, dtype)

        index = cls(path, cat(chunks_off, np.int64), cat(chunks_len, np.int32), cat(chunks_mlen, np.int32),
                    cat(chunks_pos, np.int32), st.st_size, st.st_mtime_ns, stats)
        stats.kept = len(index)
        stats.build_seconds = time.perf_counter() - t0
        return index

    def subset(self, rows: np.ndarray) -> "RecordIndex":
        """A new index over ``rows`` of this one (copies the small arrays, shares the file)."""
        rows = np.asarray(rows, dtype=np.int64)
        sub = RecordIndex(self.path, self.offsets[rows], self.nbytes[rows], self.lengths[rows],
                          self.positions[rows], self.file_size, self.file_mtime_ns, self.stats)
        return sub

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.offsets)

    @property
    def has_image(self) -> np.ndarray:
        """Boolean array: record ``i`` has an image."""
        return self.lengths > 0

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the packed arrays."""
        return sum(a.nbytes for a in (self.offsets, self.nbytes, self.lengths, self.positions))

    def raw(self, i: int) -> bytes:
        """The JSON text of record ``i`` (one ``pread``)."""
        fd = self._open()
        n = int(self.nbytes[i])
        data = os.pread(fd, n, int(self.offsets[i]))
        if len(data) != n:
            raise ValueError(f"{self.path}: short read for record #{int(self.positions[i])} "
                             "(file changed since the index was built?)")
        return data

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Parse and return record ``i`` (a fresh dict; nothing is cached)."""
        return json.loads(self.raw(i))

    def position(self, i: int) -> int:
        """Position of record ``i`` in the file."""
        return int(self.positions[i])

    def _open(self) -> int:
        pid = os.getpid()
        if self._fd is None or self._fd_pid != pid:  # one descriptor per process (fork-safe)
            st = os.stat(self.path)
            if st.st_size != self.file_size or st.st_mtime_ns != self.file_mtime_ns:
                raise ValueError(f"{self.path} changed since its index was built "
                                 f"(size {self.file_size} -> {st.st_size}); rebuild the index")
            self._fd = os.open(self.path, os.O_RDONLY)
            self._fd_pid = pid
        return self._fd

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fd"] = None
        state["_fd_pid"] = None
        return state

    def __del__(self):
        fd, pid = getattr(self, "_fd", None), getattr(self, "_fd_pid", None)
        if fd is not None and pid == os.getpid():
            try:
                os.close(fd)
            except OSError:
                pass


# ---------------------------------------------------------------------- scanning
def _scan(path: str) -> Iterator[tuple[int, int, Any]]:
    """Yield ``(byte_offset, byte_length, parsed_record)`` for every record of the file."""
    with open(path, "rb") as f:
        head = f.read(4096)
    start = 3 if head.startswith(codecs.BOM_UTF8) else 0
    first = head[start:].lstrip()[:1]
    if first == b"[":
        yield from _scan_array(path, start)
    elif first in (b"{", b""):
        if first == b"{" and _one_json_object(path, start):
            raise ValueError(f"{path}: the top level is a JSON object; a records file must be a JSON array "
                             "of records ([{...}, {...}], as llava_v1_5_mix665k.json) or JSON lines (one "
                             "record per line)")
        yield from _scan_lines(path, start)
    else:
        raise ValueError(f"{path}: not a JSON array or JSON-lines records file "
                         f"(starts with {first!r})")


def _one_json_object(path: str, bom: int, limit: int = 64 << 20) -> bool:
    """Whether a file that starts with ``{`` is one JSON object (e.g. ``{"data": [...]}``) rather than
    JSON lines: its first line is not a complete value, or the whole file parses as one object."""
    with open(path, "rb") as f:
        f.seek(bom)
        first = f.readline()
        rest = f.read(limit)
    try:
        obj = json.loads(first)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return True  # an object spread over several lines (pretty-printed)
    # one line, one object, and not a record: a wrapper such as {"data": [...]}
    return not rest.strip() and isinstance(obj, dict) and "conversations" not in obj


class _Reader:
    """Decodes a file in chunks and maps character positions back to byte offsets."""

    def __init__(self, f, path: str):
        self.f, self.path = f, path
        self.size = os.fstat(f.fileno()).st_size

    def load(self, byte_pos: int, size: int) -> None:
        """Decode ``size`` bytes (fewer at EOF / at a split multi-byte char) from ``byte_pos``."""
        self.f.seek(byte_pos)
        data = self.f.read(size)
        self.base = byte_pos
        self.eof = byte_pos + len(data) >= self.size
        try:
            self.text, used = codecs.utf_8_decode(data, "strict", self.eof)
        except UnicodeDecodeError as e:
            raise ValueError(_locate(self.path, byte_pos + e.start,
                                     f"not valid UTF-8 ({e.reason}, byte 0x{data[e.start]:02x})")) from None
        self.end_byte = byte_pos + used
        self.ascii = len(self.text) == used
        self._c, self._b = 0, byte_pos  # last (char, byte) pair mapped

    def byte_at(self, char_pos: int) -> int:
        """Byte offset in the file of character ``char_pos`` of the current chunk."""
        if self.ascii:
            return self.base + char_pos
        if char_pos < self._c:
            self._c, self._b = 0, self.base
        self._b += len(self.text[self._c:char_pos].encode("utf-8"))
        self._c = char_pos
        return self._b


def _skip_ws(text: str, pos: int) -> int:
    n = len(text)
    while pos < n and text[pos] in _WS:
        pos += 1
    return pos


def _scan_array(path: str, bom: int) -> Iterator[tuple[int, int, Any]]:
    decoder = json.JSONDecoder()
    with open(path, "rb") as f:
        r = _Reader(f, path)
        r.load(bom, _CHUNK)
        pos = _skip_ws(r.text, 0)
        pos += 1  # the "[" checked by _scan
        chunk = _CHUNK
        expect_value = True  # after "[" or ","
        seen_any = False
        while True:
            pos = _skip_ws(r.text, pos)
            if pos >= len(r.text):
                if r.eof:
                    raise ValueError(_locate(path, r.end_byte,
                                             "unexpected end of file inside the top-level array"))
                r.load(r.byte_at(pos), chunk)
                pos = 0
                continue
            ch = r.text[pos]
            if ch == "]" and (not expect_value or not seen_any):
                _check_trailing(path, r.byte_at(pos + 1))
                return
            if not expect_value:
                if ch != ",":
                    raise ValueError(_locate(path, r.byte_at(pos),
                                             f"expected ',' or ']' between records, got {ch!r}"))
                expect_value = True
                pos += 1
                continue
            try:
                try:
                    rec, end = decoder.raw_decode(r.text, pos)
                except RecursionError:
                    raise ValueError(_locate(path, r.byte_at(pos), "a record nested deeper than the JSON "
                                             "parser allows (Python's recursion limit)")) from None
                # An object is complete once raw_decode returns; a scalar ending at the chunk end
                # might continue in the next chunk, so re-read in that case.
                complete = end < len(r.text) or r.eof
            except json.JSONDecodeError as e:
                # Errors caused by the chunk cut are reported at (or near) the cut, or as an
                # unterminated string; anything else is a real syntax error.
                truncated = e.pos >= len(r.text) - 16 or e.msg.startswith("Unterminated string")
                if r.eof or not truncated:
                    raise ValueError(_locate(path, r.byte_at(e.pos), e.msg)) from None
                complete = False
            if not complete:  # the record runs past this chunk: re-read from its start, larger
                start_byte = r.byte_at(pos)
                if pos == 0:
                    chunk *= 2
                    if chunk > _MAX_RECORD:
                        too_big = f"record larger than {_MAX_RECORD >> 20} MiB or malformed JSON"
                        raise ValueError(_locate(path, start_byte, too_big))
                r.load(start_byte, chunk)
                pos = 0
                continue
            start_byte = r.byte_at(pos)
            end_byte = r.byte_at(end)
            yield start_byte, end_byte - start_byte, rec
            del rec
            chunk = _CHUNK
            seen_any = True
            expect_value = False
            pos = end


def _scan_lines(path: str, bom: int) -> Iterator[tuple[int, int, Any]]:
    with open(path, "rb") as f:
        f.seek(bom)
        offset = bom
        for lineno, line in enumerate(f, start=1):
            stripped = line.strip()
            if stripped:
                try:
                    text = stripped.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"{path}: line {lineno}: not valid UTF-8 ({e.reason})") from None
                try:
                    rec = json.loads(text)
                except RecursionError:
                    raise ValueError(f"{path}: line {lineno}: a record nested deeper than the JSON parser "
                                     "allows (Python's recursion limit)") from None
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {lineno} column {e.colno}: invalid JSON: {e.msg}") \
                        from None
                lead = len(line) - len(line.lstrip())
                yield offset + lead, len(stripped), rec
            offset += len(line)


def _check_trailing(path: str, byte_pos: int) -> None:
    """Only whitespace may follow the closing ``]``."""
    with open(path, "rb") as f:
        f.seek(byte_pos)
        at = byte_pos
        while block := f.read(1 << 20):
            extra = block.lstrip(b" \t\r\n")
            if extra:
                raise ValueError(_locate(path, at + len(block) - len(extra),
                                         "extra data after the top-level array"))
            at += len(block)


def _locate(path: str, byte_pos: int, msg: str) -> str:
    """``"<path>: line L column C (byte B): msg"`` -- computed only on the error path."""
    line, last_nl, done = 1, -1, 0
    with open(path, "rb") as f:
        while done < byte_pos:
            block = f.read(min(1 << 20, byte_pos - done))
            if not block:
                break
            nl = block.count(b"\n")
            if nl:
                line += nl
                last_nl = done + block.rfind(b"\n")
            done += len(block)
    return (f"{path}: line {line} column {byte_pos - last_nl} (byte {byte_pos}): "
            f"invalid JSON records file: {msg}")
