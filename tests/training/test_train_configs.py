"""Every YAML of conf/ composes, and its node instantiates (lightning-hydra-template test_configs)."""
import importlib.util
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

CONF = Path(__file__).resolve().parents[2] / "conf"


def _options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=["paths.output_dir=/tmp/unused", *overrides])


def _has_data(name):
    return (CONF / "data" / f"{name}.yaml").exists()


#: the image classification configs (llava_san/vision): their own tests below
VISION_MODELS = ("tiny_vit", "vit_b16")
VISION_PEFT = {"linear_probe": "LinearProbe", "ssf": "SsfRecipe", "san_ssf": "SsfRecipe", "moppa": "MoppaRecipe",
               "vit_lora": "VitLoraRecipe"}
VISION_EXPERIMENTS = ("vision_digits", "vit_b16_vtab_san_ssf", "vit_b16_vtab_ssf")


@pytest.mark.parametrize("option", [o for o in _options("model") if o not in VISION_MODELS])
def test_model_config(option):
    cfg = _compose(f"model={option}", "data=synthetic")
    build = instantiate(cfg.model.build)  # a partial: nothing is loaded
    assert callable(build)
    assert cfg.model.recipe.lora_r > 0 and cfg.model.recipe.lr > 0
    if option == "tiny":
        model, processor = build()
        assert type(model).__name__ == "LlavaForConditionalGeneration"
        instantiate(cfg.model.processor)
    if option == "tiny_llama":  # the LLaMA path's CPU model: (LlamaForCausalLM, tokenizer), no projector
        model, tok = build()
        assert type(model).__name__ == "LlamaForCausalLM" and len(instantiate(cfg.model.processor)) == len(tok)
    if option.startswith("llama") or option == "tiny_llama":
        assert cfg.model.train_projector is False


@pytest.mark.parametrize("option", [o for o in _options("peft") if o not in VISION_PEFT])
def test_peft_config(option):
    from peft import LoraConfig

    from llava_san.peft import FullFinetune, LoraRecipe, NoAdapter, SanConfig

    cfg = _compose(f"peft={option}", "data=synthetic")
    recipe = instantiate(cfg.peft)
    expected = {"none": NoAdapter, "full": FullFinetune}.get(option, LoraRecipe)
    assert type(recipe) is expected
    lora = getattr(recipe, "lora_config", None)
    san = recipe.san
    assert (lora is None) == (option in ("none", "full"))
    assert (recipe.describe().get("full_finetune") is True) == (option == "full")
    if lora is not None:
        assert isinstance(lora, LoraConfig) and isinstance(lora.target_modules, (set, list))
        assert lora.use_dora == option.endswith("dora")
    assert (san is not None) == option.startswith("san_")
    if san is not None:
        assert isinstance(san, SanConfig) and isinstance(san.modules, tuple)
        assert san.weight_side_scaling == "auto"


def test_paper_peft_values():
    cfg = _compose("model=llava7b", "peft=san_dora", "data=synthetic")
    lora = instantiate(cfg.peft.lora_config)
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (128, 256, 0.05)
    assert len(lora.target_modules) == 7


def test_san_override_from_command_line():
    cfg = _compose("peft=san_lora", "peft.san.propagation=layerwise", "data=synthetic")
    assert instantiate(cfg.peft.san).propagation == "layerwise"
    with pytest.raises(Exception, match="propagation"):
        instantiate(_compose("peft=san_lora", "peft.san.propagation=sideways", "data=synthetic").peft.san)


@pytest.mark.parametrize("option", _options("strategy"))
def test_strategy_config(option):
    cfg = _compose(f"strategy={option}", "data=synthetic")
    strategy = instantiate(cfg.strategy)
    if option.startswith("deepspeed"):
        zero = strategy.config["zero_optimization"]
        assert zero["stage"] == int(option[len("deepspeed_zero")])
        assert ("offload_optimizer" in zero) == option.endswith("offload")
        assert strategy.exclude_frozen_parameters


@pytest.mark.parametrize("option", _options("trainer"))
def test_trainer_config(option):
    cfg = _compose(f"trainer={option}", "data=synthetic")
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"
    if option != "gpu":
        instantiate(cfg.trainer, logger=False, enable_checkpointing=False)


