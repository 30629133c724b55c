"""The training corpus and tokenizer: the Python standard library's own source files (present on
every machine that runs pearlmoe, CI included; test suites excluded) and a byte-level BPE
tokenizer trained on them with the `tokenizers` package.
"""

import sysconfig
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import Tensor

EOS = "<|endoftext|>"
PAD = "<|pad|>"
SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__"}


def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """The stdlib's .py files, sorted, without its test suites, IDLE and installed packages."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = [
        p for p in root.rglob("*.py")
        if not SKIP_DIRS.intersection(p.relative_to(root).parts[:-1])
    ]  # fmt: skip
    if not files:
        raise FileNotFoundError(f"no Python sources under {root}")
    return sorted(files)


def split_files(files: list, held_out_every: int = 20) -> tuple[list, list]:
    """Deterministic split by file: every held_out_every-th file (or any distinct item, e.g.
    (name, text) pairs) is held out."""
    held_out = files[::held_out_every]
    chosen = set(held_out)
    return [f for f in files if f not in chosen], held_out


def read(files: list[Path]) -> list[str]:
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def train_tokenizer(texts: list[str], vocab_size: int = 4096) -> Tokenizer:
    """Byte-level BPE (every byte representable, so any text round-trips)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def encode(tokenizer: Tokenizer, texts: list[str]) -> Tensor:
    """One int64 token stream, documents separated by the end-of-text token: [N]."""
    eos = tokenizer.token_to_id(EOS)
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(texts):
        ids.extend(encoding.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int64)


def held_out_prompts(tokenizer: Tokenizer, count: int, length: int) -> list[list[int]]:
    """The opening tokens of held-out stdlib files (the split the embedded pair never trained
    on): the prompts of `pearlmoe bench` and of the drafts' decode agreement."""
    _, held_out = split_files(stdlib_files())
    prompts = []
    for text in read(held_out):
        ids = tokenizer.encode(text).ids
        if len(ids) >= length:
            prompts.append(ids[:length])
        if len(prompts) == count:
            break
    return prompts
