"""The packed record index: exact records back, LLaVA lengths, bad records, bad files, memory."""
import gc
import json
import pickle

import numpy as np
import pytest

import llava_san.data.index as index_mod
from llava_san.data import BadSampleError, RecordIndex
from llava_san.data.records import modality_length


def llava_modality_lengths(records):
    """Reference: LLaVA ``LazySupervisedDataset.modality_lengths``."""
    out = []
    for sample in records:
        cur_len = sum(len(conv["value"].split()) for conv in sample["conversations"])
        out.append(cur_len if "image" in sample else -cur_len)
    return out


def make_records(n, seed=0):
    rng = np.random.default_rng(seed)
    words = ["the", "shape", "blue", "größe", "円", "😀", "a\tb", "x\u3000y", "line\nbreak", "\"quoted\"",
             "back\\slash"]
    recs = []
    for i in range(n):
        conv = []
        for t in range(int(rng.integers(1, 4))):
            q = " ".join(rng.choice(words, int(rng.integers(1, 12))))
            conv.append({"from": "human", "value": ("<image>\n" + q) if t == 0 and i % 3 else q})
            conv.append({"from": "gpt", "value": " ".join(rng.choice(words, int(rng.integers(1, 30))))})
        rec = {"id": f"r{i}", "conversations": conv}
        if i % 3:
            rec["image"] = f"coco/train2017/{i:012d}.jpg"
        recs.append(rec)
    return recs


@pytest.mark.parametrize("fmt", ["array_indent", "array_compact", "jsonl", "bom"])
@pytest.mark.parametrize("chunk", [64, 8 << 20])
def test_index_returns_exact_records(tmp_path, monkeypatch, fmt, chunk):
    monkeypatch.setattr(index_mod, "_CHUNK", chunk)  # tiny chunks: records straddle every boundary
    recs = make_records(300)
    path = tmp_path / "data.json"
    if fmt == "array_indent":
        path.write_text(json.dumps(recs, indent=2, ensure_ascii=False), encoding="utf-8")
    elif fmt == "array_compact":
        path.write_text(json.dumps(recs, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    elif fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in recs) + "\n\n", encoding="utf-8")
    else:
        path.write_bytes(b"\xef\xbb\xbf" + json.dumps(recs, ensure_ascii=True).encode())
    idx = RecordIndex.build(str(path))
    assert len(idx) == 300 and idx.stats.total == 300 and idx.stats.bad == 0
    assert [idx[i] for i in range(300)] == recs
    assert idx.lengths.tolist() == llava_modality_lengths(recs) == [modality_length(r) for r in recs]
    assert idx.has_image.tolist() == ["image" in r for r in recs]
    assert idx.positions.tolist() == list(range(300))


def test_subset_and_pickle(tmp_path):
    recs = make_records(50)
    path = tmp_path / "d.json"
    path.write_text(json.dumps(recs))
    idx = RecordIndex.build(str(path))
    sub = idx.subset(np.array([5, 1, 40]))
    assert [sub[i]["id"] for i in range(3)] == ["r5", "r1", "r40"] and sub.position(2) == 40
    clone = pickle.loads(pickle.dumps(sub))  # spawned workers
    assert clone._fd is None and clone[0] == recs[5]


def test_changed_file_is_detected(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(make_records(5)))
    idx = RecordIndex.build(str(path))
    path.write_text(json.dumps(make_records(6)))
    with pytest.raises(ValueError, match="changed since its index was built"):
        idx[0]


BAD = [
    ({"id": "nc"}, "missing_conversations"),
    ({"id": "empty", "conversations": []}, "missing_conversations"),
    ({"id": "role", "conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]},
     "unknown_role"),
    ({"id": "blank", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "  "}]},
     "empty_answer"),
    ({"id": "order", "conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q2"},
                                       {"from": "gpt", "value": "a"}]}, "bad_turn_order"),
    ({"id": "noans", "conversations": [{"from": "human", "value": "q"}]}, "no_answer"),
    ({"id": "val", "conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}]},
     "invalid_record"),
    ({"id": "img", "image": ["a.jpg", "b.jpg"],
      "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, "invalid_record"),
    ("not an object", "invalid_record"),
]


def test_bad_records_skipped_and_counted(tmp_path):
    good = make_records(200)
    recs = good[:100] + [b for b, _ in BAD] + good[100:]
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(recs))
    idx = RecordIndex.build(str(path))
    assert len(idx) == 200 and idx.stats.total == 200 + len(BAD)
    expected = {}
    for _, reason in BAD:
        expected[reason] = expected.get(reason, 0) + 1
    assert idx.stats.bad_counts == expected
    assert [idx[i] for i in range(200)] == good
    for (rec, reason) in BAD:
        msgs = idx.stats.bad_examples[reason]
        assert all(str(path) in m for m in msgs)
        if isinstance(rec, dict):
            assert any(f"id={rec['id']!r}" in m for m in msgs), (reason, msgs)
    assert idx.positions[100] == 100 + len(BAD)  # file positions survive the skips


@pytest.mark.parametrize("rec,reason", BAD[:6])
def test_bad_record_raise_policy(tmp_path, rec, reason):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(make_records(3) + [rec]))
    with pytest.raises(BadSampleError, match=rf"\[{reason}\].*id='{rec['id']}' \(#3\) in .*bad.json"):
        RecordIndex.build(str(path), on_bad_sample="raise")


@pytest.mark.parametrize("content,what", [
    (b'[{"id": "a", "conversations": []},\n {"id": "b" "conversations": []}]', "line 2"),
    (b'[{"id": "a", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}',
     "end of file"),
    (b'[{"id": "a"}, ]', "line 1"),
    (b'[{"id": "a"}]\ngarbage', "extra data"),
    (b'[{"id": "a", "conversations": "caf\xe9"}]', "not valid UTF-8"),
    (b'{"id": "a"}\n{"id": "b" oops}\n', "line 2"),
    (b'{"id": "a"}\n{"id": "\xff"}\n', "not valid UTF-8"),
    (b"hello", "not a JSON array"),
])
def test_malformed_files_raise_with_location(tmp_path, monkeypatch, content, what):
    monkeypatch.setattr(index_mod, "_CHUNK", 16)
    path = tmp_path / "broken.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=what) as e:
        RecordIndex.build(str(path))
    assert "broken.json" in str(e.value)


def test_non_utf8_deep_in_a_large_file_reports_its_line(tmp_path):
    recs = make_records(2000)
    text = json.dumps(recs, indent=1, ensure_ascii=False).encode()
    pos = text.index(b'"r1500"')
    line = text[:pos].count(b"\n") + 1
    path = tmp_path / "latin1.json"
    path.write_bytes(text[:pos] + b'"r\xe9"' + text[pos + len(b'"r1500"'):])
    with pytest.raises(ValueError, match=rf"latin1.json: line {line} column \d+ .*not valid UTF-8"):
        RecordIndex.build(str(path))


def test_index_memory_is_packed(tmp_path):
    recs = make_records(10000, seed=3)
    path = tmp_path / "big.json"
    path.write_text(json.dumps(recs))
    del recs
    gc.collect()
    before = len(gc.get_objects())
    idx = RecordIndex.build(str(path))
    gc.collect()
    after = len(gc.get_objects())
    assert after - before < 200  # no per-record Python objects survive the build
    assert idx.memory_bytes / len(idx) <= 20  # int64 + 3 x int32 per record
    assert all(isinstance(getattr(idx, a), np.ndarray) for a in ("offsets", "nbytes", "lengths", "positions"))
