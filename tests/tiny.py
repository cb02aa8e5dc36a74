"""A tiny random causal LM and tokenizer, built locally in about a second with no model hub.

Tests import these instead of downloading anything:

    from tests.tiny import make_tiny_tokenizer, make_tiny_model, save_tiny_model

The tokenizer is a byte-level BPE trained in-process on a small English corpus, so any text round-trips
and ordinary English text splits into familiar pieces. It has ChatML special tokens, a pad token distinct
from EOS, and a chat template with ``{% generation %}`` markers (for TRL's ``assistant_only_loss``).
Option letters ``A``/``B`` and the numbers 1-10 are single tokens after ``(``.
"""

from __future__ import annotations

import functools
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|pad|>", "<|im_start|>", "<|im_end|>"]

_CORPUS = """
The quick brown fox jumps over the lazy dog. A helpful assistant answers the question honestly.
Which response is more helpful, honest and harmless? Choose (A) or (B). The answer is (A). The answer is (B).
Options: (A) the first response (B) the second response. Rate it from (1) to (10): (1) (2) (3) (4) (5) (6)
(7) (8) (9) (10). Score: 1 2 3 4 5 6 7 8 9 10. I am sorry, but I cannot help with that request because
it could cause harm. Here is how you can do it safely. Please explain why this is wrong and rewrite the
response so that it is kind, respectful and accurate. Critique: the response is rude. Revision: the
response is polite. User: How do I bake bread? Assistant: Mix flour, water, salt and yeast, then knead
the dough, let it rise and bake it in a hot oven. What is the capital of France? Paris is the capital.
Tell me a story about a cat and a dog who became friends in a small town near the river.
Constitution principle: choose the response that is least harmful and most ethical.
Human: can you help me? Assistant: yes, of course I can help you with that question.
"""


def _train_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line for line in _CORPUS.splitlines() if line.strip()]
    # Repeat so every merge clears min_frequency; "10" must become one token.
    tok.train_from_iterator(lines * 4, trainer=trainer)
    return tok.to_str()


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    return _train_tokenizer_json()


def make_tiny_tokenizer():
    """A byte-level BPE ``PreTrainedTokenizerFast`` with ChatML tokens, ``<|pad|>`` and a chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token=None,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        padding_side="left",
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_tiny_model(tokenizer, seed: int = 0):
    """A random ``LlamaForCausalLM``: hidden 32, 2 layers, 4 heads, vocab = ``len(tokenizer)``."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.eval()
    return model


def save_tiny_model(path, seed: int = 0) -> Path:
    """Save a tiny model and its tokenizer to ``path`` (loadable with ``from_pretrained``); return it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(tokenizer, seed=seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# What many instruct models' generation_config.json carry, and generate applies to every call that
# leaves the setting unset.
SHIPPED_SAMPLING_DEFAULTS = dict(repetition_penalty=1.3, top_k=5, min_p=0.05, typical_p=0.9, no_repeat_ngram_size=2)


def save_tiny_model_with_sampling_defaults(path, seed: int = 0) -> Path:
    """A tiny model whose generation_config sets a repetition penalty, top-k, min-p, typical-p and
    no-repeat n-grams (`SHIPPED_SAMPLING_DEFAULTS`)."""
    from transformers import AutoModelForCausalLM

    path = save_tiny_model(path, seed=seed)
    model = AutoModelForCausalLM.from_pretrained(path)
    model.generation_config.update(do_sample=True, temperature=0.6, top_p=0.9, **SHIPPED_SAMPLING_DEFAULTS)
    model.save_pretrained(path)
    return path


# Chat templates in the formats of the common open model families (written here from the formats, not
# copied), with each family's special tokens: what cai serve must read back out of OpenRLHF's text.
FAMILY_TEMPLATES = {
    # ChatML as Qwen writes it: a default system turn when the conversation has none
    "qwen": dict(
        template="{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
        bos=None, eos="<|im_end|>", specials=["<|im_start|>", "<|im_end|>", "<|endoftext|>"], end="<|im_end|>"),
    "llama3": dict(
        template="{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + "
        "(m['content'] | trim) + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
        bos="<|begin_of_text|>", eos="<|eot_id|>",
        specials=["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|end_of_text|>"], end="<|eot_id|>"),
    # Gemma: no system role; a system prompt opens the first user turn
    "gemma": dict(
        template="{{ bos_token }}{% set ns = namespace(sys='') %}{% if messages[0]['role'] == 'system' %}"
        "{% set ns.sys = messages[0]['content'] + '\\n\\n' %}{% set messages = messages[1:] %}{% endif %}"
        "{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
        "{{ '<start_of_turn>' + role + '\\n' + (ns.sys if loop.first else '') + (m['content'] | trim) + '<end_of_turn>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}",
        bos="<bos>", eos="<eos>", specials=["<start_of_turn>", "<end_of_turn>"], end="<end_of_turn>\n<eos>"),
    "phi3": dict(
        template="{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}",
        bos=None, eos="<|endoftext|>", specials=["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], end="<|end|>"),
    # Mistral's [INST] format, on a sentencepiece-style tokenizer (its decode moves spaces)
    "mistral": dict(
        template="{{ bos_token }}{% set ns = namespace(sys='') %}{% if messages[0]['role'] == 'system' %}"
        "{% set ns.sys = messages[0]['content'] + '\\n\\n' %}{% set messages = messages[1:] %}{% endif %}"
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + (ns.sys if loop.first else '') + m['content'] + ' [/INST]' }}"
        "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}",
        bos="<s>", eos="</s>", specials=["[INST]", "[/INST]"], end="</s>", metaspace=True),
}


@functools.lru_cache(maxsize=1)
def _metaspace_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<unk>", "<|pad|>"], show_progress=False,
                                  initial_alphabet=list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,?!'()[]/<>|_-:\n\u2581"))
    lines = [line for line in _CORPUS.splitlines() if line.strip()]
    tok.train_from_iterator(lines * 4, trainer=trainer)
    return tok.to_str()


def make_family_tokenizer(family: str):
    """A tokenizer with `family`'s special tokens and chat template (FAMILY_TEMPLATES)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = FAMILY_TEMPLATES[family]
    source = _metaspace_tokenizer_json() if spec.get("metaspace") else _tokenizer_json()
    specials = [t for t in spec["specials"] if t not in (spec["bos"], spec["eos"])]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(source), bos_token=spec["bos"], eos_token=spec["eos"], pad_token="<|pad|>",
        additional_special_tokens=specials, clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = spec["template"]
    return tokenizer
