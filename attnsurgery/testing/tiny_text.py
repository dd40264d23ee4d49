"""Offline tokenizers and random-weight LLM text encoders for the tiny FLUX.2, Qwen-Image and Z-Image pipelines.

Their pipelines wrap every prompt in a chat template or a long system message (Qwen-Image drops its first 34
template tokens, FLUX.2 pads to ``max_sequence_length``), so a tokenizer that spends one token per byte would
push the prompt itself out of a short test sequence. The byte-level BPEs here are trained in-process (a few
milliseconds, deterministic) on those templates and a handful of prompts until each of their words is one
token; any other text still tokenizes, byte by byte. Nothing is downloaded.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from transformers import (
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen3Config,
    Qwen3Model,
)

from ..reference.model import bytes_to_unicode

__all__ = ["tiny_qwen_tokenizer", "tiny_mistral_tokenizer", "tiny_qwen25vl", "tiny_qwen3", "tiny_mistral3"]

# Qwen2's pre-tokenizer (transformers' qwen2 tokenizer), used for the Mistral stand-in too.
_PRETOKENIZE = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# QwenImagePipeline.prompt_template_encode (diffusers 0.42): with merges trained on it, its system part is
# 34 tokens, the pipeline's drop_idx, as with the real tokenizer.
QWENIMAGE_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
PROMPTS = ("a red cube", "a blue ball", "a photo of a cat", "blurry", "bad quality", "a castle at dusk")
_QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>")
# Tekken's (Mistral-Small-3.1) first control tokens in their real order: <unk> 0, <s> 1, </s> 2, [IMG] 10, <pad> 11.
_MISTRAL_SPECIALS = (
    ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]")
    + ("[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]", "[PREFIX]", "[MIDDLE]")
    + ("[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]")
)

# Chat templates reduced to what the pipelines use; FLUX.2 sends content as a list of {"type": "text"} parts.
_TEXT = (
    "{%- if message['content'] is string %}{%- set text = message['content'] %}{%- else %}"
    "{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}"
    "{%- endif %}"
)
_CHATML = (
    "{%- for message in messages %}"
    + _TEXT
    + "{{- '<|im_start|>' + message['role'] + '\\n' + text + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
_MISTRAL_CHAT = (
    "{{- bos_token }}{%- for message in messages %}" + _TEXT + "{%- if message['role'] == 'system' %}"
    "{{- '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}{%- elif message['role'] == 'user' %}"
    "{{- '[INST]' + text + '[/INST]' }}{%- else %}{{- text + eos_token }}{%- endif %}{%- endfor %}"
)


def _components():
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers

    split = pre_tokenizers.Split(Regex(_PRETOKENIZE), behavior="isolated", invert=False)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    return normalizers.NFC(), pre_tokenizers.Sequence([split, byte_level]), decoders.ByteLevel()


def _train_bpe(
    corpus: Iterable[str], specials: tuple[str, ...], specials_first: bool
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a byte-level BPE that makes every word of `corpus` one token. Ids: the 256 bytes,
    then merged tokens, with `specials` before or after them; special tokens are cut out of the corpus first,
    as they are at encode time."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    normalizer, pre_tokenizer, _ = _components()
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer, tokenizer.pre_tokenizer = normalizer, pre_tokenizer
    cut = "|".join(map(re.escape, specials))
    segments = [piece for text in corpus for piece in re.split(cut, text) if piece]
    trainer = trainers.BpeTrainer(
        vocab_size=1 << 20, min_frequency=1, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(segments, trainer)
    trained = json.loads(tokenizer.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained]
    tokens = list(bytes_to_unicode().values()) + [a + b for a, b in merges]
    ordered = [*specials, *tokens] if specials_first else [*tokens, *specials]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(ordered))}
    return vocab, merges


def _add_specials(tokenizer, specials: tuple[str, ...]) -> None:
    from tokenizers import AddedToken

    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in specials], special_tokens=True)


def tiny_qwen_tokenizer() -> Qwen2Tokenizer:
    """Qwen2Tokenizer (Qwen2.5-VL, Qwen3) with ChatML specials after the vocabulary, as in the real one;
    pad = eos = ``<|endoftext|>``."""
    corpus = [QWENIMAGE_TEMPLATE.format(p) for p in PROMPTS]
    corpus += [f"<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n" for p in PROMPTS]
    vocab, merges = _train_bpe(corpus, _QWEN_SPECIALS, specials_first=False)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, chat_template=_CHATML)
    _add_specials(tokenizer, _QWEN_SPECIALS)
    return tokenizer


def tiny_mistral_tokenizer() -> PreTrainedTokenizerFast:
    """A Tekken-like tokenizer for FLUX.2's Mistral3 encoder. Flux2Pipeline only calls ``apply_chat_template``,
    so a tokenizer stands in for the real PixtralProcessor (which needs torchvision)."""
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from tokenizers import Tokenizer, models

    vocab, merges = _train_bpe([SYSTEM_MESSAGE, *PROMPTS], _MISTRAL_SPECIALS, specials_first=True)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    backend.normalizer, backend.pre_tokenizer, backend.decoder = _components()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        chat_template=_MISTRAL_CHAT,
    )
    _add_specials(tokenizer, _MISTRAL_SPECIALS)
    return tokenizer


def _llm(hidden: int, layers: int, heads: int, kv_heads: int, vocab_size: int, **extra) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        **extra,
    )


def tiny_qwen25vl(tokenizer: Qwen2Tokenizer, hidden: int = 32) -> Qwen2_5_VLForConditionalGeneration:
    """Qwen-Image's encoder: 2 text layers (M-RoPE sections in the real 16:24:24 ratio) and a 2-block vision
    tower the text-to-image path never runs."""
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in _QWEN_SPECIALS}
    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}
    text = _llm(hidden, 2, 2, 1, len(tokenizer), rope_parameters=rope, pad_token_id=ids["<|endoftext|>"])
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=hidden)
    vision.update(fullatt_block_indexes=[1], patch_size=14, spatial_merge_size=2, window_size=112)
    config = Qwen2_5_VLConfig(
        text_config=dict(text, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"]),
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def tiny_qwen3(tokenizer: Qwen2Tokenizer, hidden: int = 32) -> Qwen3Model:
    """Z-Image's encoder (Qwen3); Qwen3Config's head_dim defaults to 128 whatever the width, so it is set."""
    rope = {"rope_type": "default", "rope_theta": 1e6}
    config = _llm(hidden, 2, 4, 2, len(tokenizer), head_dim=8, rope_parameters=rope)
    return Qwen3Model(Qwen3Config(**config, pad_token_id=tokenizer.pad_token_id))


def tiny_mistral3(tokenizer: PreTrainedTokenizerFast, hidden: int = 32) -> Mistral3ForConditionalGeneration:
    """FLUX.2's encoder (Mistral-Small-3.1): 30 layers, so that the pipeline's default hidden-state layers
    (10, 20, 30) exist, and a one-block Pixtral tower the text-to-image path never runs."""
    rope = {"rope_type": "default", "rope_theta": 1e9}
    text = _llm(hidden, 30, 4, 2, len(tokenizer), head_dim=8, rope_parameters=rope, sliding_window=None)
    text.update(model_type="mistral", rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=11)
    vision = dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    vision.update(num_attention_heads=4, image_size=64, patch_size=8, num_channels=3)
    config = Mistral3Config(
        text_config=text,
        vision_config=vision,
        image_token_index=10,
        spatial_merge_size=2,
        multimodal_projector_bias=False,
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    return Mistral3ForConditionalGeneration(config)
