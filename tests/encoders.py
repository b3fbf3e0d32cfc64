"""Tiny masked LMs of every encoder family the scripts support, each with a real tokenizer of its own kind.

WordPiece (BERT, ELECTRA, DistilBERT) reads the vocabulary conftest.py writes; byte-level BPE (RoBERTa,
ModernBERT) and SentencePiece-style Unigram (XLM-R, DeBERTa-v3) are trained here with the `tokenizers`
library on a few hundred sentences (well under a second), then wrapped in the family's own tokenizer class,
saved and loaded back with AutoTokenizer, as a user's hub folder would be. Models: hidden 32, 4 blocks.
"""

import json
import random
from pathlib import Path

from conftest import WORDS, make_tokenizer

FAMILIES = ["bert", "roberta", "xlm-roberta", "electra", "deberta-v2", "distilbert", "modernbert"]
NAMES = ["John", "Mary", "Paris", "London", "France", "England", "Smith"]


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Sentences with capitals, digits and punctuation, so offsets and word boundaries are exercised."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [rng.choice(WORDS + NAMES) for _ in range(rng.randint(4, 14))]
        if rng.random() < 0.4:
            words.insert(rng.randint(0, len(words)), str(rng.randint(1800, 2020)))
        lines.append(" ".join(words) + rng.choice([".", "!", "?", ", and more."]))
    return lines


def byte_level_bpe(specials: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    return tok


def unigram(specials: list[str], unk: str):
    """[(piece, score)] with the specials first, in the order given."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=300, special_tokens=specials, unk_token=unk, show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    pieces = [(piece, score) for piece, score in json.loads(tok.to_str())["model"]["vocab"] if piece not in specials]
    return [(s, 0.0) for s in specials] + pieces


def build_tokenizer(family: str, folder: Path):
    """The family's tokenizer, saved in `folder` and loaded back with AutoTokenizer."""
    import transformers
    from transformers import AutoTokenizer

    if family in ("bert", "electra", "distilbert"):
        tok = make_tokenizer(folder)  # WordPiece
        cls = {"bert": transformers.BertTokenizer, "electra": transformers.ElectraTokenizer,
               "distilbert": transformers.DistilBertTokenizer}[family]
        tok = cls.from_pretrained(str(folder), model_max_length=128)
    elif family == "roberta":
        bpe = byte_level_bpe(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
        merges = [tuple(pair) for pair in json.loads(bpe.to_str())["model"]["merges"]]
        tok = transformers.RobertaTokenizer(vocab=bpe.get_vocab(), merges=merges, model_max_length=128)
    elif family == "modernbert":  # on the hub: a generic fast tokenizer, byte-level BPE with BERT's special tokens
        from tokenizers import decoders, processors

        specials = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
        bpe = byte_level_bpe(specials)
        cls_id, sep_id = bpe.token_to_id("[CLS]"), bpe.token_to_id("[SEP]")
        bpe.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
        bpe.decoder = decoders.ByteLevel()
        tok = transformers.PreTrainedTokenizerFast(
            tokenizer_object=bpe, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]",
            mask_token="[MASK]", model_max_length=128, model_input_names=["input_ids", "attention_mask"])
    elif family == "xlm-roberta":
        vocab = unigram(["<s>", "<pad>", "</s>", "<unk>"], "<unk>") + [("<mask>", 0.0)]
        tok = transformers.XLMRobertaTokenizer(vocab=vocab, model_max_length=128)
    else:  # deberta-v2: DeBERTa-v3's SentencePiece-style tokenizer
        vocab = unigram(["[PAD]", "[CLS]", "[SEP]", "[UNK]"], "[UNK]") + [("[MASK]", 0.0)]
        tok = transformers.DebertaV2Tokenizer(vocab=vocab, unk_id=3, model_max_length=128)
    tok.save_pretrained(str(folder))
    return AutoTokenizer.from_pretrained(str(folder))


def tiny_config(family: str, tok, layers: int = 4, dropout: float = 0.0):
    """A config of the family, hidden 32, `layers` blocks, sized to the tokenizer."""
    import transformers

    ids = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    if family == "distilbert":
        return transformers.DistilBertConfig(dim=32, n_layers=layers, n_heads=2, hidden_dim=64,
                                             max_position_embeddings=128, dropout=dropout, attention_dropout=dropout,
                                             **ids)
    if family == "modernbert":  # global attention in blocks 0 and 3, a 8-token sliding window in 1 and 2
        return transformers.ModernBertConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                                             intermediate_size=64, max_position_embeddings=128, local_attention=8,
                                             global_attn_every_n_layers=3, cls_token_id=tok.cls_token_id,
                                             sep_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id,
                                             eos_token_id=tok.sep_token_id, embedding_dropout=dropout,
                                             attention_dropout=dropout, mlp_dropout=dropout, **ids)
    shared = dict(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
                  hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, **ids)
    if family == "bert":
        return transformers.BertConfig(max_position_embeddings=128, **shared)
    if family in ("roberta", "xlm-roberta"):  # positions count from pad_token_id + 1
        cls = transformers.RobertaConfig if family == "roberta" else transformers.XLMRobertaConfig
        return cls(max_position_embeddings=130, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                   **shared)
    if family == "electra":  # embeddings of width 16, projected to the blocks' 32
        return transformers.ElectraConfig(embedding_size=16, max_position_embeddings=128, **shared)
    # DeBERTa-v3's layout: relative attention only (no absolute positions), log buckets, no token types
    return transformers.DebertaV2Config(max_position_embeddings=128, relative_attention=True, position_buckets=16,
                                        max_relative_positions=-1, pos_att_type=["p2c", "c2p"],
                                        position_biased_input=False, norm_rel_ebd="layer_norm", share_att_key=True,
                                        type_vocab_size=0, **shared)


def save_masked_lm(family: str, folder: Path, seed: int = 0):
    """A random masked LM of the family with its tokenizer in `folder`; returns (model, tokenizer)."""
    import torch
    from transformers import AutoModelForMaskedLM

    tok = build_tokenizer(family, folder)
    torch.manual_seed(seed)
    model = AutoModelForMaskedLM.from_config(tiny_config(family, tok)).eval()
    model.save_pretrained(str(folder))
    return model, tok
