"""The commonsense_170k pipeline (LLM-Adapters format): labels per train_on_inputs, cutoff and EOS, bad
records, the validation split, batches and exact resume of the loader; the csr_tiny generator."""
import json

import pytest
import torch

from llava_san.commonsense import generate_prompt
from llava_san.data.commonsense import CommonsenseDataModule, CommonsensePreprocessor, check_commonsense_record
from llava_san.data.commonsense_synthetic import TASKS, generate_records, prepare_csr_tiny
from llava_san.data.errors import BadSample, BadSampleError, TooManyBadSamplesError
from llava_san.models.llama import tiny_causal_lm_tokenizer

REC = {"instruction": "Please answer the following question with true or false, question: is 7 greater than 3?"
                      "\n\nAnswer format: true/false", "input": "", "output": "the correct answer is true",
       "answer": "true"}


@pytest.fixture(scope="module")
def tok():
    return tiny_causal_lm_tokenizer()


def _llm_adapters(tok, rec, cutoff, train_on_inputs):
    """LLM-Adapters finetune.py's tokenize / generate_and_tokenize_prompt, written out."""
    def tokenize(prompt, add_eos_token=True):
        r = tok(prompt, truncation=True, max_length=cutoff, padding=False, return_tensors=None)
        ids = list(r["input_ids"])
        if ids[-1] != tok.eos_token_id and len(ids) < cutoff and add_eos_token:
            ids.append(tok.eos_token_id)
        return ids
    full = tokenize(generate_prompt(rec["instruction"], rec["input"], rec["output"]))
    labels = list(full)
    if not train_on_inputs:
        n = len(tokenize(generate_prompt(rec["instruction"], rec["input"], ""), add_eos_token=False))
        labels = [-100] * n + labels[n:]
    return full, labels


