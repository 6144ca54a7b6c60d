"""The real-model loaders, run on tiny checkpoints written in the real on-disk formats."""
import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoTokenizer, CLIPVisionConfig, CLIPVisionModel, LlamaForCausalLM

from llava_san.models import (
    IMAGE_TOKEN,
    TinyLlavaSpec,
    build_llava_from_parts,
    build_parts_processor,
    build_tiny,
    build_tiny_llava,
    check_model_processor,
    load_llava_hf,
    load_llava_hf_processor,
)
from llava_san.testing.checkpoints import write_tiny_checkpoints, write_tiny_mm_projector, write_tiny_vicuna

SPEC = TinyLlavaSpec()
PROMPT = f"USER: {IMAGE_TOKEN}\nWhat color is the shape? ASSISTANT: red"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return write_tiny_checkpoints(tmp_path_factory.mktemp("ckpts"), SPEC, seed=0)


@pytest.fixture(scope="module")
def parts(ckpts):
    return build_llava_from_parts(ckpts["vicuna"], ckpts["clip"], ckpts["mm_projector"], dtype="float32")


def _images():
    return [Image.new("RGB", (80, 64), (255, 0, 0)), Image.new("RGB", (64, 96), (0, 90, 200))]


def _encode(processor):
    return processor(images=_images(), text=[PROMPT, PROMPT + " and blue"], padding=True, return_tensors="pt")


def _vicuna_state(path: Path) -> dict:
    index = json.loads((path / "pytorch_model.bin.index.json").read_text())
    state = {}
    for shard in sorted(set(index["weight_map"].values())):
        state.update(torch.load(path / shard, weights_only=True))
    return state


def _manual_projector(x, proj):
    h = F.linear(x, proj["model.mm_projector.0.weight"].float(), proj["model.mm_projector.0.bias"].float())
    w2, b2 = proj["model.mm_projector.2.weight"].float(), proj["model.mm_projector.2.bias"].float()
    return F.linear(F.gelu(h), w2, b2)


