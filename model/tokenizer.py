"""Tokenizers: any Hugging Face tokenizer from a directory, and a small character-level tokenizer for
synthetic reasoning tasks (digits, arithmetic, lower-case text, the R1 tags as single tokens), saved in
Hugging Face format so transformers and vLLM load it too."""

from __future__ import annotations

import string
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")
R1_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
DEFAULT_ALPHABET = string.digits + string.ascii_lowercase + string.ascii_uppercase + " +-*/=()<>[]{}.,:;?!'\"\n_%^|\\$#&"
# A plain chat template: the user turn, then the assistant's reply.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] + '\n' }}"
    "{% elif m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\n' }}"
    "{% else %}{{ 'Assistant: ' + m['content'] + eos_token + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def build_char_tokenizer(alphabet: str = DEFAULT_ALPHABET, tags: tuple[str, ...] = R1_TAGS) -> PreTrainedTokenizerFast:
    """One token per character of `alphabet`, plus `tags` as whole tokens and <pad>/<bos>/<eos> (ids 0-2).

    Characters outside the alphabet map to <pad>; keep the alphabet wide enough for the task."""
    chars = list(dict.fromkeys(alphabet))
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *chars, *tags])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                  clean_up_tokenization_spaces=False)
    # Tags are matched before the character split, so "<think>" is one token, not seven.
    tok.add_tokens(list(tags))
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """A Hugging Face tokenizer (tokenizer.json, tokenizer_config.json, chat template) from a local directory."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory {path} does not exist")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