@pytest.mark.parametrize("option", _options("logger"))
def test_logger_config(option, tmp_path):
    needs = {"tensorboard": "tensorboard", "wandb": "wandb", "many": "tensorboard"}.get(option)
    if needs and importlib.util.find_spec(needs) is None and importlib.util.find_spec("tensorboardX") is None:
        pytest.skip(f"{needs} not installed (extra)")
    cfg = _compose(f"logger={option}", "data=synthetic", f"paths.output_dir={tmp_path}")
    loggers = [instantiate(v) for v in cfg.logger.values()]
    assert loggers


@pytest.mark.parametrize("option", _options("callbacks"))
def test_callbacks_config(option):
    cfg = _compose(f"callbacks={option}", "data=synthetic")
    for v in (cfg.callbacks or {}).values():
        instantiate(v)


@pytest.mark.parametrize("option", _options("debug"))
def test_debug_config(option):
    _compose(f"debug={option}", "data=synthetic")


@pytest.mark.parametrize("option", _options("data"))
def test_data_config(option):
    cfg = _compose(f"data={option}")
    assert "_target_" in cfg.data


@pytest.mark.parametrize("option", [o for o in _options("experiment") if o.startswith("llava")])
def test_experiment_config(option):
    if not _has_data("mvit665k"):
        pytest.skip("conf/data/mvit665k.yaml not there yet")
    cfg = _compose(f"experiment={option}")
    size, method = option[len("llava"):].split("_", 1)
    assert cfg.model.build.language_model.endswith(f"vicuna-{size}-v1.5")
    lora = instantiate(cfg.peft.lora_config)
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, lora.use_dora) == (128, 256, 0.05, method.endswith("dora"))
    assert cfg.optim.lr == (1e-4 if method.endswith("dora") else 2e-4) and cfg.optim.projector_lr == 2e-5
    assert cfg.data.batch_size * cfg.trainer.devices * cfg.trainer.accumulate_grad_batches == 128
    assert cfg.trainer.max_epochs == 1 and cfg.trainer.precision == "bf16-mixed"


@pytest.mark.parametrize("option", [o for o in _options("experiment")
                                    if not o.startswith("llava") and o not in VISION_EXPERIMENTS])
def test_llama_experiment_config(option):
    """The LLaMA recipes (conf/experiment/llama*.yaml, csr_tiny.yaml) compose and their nodes instantiate:
    a LLaMA model config, commonsense-format data, LoRA/DoRA r=32 on q,k,v,up,down (Table 6: q,up,down)."""
    from llava_san.data.commonsense import CommonsenseDataModule

    cfg = _compose(f"experiment={option}")
    assert cfg.model.train_projector is False
    assert issubclass(instantiate(cfg.data, _partial_=True).func, CommonsenseDataModule)
    recipe = instantiate(cfg.peft)
    types = set(recipe.lora_config.target_modules)
    paper = {"q_proj", "k_proj", "v_proj", "up_proj", "down_proj"}  # csr_tiny: the seven (peft=<any> sweeps)
    assert types == ({"q_proj", "up_proj", "down_proj"} if option.endswith("_qud") else
                     paper | {"o_proj", "gate_proj"} if option == "csr_tiny" else paper)
    assert (recipe.san is not None) == ("_san_" in option or option == "csr_tiny")
    if option == "csr_tiny":
        assert cfg.model.build._target_.endswith("build_tiny_causal_lm") and cfg.evaluate is None
        assert cfg.evaluate_commonsense._target_.endswith("CommonsenseEvaluator")
    else:
        assert (recipe.lora_config.r, recipe.lora_config.lora_alpha, recipe.lora_config.lora_dropout) == (32, 64, 0.05)
        assert cfg.data.cutoff_len == 256 and cfg.trainer.max_epochs == 3 and cfg.evaluate is None


