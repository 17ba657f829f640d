"""Builders of tiny, seeded models for offline tests: each saves a config-constructed model and its tokenizer
(trained here on a fixed corpus) or image processor with `save_pretrained`, and returns the directory.

Nothing is downloaded, and the same builder gives byte-identical files every time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Holds every word of test_run.py's sample rows, so the uncased WordPiece vocabulary has each as one token.
CORPUS = (
    "The quick brown fox jumps over the lazy dog.",
    "A cat sleeps in the warm sun while the dog watches.",
    "People walk through the old city of London near the river on a quiet morning.",
    "Alice and Bob travelled from Paris to Berlin by train last summer.",
    "Maria Garcia lives in Madrid and works at a small bookshop.",
    "John Smith met Anna Meyer in Vienna to talk about the new museum.",
    "The river Thames flows through London and the river Seine through Paris.",
    "Tokyo, New York and Sydney are large cities with busy streets.",
    "I loved this film; the story was wonderful and the music was great!",
    "The service was terrible, the food was cold, and I will not come back.",
    "It was an ordinary day, nothing good and nothing bad happened.",
    "This is the best book I have read this year, truly excellent.",
    "The product broke after two days, which was very disappointing.",
    "The weather today is cloudy with a chance of light rain in the evening.",
    "Summarize the following text in one short sentence, please.",
    "The meeting has been moved to Thursday at ten o'clock in room 42.",
    "Scientists found that the small birds fly south every autumn.",
    "The children played football in the park until it was dark.",
    "She opened the window, and a cold wind came into the room.",
    "Our team released version 2.0 of the software with many fixes.",
    "The train to Edinburgh leaves at 9:15 from platform three.",
    "He said hello, asked how we were, and then left without a word.",
    "The market sells fresh bread, cheese, apples and green tea.",
    "Mountains, lakes and forests make the north a beautiful place to visit.",
    "Please read the report and send me your comments by Friday.",
    "The user asked a question and the assistant gave a helpful answer.",
    "Water boils at one hundred degrees, and ice melts above zero.",
    "The old man told a long story about the sea and his ship.",
    "Prices rose quickly, so many families bought less food this month.",
    "What time does the shop open on Sunday morning?",
)
MAX_POSITIONS = 512
BPE_VOCABULARY_LIMIT = 1000

BERT_SPECIAL_TOKENS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]",
                       "sep_token": "[SEP]", "mask_token": "[MASK]"}
T5_SPECIAL_TOKENS = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
GPT2_SPECIAL_TOKENS = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SUMMARIZATION_PARAMS = {"summarization": {"prefix": "summarize: ", "max_length": 40, "num_beams": 2}}
SENTIMENT_LABELS = ("negative", "neutral", "positive")
ENTITY_LABELS = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC")
IMAGE_LABELS = ("cat", "dog")
BERT_SIZES = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
              "max_position_embeddings": MAX_POSITIONS}


@dataclass(frozen=True)
class TinyModels:
    """Where each tiny model was saved."""

    seq2seq: Path
    causal_lm: Path
    text_classifier: Path
    token_classifier: Path
    embedder: Path
    image_classifier: Path


def build_all(root: Path) -> TinyModels:
    return TinyModels(**{name: build(Path(root) / name) for name, build in BUILDERS.items()})


def built_in(root: Path) -> TinyModels:
    """Where build_all(root) put each model."""
    return TinyModels(**{name: Path(root) / name for name in BUILDERS})


def wordpiece_tokenizer():
    """A BERT-style uncased WordPiece tokenizer: [CLS] text [SEP], fast, so it gives offsets."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    vocabulary = wordpiece_vocabulary(normalizer, pre_tokenizer)
    tokenizer = Tokenizer(models.WordPiece(vocabulary, unk_token=BERT_SPECIAL_TOKENS["unk_token"]))
    tokenizer.normalizer, tokenizer.pre_tokenizer = normalizer, pre_tokenizer
    tokenizer.decoder = decoders.WordPiece()
    cls, sep = BERT_SPECIAL_TOKENS["cls_token"], BERT_SPECIAL_TOKENS["sep_token"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, vocabulary[cls]), (sep, vocabulary[sep])],
    )
    # BertTokenizer's inputs; the generic wrapper's default leaves token_type_ids out
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=MAX_POSITIONS,
                                   model_input_names=["input_ids", "token_type_ids", "attention_mask"],
                                   **BERT_SPECIAL_TOKENS)


