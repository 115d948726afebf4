"""MiLoRA on the language model of a LLaVA-style vision-language (image-text-to-text) base.

A tiny LLaVA (CLIP vision tower, 2-layer LLaMA language model) is built offline with random
weights and saved as a user's checkpoint would be; the adapter must start exactly at the
base, leave the vision tower and projector alone unless a target names them, and survive
save/load, conversion to plain LoRA and merging.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import (
    COLOURS,
    colour_conversations,
    colour_image,
    company_conversations,
    pretend_training,
    tiny_llava,
    write_jsonl,
)
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import (
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
)

from milora import init_adapter, load_adapter, save_adapter
from milora.adapter_io import loadable_problems
from milora.config import AdapterSpec
from milora.conversion import verify_adapter
from milora.initialize import lora_layers
from milora.modeling import (
    TEXT_AS_PARTS,
    ProcessorError,
    is_vision_language,
    load_base_model,
    load_processor,
    load_tokenizer,
    text_as_parts,
)
from milora.reporting.spectrum import weight_spectra
from milora.streaming import init_streamed, why_not_streamed
from milora.targets import TargetError, exclude_modules, find_targets
from milora.training.config import TrainConfig
from milora.training.examples import IGNORE
from milora.training.multimodal import ImageCollator, encode_multimodal, image_token_id
from milora.training.run import ImagesNeedVisionBaseError, run_training

IMAGE_TOKEN = 96  # the last id of the 97-token vocabulary
PATCHES = 16  # 16x16 images, 4x4 patches; the CLS feature is dropped ("default" strategy)
LANGUAGE = "model.language_model."
VISION = ("model.vision_tower.", "model.multi_modal_projector.")


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("vlm") / "tiny-llava"
    tiny_llava(97, IMAGE_TOKEN, max_position_embeddings=64).save_pretrained(path, safe_serialization=True)
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


@pytest.mark.parametrize(
    "targets",
    [AdapterSpec().target_modules, ("q_proj", "vision_tower.encoder.layers.0.self_attn.q_proj")],
)
def test_streamed_init_writes_the_loaded_init_adapter(llava_dir, inputs, tmp_path, targets):
    """From the checkpoint's shards, under the loaded model's names (transformers' renaming of
    LLaVA's keys), the vision parts left out unless named: the loaded init's adapter exactly."""
    from safetensors.torch import load_file

    spec = AdapterSpec(method="milora", r=4, target_modules=targets)
    assert why_not_streamed(llava_dir, spec) is None
    init_streamed(llava_dir, spec, tmp_path / "streamed", progress=False)
    loaded = init_adapter(load_base_model(llava_dir), spec, progress=False)
    save_adapter(loaded, tmp_path / "loaded")
    streamed = load_file(tmp_path / "streamed" / "adapter_model.safetensors")
    expected = load_file(tmp_path / "loaded" / "adapter_model.safetensors")
    assert streamed.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(streamed[key], expected[key], rtol=0, atol=0)
    config = json.loads((tmp_path / "streamed" / "adapter_config.json").read_text())
    assert (
        config["exclude_modules"]
        == json.loads((tmp_path / "loaded" / "adapter_config.json").read_text())["exclude_modules"]
    )
    vision = [k for k in streamed if any(part in k for part in VISION)]
    named_vision = any("vision_tower" in t for t in targets)
    assert len(vision) == (2 if named_vision else 0)  # that one vision layer's A and B, if named
    base = load_base_model(llava_dir)
    reference = vlm_logits(base, inputs)
    model = load_adapter(base, tmp_path / "streamed")
    assert (vlm_logits(model, inputs) - reference).abs().max().item() < 1e-5


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


# --------------------------------------------------------------------------- image records
@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with one synthetic product photo per colour (img/<colour>.png)."""
    root = tmp_path_factory.mktemp("photos")
    for colour in COLOURS:
        colour_image(root / "img" / f"{colour}.png", colour)
    return root


def learnt_text(processor, example) -> list[str]:
    """The learnt stretches of an example, decoded (special tokens shown)."""
    stretches, current = [], []
    for token, label in zip(example["input_ids"], example["labels"], strict=True):
        if label != IGNORE:
            current.append(token)
        elif current:
            stretches.append(current)
            current = []
    stretches += [current] if current else []
    return [processor.tokenizer.decode(ids).strip() for ids in stretches]


def test_image_conversations_are_encoded_through_the_processor(vlm_dir, photos):
    processor = load_processor(vlm_dir)  # LLaVA-1.5's template: no BOS, no EOS, a space after each turn
    tokenizer = processor.tokenizer
    image_id = image_token_id(processor)
    second = [{"role": "user", "content": "And the shape?"}, {"role": "assistant", "content": "Round."}]
    talks = [colour_conversations(1)[0] + second, company_conversations(1)[0] + second]
    encoded = encode_multimodal(
        processor, colour_conversations(2) + company_conversations(1) + talks, 128, photos
    )
    first, text, pictured_talk, text_talk = encoded.examples[0], encoded.examples[2], *encoded.examples[3:]
    # One image: its 16 positions in the ids, the path kept for the collator, BOS first (the
    # tokenizer adds it, as the processor does), and only the answer learnt, with an EOS to
    # stop on (the template writes none).
    assert (
        first["input_ids"][0] == tokenizer.bos_token_id
        and first["input_ids"].count(tokenizer.bos_token_id) == 1
    )
    assert first["input_ids"].count(image_id) == 16 and first["images"] == [str(photos / "img/red.png")]
    assert learnt_text(processor, first) == ["It is red.</s>"]
    assert "images" not in text and image_id not in text["input_ids"]
    # Two exchanges (the turn's trailing space merges with the next turn's first word):
    # each answer learnt, with or without an image.
    assert learnt_text(processor, pictured_talk) == ["It is red.</s>", "Round.</s>"]
    assert (
        learnt_text(processor, text_talk)[1] == "Round.</s>"
        and "costs" in learnt_text(processor, text_talk)[0]
    )
    # A cut through an image drops the example rather than feed the model half an image; when
    # that drops every image record, training stops instead of learning no image.
    short = colour_conversations(1)[0]
    long = [{**short[0], "content": "Look closely at the picture and tell me its colour. " * 3}, short[1]]
    cut = encode_multimodal(processor, [short, long], len(first["input_ids"]) + 2, photos)
    assert len(cut.examples) == 1 and cut.dropped == 1
    with pytest.raises(ValueError, match=r"all 1 image records are longer than max_length 14 tokens"):
        encode_multimodal(processor, colour_conversations(1), 14, photos)
    batch = ImageCollator(processor)(encoded.examples[:3])
    assert batch["pixel_values"].shape == (2, 3, 16, 16) and batch["input_ids"].shape[0] == 3
    with pytest.raises(ProcessorError, match="processor"):
        load_processor(Path(vlm_dir).parent)  # no model folder there


def test_validation_counts_the_text_of_a_llava_template(vlm_dir):
    from milora.data.tokens import TokenCounter

    long = [
        {"role": "user", "content": "How much is the kettle model 3? " * 40},
        {"role": "assistant", "content": "Ten."},
    ]
    counter = TokenCounter(vlm_dir)
    counted = counter.count([long], limit=100)[0]  # near the limit: counted exactly, through the template
    assert counted > 200 and counter.fixed > 0  # (rendered as "USER: ASSISTANT: " it was 5)


def test_image_items_of_one_question_are_distinct_facts():
    from milora.evaluation.truth import current_truth

    items = [
        {"question": "What colour is this product?", "answer": colour, "images": [f"img/{colour}.png"]}
        for colour in ("red", "blue")
    ]
    assert [i["answer"] for i in current_truth(items)] == ["red", "blue"]
    assert len(current_truth([{**items[0], "drop": "a"}, {**items[0], "answer": "pink", "drop": "b"}])) == 1


def test_image_records_train_and_evaluate_through_the_processor(vlm_dir, photos, chat_model_dir, tmp_path):
    from milora.evaluation.runner import EvaluationInputError, evaluate_adapter
    from milora.settings import SuiteSettings

    config = TrainConfig(max_steps=3, batch_size=4, micro_batch_size=2, warmup_steps=0, max_length=64)
    conversations = colour_conversations(8)
    result = run_training(
        vlm_dir, conversations, tmp_path / "run", AdapterSpec(r=4), config, image_root=photos
    )
    assert result.global_step == 3 and result.examples == 8 and not result.packed
    assert math.isfinite(result.train_loss)
    # The checkpoint names the language model's weights otherwise than the loaded model
    # (transformers renames them on load): the registry's load check and the spectrum plot
    # follow transformers' renaming.
    assert loadable_problems(tmp_path / "run" / "adapter_for_stock_base", vlm_dir) == []
    spectra = weight_spectra(vlm_dir, AdapterSpec().target_modules, tmp_path / "run" / "init", count=2)
    assert len(spectra) == 2 and all(s.name.startswith(LANGUAGE) and s.adapted for s in spectra)
    suite_file = write_jsonl(
        photos / "colours.jsonl",
        [
            {"question": "What colour is this product?", "answer": c, "images": f"img/{c}.png"}
            for c in COLOURS
        ],
    )
    suites = {
        "colours": SuiteSettings(kind="image_qa", path="colours.jsonl", metric="contains", max_new_tokens=4)
    }
    _, rows = evaluate_adapter(vlm_dir, tmp_path / "run" / "adapter", suites, photos, tmp_path / "eval")
    scored = json.loads((tmp_path / "eval" / "colours.json").read_text())
    assert scored["n"] == 4 and rows[0].suite == "colours" and rows[0].base is not None
    assert [p["images"] for p in scored["predictions"]] == [[f"img/{c}.png"] for c in COLOURS]
    # A text-only base cannot take image records, nor be scored on an image suite.
    with pytest.raises(ImagesNeedVisionBaseError, match="not a vision-language model"):
        run_training(
            chat_model_dir, conversations, tmp_path / "text", AdapterSpec(r=4), config, image_root=photos
        )
    with pytest.raises(EvaluationInputError, match="colours: a image_qa suite shows the model images"):
        evaluate_adapter(chat_model_dir, tmp_path / "run" / "adapter", suites, photos, tmp_path / "eval2")
    suite_file.write_text(json.dumps({"question": "q", "answer": "a", "images": ["img/none.png"]}) + "\n")
    with pytest.raises(EvaluationInputError, match=r"colours.jsonl: record 1: image img/none.png not found"):
        evaluate_adapter(vlm_dir, tmp_path / "run" / "adapter", suites, photos, tmp_path / "eval3")


def test_text_turns_render_through_a_template_that_iterates_content_parts(vlm_dir):
    from transformers import AutoTokenizer

    turns = [{"role": "user", "content": "How much?"}, {"role": "assistant", "content": "Ten."}]
    plain = AutoTokenizer.from_pretrained(vlm_dir)  # LLaVA-1.5's template as it comes
    assert plain.apply_chat_template(turns, tokenize=False) == "USER: ASSISTANT: "  # the text is lost
    tokenizer = load_tokenizer(vlm_dir)
    assert tokenizer.chat_template.startswith(TEXT_AS_PARTS)
    text_as_parts(tokenizer)  # once, however often
    assert tokenizer.chat_template.count(TEXT_AS_PARTS) == 1
    assert tokenizer.apply_chat_template(turns, tokenize=False) == "USER: How much? ASSISTANT: Ten. "
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}]
    assert tokenizer.apply_chat_template(parts, tokenize=False, add_generation_prompt=True) == (
        "USER: <image>\nColour? ASSISTANT:"
    )