# ------------------------------------------------------------------------------------------- parts
def test_parts_weights_tokens_and_processor(ckpts, parts):
    model, processor = parts
    tok = processor.tokenizer
    raw_lm = _vicuna_state(ckpts["vicuna"])
    vocab = raw_lm["model.embed_tokens.weight"].shape[0]  # the Vicuna vocabulary (32000 for the real one)

    # the Vicuna-format fixture tokenizer has only the base LLaMA specials, as the real one
    vicuna_tok = AutoTokenizer.from_pretrained(ckpts["vicuna"])
    assert vicuna_tok.pad_token is None and len(vicuna_tok) == vocab
    assert IMAGE_TOKEN not in vicuna_tok.get_vocab() and "<pad>" not in vicuna_tok.get_vocab()
    # tokens: <image> then <pad> appended after the Vicuna vocabulary, as llava-hf
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert model.config.image_token_id == processor.image_token_id == vocab
    assert tok.convert_tokens_to_ids(IMAGE_TOKEN) == vocab
    assert tok.pad_token == "<pad>" and tok.pad_token_id == vocab + 1
    assert len(tok) == model.config.text_config.vocab_size == vocab + 2
    assert (tok.padding_side, tok.model_max_length) == ("right", 2048)

    # language model: every Vicuna tensor is in the model unchanged; new rows are the mean of the old
    lm_state = model.model.language_model.state_dict()
    for key, value in raw_lm.items():
        if key == "lm_head.weight":
            got = model.lm_head.weight
        else:
            got = lm_state[key.removeprefix("model.")]
        if key in ("lm_head.weight", "model.embed_tokens.weight"):
            assert got.shape == (vocab + 2, value.shape[1])
            assert torch.equal(got[:vocab], value)
            mean = value.mean(0)
            assert torch.allclose(got[vocab], mean) and torch.allclose(got[vocab + 1], mean)
        else:
            assert torch.equal(got, value), key
    assert len(lm_state) + 1 == len(raw_lm)

    # vision tower = the CLIP checkpoint's vision_model.* tensors (text tower dropped)
    raw_clip = load_file(ckpts["clip"] / "model.safetensors")
    vt_state = model.model.vision_tower.state_dict()
    vision_keys = {k.removeprefix("vision_model.") for k in raw_clip if k.startswith("vision_model.")}
    assert set(vt_state) == vision_keys
    for key, value in vt_state.items():
        assert torch.equal(value, raw_clip[f"vision_model.{key}"]), key

    # projector = mm_projector.bin (saved in bf16 as LLaVA does)
    proj = torch.load(ckpts["mm_projector"], weights_only=True)
    mmp = model.model.multi_modal_projector
    assert torch.equal(mmp.linear_1.weight, proj["model.mm_projector.0.weight"].float())
    assert torch.equal(mmp.linear_1.bias, proj["model.mm_projector.0.bias"].float())
    assert torch.equal(mmp.linear_2.weight, proj["model.mm_projector.2.weight"].float())
    assert torch.equal(mmp.linear_2.bias, proj["model.mm_projector.2.bias"].float())

    # LLaVA-1.5 wiring, processor settings, no inherited Vicuna sampling defaults
    cfg = model.config
    assert (cfg.vision_feature_layer, cfg.vision_feature_select_strategy, cfg.projector_hidden_act) == (
        -2, "default", "gelu")
    assert (processor.patch_size, processor.vision_feature_select_strategy) == (SPEC.patch_size, "default")
    assert processor.num_additional_image_tokens == 1
    assert processor.image_processor.crop_size == {"height": SPEC.image_size, "width": SPEC.image_size}
    assert not model.generation_config.do_sample
    assert model.generation_config.pad_token_id == tok.pad_token_id
    assert model.dtype == torch.float32 and not model.training
    assert not any(p.is_meta for p in model.parameters())
    # the sub-configs are the models' own (one source of truth, e.g. for attn_implementation)
    assert cfg.text_config is model.model.language_model.config
    assert cfg.vision_config is model.model.vision_tower.config

    enc = _encode(processor)
    n_img = (SPEC.image_size // SPEC.patch_size) ** 2
    assert ((enc.input_ids == cfg.image_token_id).sum(1) == n_img).all()
    assert enc.pixel_values.shape == (2, 3, SPEC.image_size, SPEC.image_size)


def test_parts_image_features_are_penultimate_patch_tokens(ckpts, parts):
    model, processor = parts
    pixels = _encode(processor).pixel_values
    proj = torch.load(ckpts["mm_projector"], weights_only=True)
    # "penultimate layer" defined independently: the same CLIP truncated to L-1 layers, its encoder output
    # (CLIP's last_hidden_state has no post-layernorm), CLS dropped
    cfg = CLIPVisionConfig.from_pretrained(ckpts["clip"])
    cfg.num_hidden_layers -= 1
    truncated = CLIPVisionModel.from_pretrained(ckpts["clip"], config=cfg).eval()
    with torch.no_grad():
        patch_tokens = truncated(pixels).last_hidden_state[:, 1:]
        expected = _manual_projector(patch_tokens, proj)
        got = torch.stack(list(model.get_image_features(pixel_values=pixels).pooler_output))
    assert got.shape == (2, (SPEC.image_size // SPEC.patch_size) ** 2, SPEC.text_hidden)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_parts_logits_equal_vicuna_with_spliced_image_features(ckpts, parts):
    model, processor = parts
    enc = _encode(processor)
    vicuna = LlamaForCausalLM.from_pretrained(ckpts["vicuna"]).eval()
    vocab = vicuna.config.vocab_size
    proj = torch.load(ckpts["mm_projector"], weights_only=True)
    cfg = CLIPVisionConfig.from_pretrained(ckpts["clip"])
    clip = CLIPVisionModel.from_pretrained(ckpts["clip"]).eval()
    with torch.no_grad():
        hidden = clip(enc.pixel_values, output_hidden_states=True).hidden_states
        feats = _manual_projector(hidden[-2][:, 1:], proj)
        is_img = enc.input_ids == model.config.image_token_id
        embeds = vicuna.get_input_embeddings()(enc.input_ids.masked_fill(enc.input_ids >= vocab, 0))
        embeds[is_img] = feats.reshape(-1, feats.shape[-1])
        ref = vicuna(inputs_embeds=embeds, attention_mask=enc.attention_mask).logits
        logits = model(**enc).logits
    assert cfg.num_hidden_layers == SPEC.vision_layers
    mask = enc.attention_mask.bool()
    torch.testing.assert_close(logits[..., :vocab][mask], ref[mask], rtol=1e-5, atol=1e-5)
    # the added rows (<image>, <pad>) are the mean of the old: their logit is the mean logit
    torch.testing.assert_close(logits[..., vocab][mask], ref.mean(-1)[mask], rtol=1e-4, atol=1e-5)
    # text-only prompts give exactly Vicuna's logits too
    text = processor.tokenizer(["USER: hello ASSISTANT:"], return_tensors="pt")
    with torch.no_grad():
        got, want = model(**text).logits[..., :vocab], vicuna(**text).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_parts_save_then_load_llava_hf_roundtrip(ckpts, parts, tmp_path):
    model, processor = parts
    # same architecture and shapes as the llava-hf fixture
    hf_model = load_llava_hf(ckpts["llava_hf"], dtype="float32")[0]
    hf_shapes = {k: v.shape for k, v in hf_model.state_dict().items()}
    assert {k: v.shape for k, v in model.state_dict().items()} == hf_shapes
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_proc = load_llava_hf(tmp_path, dtype="float32")
    enc, enc2 = _encode(processor), _encode(loaded_proc)
    assert torch.equal(enc.input_ids, enc2.input_ids) and torch.equal(enc.pixel_values, enc2.pixel_values)
    with torch.no_grad():
        assert torch.equal(loaded(**enc2).logits, model(**enc).logits)


def test_parts_llava_pad_choice_bf16_projector_dir_and_safetensors_vicuna(ckpts, tmp_path):
    vicuna_st = write_tiny_vicuna(tmp_path / "vicuna-st", SPEC, seed=0, weights_format="safetensors")
    assert not list(vicuna_st.glob("*.bin"))
    model, processor = build_llava_from_parts(
        vicuna_st, ckpts["clip"], ckpts["mm_projector_dir"],
        dtype="bf16", pad_token="<unk>", image_size=SPEC.image_size,
    )
    tok = processor.tokenizer
    vocab = load_file(vicuna_st / "model.safetensors")["model.embed_tokens.weight"].shape[0]
    # LLaVA's v1 choice: pad = unk, only <image> added
    assert tok.pad_token_id == tok.unk_token_id == 0
    assert len(tok) == model.config.text_config.vocab_size == vocab + 1 == model.config.image_token_id + 1
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    auto, _ = build_llava_from_parts(vicuna_st, ckpts["clip"], ckpts["mm_projector"], dtype="auto")
    assert {p.dtype for p in auto.parameters()} == {torch.float32}  # the Vicuna checkpoint's dtype
    ref, _ = build_llava_from_parts(ckpts["vicuna"], ckpts["clip"], ckpts["mm_projector"], dtype="bfloat16")
    assert torch.equal(model.model.language_model.layers[0].mlp.up_proj.weight,
                       ref.model.language_model.layers[0].mlp.up_proj.weight)
    with torch.no_grad():
        out = model(**_encode(processor))
    assert torch.isfinite(out.logits.float()).all()


def test_parts_without_projector_warns_and_still_runs(ckpts):
    with pytest.warns(UserWarning, match="mm_projector is None, the projector is randomly initialised"):
        model, processor = build_llava_from_parts(ckpts["vicuna"], ckpts["clip"], None, dtype="float32")
    assert model.model.multi_modal_projector.linear_1.weight.abs().sum() > 0
    with torch.no_grad():
        assert torch.isfinite(model(**_encode(processor)).logits).all()


def test_parts_reuses_a_tokenizer_that_already_has_image_and_pad(ckpts):
    # e.g. tokenizer=llava-hf/llava-1.5-7b-hf when sentencepiece is unavailable for Vicuna's tokenizer.model
    model, processor = build_llava_from_parts(
        ckpts["vicuna"], ckpts["clip"], ckpts["mm_projector"], dtype="float32", tokenizer=ckpts["llava_hf"]
    )
    tok = processor.tokenizer
    assert len(tok) == model.config.text_config.vocab_size
    assert model.config.image_token_id == tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert tok.pad_token == "<pad>"
    assert tok.get_vocab() == type(tok).from_pretrained(ckpts["llava_hf"]).get_vocab()


def test_processor_only_helpers_match_the_builders(ckpts, parts):
    _, processor = parts
    alone = build_parts_processor(ckpts["vicuna"], ckpts["clip"])
    enc, enc2 = _encode(processor), _encode(alone)
    assert torch.equal(enc.input_ids, enc2.input_ids) and torch.equal(enc.pixel_values, enc2.pixel_values)
    assert alone.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert alone.tokenizer.pad_token_id == processor.tokenizer.pad_token_id
    hf_model, hf_proc = load_llava_hf(ckpts["llava_hf_hub"], dtype="float32")
    hf_alone = load_llava_hf_processor(ckpts["llava_hf_hub"])
    check_model_processor(hf_model, hf_alone)
    assert torch.equal(_encode(hf_alone).input_ids, _encode(hf_proc).input_ids)
    with pytest.raises(ValueError, match="is not a LLaVA checkpoint"):
        load_llava_hf_processor(ckpts["vicuna"])


# ------------------------------------------------------------------------------------------- llava-hf
@pytest.mark.parametrize("layout", ["llava_hf", "llava_hf_hub"])
def test_llava_hf_logits_equal_the_saved_model(ckpts, layout):
    # llava_hf: save_pretrained; llava_hf_hub: the hub checkpoint's transformers-4 key layout
    saved, saved_proc = build_tiny_llava(SPEC, seed=3)  # write_tiny_checkpoints(seed=0) saves seed 0 + 3
    model, processor = load_llava_hf(ckpts[layout], dtype="float32")
    assert (processor.patch_size, processor.vision_feature_select_strategy) == (SPEC.patch_size, "default")
    assert processor.num_additional_image_tokens == 1 and processor.tokenizer.padding_side == "right"
    assert processor.tokenizer.model_max_length == 2048
    enc, ref_enc = _encode(processor), _encode(saved_proc)
    assert torch.equal(enc.input_ids, ref_enc.input_ids)
    assert torch.equal(enc.pixel_values, ref_enc.pixel_values)
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, saved(**ref_enc).logits)
    bf16, proc16 = load_llava_hf(ckpts[layout], dtype="bfloat16", padding_side="left")
    assert bf16.dtype == torch.bfloat16 and proc16.tokenizer.padding_side == "left"
    assert load_llava_hf(ckpts[layout], dtype="auto")[0].dtype == torch.float32  # as saved


def _copy_llava_hf(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_llava_hf_legacy_processor_is_completed_and_conflicts_raise(ckpts, tmp_path):
    legacy = _copy_llava_hf(ckpts["llava_hf"], tmp_path / "legacy")
    cfg = json.loads((legacy / "processor_config.json").read_text())
    for k in ("patch_size", "vision_feature_select_strategy", "num_additional_image_tokens"):
        cfg.pop(k)
    (legacy / "processor_config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="lacks"):
        model, processor = load_llava_hf(legacy, dtype="float32")
    enc = _encode(processor)
    assert ((enc.input_ids == model.config.image_token_id).sum(1) == SPEC.image_tokens).all()

    bad = _copy_llava_hf(ckpts["llava_hf"], tmp_path / "bad")
    cfg = json.loads((bad / "processor_config.json").read_text())
    cfg["vision_feature_select_strategy"] = "full"
    (bad / "processor_config.json").write_text(json.dumps(cfg))
    match = r"inconsistent: processor vision_feature_select_strategy='full' but model config has 'default'"
    with pytest.raises(ValueError, match=match):
        load_llava_hf(bad, dtype="float32")


# ------------------------------------------------------------------------------------------- tiny
def test_build_tiny_matches_build_tiny_llava():
    model, processor = build_tiny(seed=5, text_layers=1, dtype="float32")
    ref, ref_proc = build_tiny_llava(TinyLlavaSpec(text_layers=1), seed=5)
    enc = _encode(processor)
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, ref(**enc).logits)
    assert build_tiny(dtype="bfloat16")[0].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="multiple of patch_size"):
        build_tiny(image_size=60, patch_size=16)


# ------------------------------------------------------------------------------------------- errors
def test_missing_paths_are_named(ckpts, tmp_path):
    match = (r"language model: folder '.*nope' does not exist; expected a Vicuna/LLaMA checkpoint folder "
             r".*model\.build\.language_model=")
    with pytest.raises(FileNotFoundError, match=match):
        build_llava_from_parts(tmp_path / "nope", ckpts["clip"], ckpts["mm_projector"])
    match = (r"vision tower: folder '.*nope' does not exist; expected a CLIP checkpoint folder like "
             r"openai/clip-vit-large-patch14-336")
    with pytest.raises(FileNotFoundError, match=match):
        build_llava_from_parts(ckpts["vicuna"], tmp_path / "nope", ckpts["mm_projector"])
    with pytest.raises(FileNotFoundError, match=r"mm_projector: file '.*nope\.bin' does not exist"):
        build_llava_from_parts(ckpts["vicuna"], ckpts["clip"], tmp_path / "nope.bin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"mm_projector: folder '.*empty' has no mm_projector\.bin"):
        build_llava_from_parts(ckpts["vicuna"], ckpts["clip"], tmp_path / "empty")
    match = r"language model: '.*empty' has no config\.json \(found nothing\)"
    with pytest.raises(FileNotFoundError, match=match):
        build_llava_from_parts(tmp_path / "empty", ckpts["clip"], ckpts["mm_projector"])
    match = (r"llava-hf checkpoint: folder '.*nope' does not exist; expected a llava-hf checkpoint folder "
             r"like llava-hf/llava-1.5-7b-hf")
    with pytest.raises(FileNotFoundError, match=match):
        load_llava_hf(tmp_path / "nope")
    # a hub id cannot be fetched offline: said so, with the id
    match = r"'no-such-org/no-such-model' is not a local folder and could not be loaded as a Hugging Face Hub"
    with pytest.raises(FileNotFoundError, match=match):
        load_llava_hf("no-such-org/no-such-model")
    match = r"mm_projector: 'no-such-org/no-such-proj' is not a local file or folder and mm_projector\.bin"
    with pytest.raises(FileNotFoundError, match=match):
        build_llava_from_parts(ckpts["vicuna"], ckpts["clip"], "no-such-org/no-such-proj")
    # a Vicuna folder without weights
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    (noweights / "config.json").write_text((ckpts["vicuna"] / "config.json").read_text())
    match = r"has no weights \(model\*\.safetensors or pytorch_model\*\.bin; found \[config\.json\]\)"
    with pytest.raises(FileNotFoundError, match=match):
        build_llava_from_parts(noweights, ckpts["clip"], ckpts["mm_projector"])


def test_wrong_kind_of_checkpoint_is_named(ckpts):
    match = (r"llava-hf checkpoint: '.*vicuna-v1\.5' is not a LLaVA checkpoint: its config\.json has "
             r"model_type='llama', architectures=\['LlamaForCausalLM'\]")
    with pytest.raises(ValueError, match=match):
        load_llava_hf(ckpts["vicuna"])
    match = r"language model: '.*llava-1\.5-hf' is a LLaVA \(llava-hf\) checkpoint"
    with pytest.raises(ValueError, match=match):
        build_llava_from_parts(ckpts["llava_hf"], ckpts["clip"], ckpts["mm_projector"])
    with pytest.raises(ValueError, match=r"vision tower: '.*vicuna-v1\.5' is a 'llama' checkpoint"):
        build_llava_from_parts(ckpts["vicuna"], ckpts["vicuna"], ckpts["mm_projector"])
    match = r"language model: '.*clip-vit' is a 'clip' checkpoint .* not a causal LM"
    with pytest.raises(ValueError, match=match):
        build_llava_from_parts(ckpts["clip"], ckpts["clip"], ckpts["mm_projector"])


def test_bad_projector_files_are_described(ckpts, tmp_path):
    # shapes for another language model (hidden 32 instead of 64)
    wrong = write_tiny_mm_projector(tmp_path / "wrong" / "mm_projector.bin", TinyLlavaSpec(text_hidden=32))
    with pytest.raises(ValueError) as err:
        build_llava_from_parts(ckpts["vicuna"], ckpts["clip"], wrong)
    msg = str(err.value)
    assert f"mm_projector file '{wrong}'" in msg
    assert "0.weight has shape (32, 32), expected (64, 32)" in msg
    assert "2.weight has shape (32, 32), expected (64, 64)" in msg
    assert "'model.mm_projector.0.weight': (64, 32)" in msg  # expected keys and shapes listed
    assert "found {'model.mm_projector.0.weight': (32, 32)" in msg

    # a 'linear' projector (mm_projector_type=linear): wrong keys
    linear = tmp_path / "linear.bin"
    torch.save({"model.mm_projector.weight": torch.zeros(64, 32), "model.mm_projector.bias": torch.zeros(64)},
               linear)
    match = (r"missing \['0\.bias', '0\.weight', '2\.bias', '2\.weight'\]; unexpected \['bias', 'weight'\] "
             r"\(an mm_projector_type other than mlp2x_gelu\?\)")
    with pytest.raises(ValueError, match=match):
        build_llava_from_parts(ckpts["vicuna"], ckpts["clip"], linear)

    # not a dict / not a torch file
    tensor = tmp_path / "tensor.bin"
    torch.save(torch.zeros(3), tensor)
    match = r"mm_projector file '.*tensor\.bin' is not a dict of tensors \(found Tensor\)"
    with pytest.raises(ValueError, match=match):
        build_llava_from_parts(ckpts["vicuna"], ckpts["clip"], tensor)
    junk = tmp_path / "junk.bin"
    junk.write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"mm_projector file '.*junk\.bin' could not be read"):
        build_llava_from_parts(ckpts["vicuna"], ckpts["clip"], junk)

    # other prefixes after which LLaVA's own loader finds the keys are fine
    prefixed = tmp_path / "prefixed.bin"
    state = torch.load(ckpts["mm_projector"], weights_only=True)
    torch.save({k.replace("model.", "base_model.model.model."): v for k, v in state.items()}, prefixed)
    model, _ = build_llava_from_parts(ckpts["vicuna"], ckpts["clip"], prefixed, dtype="float32")
    got = model.model.multi_modal_projector.linear_2.bias
    assert torch.equal(got, state["model.mm_projector.2.bias"].float())


def test_bad_arguments_are_explained(ckpts):
    args = (ckpts["vicuna"], ckpts["clip"], ckpts["mm_projector"])
    with pytest.raises(ValueError, match=r"image_size=336 but the vision tower .* takes 64px images"):
        build_llava_from_parts(*args, image_size=336)
    match = r"vision_feature_layer 5 is out of range for the 2-layer vision tower"
    with pytest.raises(ValueError, match=match):
        build_llava_from_parts(*args, vision_feature_layer=5)
    with pytest.raises(ValueError, match=r"dtype 'bfloat61' is not supported"):
        build_llava_from_parts(*args, dtype="bfloat61")
    with pytest.raises(ValueError, match=r"vision_feature_select_strategy must be 'default'"):
        build_llava_from_parts(*args, vision_feature_select_strategy="patch")
    with pytest.raises(ValueError, match=r"device_map='auto': build_llava_from_parts loads onto one device"):
        build_llava_from_parts(*args, device_map="auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no stray warnings on the normal path
        build_llava_from_parts(*args, dtype="float32")
    # several feature layers (concatenated): the projector input widens, and the stage-1 file no longer fits
    with pytest.raises(ValueError, match=r"0\.weight has shape \(64, 32\), expected \(64, 64\)"):
        build_llava_from_parts(*args, vision_feature_layer=[-2, -1])
    with pytest.warns(UserWarning, match="randomly initialised"):
        model, processor = build_llava_from_parts(
            *args[:2], None, dtype="float32", vision_feature_layer=[-2, -1]
        )
    assert model.model.multi_modal_projector.linear_1.in_features == 2 * SPEC.vision_hidden
    with torch.no_grad():
        assert torch.isfinite(model(**_encode(processor)).logits).all()