def wordpiece_vocabulary(normalizer, pre_tokenizer) -> dict[str, int]:
    """Special tokens, every character alone and as a "##" continuation, then every corpus word.

    Made here rather than by WordPieceTrainer, which numbers its "##" pieces in hash order, so its vocabulary
    differs between processes; this one is the same on every run, and unseen words still split into characters.
    """
    words = {word for line in CORPUS
             for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line))}
    characters = sorted({character for word in words for character in word})
    tokens = [*BERT_SPECIAL_TOKENS.values(), *characters, *(f"##{character}" for character in characters),
              *sorted(words - set(characters))]
    return {token: index for index, token in enumerate(tokens)}


def byte_level_tokenizer(special_tokens: dict[str, str], append_eos: bool):
    """A byte-level BPE tokenizer (no unknown text); `append_eos` ends each sequence with EOS, as T5's does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = list(dict.fromkeys(special_tokens.values()))
    # the BPE trainer is deterministic: its alphabet is sorted and ties between merges go to the lower ids
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCABULARY_LIMIT, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    if append_eos:
        eos = special_tokens["eos_token"]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, tokenizer.token_to_id(eos))])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=MAX_POSITIONS, **special_tokens)


def save(directory: Path, model, *processors) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    for processor in processors:
        processor.save_pretrained(directory)
    return directory


def seeded(model_class, config):
    """The model built from `config` with torch's global seed reset first, so its weights never change."""
    import torch

    torch.manual_seed(0)
    return model_class(config)


def labels(names: tuple[str, ...]) -> dict:
    return {"id2label": dict(enumerate(names)), "label2id": {name: index for index, name in enumerate(names)}}


def build_seq2seq(directory: Path) -> Path:
    """T5 with summarization task_specific_params and a saved generation config (max_length 20)."""
    from transformers import GenerationConfig, T5Config, T5ForConditionalGeneration

    tokenizer = byte_level_tokenizer(T5_SPECIAL_TOKENS, append_eos=True)
    special_ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
                   "decoder_start_token_id": tokenizer.pad_token_id}  # T5 starts decoding from its pad token
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, relative_attention_max_distance=32,
                      task_specific_params=SUMMARIZATION_PARAMS, **special_ids)
    model = seeded(T5ForConditionalGeneration, config)
    model.generation_config = GenerationConfig(max_length=20, **special_ids)
    return save(directory, model, tokenizer)


def build_causal_lm(directory: Path) -> Path:
    """GPT-2 whose tokenizer, like GPT-2's, has one token for BOS and EOS, no pad token, and a chat template."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = byte_level_tokenizer(GPT2_SPECIAL_TOKENS, append_eos=False)
    tokenizer.chat_template = CHAT_TEMPLATE
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=MAX_POSITIONS, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return save(directory, seeded(GPT2LMHeadModel, config), tokenizer)


def bert_config(tokenizer, **extra):
    from transformers import BertConfig

    return BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **BERT_SIZES, **extra)


def build_text_classifier(directory: Path) -> Path:
    from transformers import BertForSequenceClassification

    tokenizer = wordpiece_tokenizer()
    model = seeded(BertForSequenceClassification, bert_config(tokenizer, **labels(SENTIMENT_LABELS)))
    return save(directory, model, tokenizer)


def build_token_classifier(directory: Path) -> Path:
    from transformers import BertForTokenClassification

    tokenizer = wordpiece_tokenizer()
    model = seeded(BertForTokenClassification, bert_config(tokenizer, **labels(ENTITY_LABELS)))
    return save(directory, model, tokenizer)


def build_embedder(directory: Path) -> Path:
    from transformers import BertModel

    tokenizer = wordpiece_tokenizer()
    return save(directory, seeded(BertModel, bert_config(tokenizer)), tokenizer)


def build_image_classifier(directory: Path) -> Path:
    """ViT on 32x32 images with the PIL image processor: the torchvision one needs a package the tests lack."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, **labels(IMAGE_LABELS))
    processor = ViTImageProcessorPil(size={"height": 32, "width": 32})
    return save(directory, seeded(ViTForImageClassification, config), processor)


BUILDERS = {
    "seq2seq": build_seq2seq,
    "causal_lm": build_causal_lm,
    "text_classifier": build_text_classifier,
    "token_classifier": build_token_classifier,
    "embedder": build_embedder,
    "image_classifier": build_image_classifier,
}