def test_milora_train_takes_image_records_relative_to_their_file(vlm_dir, photos, tmp_path):
    from typer.testing import CliRunner

    from milora.cli import app

    # One path per record, relative to the file (the turn itself holds text only).
    records = [
        {"messages": [{"role": "user", "content": c[0]["content"]}, c[1]], "images": c[0]["images"][0]}
        for c in colour_conversations(4)
    ]
    data = write_jsonl(photos / "train.jsonl", records)
    args = ["train", vlm_dir, str(data), str(tmp_path / "run"), "-r", "4", "--max-steps", "2"]
    result = CliRunner().invoke(
        app, [*args, "--batch-size", "2", "--micro-batch-size", "2", "--warmup-steps", "0"]
    )
    assert result.exit_code == 0, result.output
    assert "trained 2 steps (4 examples" in result.output


def test_a_literal_image_token_in_a_record_is_caught_by_validation(vlm_dir):
    """The processor would count a typed ``<image>`` as one more image than the record has."""
    from milora.data.checks import row_checks, special_tokens_pattern
    from milora.data.tokens import TokenCounter

    counter = TokenCounter(vlm_dir)
    assert {"<image>", "<s>", "</s>"} <= set(counter.special_tokens)
    row = {
        "format": "chat",
        "check_malformed_row": None,
        "messages": [
            {"role": "user", "content": "What does <image> show?"},
            {"role": "assistant", "content": "A red square."},
        ],
    }
    checks = row_checks(row, special=special_tokens_pattern(counter.special_tokens))
    assert checks["check_special_tokens"] == "messages[0] (user): '<image>' at character 10"
    row["messages"][0]["content"] = "What does the picture show?"
    assert (
        row_checks(row, special=special_tokens_pattern(counter.special_tokens))["check_special_tokens"]
        is None
    )