@pytest.mark.parametrize("train_on_inputs", [True, False])
def test_sample_is_llm_adapters_tokenization(tok, train_on_inputs):
    s = CommonsensePreprocessor(tok, 256, train_on_inputs)(REC)
    ids, labels = _llm_adapters(tok, REC, 256, train_on_inputs)
    assert s["input_ids"].tolist() == ids and s["labels"].tolist() == labels and not s["truncated"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id  # BOS first, EOS appended (room left)
    if train_on_inputs:  # the whole sequence trains (LLM-Adapters' default)
        assert labels == ids
    else:  # only the response (and EOS) trains
        trained = [t for t in labels if t != -100]
        assert tok.decode(trained, skip_special_tokens=True).strip() == "the correct answer is true"
        assert trained[-1] == tok.eos_token_id


def test_cutoff_truncates_without_eos(tok):
    long = dict(REC, instruction=REC["instruction"] + " really" * 300)
    s = CommonsensePreprocessor(tok, 64, True)(long)
    ids, _ = _llm_adapters(tok, long, 64, True)
    assert s["input_ids"].tolist() == ids and len(ids) == 64 and ids[-1] != tok.eos_token_id
    assert s["truncated"]
    # the prompt fills the cutoff: with train_on_inputs=False nothing is left to train
    with pytest.raises(BadSample) as err:
        CommonsensePreprocessor(tok, 64, False)(long)
    assert err.value.reason == "no_trained_tokens"


@pytest.mark.parametrize("rec,reason", [
    ([1, 2], "invalid_record"),
    ({"input": "", "output": "x", "answer": "x"}, "invalid_record"),
    (dict(REC, instruction="  "), "invalid_record"),
    (dict(REC, output=""), "empty_answer"),
    (dict(REC, output=3), "invalid_record"),
    (dict(REC, input="\ud800"), "unencodable_text"),
])
def test_bad_records(rec, reason):
    with pytest.raises(BadSample) as err:
        check_commonsense_record(rec, 4, "f.json")
    assert err.value.reason == reason and "#4" in err.value.message and "f.json" in err.value.message


def test_good_record_without_input_or_answer():
    assert check_commonsense_record({"instruction": "a b", "output": "c"}, 0, "f") == -3  # text-only length


def _write(path, records):
    path.write_text(json.dumps(records))
    return str(path)


def _dm(tok, path, **kw):
    kw = {"batch_size": 4, "num_workers": 0, "seed": 3, "val_set_size": 5, **kw}
    return CommonsenseDataModule(train_file=path, processor=tok, **kw)


def test_bad_records_skipped_with_reasons_or_raised(tmp_path, tok):
    good = generate_records(40, seed=0)
    bad = [[1], {"instruction": "x", "output": ""}, {"instruction": 5, "output": "y"}]
    path = _write(tmp_path / "c.json", good[:20] + bad + good[20:])
    dm = _dm(tok, path, max_bad_fraction=0.1)
    dm.setup()
    st = dm.index_stats[path]
    assert st["total"] == 43 and st["kept"] == 40
    assert st["bad_by_reason"] == {"invalid_record": 2, "empty_answer": 1}
    assert len(dm.train_dataset) == 35 and len(dm.val_dataset) == 5
    with pytest.raises(TooManyBadSamplesError, match="max_bad_fraction"):
        _dm(tok, path, max_bad_fraction=0.05).setup()
    with pytest.raises(BadSampleError, match="invalid_record"):
        _dm(tok, path, on_bad_sample="raise").setup()


def test_runtime_bad_sample_is_counted(tmp_path, tok):
    recs = generate_records(20, seed=0)
    recs[3] = dict(recs[3], instruction=recs[3]["instruction"] + " really" * 400)
    path = _write(tmp_path / "c.json", recs)
    dm = _dm(tok, path, val_set_size=0, train_on_inputs=False, cutoff_len=120, max_bad_fraction=0.5)
    dm.setup()
    samples = [dm.train_dataset[i] for i in range(len(dm.train_dataset))]
    assert samples[3] is None and sum(s is None for s in samples) == 1
    assert dm.train_dataset.counter.totals()["no_trained_tokens"] == 1


def test_val_split_is_deterministic(tmp_path, tok):
    path = _write(tmp_path / "c.json", generate_records(60, seed=0))

    def val_positions(seed, n=7):
        dm = _dm(tok, path, seed=seed, val_set_size=n)
        dm.setup()
        idx = dm.val_dataset.index
        train = set(dm.train_dataset.index.positions.tolist())
        val = idx.positions.tolist()
        assert not train & set(val) and len(train) + len(val) == 60
        return val

    assert val_positions(3) == val_positions(3) and len(val_positions(3)) == 7
    assert val_positions(3) != val_positions(4)
    with pytest.raises(ValueError, match="val_set_size"):
        val_positions(3, 60)


def test_batches_and_exact_resume(tmp_path, tok):
    path = _write(tmp_path / "c.json", generate_records(50, seed=0))
    dm = _dm(tok, path, val_set_size=2)
    batches = list(dm.train_dataloader())
    assert len(batches) == 12  # 48 / 4
    b = batches[0]
    assert b["input_ids"].shape[1] % 8 == 0  # pad_to_multiple_of=8, as LLM-Adapters' collator
    assert ((b["labels"] == -100) | (b["attention_mask"] == 1)).all() and "pixel_values" not in b
    # the index keeps no parsed record: four packed arrays
    assert dm.train_dataset.index.memory_bytes < 50 * 32
    # resume after 5 batches: the rest is the same batches
    dm2 = _dm(tok, path, val_set_size=2)
    it = iter(dm2.train_dataloader())
    for _ in range(5):
        next(it)
    state = dm2.state_dict()
    dm3 = _dm(tok, path, val_set_size=2)
    dm3.load_state_dict(state)
    rest = list(dm3.train_dataloader())
    assert len(rest) == 7
    for x, y in zip(rest, batches[5:]):
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])


def test_csr_tiny_generator(tmp_path):
    recs = generate_records(80, seed=0)
    assert recs == generate_records(80, seed=0) and recs != generate_records(80, seed=1)
    assert {r["dataset"] for r in recs} == set(TASKS)
    from llava_san.commonsense import extract_answer

    for r in recs:  # LLM-Adapters' format, the answer found by the official extraction in the output
        assert set(r) == {"instruction", "input", "output", "answer", "dataset"}
        assert extract_answer(r["dataset"], r["output"]) == r["answer"]
        check_commonsense_record(r, 0, "x")
    train, test = prepare_csr_tiny(tmp_path, n_train=16, n_test=8, seed=0)
    assert len(json.loads(train.read_text())) == 16 and len(json.loads(test.read_text())) == 8
    mtime = train.stat().st_mtime_ns
    prepare_csr_tiny(tmp_path, n_train=16, n_test=8, seed=0)
    assert train.stat().st_mtime_ns == mtime  # reused