def test_default_config():
    if not _has_data("easyvqa"):
        pytest.skip("conf/data/easyvqa.yaml not there yet")
    cfg = _compose()
    assert cfg.model.build._target_.endswith("build_tiny") and cfg.peft.lora_config.use_dora and cfg.peft.san
    assert cfg.trainer.max_epochs is None and cfg.trainer.max_steps == 4000  # a fixed step count (rule R2)
    assert cfg.data.batch_size == 32 and cfg.evaluate.limit is None  # all 9,673 test questions
    # the evaluation asks questions as the training data is prepared
    assert (cfg.evaluate.template, cfg.evaluate.tokenization, cfg.evaluate.image_aspect_ratio) == (
        cfg.data.template, cfg.data.tokenization, cfg.data.image_aspect_ratio)
    assert cfg.evaluate.cache_dir == cfg.data.cache_dir
    assert _compose("trainer=gpu").trainer.precision == "bf16-mixed"


def test_model_processor_targets_are_the_builders():
    """One piece of code per processor: the model configs' processors are the builder's functions."""
    for name, target in (("llava7b", "build_parts_processor"), ("llava13b", "build_parts_processor"),
                         ("llava7b_hf", "load_llava_hf_processor"), ("llama7b", "load_llama_tokenizer"),
                         ("llama13b", "load_llama_tokenizer"), ("llama2_7b", "load_llama_tokenizer"),
                         ("llama3_8b", "load_llama_tokenizer"), ("tiny_llama", "tiny_causal_lm_processor")):
        cfg = _compose(f"model={name}", "data=synthetic")
        assert cfg.model.processor._target_ == f"llava_san.models.{target}"
        build_keys = set(cfg.model.build) - {"_target_", "_partial_"}
        assert set(cfg.model.processor) - {"_target_"} <= build_keys  # every processor argument comes from build


def test_every_config_is_covered():
    """A new vision YAML is added to the lists above (and so composed by a test)."""
    assert set(VISION_MODELS) <= set(_options("model")) and set(VISION_PEFT) <= set(_options("peft"))
    assert set(VISION_EXPERIMENTS) == {o for o in _options("experiment")
                                       if o.startswith(("vision_", "vit_"))}


@pytest.mark.parametrize("option", VISION_MODELS)
def test_vision_model_config(option):
    cfg = _compose(f"model={option}", "data=digits", "peft=linear_probe")
    build = instantiate(cfg.model.build)
    assert callable(build) and cfg.model.recipe.lr > 0 and cfg.model.train_projector is False
    transform = instantiate(cfg.model.processor)
    assert transform.size == (32 if option == "tiny_vit" else 224) and tuple(transform.mean) == (0.5, 0.5, 0.5)
    if option == "tiny_vit":
        model = build()
        assert type(model).__name__ == "VisionTransformer" and model.num_classes == 10


@pytest.mark.parametrize("option", sorted(VISION_PEFT))
def test_vision_peft_config(option):
    cfg = _compose("model=tiny_vit", "data=digits", f"peft={option}")
    recipe = instantiate(cfg.peft)
    assert type(recipe).__name__ == VISION_PEFT[option]
    if option in ("ssf", "san_ssf"):
        assert recipe.config.method == option and recipe.config.init == "exact" and recipe.config.mode == "paper"
    assert recipe.describe()["adapter"]["kind"] == recipe.kind


@pytest.mark.parametrize("option", VISION_EXPERIMENTS)
def test_vision_experiment_config(option):
    """The vision experiments compose; the VTAB recipes take the task's row of their table."""
    extra = [] if option == "vision_digits" else ["data.root=/vtab-1k", "data.task=smallnorb_azi"]
    cfg = _compose(f"experiment={option}", *extra)
    assert cfg.module._target_ == "llava_san.vision.module.ImageClassifierModule" and cfg.evaluate is None
    assert cfg.evaluate_classification.data.source == cfg.data.source
    recipe = instantiate(cfg.peft)
    if option == "vision_digits":
        assert cfg.data.source == "digits" and cfg.model.build._target_.endswith("build_tiny_vit")
        return
    san = option.endswith("san_ssf")
    assert recipe.config.method == ("san_ssf" if san else "ssf") and cfg.data.num_classes == 18
    assert (cfg.optim.lr, cfg.model.build.drop_path_rate) == ((1.5e-2, 0.05) if san else (2e-2, 0.0))
    assert cfg.optim.weight_decay == 5e-5 and cfg.trainer.max_epochs == 100 and cfg.data.batch_size == 64