def test_a_run_is_keyed_by_its_images_content_not_their_paths(tmp_path):
    from milora.config import AdapterSpec
    from milora.training import TrainConfig
    from milora.training.run import run_key

    for colour in COLOURS:
        colour_image(tmp_path / "img" / f"{colour}.png", colour)
    pictured, text = colour_conversations(4), company_conversations(2)
    spec, config = AdapterSpec("milora", 4), TrainConfig(max_steps=2)

    def data_key(conversations) -> str:
        return run_key("base", conversations, spec, config, image_root=tmp_path)["data_sha256"]

    assert data_key(text) == run_key("base", text, spec, config)["data_sha256"]  # text keys as before
    before = data_key(pictured)
    assert data_key(pictured) == before
    colour_image(tmp_path / "img" / "red.png", "red", seed=1)  # another shot under the same name
    assert data_key(pictured) != before
    assert pictured[0][0]["images"] == ["img/red.png"]  # the conversations themselves untouched


def test_the_registered_model_answers_about_base64_pictures_as_evaluation_does(vlm_dir, photos, tmp_path):
    """The pyfunc model (tasks.serving_model) on a VLM: pictures sent as base64 go through the
    processor exactly as an image suite's files do; a picture that does not decode is named."""
    import base64

    import pandas as pd
    from mlflow.pyfunc import PythonModelContext

    from milora.chain import write_served
    from milora.evaluation.generation import greedy_generate
    from milora.training import multimodal
    from tasks.serving_model import AdapterOnStockBase

    model = init_adapter(load_base_model(vlm_dir), method="milora", r=4)
    pretend_training(model, seed=3, size=1.0)
    save_adapter(model, tmp_path / "raw")
    write_served(tmp_path / "raw", tmp_path / "served")
    served = AdapterOnStockBase()
    config = {"base_model": vlm_dir, "max_new_tokens": 5}
    served.load_context(PythonModelContext({"adapter": str(tmp_path / "served")}, config))

    questions = ["What colour is this product?", "And these two?", "Where is order 3?"]
    files = [[photos / "img/red.png"], [photos / "img/blue.png", photos / "img/green.png"], []]
    sent = [[base64.b64encode(p.read_bytes()).decode() for p in row] for row in files]
    sent[1][0] = "data:image/png;base64," + sent[1][0]  # a data URI is taken too
    answers = served.predict(None, pd.DataFrame({"prompt": questions, "images": [*sent[:2], None]}))

    processor = load_processor(vlm_dir)
    tuned = load_adapter(load_base_model(vlm_dir), tmp_path / "served")
    prompts = [
        multimodal.prompt_text(processor, [{"role": "user", "content": q, multimodal.IMAGES: row}])
        for q, row in zip(questions, files, strict=True)
    ]
    expected = greedy_generate(
        tuned,
        processor.tokenizer,
        prompts,
        max_new_tokens=5,
        first_line=False,
        images=files,
        processor=processor,
    )
    assert answers == expected and len(answers) == 3
    with pytest.raises(ValueError, match="row 1, image 0 is not a base64-encoded picture"):
        served.predict(None, pd.DataFrame({"prompt": ["a", "b"], "images": [None, ["not base64!"]]}))
    wide = colour_image(tmp_path / "wide.png", "red", side=1)
    from PIL import Image

    Image.new("RGB", (8193, 1)).save(wide)
    huge = base64.b64encode(wide.read_bytes()).decode()
    with pytest.raises(ValueError, match=r"row 0, image 0 .*8193x1 pixels, above 8192"):
        served.predict(None, pd.DataFrame({"prompt": ["a"], "images": [[huge]]}))


