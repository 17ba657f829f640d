"""The fixtures themselves: each tiny model reloads offline through its Auto class with a tokenizer or image
processor that fits it, gives outputs of the expected shapes, and is rebuilt identically; the environment is
offline and conftest.py's guard refuses every connection off this machine.
"""

from __future__ import annotations

import os
import socket

import huggingface_hub.constants
import pytest
import torch
from PIL import Image
from tiny_models import (
    BUILDERS,
    CHAT_TEMPLATE,
    ENTITY_LABELS,
    IMAGE_LABELS,
    SENTIMENT_LABELS,
    SUMMARIZATION_PARAMS,
)
from transformers import (
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
)

AUTO_CLASSES = {
    "seq2seq": (AutoModelForSeq2SeqLM, "T5ForConditionalGeneration"),
    "causal_lm": (AutoModelForCausalLM, "GPT2LMHeadModel"),
    "text_classifier": (AutoModelForSequenceClassification, "BertForSequenceClassification"),
    "token_classifier": (AutoModelForTokenClassification, "BertForTokenClassification"),
    "embedder": (AutoModel, "BertModel"),
    "image_classifier": (AutoModelForImageClassification, "ViTForImageClassification"),
}
TEXT_MODELS = [name for name in AUTO_CLASSES if name != "image_classifier"]
TEXTS = ["the quick brown fox jumps over the lazy dog", "Alice walks through London", "a cat sleeps"]
OUTSIDE = ("93.184.216.34", 80)


def id2label(names: tuple[str, ...]) -> dict[int, str]:
    return dict(enumerate(names))


@pytest.mark.parametrize("name", AUTO_CLASSES)
def test_model_reloads_offline_through_its_auto_class(tiny_models, name):
    auto_class, class_name = AUTO_CLASSES[name]
    path = getattr(tiny_models, name)
    model = auto_class.from_pretrained(path, local_files_only=True)
    assert type(model).__name__ == class_name
    assert (path / "model.safetensors").is_file()
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2


@pytest.mark.parametrize("name", TEXT_MODELS)
def test_fast_tokenizer_fills_the_input_embeddings_and_knows_the_texts(tiny_models, name):
    path = getattr(tiny_models, name)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AUTO_CLASSES[name][0].from_pretrained(path)
    assert tokenizer.is_fast
    assert len(tokenizer) == model.get_input_embeddings().num_embeddings == model.config.vocab_size
    assert 300 <= len(tokenizer) <= 1000
    ids = tokenizer(TEXTS[0])["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == TEXTS[0]


@pytest.mark.parametrize("name", BUILDERS)
def test_building_again_gives_identical_files(tiny_models, tmp_path, name):
    def files(directory):
        return {path.name: path.read_bytes() for path in directory.iterdir()}

    assert files(BUILDERS[name](tmp_path / name)) == files(getattr(tiny_models, name))


def test_seq2seq_carries_summarization_params_and_t5_special_tokens(tiny_seq2seq):
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_seq2seq)
    tokenizer = AutoTokenizer.from_pretrained(tiny_seq2seq)
    assert model.config.task_specific_params == SUMMARIZATION_PARAMS
    generation = model.generation_config
    assert generation.max_length == 20
    assert generation.pad_token_id == generation.decoder_start_token_id == tokenizer.pad_token_id == 0
    assert generation.eos_token_id == model.config.eos_token_id == tokenizer.eos_token_id == 1
    assert tokenizer.bos_token is None
    assert tokenizer("a cat")["input_ids"][-1] == tokenizer.eos_token_id


def test_seq2seq_greedy_generation_is_deterministic_and_padding_free(tiny_seq2seq):
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_seq2seq)
    tokenizer = AutoTokenizer.from_pretrained(tiny_seq2seq)
    prompts = ["summarize: " + text for text in TEXTS]
    # min_new_tokens keeps EOS away, so every row is compared over all its tokens
    settings = {"do_sample": False, "num_beams": 1, "max_new_tokens": 8, "min_new_tokens": 8}

    def generate(texts):
        with torch.no_grad():
            return model.generate(**tokenizer(texts, padding=True, return_tensors="pt"), **settings)

    batched = generate(prompts)
    assert batched.shape == (len(prompts), 9)  # the decoder start token, then 8 new ones
    assert torch.equal(generate(prompts), batched)
    assert torch.equal(torch.cat([generate([prompt]) for prompt in prompts]), batched)


