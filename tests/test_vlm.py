"""MiLoRA on the language model of a LLaVA-style vision-language (image-text-to-text) base.

A tiny LLaVA (CLIP vision tower, 2-layer LLaMA language model) is built offline with random
weights and saved as a user's checkpoint would be; the adapter must start exactly at the
base, leave the vision tower and projector alone unless a target names them, and survive
save/load, conversion to plain LoRA and merging.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import give_decaying_spectra, pretend_training
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from milora import init_adapter, load_adapter, save_adapter
from milora.config import AdapterSpec
from milora.conversion import verify_adapter
from milora.initialize import lora_layers
from milora.modeling import is_vision_language, load_base_model
from milora.streaming import init_streamed, why_not_streamed
from milora.targets import TargetError, exclude_modules, find_targets

IMAGE_TOKEN = 96  # the last id of the 97-token vocabulary
PATCHES = 16  # 16x16 images, 4x4 patches; the CLS feature is dropped ("default" strategy)
LANGUAGE = "model.language_model."
VISION = ("model.vision_tower.", "model.multi_modal_projector.")


def tiny_llava() -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=16,
        patch_size=4,
        projection_dim=32,
    )
    text = LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=97,
        max_position_embeddings=64,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN, image_seq_length=PATCHES
    )
    return give_decaying_spectra(LlavaForConditionalGeneration(config)).eval()


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("vlm") / "tiny-llava"
    tiny_llava().save_pretrained(path, safe_serialization=True)
    return str(path)


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    """Two rows of text around one image each, and the images."""
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, IMAGE_TOKEN, (2, 24), generator=gen)
    ids[:, 3 : 3 + PATCHES] = IMAGE_TOKEN
    return {"input_ids": ids, "pixel_values": torch.randn(2, 3, 16, 16, generator=gen)}


def vlm_logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**inputs).logits.double()


def vision_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter of the vision tower and projector, by its base-model name."""
    out = {}
    for name, param in model.named_parameters():
        name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        if name.startswith(VISION):
            out[name] = param.detach().clone()
    return out


def test_llava_folder_loads_as_image_text_to_text(llava_dir, llama_dir, inputs):
    model = load_base_model(llava_dir)
    assert isinstance(model, LlavaForConditionalGeneration) and is_vision_language(llava_dir)
    assert vlm_logits(model, inputs).shape == (2, 24, 97)
    # A causal LM still loads as one.
    assert isinstance(load_base_model(llama_dir), LlamaForCausalLM) and not is_vision_language(llama_dir)


