"""CLIP BPE tokenizers written offline, in the files the hub repos hold.

`CLIPTokenizer(vocab_file=...)` silently ignores the files under transformers 5 (every prompt then encodes
alike), so the zoo writes `vocab.json` / `merges.txt` / `tokenizer_config.json` / `special_tokens_map.json`
and the pipelines load them with `CLIPTokenizer.from_pretrained(dir)` like a real repo.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .common import write_json

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MODEL_MAX_LENGTH = 77

# A few merges so that common words become multi-character tokens, as in a real CLIP vocabulary.
# Each pair's parts are byte symbols or results of earlier merges.
_MERGES = (
    ("t", "h"), ("i", "n"), ("e", "r"), ("a", "n"), ("o", "n"), ("r", "e"), ("s", "t"), ("a", "r"),
    ("o", "r"), ("e", "n"), ("a", "l"), ("l", "o"), ("o", "u"), ("i", "t"), ("h", "e"), ("q", "u"),
    ("th", "e</w>"), ("an", "d</w>"), ("in", "g</w>"), ("e", "r</w>"), ("o", "n</w>"), ("a", "t</w>"),
    ("e", "s</w>"), ("l", "y</w>"), ("i", "s</w>"), ("o", "f</w>"), ("t", "o</w>"),
    ("qu", "al"), ("st", "y"), ("l", "e</w>"), ("sty", "le</w>"),
)


def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 / CLIP byte-to-symbol table (256 printable symbols)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


@dataclass(frozen=True)
class TokenizerSpec:
    vocab_size: int
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int


def build_vocab(pad_to: int | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary in CLIP order: 256 byte symbols, the same with `</w>`, merge results, [fillers,]
    then `<|startoftext|>` and `<|endoftext|>` as the last ids. `pad_to` pads with unreachable filler
    tokens so that the specials land on the real ids (49406 / 49407 for `pad_to=49408`)."""
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    known = set(tokens)
    for left, right in _MERGES:
        assert left in known and right in known, (left, right)
        merged = left + right
        assert merged not in known, merged
        tokens.append(merged)
        known.add(merged)
    if pad_to is not None:
        fillers = pad_to - len(tokens) - 2
        if fillers < 0:
            raise ValueError(f"pad_to={pad_to} is smaller than the base vocabulary ({len(tokens) + 2})")
        tokens.extend(f"<|filler_{i}|>" for i in range(fillers))
    tokens.extend([BOS, EOS])
    return {token: index for index, token in enumerate(tokens)}, list(_MERGES)


def tokenizer_spec(pad_to: int | None = None, *, pad_token: str = EOS) -> TokenizerSpec:
    vocab, _ = build_vocab(pad_to)
    return TokenizerSpec(len(vocab), vocab[BOS], vocab[EOS], vocab[pad_token])


def write_clip_tokenizer(directory: Path, *, pad_token: str = EOS, pad_to: int | None = None) -> TokenizerSpec:
    """Write a CLIP tokenizer folder. `pad_token` is `<|endoftext|>` for SD's tokenizer and `!` for SDXL's
    `tokenizer_2`, as in the real repos. Returns the ids the text encoder config must use."""
    vocab, merges = build_vocab(pad_to)
    directory.mkdir(parents=True, exist_ok=True)
    write_json(directory / "vocab.json", vocab, sort_keys=False)
    lines = ["#version: 0.2"] + [f"{left} {right}" for left, right in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    write_json(
        directory / "tokenizer_config.json",
        {
            "add_prefix_space": False,
            "bos_token": BOS,
            "clean_up_tokenization_spaces": True,
            "do_lower_case": True,
            "eos_token": EOS,
            "errors": "replace",
            "model_max_length": MODEL_MAX_LENGTH,
            "pad_token": pad_token,
            "tokenizer_class": "CLIPTokenizer",
            "unk_token": EOS,
        },
    )
    write_json(
        directory / "special_tokens_map.json",
        {"bos_token": BOS, "eos_token": EOS, "pad_token": pad_token, "unk_token": EOS},
    )
    return TokenizerSpec(len(vocab), vocab[BOS], vocab[EOS], vocab[pad_token])
