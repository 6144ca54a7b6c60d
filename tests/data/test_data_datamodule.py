"""End to end: real files -> LlavaDataModule -> batches the tiny LLaVA trains on; bad input; resume."""
import json
import logging
import os

import lightning as L
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from llava_san.data import (IGNORE_INDEX, BadSampleError, LlavaCollator, LlavaDataModule,
                            TooManyBadSamplesError)
from llava_san.models import build_tiny_llava

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
N_GOOD_IMG, N_TEXT = 28, 10


@pytest.fixture(scope="module")
def model_and_processor():
    return build_tiny_llava(seed=0)


def _conv(q, a, image=False):
    return [{"from": "human", "value": ("<image>\n" if image else "") + q}, {"from": "gpt", "value": a}]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Real PNG/JPEG/CMYK/palette/RGBA files, good and bad records (ids say what they are)."""
    d = tmp_path_factory.mktemp("llava_data")
    img = d / "coco" / "train2017"
    img.mkdir(parents=True)
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 256, (40, 64, 3), dtype=np.uint8), "RGB")
    base.save(img / "rgb.png")
    base.save(img / "rgb.jpg", quality=90)
    base.convert("CMYK").save(img / "cmyk.jpg")
    base.convert("P", palette=Image.Palette.ADAPTIVE, colors=8).save(img / "pal.png", transparency=0)
    base.convert("RGBA").save(img / "rgba.png")
    data = (img / "rgb.jpg").read_bytes()
    (img / "trunc.jpg").write_bytes(data[: len(data) // 3])
    names = ["rgb.png", "rgb.jpg", "cmyk.jpg", "pal.png", "rgba.png"]
    recs = []
    for i in range(N_GOOD_IMG):
        recs.append({"id": f"img{i}", "image": f"coco/train2017/{names[i % 5]}",
                     "conversations": _conv(f"what color is shape {i}?", ["blue", "red", "green"][i % 3],
                                            True)
                     + _conv("is it a circle?", "yes" if i % 2 else "no")})
    for i in range(N_TEXT):
        recs.append({"id": f"txt{i}",
                     "conversations": _conv(f"tell me about number {i}", "it is a number " * (1 + i))})
    runtime_bad = [
        {"id": "missing", "image": "coco/train2017/nope.jpg", "conversations": _conv("q?", "a", True)},
        {"id": "trunc", "image": "coco/train2017/trunc.jpg", "conversations": _conv("q?", "a", True)},
        {"id": "longq", "image": "coco/train2017/rgb.png",
         "conversations": _conv("what " * 300 + "?", "blue", True)},  # answer falls past model_max_length
    ]
    index_bad = [
        {"id": "noconv", "image": "coco/train2017/rgb.png"},
        {"id": "role", "conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]},
        {"id": "empty", "conversations": _conv("q", "")},
    ]
    order = np.random.default_rng(1).permutation(len(recs) + 6)
    allrecs = recs + runtime_bad + index_bad
    (d / "mixed.json").write_text(json.dumps([allrecs[i] for i in order], indent=2))
    (d / "clean.json").write_text(json.dumps(recs, indent=2))
    (d / "runtime_bad.json").write_text(json.dumps(recs + runtime_bad))
    return d


def make_dm(data_dir, processor, file="clean.json", **kw):
    args = dict(train_file=str(data_dir / file), image_folder=str(data_dir), batch_size=4, num_workers=0,
                seed=0, model_max_length=120, processor=processor)
    args.update(kw)
    return LlavaDataModule(**args)


def all_batches(loader):
    return [b for b in loader]


def test_batches_contract_and_model_forward(data_dir, model_and_processor):
    model, processor = model_and_processor
    dm = make_dm(data_dir, processor)
    batches = all_batches(dm.train_dataloader())
    assert sum(b["input_ids"].shape[0] for b in batches) == N_GOOD_IMG + N_TEXT
    pad = processor.tokenizer.pad_token_id
    kinds = set()
    for b in batches:
        ids, am, lab = b["input_ids"], b["attention_mask"], b["labels"]
        assert ids.dtype == am.dtype == lab.dtype == torch.long and ids.shape == am.shape == lab.shape
        lengths = am.sum(1)
        for row, n in enumerate(lengths.tolist()):  # right padding
            assert am[row, :n].all() and not am[row, n:].any()
            assert (ids[row, n:] == pad).all() and (lab[row, n:] == IGNORE_INDEX).all()
        n_img_tokens = (ids == processor.image_token_id).sum(1)
        if "pixel_values" in b:
            kinds.add("image")
            assert (n_img_tokens == 16).all()  # never mixed: every sample of the batch has its image
            assert b["pixel_values"].shape == (ids.shape[0], 3, 64, 64)
        else:
            kinds.add("text")
            assert (n_img_tokens == 0).all()
    assert kinds == {"image", "text"}
    with torch.no_grad():
        image_batch = next(b for b in batches if "pixel_values" in b)
        text_batch = next(b for b in batches if "pixel_values" not in b)
        for b in (image_batch, text_batch):
            out = model(**b)
            assert torch.isfinite(out.loss)


def test_collator_mixed_batch_and_empty(model_and_processor):
    _, processor = model_and_processor
    col = LlavaCollator(processor.tokenizer.pad_token_id)
    s1 = {"input_ids": torch.tensor([1, 5, 6]), "labels": torch.tensor([-100, 5, 6]),
          "pixel_values": torch.zeros(3, 64, 64)}
    s2 = {"input_ids": torch.tensor([1, 7]), "labels": torch.tensor([-100, 7]), "pixel_values": None}
    b = col([s1, None, s2])
    assert b["input_ids"].tolist() == [[1, 5, 6], [1, 7, processor.tokenizer.pad_token_id]]
    assert b["labels"].tolist() == [[-100, 5, 6], [-100, 7, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert b["pixel_values"].shape == (1, 3, 64, 64)
    assert "pixel_values" not in col([s2])
    empty = col([None, None])
    assert empty["input_ids"].shape == (0, 0)


def test_bad_samples_skipped_counted_and_named(data_dir, model_and_processor, caplog):
    _, processor = model_and_processor
    dm = make_dm(data_dir, processor, file="mixed.json", max_bad_fraction=0.5)
    with caplog.at_level(logging.WARNING):
        dm.setup()
        loader = dm.train_dataloader()
        n = sum(b["input_ids"].shape[0] for b in loader)
    assert n == N_GOOD_IMG + N_TEXT
    stats = dm.index_stats[str(data_dir / "mixed.json")]
    assert stats["bad_by_reason"] == {"missing_conversations": 1, "unknown_role": 1, "empty_answer": 1}
    (report,) = dm.bad_sample_reports()
    assert report["bad_by_reason"] == {"missing_image": 1, "corrupt_image": 1, "no_trained_tokens": 1}
    assert report["seen"] == N_GOOD_IMG + N_TEXT + 3
    text = caplog.text
    path = str(data_dir / "mixed.json")
    for rid, what in [("missing", "nope.jpg"), ("trunc", "trunc.jpg"), ("longq", "no trained token"),
                      ("noconv", "no 'conversations'"), ("role", "'bot'"), ("empty", "empty")]:
        line = next(ln for ln in text.splitlines() if f"id={rid!r}" in ln)
        assert path in line and what in line, line
    assert "train epoch 0" in text and "'missing_image': 1" in text


def test_counters_aggregate_across_workers(data_dir, model_and_processor):
    _, processor = model_and_processor
    dm = make_dm(data_dir, processor, file="runtime_bad.json", num_workers=2, max_bad_fraction=0.5)
    n = sum(b["input_ids"].shape[0] for b in dm.train_dataloader())
    assert n == N_GOOD_IMG + N_TEXT
    (report,) = dm.bad_sample_reports()
    assert report["bad_by_reason"] == {"missing_image": 1, "corrupt_image": 1, "no_trained_tokens": 1}
    assert report["seen"] == N_GOOD_IMG + N_TEXT + 3


def test_too_many_bad_samples_fail(data_dir, model_and_processor):
    _, processor = model_and_processor
    with pytest.raises(TooManyBadSamplesError, match="3 of 44 records are invalid"):
        make_dm(data_dir, processor, file="mixed.json").setup()  # default max_bad_fraction=1%
    dm = make_dm(data_dir, processor, file="runtime_bad.json", max_bad_fraction=0.05)
    with pytest.raises(TooManyBadSamplesError, match=r"exceed max_bad_fraction=5\.00%"):
        all_batches(dm.train_dataloader())


def test_raise_policy_names_record_and_file(data_dir, model_and_processor):
    _, processor = model_and_processor
    with pytest.raises(BadSampleError, match=r"id='(noconv|role|empty)' .* in .*mixed.json"):
        make_dm(data_dir, processor, file="mixed.json", on_bad_sample="raise").setup()
    for workers in (0, 2):
        dm = make_dm(data_dir, processor, file="runtime_bad.json", on_bad_sample="raise", num_workers=workers)
        with pytest.raises(BadSampleError, match=r"id='(missing|trunc|longq)' .*runtime_bad.json"):
            all_batches(dm.train_dataloader())


def test_val_split_and_val_loader(data_dir, model_and_processor):
    _, processor = model_and_processor
    dm = make_dm(data_dir, processor, val_fraction=0.25)
    dm.setup()
    n_train, n_val = len(dm.train_dataset), len(dm.val_dataset)
    assert n_train + n_val == N_GOOD_IMG + N_TEXT and n_val == round(0.25 * (N_GOOD_IMG + N_TEXT))
    train_pos = set(dm.train_dataset.index.positions.tolist())
    assert not train_pos & set(dm.val_dataset.index.positions.tolist())
    assert sum(b["input_ids"].shape[0] for b in dm.val_dataloader()) == n_val
    assert make_dm(data_dir, processor).val_dataloader() == []


def test_resume_mid_epoch_reproduces_the_rest(data_dir, model_and_processor):
    _, processor = model_and_processor
    dm = make_dm(data_dir, processor, seed=3)
    loader = dm.train_dataloader()
    loader.batch_sampler.set_epoch(2)
    it = iter(loader)
    head = [next(it) for _ in range(3)]
    state = dm.state_dict()
    assert state["train"]["epoch"] == 2 and state["train"]["batches_consumed"] == 3
    rest = list(it)
    dm2 = make_dm(data_dir, processor, seed=3)
    dm2.load_state_dict(state)
    resumed = all_batches(dm2.train_dataloader())
    assert len(resumed) == len(rest) and len(head) + len(rest) == len(loader)
    for a, b in zip(resumed, rest):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    with pytest.raises(ValueError, match="batch_size: saved 4 != now 2"):
        dm3 = make_dm(data_dir, processor, seed=3, batch_size=2)
        dm3.load_state_dict(state)
        dm3.train_dataloader()


class _Recorder(L.LightningModule):
    def __init__(self, model):
        super().__init__()
        self.model = model
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["input_ids"].sum().item())
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def test_lightning_fit_and_resume_from_mid_epoch_checkpoint(data_dir, tmp_path):
    """Lightning restores the loader position from a checkpoint: no batch repeated or lost."""
    def trainer(callbacks=None):
        return L.Trainer(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
                         callbacks=callbacks, enable_checkpointing=callbacks is not None)

    model, processor = build_tiny_llava(seed=0)
    full = _Recorder(model)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1,
                                               filename="{step}")
    trainer(callbacks=[ckpt]).fit(full, datamodule=make_dm(data_dir, processor, seed=1))
    per_epoch = len(full.seen) // 2
    assert per_epoch == 10  # 28 image + 10 text samples -> 7 + 3 batches of <= 4
    for step in (4, 12):  # mid epoch 0, mid epoch 1
        model2, _ = build_tiny_llava(seed=0)
        resumed = _Recorder(model2)
        trainer().fit(resumed, datamodule=make_dm(data_dir, processor, seed=1),
                      ckpt_path=str(tmp_path / f"step={step}.ckpt"))
        assert resumed.seen == full.seen[step:]


def test_hydra_configs_instantiate(tmp_path, model_and_processor):
    _, processor = model_and_processor
    for name, expect in [("easyvqa", "EasyVQADataModule"), ("mvit665k", "LlavaDataModule")]:
        data = OmegaConf.load(os.path.join(ROOT, "conf", "data", f"{name}.yaml"))
        cfg = OmegaConf.create({"paths": {"cache_dir": str(tmp_path / "cache"), "data_dir": "/data/llava"},
                                "seed": 7, "data": data})
        dm = instantiate(cfg.data, processor=processor)
        assert type(dm).__name__ == expect and dm.seed == 7 and dm.processor is processor
        assert dm.template == "vicuna_v1" and dm.model_max_length == 2048 and dm.batch_size == 16
        if name == "mvit665k":
            assert dm.train_file == "/data/llava/llava_v1_5_mix665k.json" and dm.image_folder == "/data/llava"
            assert dm.num_workers == 4
        else:
            assert dm.cache_dir == str(tmp_path / "cache" / "easyvqa")
    # without paths / seed in the training config the defaults apply
    data = OmegaConf.load(os.path.join(ROOT, "conf", "data", "mvit665k.yaml"))
    dm = instantiate(OmegaConf.create({"data": data}).data, processor=processor)
    assert dm.train_file == "data/llava_v1_5_mix665k.json" and dm.seed == 42


def test_parallel_settings_come_from_the_trainer(data_dir, model_and_processor):
    _, processor = model_and_processor
    kw = dict(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False)
    dm = make_dm(data_dir, processor)
    dm.trainer = L.Trainer(accumulate_grad_batches=3, use_distributed_sampler=False, **kw)
    s = dm.train_dataloader().batch_sampler
    assert (s.world_size, s.rank, s.grad_accum, s.megabatch_size) == (2, 0, 3, 24)
    dm = make_dm(data_dir, processor, grad_accum=1, world_size=1, rank=0)  # explicit overrides win
    dm.trainer = L.Trainer(accumulate_grad_batches=3, use_distributed_sampler=False, **kw)
    s = dm.train_dataloader().batch_sampler
    assert (s.world_size, s.grad_accum) == (1, 1)
    dm = make_dm(data_dir, processor)
    dm.trainer = L.Trainer(**kw)  # Lightning would replace our sharded sampler
    with pytest.raises(ValueError, match="use_distributed_sampler=False"):
        dm.train_dataloader()