def test_init_is_exact_and_adapts_only_the_language_model(llava_dir, inputs):
    base = load_base_model(llava_dir)
    reference = vlm_logits(base, inputs)
    before = vision_weights(base)
    expected = {t.name for t in find_targets(base, AdapterSpec().target_modules, 4)}
    model = init_adapter(base, method="milora", r=4, progress=False)
    assert (vlm_logits(model, inputs) - reference).abs().max().item() < 1e-5
    wrapped = set(lora_layers(model))
    assert wrapped == expected == set(model.milora_init.factors)  # find_targets agrees with PEFT
    assert wrapped and all(name.startswith(LANGUAGE) for name in wrapped)
    assert len(wrapped) == 2 * 5  # q, k, v, up, down of both language layers
    for name, module in model.named_modules():
        if name.removeprefix("base_model.model.").startswith(VISION):
            assert not isinstance(module, LoraLayer), name
    after = vision_weights(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert model.peft_config["default"].exclude_modules  # PEFT's own exclusion


def test_causal_lm_config_is_unchanged(llama_dir):
    model = init_adapter(load_base_model(llama_dir), method="milora", r=4, progress=False)
    assert model.peft_config["default"].exclude_modules is None
    assert exclude_modules(load_base_model(llama_dir), ("q_proj",)) is None


def test_save_load_round_trip(llava_dir, inputs, tmp_path):
    model = init_adapter(load_base_model(llava_dir), method="milora", r=4, progress=False)
    pretend_training(model, seed=1)
    trained = vlm_logits(model, inputs)
    out = save_adapter(model, tmp_path / "adapter", base_model=llava_dir)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["exclude_modules"] == model.peft_config["default"].exclude_modules
    stock = load_base_model(llava_dir)
    before = vision_weights(stock)
    loaded = load_adapter(stock, out)
    assert set(lora_layers(loaded)) == set(lora_layers(model))
    assert (vlm_logits(loaded, inputs) - trained).abs().max().item() < 1e-5
    after = vision_weights(loaded)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_converted_and_merged_match_the_trained_adapter(llava_dir, inputs, tmp_path):
    model = init_adapter(load_base_model(llava_dir), method="milora", r=4, progress=False)
    pretend_training(model, seed=2, size=1.0)
    out = save_adapter(model, tmp_path / "adapter", base_model=llava_dir)
    report = verify_adapter(
        lambda: load_base_model(llava_dir),
        out,
        inputs["input_ids"],
        inputs={"pixel_values": inputs["pixel_values"]},
    )
    assert report["base vs adapter"] > 1e-4  # it moved
    assert report["adapter vs converted plain LoRA on stock base"] < 1e-5
    assert report["adapter vs merged model"] < 1e-5
    # Text only, with the inputs verify draws itself (the vocabulary is the text model's).
    text_only = verify_adapter(lambda: load_base_model(llava_dir), out)
    assert text_only["adapter vs merged model"] < 1e-5


@pytest.mark.parametrize(
    "targets, vision",
    [
        (
            ("q_proj", "v_proj", "vision_tower.encoder.layers.0.self_attn.q_proj"),
            {"model.vision_tower.encoder.layers.0.self_attn.q_proj"},
        ),
        (
            r".*vision_tower.*\.(q_proj|fc1)",
            {
                f"model.vision_tower.encoder.layers.{i}.{m}"
                for i in (0, 1)
                for m in ("self_attn.q_proj", "mlp.fc1")
            },
        ),
        (("q_proj", "multi_modal_projector.linear_1"), {"model.multi_modal_projector.linear_1"}),
    ],
)
def test_named_vision_targets_are_adapted(llava_dir, inputs, targets, vision):
    base = load_base_model(llava_dir)
    reference = vlm_logits(base, inputs)
    model = init_adapter(base, method="milora", r=4, target_modules=targets, progress=False)
    wrapped = set(lora_layers(model))
    assert {n for n in wrapped if n.startswith(VISION)} == vision
    assert wrapped == set(model.milora_init.factors)
    if isinstance(targets, tuple):  # the generic names still reach the language model only
        assert {n for n in wrapped if n.startswith(LANGUAGE)} == {
            f"{LANGUAGE}layers.{i}.self_attn.{m}" for i in (0, 1) for m in targets if "." not in m
        }
    assert (vlm_logits(model, inputs) - reference).abs().max().item() < 1e-5


@pytest.mark.parametrize("targets", [("fc1",), ("q_proj", "nonexistent"), r".*\.fc9"])
def test_a_bad_target_lists_the_parts(llava_dir, targets):
    with pytest.raises(TargetError) as error:
        init_adapter(load_base_model(llava_dir), method="milora", r=4, target_modules=targets, progress=False)
    message = str(error.value)
    for said in ("language model: ['down_proj'", "vision tower (vision_tower): ['fc1'", "projector ("):
        assert said in message
    assert "model.vision_tower.encoder.layers.0" in message  # a name that would adapt it


def test_streamed_init_refuses_a_vision_language_model(llava_dir, tmp_path):
    spec = AdapterSpec(method="milora", r=4)
    reason = why_not_streamed(llava_dir, spec)
    assert reason is not None and "vision-language" in reason
    with pytest.raises(ValueError, match="vision-language"):
        init_streamed(llava_dir, spec, tmp_path / "adapter", progress=False)


def test_a_few_training_steps_on_image_and_text(llava_dir, inputs, tmp_path):
    model = init_adapter(load_base_model(llava_dir), method="milora", r=4, lora_dropout=0.0, progress=False)
    before = vision_weights(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    optimiser = torch.optim.AdamW(trainable, lr=1e-2)
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE_TOKEN, -100)
    model.train()
    losses = []
    for _ in range(4):
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    after = vision_weights(model)
    assert all(torch.equal(after[k], before[k]) for k in before)
    out = save_adapter(model, tmp_path / "adapter", base_model=llava_dir)
    report = verify_adapter(
        lambda: load_base_model(llava_dir),
        out,
        inputs["input_ids"],
        inputs={"pixel_values": inputs["pixel_values"]},
    )
    assert report["adapter vs converted plain LoRA on stock base"] < 1e-5
    assert report["adapter vs merged model"] < 1e-5


def test_the_suggestion_considers_the_language_model_only(llava_dir):
    from milora.modeling import load_base_model
    from milora.suggestion import candidate_modules

    names = candidate_modules(load_base_model(llava_dir))
    assert names and all("language_model" in n for n in names)