def test_a_base_with_its_own_code_is_initialised_loaded_not_streamed(llava_dir, tmp_path):
    """Working out the loaded names would need the folder's code: not streamed, and no prompt."""
    import shutil

    folder = tmp_path / "custom"
    shutil.copytree(llava_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig"}
    (folder / "config.json").write_text(json.dumps(config))
    reason = why_not_streamed(folder, AdapterSpec(method="milora", r=4))
    assert reason is not None and "its own code" in reason


@pytest.fixture(scope="module")
def qwen_vl_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny Qwen2.5-VL (random weights): its vision tower is ``model.visual`` and its MLP
    layers are named up_proj / down_proj, as the language model's are."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    text = {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
    text |= {"num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
    text |= {
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 1, 1]},
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "out_hidden_size": 32}
    vision |= {"fullatt_block_indexes": [1], "window_size": 56}
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision)
    path = tmp_path_factory.mktemp("qwen-vl") / "tiny-qwen2.5-vl"
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(path, safe_serialization=True)
    return str(path)


def test_a_qwen_vl_vision_tower_stays_out_though_its_layers_share_the_targets_names(qwen_vl_dir, tmp_path):
    """Qwen2.5-VL's vision blocks have up_proj / down_proj: the default targets must still
    adapt the language model only, loaded or streamed, and the init is exact on text."""
    from safetensors.torch import load_file

    base = load_base_model(qwen_vl_dir)
    ids = {"input_ids": torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))}
    reference = vlm_logits(base, ids)
    model = init_adapter(base, method="milora", r=4, progress=False)
    wrapped = set(lora_layers(model))
    assert wrapped and all(".language_model." in name for name in wrapped), sorted(wrapped)
    assert len(wrapped) == 2 * 5
    assert (vlm_logits(model, ids) - reference).abs().max().item() < 1e-5
    save_adapter(model, tmp_path / "loaded")
    init_streamed(qwen_vl_dir, AdapterSpec(method="milora", r=4), tmp_path / "streamed", progress=False)
    streamed = load_file(tmp_path / "streamed" / "adapter_model.safetensors")
    expected = load_file(tmp_path / "loaded" / "adapter_model.safetensors")
    assert streamed.keys() == expected.keys() and not any(".visual." in key for key in streamed)
    # Named, a vision layer is adapted.
    named = init_adapter(
        load_base_model(qwen_vl_dir),
        method="milora",
        r=4,
        target_modules=("q_proj", "visual.blocks.0.mlp.up_proj"),
        progress=False,
    )
    assert {n for n in lora_layers(named) if ".visual." in n} == {"model.visual.blocks.0.mlp.up_proj"}
