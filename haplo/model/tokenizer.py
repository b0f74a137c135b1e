"""Tokenizers: a checkpoint's Hugging Face tokenizer files, or a small built-in one for presets.

The built-in tokenizer is byte-level (every UTF-8 byte is a token, so any text round-trips) with the
Qwen2-style special tokens and the image/video placeholders at the ids the config names. It is
built offline and deterministically; real checkpoints ship their own tokenizer (Qwen2.5's).
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from haplo.errors import HaploError
from haplo.model.config import HaploOmniConfig

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
IMAGE_TOKEN, VIDEO_TOKEN = "<image>", "<video>"

# Qwen2.5's template: a default system turn, <|im_start|>role\ncontent<|im_end|>\n per message.
# List-valued content renders image/video items as their placeholder on a line of its own.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'video' %}<video>\n"
    "{% else %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class TokenizerError(HaploError, ValueError):
    pass


def build_tokenizer(config: HaploOmniConfig) -> PreTrainedTokenizerFast:
    """Byte-level tokenizer that fits `config.vocab_size`, placeholders at the configured ids."""
    specials = {PAD: config.pad_token_id, IMAGE_TOKEN: config.image_token_index, VIDEO_TOKEN: config.video_token_index}
    byte_symbols = sorted(pre_tokenizers.ByteLevel.alphabet())  # 256 printable stand-ins for the bytes
    free = [i for i in range(config.vocab_size) if i not in specials.values()]
    if (
        len(set(specials.values())) != len(specials)
        or len(free) < 2 + len(byte_symbols)
        or max(specials.values()) >= config.vocab_size
    ):
        raise TokenizerError(
            f"vocab_size {config.vocab_size} cannot hold 256 bytes and the special tokens "
            "at the configured ids; pass --tokenizer with the checkpoint's tokenizer"
        )
    specials[IM_START], specials[IM_END] = free[0], free[1]
    vocab = dict(zip(byte_symbols, free[2:]))
    vocab.update(specials)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        eos_token=IM_END,
        bos_token=None,
        additional_special_tokens=[IM_START, IM_END, IMAGE_TOKEN, VIDEO_TOKEN],
        padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerBase:
    """Hugging Face tokenizer files from a local directory (never the hub). A `tokenizer.json` is
    loaded as it is (AutoTokenizer would read the model's config.json, which is not a transformers
    model type); other layouts go through AutoTokenizer."""
    directory = Path(directory)
    if not directory.is_dir():
        raise TokenizerError(f"{directory}: not a directory of tokenizer files")
    loader = PreTrainedTokenizerFast if (directory / "tokenizer.json").is_file() else AutoTokenizer
    try:
        tokenizer = loader.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as err:
        raise TokenizerError(f"{directory}: cannot load a tokenizer ({str(err).splitlines()[0]})") from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tokenizer_for(
    config: HaploOmniConfig, checkpoint: str | Path | None = None, named: str | Path | None = None
) -> PreTrainedTokenizerBase:
    """A directory the user `named` (its files, or the reason they cannot load), else the checkpoint's
    tokenizer files when it has them, else the built-in tokenizer for `config`."""
    if named is not None:
        return load_tokenizer(named)
    if checkpoint is not None and (Path(checkpoint) / "tokenizer_config.json").exists():
        return load_tokenizer(checkpoint)
    return build_tokenizer(config)