def test_causal_lm_tokenizer_has_bos_eos_no_pad_and_a_chat_template(tiny_causal_lm):
    model = AutoModelForCausalLM.from_pretrained(tiny_causal_lm)
    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_lm)
    assert tokenizer.pad_token is None and tokenizer.pad_token_id is None
    assert tokenizer.bos_token_id == tokenizer.eos_token_id == model.config.eos_token_id == 0
    assert model.generation_config.eos_token_id == 0 and model.generation_config.pad_token_id is None
    assert tokenizer.chat_template == CHAT_TEMPLATE
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt == "<|endoftext|><|user|>\nhi\n<|assistant|>\n"
    inputs = tokenizer(TEXTS[0], return_tensors="pt")
    assert "token_type_ids" not in inputs  # GPT-2 would add them as embeddings of token 0
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], len(tokenizer))


def test_text_classifier_has_three_sentiment_labels(tiny_text_classifier):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_text_classifier)
    tokenizer = AutoTokenizer.from_pretrained(tiny_text_classifier)
    assert model.config.id2label == id2label(SENTIMENT_LABELS) == {0: "negative", 1: "neutral", 2: "positive"}
    with torch.no_grad():
        logits = model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits
    assert logits.shape == (len(TEXTS), 3)


def test_token_classifier_labels_and_offsets(tiny_token_classifier):
    model = AutoModelForTokenClassification.from_pretrained(tiny_token_classifier)
    tokenizer = AutoTokenizer.from_pretrained(tiny_token_classifier)
    assert model.config.id2label == id2label(ENTITY_LABELS)
    text = TEXTS[1]  # "walks" is not in the corpus, so it splits into walk + ##s
    encoding = tokenizer(text, return_offsets_mapping=True, return_tensors="pt")
    offsets = encoding.pop("offset_mapping")[0].tolist()
    assert offsets[0] == offsets[-1] == [0, 0]  # [CLS] and [SEP]
    assert [text[start:end] for start, end in offsets[1:-1]] == ["Alice", "walk", "s", "through", "London"]
    with torch.no_grad():
        logits = model(**encoding).logits
    assert logits.shape == (1, len(offsets), len(ENTITY_LABELS))


def test_embedder_gives_one_vector_per_token(tiny_embedder):
    model = AutoModel.from_pretrained(tiny_embedder)
    tokenizer = AutoTokenizer.from_pretrained(tiny_embedder)
    inputs = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**inputs).last_hidden_state
    assert hidden.shape == (*inputs["input_ids"].shape, 32)


def test_image_classifier_takes_32_pixel_images(tiny_image_classifier):
    model = AutoModelForImageClassification.from_pretrained(tiny_image_classifier)
    processor = AutoImageProcessor.from_pretrained(tiny_image_classifier)
    assert type(processor).__name__ == "ViTImageProcessorPil"  # torchvision is not installed
    assert model.config.id2label == id2label(IMAGE_LABELS)
    images = [Image.new("RGB", (64, 48), "red"), Image.new("RGB", (20, 20), "blue")]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (2, 3, 32, 32)
    with torch.no_grad():
        assert model(pixel_values=pixels).logits.shape == (2, 2)


def test_hugging_face_libraries_are_offline():
    assert os.environ["HF_HUB_OFFLINE"] == os.environ["TRANSFORMERS_OFFLINE"] == "1"
    assert os.environ["HF_DATASETS_OFFLINE"] == "1" and os.environ["TOKENIZERS_PARALLELISM"] == "false"
    assert huggingface_hub.constants.HF_HUB_OFFLINE is True


def test_network_guard_refuses_outside_connections():
    with pytest.raises(RuntimeError, match="may not use the network"):
        socket.create_connection(OUTSIDE, timeout=0.5)
    with pytest.raises(RuntimeError, match="may not use the network"):
        socket.create_connection(("example.com", 80), timeout=0.5)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        with pytest.raises(RuntimeError, match="may not use the network"):
            sock.connect(OUTSIDE)
        with pytest.raises(RuntimeError, match="may not use the network"):
            sock.connect_ex(OUTSIDE)


def test_network_guard_lets_loopback_through():
    with socket.create_server(("127.0.0.1", 0)) as server:
        with socket.create_connection(server.getsockname(), timeout=0.5):
            pass
