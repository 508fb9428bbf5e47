"""Tokenizers for the tiny pipelines, written to a folder from a small vocabulary (nothing is downloaded).

The CLIP tokenizer is character-level: its vocabulary is CLIP's 256 byte symbols (plus word-final forms). The T5
tokenizer is a character-level Unigram (sentencepiece-style) model. The Qwen tokenizer is byte-level BPE without
merges (one token per byte) plus Qwen's chat special tokens and a Qwen3-style chat template (its Qwen3-VL variant
adds the vision markers and a template for contents given as parts); the Mistral tokenizer is the same byte-level
model with Mistral's control tokens and a Mistral-Small-3-style chat template. Files are published atomically, so
two processes building the same pipeline never read a half-written vocabulary.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator

from transformers import CLIPTokenizer, PreTrainedTokenizerFast, Qwen2Tokenizer, T5TokenizerFast


def _bytes_to_unicode() -> list[str]:
    # CLIP's reversible byte -> printable-symbol table.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    symbols = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            symbols.append(256 + extra)
            extra += 1
    return [chr(s) for s in symbols]


@contextlib.contextmanager
def _published(directory: str) -> Iterator[str]:
    """Write into a staging folder inside ``directory``, then move each file into place with ``os.replace``: a process
    reading the tokenizer while another (re)writes it (two training processes building the same tiny pipeline)
    always sees whole files."""
    os.makedirs(directory, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".staging-", dir=directory)
    try:
        yield staging
        for name in os.listdir(staging):
            os.replace(os.path.join(staging, name), os.path.join(directory, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_char_tokenizer(directory: str, max_length: int = 32, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """Write a character-level CLIP tokenizer to ``directory`` (file by file, atomically) and load it back."""
    symbols = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab.setdefault(s, len(vocab))
    for s in symbols:
        vocab.setdefault(s + "</w>", len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with _published(directory) as staging:
        with open(os.path.join(staging, "vocab.json"), "w") as f:
            json.dump(vocab, f)
        with open(os.path.join(staging, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n")
        tokenizer = CLIPTokenizer(
            os.path.join(staging, "vocab.json"),
            os.path.join(staging, "merges.txt"),
            model_max_length=max_length,
            pad_token=pad_token,
        )
        tokenizer.save_pretrained(staging)
    return tokenizer


def write_t5_tokenizer(directory: str, max_length: int = 16) -> T5TokenizerFast:
    """Write a character-level T5 (Unigram, sentencepiece-style) tokenizer to ``directory`` and load it back.

    Its pieces are ``<pad>`` (0), ``</s>`` (1), ``<unk>`` (2), the word-start marker and the printable ASCII
    characters with and without it; every prompt therefore tokenises without unknown pieces. ``max_length`` is
    its ``model_max_length``.
    """
    os.makedirs(directory, exist_ok=True)
    characters = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + c, -3.0) for c in characters] + [(c, -4.0) for c in characters]
    tokenizer = T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=max_length)
    with _published(directory) as staging:  # whole files for a process reading them meanwhile
        tokenizer.save_pretrained(staging)
    return T5TokenizerFast.from_pretrained(directory)


# Qwen's chat markers and a Qwen3-style chat template (the generation prompt, and the empty thinking block when
# ``enable_thinking=False``), enough for ``apply_chat_template`` as the Z-Image pipeline calls it.
_QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


# The words of QwenImagePipeline's prompt template, one token each as in Qwen's real BPE vocabulary: the template's
# prefix is then 34 tokens, the pipeline's ``prompt_template_encode_start_idx``, and dropping it keeps the prompt.
_QWEN_TEMPLATE_WORDS = (
    "system", "user", "assistant", "Describe", " the", " image", " by", " detailing", " color", " shape", " size",
    " texture", " quantity", " text", " spatial", " relationships", " of", " objects", " and", " background",
)  # fmt: skip


def write_qwen_tokenizer(directory: str, max_length: int = 64) -> Qwen2Tokenizer:
    """Write a byte-level Qwen2 tokenizer (one token per byte, no merges, plus whole-word tokens for the words of
    Qwen-Image's prompt template) with Qwen's chat special tokens (``<|endoftext|>`` pads) and a chat template to
    ``directory``, and load it back."""
    return _write_byte_level_qwen(
        directory, max_length, _QWEN_SPECIAL_TOKENS, _QWEN_TEMPLATE_WORDS, _QWEN_CHAT_TEMPLATE
    )


# Qwen3-VL's vision markers beside the chat markers, and a Qwen3-VL-style chat template whose message contents are
# strings or lists of ``{"type": "text"}`` / ``{"type": "image"}`` parts (how QwenImage21Pipeline writes its system
# turn).
_QWEN_VL_SPECIAL_TOKENS = (
    *_QWEN_SPECIAL_TOKENS, "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip
_QWEN_VL_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for part in m['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% else %}<|vision_start|><|image_pad|><|vision_end|>{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# The words of QwenImage21Pipeline's system prompt and template, one token each as in Qwen's real BPE vocabulary: the
# system turn the pipeline drops is then 9 tokens, not 52.
_QWEN21_TEMPLATE_WORDS = (
    "system", "user", "assistant", "Comprehend", " and", " analyze", " the", " provided", " prompt",
)  # fmt: skip


def write_qwen3_vl_tokenizer(directory: str, max_length: int = 64) -> Qwen2Tokenizer:
    """Write a byte-level Qwen2 tokenizer as :func:`write_qwen_tokenizer` does, with Qwen3-VL's vision markers
    (``<|image_pad|>`` and the rest), whole-word tokens for the words of Qwen-Image 2.1's system prompt and a
    Qwen3-VL-style chat template (contents as strings or lists of parts) to ``directory``, and load it back."""
    return _write_byte_level_qwen(
        directory, max_length, _QWEN_VL_SPECIAL_TOKENS, _QWEN21_TEMPLATE_WORDS, _QWEN_VL_CHAT_TEMPLATE
    )


def _write_byte_level_qwen(
    directory: str, max_length: int, special_tokens: tuple[str, ...], words: tuple[str, ...], chat_template: str
) -> Qwen2Tokenizer:
    """One token per byte, ``special_tokens`` (the first pads), then ``words`` as whole tokens; saved and reloaded."""
    os.makedirs(directory, exist_ok=True)
    vocab = {symbol: index for index, symbol in enumerate(dict.fromkeys(_bytes_to_unicode()))}
    for token in special_tokens:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=max_length)
    tokenizer.add_tokens(list(words))
    tokenizer.add_special_tokens({"additional_special_tokens": list(special_tokens[1:])})
    tokenizer.chat_template = chat_template
    with _published(directory) as staging:  # whole files for a process reading them meanwhile
        tokenizer.save_pretrained(staging)
    return Qwen2Tokenizer.from_pretrained(directory)


# The words of the Qwen-Image-Edit pipelines' prompt template that Qwen-Image's leave out, one token each as in Qwen's
# real vocabulary: the template's prefix (up to the user turn) is then 64 tokens, their
# ``prompt_template_encode_start_idx``. Qwen2-VL's vision markers delimit each image's placeholder tokens.
_QWEN_EDIT_TEMPLATE_WORDS = (
    " key", " features", " input", " (", "color", "),", " then", " explain", " how", " user", "'s", " instruction",
    " should", " alter", " or", " modify", " Generate", " a", " new", " that", " meets", " requirements", " while",
    " maintaining", " consistency", " with", " original", " where", " appropriate",
)  # fmt: skip
_QWEN_VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def write_qwen_vl_tokenizer(directory: str, max_length: int = 64) -> Qwen2Tokenizer:
    """:func:`write_qwen_tokenizer`'s tokenizer with the words of the Qwen-Image-Edit template and Qwen2-VL's vision
    special tokens added after its vocabulary (the tokenizer of a Qwen2-VL processor), written to ``directory`` and
    loaded back."""
    tokenizer = write_qwen_tokenizer(directory, max_length)
    tokenizer.add_tokens(list(_QWEN_EDIT_TEMPLATE_WORDS))
    special = [*_QWEN_SPECIAL_TOKENS[1:], *_QWEN_VISION_TOKENS]
    tokenizer.add_special_tokens({"additional_special_tokens": special})
    with _published(directory) as staging:
        tokenizer.save_pretrained(staging)
    return Qwen2Tokenizer.from_pretrained(directory)


# Mistral's control tokens at the ids of Mistral-Small-3's tekken vocabulary (``<pad>`` is 11, ``[IMG]`` 10), and a
# Mistral-Small-3-style chat template that takes message contents as strings or as lists of ``{"type": "text"}``
# parts (how Flux2Pipeline's ``format_input`` writes them).
_MISTRAL_SPECIAL_TOKENS = (
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]", "[PREFIX]", "[MIDDLE]",
    "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
)  # fmt: skip
_MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['content'] is string %}{% set text = m['content'] %}"
    "{% else %}{% set text = m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text')"
    " | join('') %}"
    "{% endif %}"
    "{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% elif m['role'] == 'user' %}[INST]{{ text }}[/INST]"
    "{% else %}{{ text }}{{ eos_token }}{% endif %}{% endfor %}"
)


def write_mistral_tokenizer(directory: str, max_length: int = 64) -> PreTrainedTokenizerFast:
    """Write a byte-level tokenizer with Mistral's control tokens (``<pad>`` pads), a Mistral-style chat template and
    whole-word tokens for the words of FLUX.2's system message (so that the message is about 30 tokens, not 170) to
    ``directory``, and load it back."""
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    os.makedirs(directory, exist_ok=True)
    vocab = {token: index for index, token in enumerate(_MISTRAL_SPECIAL_TOKENS)}
    for symbol in dict.fromkeys(_bytes_to_unicode()):
        vocab.setdefault(symbol, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=max_length,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(_MISTRAL_SPECIAL_TOKENS[3:])})
    words = SYSTEM_MESSAGE.split()
    tokenizer.add_tokens(list(dict.fromkeys(words[:1] + [" " + w for w in words[1:]] + ["\n" + w for w in words])))
    tokenizer.chat_template = _MISTRAL_CHAT_TEMPLATE
    with _published(directory) as staging:  # whole files for a process reading them meanwhile
        tokenizer.save_pretrained(staging)
    return PreTrainedTokenizerFast.from_pretrained(directory)
