"""Shared test fixtures: a tiny WordPiece tokenizer and tiny random BERTs built from BertConfig.

Nothing here downloads anything; every model is a few hundred kB and runs in milliseconds.
"""

import os
import string
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub id must fail fast in tests, not retry for ~25 s
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = (
    "the a an of and to in is was it that for on with as by at from this be are his her he she they "
    "film movie good bad great terrible plot acting story love hate fun boring not very no yes "
    "city river king war music team game year people world house school book time day man woman "
    "who what where when which paris london france england john mary born played wrote won lost"
).split()


def write_vocab(folder: Path) -> Path:
    """A WordPiece vocabulary that can spell any lower-case ASCII text (letters and '##' pieces)."""
    folder.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = specials + chars + ["##" + c for c in string.ascii_lowercase + string.digits] + WORDS
    (folder / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    return folder


def make_tokenizer(folder: Path):
    from transformers import BertTokenizerFast

    write_vocab(folder)
    # transformers 5.x: BertTokenizerFast(vocab_file=...) builds a 5-token vocabulary; load the folder.
    tok = BertTokenizerFast.from_pretrained(str(folder), do_lower_case=True, model_max_length=64)
    assert len(tok) > 100
    tok.save_pretrained(str(folder))
    return tok


def tiny_config(vocab_size: int, layers: int = 4, **kw):
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64, **kw)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    make_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_mlm_dir(tmp_path_factory, tokenizer_dir):
    """A saved 4-layer random BertForMaskedLM with the tiny tokenizer: a stand-in teacher folder."""
    from transformers import AutoTokenizer, BertForMaskedLM

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    folder = tmp_path_factory.mktemp("tiny_mlm")
    model = BertForMaskedLM(tiny_config(len(tok), layers=4))
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder
