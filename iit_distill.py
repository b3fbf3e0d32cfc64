"""Causal distillation of BERT (DIITO): Wu, Geiger et al., "Causal Distillation for Language
Models", NAACL 2022.

A student with fewer blocks learns from a frozen teacher as in DistilBERT and, by interchange
intervention training (IIT), to react to interventions as the teacher does: aligned blocks'
outputs are copied from a *source* into a *base* input in both models, whose *counterfactual*
outputs must agree.

    L = a_ce L_ce + a_mlm L_mlm + a_cos L_cos + a_iit L_iit (+ a_iit_cos L_iit_cos)
    L_ce      = T^2 1/|M| sum_{p in M} KL( softmax(z_t[p]/T) || softmax(z_s[p]/T) )
    L_mlm     = 1/|masked| sum_{p masked} -log p_s(x_p | masked base)
    L_cos     = 1/|M| sum_{p in M} (1 - cos(h_s[p], h_t[p]))
    L_iit     = T^2 1/|M| sum_{p in M} KL( softmax(z~_t[p]/T) || softmax(z~_s[p]/T) )
    L_iit_cos = 1/|M| sum_{p in M} (1 - cos(h~_s[p], h~_t[p]))
z: MLM logits of the base run, z~: of the counterfactual run; h: last hidden states; M: every
non-pad base token; T = 2; every a = 0.25 but a_iit_cos = 0 (the paper's +COS variant sets it).
On GLUE the same interchange trains a classifier (z: class logits; STS-B: squared errors):
    L = a_ce T^2 KL(z_t || z_s) + a_task CE(z_s, y) + a_iit T^2 KL(z~_t || z~_s),   T = 20

    python iit_distill.py --task mlm                 # no CUDA: offline CPU demo, a small teacher
    python iit_distill.py --task mlm --preset paper  # bert-base-uncased -> 6 blocks, WikiText-103
    python iit_distill.py --task mlm --alpha_iit 0 --alpha_ce 0.33 --alpha_mlm 0.33 \\
        --alpha_cos 0.33                             # the standard-distillation baseline
    python iit_distill.py --task sst2                # offline demo: teacher blocks 0,3,5
    python iit_distill.py --task rte --preset paper --teacher T  # the authors' task-level setting
"""

import bz2
import concurrent.futures
import contextlib
import dataclasses
import inspect
import math
import os
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import common
from common import UserError, fail_if, log, option, transformer_blocks


# ==== 1. THE METHOD ====
# Hooks on block l (common.transformer_blocks) read its output in the source run and write it in
# the counterfactual run (the official code reads hidden_states[l], its input: an off-by-one).
def get_activations(model, input_ids, attention_mask, layers, **inputs) -> dict:
    """The source run: {l: block l's output (0-based), (B, T, H)} for l in `layers`."""
    found = {}
    blocks = transformer_blocks(model)

    def reader(layer):
        def hook(module, args, output):  # a block's state, or a tuple starting with it
            found[layer] = output[0] if isinstance(output, tuple) else output
        return hook

    handles = [blocks[layer].register_forward_hook(reader(layer)) for layer in layers]
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, **inputs)
        return found
    finally:
        for handle in handles:
            handle.remove()


def forward_with_interchange(model, input_ids, attention_mask, interventions: dict, **kwargs):
    """The counterfactual run: `model` on the base input, {l: (positions, values (N, H))} writing
    `values`, row-major, with gradients, into block l's output at `positions` (mask or indices)."""
    def setter(positions, values):
        def hook(module, inputs, output):
            is_tuple = isinstance(output, tuple)
            # (B, T, H), copied: no in-place write on a tensor autograd tracks
            hidden = (output[0] if is_tuple else output).clone()
            hidden[positions] = values.to(hidden.dtype)  # IIT: the interchange intervention
            return (hidden, *output[1:]) if is_tuple else hidden
        return hook

    blocks = transformer_blocks(model)
    # prepend: before transformers' own hooks (they record hidden states)
    handles = [blocks[layer].register_forward_hook(setter(positions, values), prepend=True)
               for layer, (positions, values) in interventions.items()]
    try:
        return model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    finally:
        for handle in handles:
            handle.remove()


def interchange_masks(base_lengths: torch.Tensor, source_lengths: torch.Tensor, seq_len: int,
                      prop: float, mode: str = "consecutive",
                      base_candidates: torch.Tensor | None = None,
                      generator: torch.Generator | None = None) -> tuple:
    """(base_mask, source_mask), (B, T) bool: the swapped tokens, real ones only (the official
    random mode can pick padding). Row i swaps n = floor(prop * min(base_len, source_len)), the
    k-th source token into the k-th base one: a span at a random start in each (consecutive, the
    paper's), random ones (random), or up to source_len MLM positions `base_candidates` and as
    many random source ones (masked)."""
    if mode not in ("consecutive", "random", "masked"):
        raise ValueError(f"interchange mode '{mode}' is not one of consecutive, random, masked")
    base_mask, source_mask = torch.zeros(2, len(base_lengths), seq_len, dtype=torch.bool)

    def sample(length: int, n: int) -> torch.Tensor:  # n of range(length), no repeats
        return torch.randperm(length, generator=generator)[:n]

    for i in range(len(base_lengths)):
        base_len = int(base_lengths[i])
        source_len = int(source_lengths[i])
        if mode == "masked":
            positions = base_candidates[i, :base_len].nonzero().flatten().cpu()
            n = min(len(positions), source_len)
            base_mask[i, positions[sample(len(positions), n)]] = True
            source_mask[i, sample(source_len, n)] = True
            continue
        n = int(prop * min(base_len, source_len))
        for mask, length in ((base_mask, base_len), (source_mask, source_len)):
            if n > 0 and mode == "consecutive":
                start = int(torch.randint(length - n + 1, (1,), generator=generator))
                mask[i, start:start + n] = True
            elif n > 0:
                mask[i, sample(length, n)] = True
    return base_mask, source_mask


def positions_of(mask: torch.Tensor) -> torch.Tensor:
    """A (B, T) bool mask's True entries as (2, N) rows and columns, row-major; found on the host
    with the batch (on a GPU, bool-mask indexing waits for the device)."""
    return mask.nonzero().T


def alignments(name: str, num_teacher_layers: int, num_student_layers: int) -> list:
    """The swapped blocks: groups (teacher blocks, student blocks), one drawn per micro-batch.
    Official, 12 -> 6: full {T0,T1->S0}, ..., {T10,T11->S5}; middle {T6->S3}; late {T9->S3},
    {T10->S4}; else a map like '0,1:0;2,3:1'."""
    nt = num_teacher_layers
    ns = num_student_layers
    if name == "full" and ns > nt:
        raise ValueError(f"alignment 'full' needs a teacher block per student block "
                         f"(teacher {nt}, student {ns})")
    if name == "full":
        groups = [(tuple(range(i * nt // ns, (i + 1) * nt // ns)), (i,)) for i in range(ns)]
    elif name == "middle":
        groups = [((nt // 2,), (ns // 2,))]
    elif name == "late":
        late = [((min(3 * nt // 4 + i, nt - 1),), (min(ns // 2 + i, ns - 1),)) for i in (0, 1)]
        groups = list(dict.fromkeys(late))  # a small student may fit one group only
    else:
        try:
            groups = [tuple(tuple(int(x) for x in side.replace(" ", "").split(",") if x != "")
                            for side in group.split(":")) for group in name.split(";")]
        except ValueError:
            groups = []
        if not groups or any(len(g) != 2 or not g[0] or not g[1] for g in groups):
            raise ValueError(f"alignment '{name}' is not full, middle, late or a map like "
                             f"'9:3;10:4'")
        groups = [(tuple(sorted(set(t))), tuple(sorted(set(s)))) for t, s in groups]
    for teacher_layers, student_layers in groups:
        outside_teacher = any(not 0 <= t < nt for t in teacher_layers)
        if outside_teacher or any(not 0 <= s < ns for s in student_layers):
            raise ValueError(f"alignment group {teacher_layers}->{student_layers} is outside the "
                             f"teacher's 0..{nt - 1} or the student's 0..{ns - 1} blocks")
    return groups


# The losses, per position.
def soft_target_kl(student_logits, teacher_logits, temperature: float) -> torch.Tensor:
    """(...,) for logits (..., V): T^2 * KL( softmax(z_t/T) || softmax(z_s/T) ), in fp32 (bf16
    logits not copied to fp32 first)."""
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1, dtype=torch.float32)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=-1, dtype=torch.float32)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="none", log_target=True)
    return kl.sum(-1) * temperature**2


def cosine_distance(student_hidden, teacher_hidden) -> torch.Tensor:
    """(...,) for states (..., H): 1 - cos(h_s, h_t)."""
    return 1.0 - F.cosine_similarity(student_hidden.float(), teacher_hidden.float(), dim=-1)


def masked_mean(values, positions) -> torch.Tensor:
    """1/|M| * sum_{p in M} values[p]; values outside M (padding) must be finite and are ignored."""
    return (values * positions).sum() / positions.sum()


def mlm_loss(student_logits, labels, positions=None) -> torch.Tensor:
    """1/|masked| * sum_{p masked} -log p_s(x_p | masked input), at the labels' positions (the
    logits may have more rows); positions: (2, N), make_batch's, else found here."""
    if positions is None:
        positions = (labels != -100).nonzero().T
    rows, cols = positions
    return F.cross_entropy(student_logits[rows, cols].float(), labels[rows, cols])


# The three runs of the paper: base, source and counterfactual.
@contextlib.contextmanager
def encoder_output(model):
    """The encoder's last hidden state (the head's input) in the next forward: {"h": (R, T, H)}."""
    found = {}

    def hook(module, args, output):
        found["h"] = output[0]

    encoder = getattr(model, "module", model).base_model  # DDP keeps the model as .module
    handle = encoder.register_forward_hook(hook)
    try:
        yield found
    finally:
        handle.remove()


def model_inputs(batch: dict, run: str = "") -> dict:
    """The base run's (run "") or source run's ("source_") inputs: ids, mask, any token types."""
    names = ("input_ids", "attention_mask", "token_type_ids")
    return {name: batch[run + name] for name in names if run + name in batch}


def base_source_counterfactual(model, batch: dict, layers=None):
    """The paper's three forwards: logits z (R, T, V) (classifiers: (R, C)) and last hidden states
    h (R, T, H); rows [0, B): the base run; rows [B, 2B), given `layers`: the counterfactual run."""
    with encoder_output(model) as base_h:
        base = model(**model_inputs(batch))
    if layers is None:  # standard distillation: the base run alone
        return base.logits, base_h["h"]
    # IIT: the source run: the aligned blocks' outputs
    source = get_activations(model, **model_inputs(batch, "source_"), layers=layers)
    # IIT: the counterfactual run: the base input, the source's states at the swapped positions
    base_at = tuple(batch["base_swap"])  # (rows, columns) of the swapped base tokens
    source_at = tuple(batch["source_swap"])  # the k-th source token goes to the k-th base token
    swaps = {layer: (base_at, source[layer][source_at]) for layer in layers}
    with encoder_output(model) as counterfactual_h:
        counterfactual = forward_with_interchange(model, interventions=swaps, **model_inputs(batch))
    logits = torch.cat([base.logits, counterfactual.logits])
    return logits, torch.cat([base_h["h"], counterfactual_h["h"]])


# The two objectives: masked-LM (the paper) and GLUE (the authors' follow-up). Both take `runs`,
# the forwards (default: the paper's three; main may pass appendix A's), and `kl`.
def distillation_loss(student, teacher, batch: dict, group=None, *, temperature=2.0,
                      alpha_ce=0.25, alpha_mlm=0.25, alpha_cos=0.25, alpha_iit=0.25,
                      alpha_iit_cos=0.0, runs=base_source_counterfactual, kl=soft_target_kl):
    """One micro-batch's MLM objective, (loss, {term: value}); defaults: the paper's. batch: masked
    base `input_ids`, `attention_mask`, MLM `labels` (+ positions) and, for IIT, masked
    `source_input_ids`, `source_attention_mask`, swaps `base_swap`, `source_swap` ((2, N)).
    group: (teacher blocks, student blocks) to intervene on; None: standard distillation."""
    teacher_layers, student_layers = group if group is not None else (None, None)
    # the teacher is frozen; the student's source run is not detached (as officially)
    with torch.no_grad():
        z_t, h_t = runs(teacher, batch, teacher_layers)  # (R, T, V), (R, T, H); R = B or 2B
    z_s, h_s = runs(student, batch, student_layers)
    M = batch["attention_mask"].bool()  # (B, T): every non-pad base token, in both runs
    B = len(M)
    kl_per_position = kl(z_s, z_t, temperature)  # (R, T)
    cos_per_position = cosine_distance(h_s, h_t)  # (R, T)
    # L_ce = T^2 * 1/|M| * sum_{p in M} KL( softmax(z_t[p]/T) || softmax(z_s[p]/T) )
    terms = {"ce": masked_mean(kl_per_position[:B], M)}
    # L_mlm = 1/|masked| * sum_{p masked} -log p_s(x_p | masked base)   (the base rows only)
    terms["mlm"] = mlm_loss(z_s, batch["labels"], batch.get("label_positions"))
    # L_cos = 1/|M| * sum_{p in M} (1 - cos(h_s[p], h_t[p]))
    terms["cos"] = masked_mean(cos_per_position[:B], M)
    loss = alpha_ce * terms["ce"] + alpha_mlm * terms["mlm"] + alpha_cos * terms["cos"]
    if group is not None:
        # IIT: L_iit = T^2 * 1/|M| * sum_{p in M} KL( softmax(z~_t[p]/T) || softmax(z~_s[p]/T) )
        terms["iit"] = masked_mean(kl_per_position[B:], M)
        # L_iit_cos = 1/|M| * sum_{p in M} (1 - cos(h~_s[p], h~_t[p]))
        terms["iit_cos"] = masked_mean(cos_per_position[B:], M)
        loss = loss + alpha_iit * terms["iit"] + alpha_iit_cos * terms["iit_cos"]
    return loss, terms


def task_distillation_loss(student, teacher, batch: dict, group=None, *, temperature=20.0,
                           alpha_ce=0.7, alpha_task=0.3, alpha_iit=1.0, kl_reduction="batchmean",
                           runs=base_source_counterfactual, kl=soft_target_kl):
    """One micro-batch's GLUE objective: distillation_loss on class logits (a row per example),
    the gold `labels`' (B,) cross-entropy for L_mlm, no cosines. kl_reduction 'mean' also divides
    each KL by the C classes, as the authors' KLDivLoss(reduction='mean'). STS-B (one output):
    squared errors replace KL and cross-entropy, (z_s - z_t)^2 = T^2 MSE(z_s/T, z_t/T)."""
    teacher_layers, student_layers = group if group is not None else (None, None)
    with torch.no_grad():
        z_t = runs(teacher, batch, teacher_layers)[0]  # (R, C)
    z_s = runs(student, batch, student_layers)[0]
    labels = batch["labels"]
    B = len(labels)
    if z_s.shape[-1] == 1:
        kl_per_example = (z_s - z_t)[:, 0].float() ** 2  # (R,)
        gold_loss = F.mse_loss(z_s[:B, 0].float(), labels.float())
    else:
        classes = z_s.shape[-1] if kl_reduction == "mean" else 1
        kl_per_example = kl(z_s, z_t, temperature) / classes  # (R,)
        gold_loss = F.cross_entropy(z_s[:B].float(), labels)
    # L_ce = T^2 * 1/B * sum_i KL( softmax(z_t[i]/T) || softmax(z_s[i]/T) )
    terms = {"ce": kl_per_example[:B].mean()}
    # L_task = 1/B * sum_i -log p_s(y_i | x_i)     (STS-B: 1/B * sum_i (z_s[i] - y_i)^2)
    terms["task"] = gold_loss
    loss = alpha_ce * terms["ce"] + alpha_task * terms["task"]
    if group is not None:
        # IIT: L_iit = T^2 * 1/B * sum_i KL( softmax(z~_t[i]/T) || softmax(z~_s[i]/T) )
        terms["iit"] = kl_per_example[B:].mean()
        loss = loss + alpha_iit * terms["iit"]
    return loss, terms


def in_batch_sources(indices: list[int], seed: int, step: int, micro: int) -> dict:
    """--source_pairing batch (the authors'): each example's source is one of its micro-batch,
    shuffled by (seed, step, micro-batch): the same on resume."""
    order = np.random.default_rng([seed, step, micro, 1]).permutation(len(indices))
    return {i: indices[j] for i, j in zip(indices, order)}


# What IIT trains: does the student react to an intervention as the teacher does?
@torch.no_grad()
def predictions(model, batches: list, layers_per_group: list,
                runs=base_source_counterfactual) -> list:
    """Per batch, (1 + G, B, ...): predictions (argmax; one output: its value) in the base run,
    then after intervening on this model's blocks of each group."""
    was_training = model.training
    model.eval()
    found = []
    for batch in batches:
        B = len(batch["labels"])
        rows = []
        for layers in layers_per_group:
            z = runs(model, batch, layers)[0]  # (2B, ...): base rows, then counterfactual rows
            z = z[..., 0] if z.shape[-1] == 1 else z.argmax(-1)
            if not rows:  # the base run is the same for every group
                rows.append(z[:B])
            rows.append(z[B:])
        found.append(torch.stack(rows))
    model.train(was_training)
    return found


def interchange_agreement(teacher, student, batches: list, groups: list,
                          runs=base_source_counterfactual,
                          teacher_predictions: list | None = None) -> dict:
    """On held-out pairs, how often the student predicts as the teacher, both intervened on (aligned
    blocks, every group: "counterfactual") or neither ("plain"); scored at masked base positions
    (MLM) or every pair (one output: within 0.5). teacher_predictions: reused across students."""
    if teacher_predictions is None:
        teacher_predictions = predictions(teacher, batches, [t for t, _ in groups], runs)
    student_predictions = predictions(student, batches, [s for _, s in groups], runs)
    same = 0
    scored = 0
    for batch, t, s in zip(batches, teacher_predictions, student_predictions):
        labels = batch["labels"]
        positions = labels != -100 if labels.dim() == 2 else torch.ones_like(labels).bool()
        agree = (t - s).abs() <= 0.5 if t.is_floating_point() else t == s  # (1 + G, B, ...)
        same = same + agree[:, positions].sum(-1)
        scored = scored + int(positions.sum())
    counterfactual = float(same[1:].sum()) / (scored * len(groups))
    return {"counterfactual": counterfactual, "plain": float(same[0]) / scored}


# ==== 2. DATA ====
def tokenize_paragraphs(raw, tokenizer, max_len: int, min_len: int, num_proc: int | None):
    """[CLS] paragraph [SEP] in chunks of at most `max_len` tokens, none under `min_len`."""
    cls = tokenizer.cls_token_id
    sep = tokenizer.sep_token_id
    body = max_len - 2

    def encode(batch):
        out = []
        encoded = tokenizer(batch["text"], add_special_tokens=False, verbose=False)
        for ids in encoded["input_ids"]:
            for start in range(0, max(len(ids), 1), body):
                piece = [cls] + ids[start:start + body] + [sep]
                if len(piece) >= min_len:
                    out.append(piece)
        return {"input_ids": out}

    return raw.map(encode, batched=True, remove_columns=raw["train"].column_names,
                   num_proc=num_proc, desc="tokenizing")


def load_data(args, tokenizer, dist):
    """Tokenised train and validation sequences (rank 0 tokenises; the others read its cache)."""
    import datasets
    with common.main_process_first(dist):
        if args.preset == "demo" and args.train_file is None and args.dataset_name is None:
            corpus = demo_corpus(common.cache_root(args.cache_dir))
            args.train_file, args.validation_file = map(str, corpus)
        if args.train_file:
            files = dict(train=args.train_file, validation=args.validation_file)
            raw = datasets.load_dataset("text", data_files=files)
        else:
            instead = "--train_file and --validation_file (plain text, one paragraph per line)"
            raw = common.load_hub_dataset(args.dataset_name, args.dataset_config_name, instead)
            fail_if("text" not in raw["train"].column_names,
                    f"dataset '{args.dataset_name}' has no 'text' column; pass --train_file")
            raw = datasets.DatasetDict(train=raw["train"], validation=raw["validation"])
        tokens = tokenize_paragraphs(raw, tokenizer, args.max_seq_length, args.min_seq_length,
                                     args.num_proc)
    tokens = common.first_examples(tokens, args.max_train_samples, args.max_eval_samples)
    train_ids = tokens["train"]
    eval_ids = tokens["validation"]
    fail_if(len(train_ids) == 0 or len(eval_ids) == 0,
            f"no sequence of at least {args.min_seq_length} tokens in the train or validation "
            f"data; pass longer paragraphs or a smaller --min_seq_length")
    log(dist, f"data: {args.train_file or args.dataset_name}: {len(train_ids)} training and "
              f"{len(eval_ids)} validation sequences of {args.min_seq_length} to "
              f"{args.max_seq_length} tokens")
    return train_ids, eval_ids


def token_weights(train_ids, vocab_size: int, smoothing: float, special_ids) -> torch.Tensor:
    """Masking weight max(count, 1)^-smoothing per id (rare words masked more); specials 0."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, len(train_ids), 10_000):
        chunk = train_ids[start:start + 10_000]["input_ids"]
        tokens = np.concatenate([np.asarray(x) for x in chunk])
        counts += np.bincount(tokens, minlength=vocab_size)[:vocab_size]
    weights = np.maximum(counts, 1).astype(np.float64) ** (-smoothing)
    weights[list(special_ids)] = 0.0
    return torch.tensor(weights, dtype=torch.float32)


def mlm_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, mask_token_id: int,
             vocab_size: int, special_ids, probability: float = 0.15,
             weights: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking 80% [MASK] / 10% random / 10% kept: (masked ids, labels; -100: not predicted).
    weights=None: each real non-special token with `probability` (evaluation). weights (V,), as
    officially: ceil(probability * real tokens) positions a batch, drawn without replacement in
    proportion to weights[token]."""
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
    masked[chosen & (action >= 0.9)] = random_ids[chosen & (action >= 0.9)]
    return masked, labels


def make_batch(train_ids, indices: list[int], sources, tokenizer, args, with_iit: bool,
               masking: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> dict:
    """MLM: base sequences and, for IIT, their sources (sources[i]) cut or padded to the longest
    base (as officially), all masked (`masking`: token_weights, else uniform); swapped positions."""
    vocab = len(tokenizer)
    special = set(tokenizer.all_special_ids)
    mask_id = tokenizer.mask_token_id
    base = tokenizer.pad({"input_ids": train_ids[indices]["input_ids"]}, return_tensors="pt")
    ids = base["input_ids"]
    attention = base["attention_mask"]
    length = ids.shape[1]
    source_ids = train_ids[[int(sources[i]) for i in indices]]["input_ids"]
    source = tokenizer.pad({"input_ids": [s[:length] for s in source_ids]}, padding="max_length",
                           max_length=length, return_tensors="pt")
    batch = {"attention_mask": attention}
    batch["input_ids"], batch["labels"] = mlm_mask(
        ids, attention, mask_id, vocab, special, args.mlm_probability, masking, generator)
    labelled = batch["labels"] != -100
    batch["label_positions"] = positions_of(labelled)
    if with_iit:
        batch["source_attention_mask"] = source["attention_mask"]
        batch["source_input_ids"], _ = mlm_mask(
            source["input_ids"], source["attention_mask"], mask_id, vocab, special,
            args.mlm_probability, masking, generator)
        swaps = interchange_masks(
            attention.sum(1), source["attention_mask"].sum(1), length, args.interchange_prop,
            args.interchange_mode, base_candidates=labelled, generator=generator)
        batch["base_swap"], batch["source_swap"] = map(positions_of, swaps)
    return batch


def make_task_batch(data, indices: list[int], sources, tokenizer, args, with_iit: bool,
                    masking=None, generator: torch.Generator | None = None) -> dict:
    """GLUE: base examples and, for IIT, their sources (sources[i]) padded to the longer (none
    cut); swapped positions. `masking`: unused (both builders take the same arguments)."""
    spec = common.GLUE_TASKS[args.task]
    pad_id = tokenizer.pad_token_id
    batch = common.classification_batch(data[indices], pad_id, spec.is_regression, "cpu")
    if with_iit:
        source_rows = data[[int(sources[i]) for i in indices]]
        source = common.classification_batch(source_rows, pad_id, False, "cpu")
        T = max(batch["input_ids"].shape[1], source["input_ids"].shape[1])
        for run, rows in (("", batch), ("source_", source)):
            for name, value in model_inputs(rows).items():
                fill = pad_id if name == "input_ids" else 0
                batch[run + name] = F.pad(value, (0, T - value.shape[1]), value=fill)
        swaps = interchange_masks(
            batch["attention_mask"].sum(1), batch["source_attention_mask"].sum(1), T,
            args.interchange_prop, args.interchange_mode, generator=generator)
        batch["base_swap"], batch["source_swap"] = map(positions_of, swaps)
    return batch


def to_device(batch: dict, device) -> dict:
    """From pinned memory (appendix A), copies to the GPU overlap its work."""
    return {name: value.to(device, non_blocking=True) for name, value in batch.items()}


def held_out_pairs(args, eval_set, tokenizer, device, seed: int = 1234) -> list[dict]:
    """interchange_agreement's held-out pairs, masked and swapped from `seed`: the same each run."""
    build = make_batch if args.task == "mlm" else make_task_batch
    examples = eval_set if args.task == "mlm" else eval_set["validation"]
    generator = torch.Generator().manual_seed(seed)
    sources = torch.randperm(len(examples), generator=generator).numpy()
    size = args.per_device_eval_batch_size
    pairs = []
    for start in range(0, len(examples), size):
        indices = list(range(start, min(start + size, len(examples))))
        batch = build(examples, indices, sources, tokenizer, args, True, generator=generator)
        pairs.append(to_device(batch, device))
    return pairs


def micro_batches(lengths: np.ndarray, args, dist, epoch: int, position: int):
    """This rank's micro-batches from (epoch, position) on: (epoch, next position, indices). Each
    epoch (seeded by it: the same on resume) is shuffled, sorted by length in windows of 50 batches
    a rank (official group_by_size), dealt in shuffled runs of world_size like-length batches, one a
    rank (a step waits for the slowest); a partial last step is dropped."""
    size = args.per_device_train_batch_size
    accumulation = args.gradient_accumulation_steps
    ranks = dist.world_size
    while True:
        rng = np.random.default_rng([args.seed, epoch])
        order = rng.permutation(len(lengths))
        batches = []
        for start in range(0, len(order), 50 * size * ranks):
            window = order[start:start + 50 * size * ranks]
            window = window[np.argsort(-lengths[window], kind="stable")]
            batches += [window[i:i + size].tolist() for i in range(0, len(window), size)]
        deal_order = rng.permutation(len(batches) // ranks)
        mine = [batches[k * ranks + dist.rank] for k in deal_order]
        for position in range(position, len(mine) // accumulation * accumulation):
            yield epoch, position + 1, mine[position]
        epoch += 1
        position = 0


def sequence_lengths(data) -> np.ndarray:
    """Each example's token count, read from Arrow's list offsets (no Python list of every id)."""
    import pyarrow.compute
    return pyarrow.compute.list_value_length(data.with_format("arrow")["input_ids"]).to_numpy()


def training_batches(build_batch, train_set, source_of, tokenizer, masking, args, dist,
                     state: dict, with_iit: bool, ahead: bool):
    """Host-built micro-batches from the training state's place on: (epoch, next position, real
    tokens, batch). ahead (in a thread, appendix A): each from a generator seeded by its place in
    the run, not torch's global RNG."""
    stream = micro_batches(sequence_lengths(train_set), args, dist, state["epoch"],
                           state["batches_done"])
    step = state["step"]
    micro = 0
    for epoch, position, indices in stream:
        sources = source_of
        if args.source_pairing == "batch":
            sources = in_batch_sources(indices, args.seed, step, micro)
        generator = None
        if ahead:
            seed = np.random.SeedSequence([args.seed, dist.rank, epoch, position]).generate_state(1)
            generator = torch.Generator().manual_seed(int(seed[0]))
        batch = build_batch(train_set, indices, sources, tokenizer, args, with_iit, masking,
                            generator)
        tokens = int(batch["attention_mask"].sum())  # the base rows' real tokens
        if ahead and torch.cuda.is_available():  # pinned: see to_device
            batch = {name: value.pin_memory() for name, value in batch.items()}
        yield epoch, position, tokens, batch
        micro += 1
        if micro == args.gradient_accumulation_steps:
            step += 1
            micro = 0


# ==== 3. MODELS ====
def load_models(args, dist, device):
    """MLM: tokenizer, teacher (a masked LM, frozen), student, alignment groups."""
    from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer
    from transformers import logging as transformers_logging
    transformers_logging.disable_progress_bar()
    with common.main_process_first(dist):  # the demo teacher fitted, or a model fetched, once
        if args.teacher is None:
            args.teacher = str(demo_teacher(args))
        config = common.from_pretrained(AutoConfig, args.teacher, "teacher", "--teacher")
        skeleton = common.encoder_skeleton(config)
        teacher, info = common.from_pretrained(AutoModelForMaskedLM, args.teacher, "teacher",
                                               "--teacher", output_loading_info=True)
        tokenizer = common.from_pretrained(AutoTokenizer, args.teacher, "tokenizer", "--teacher")
    # e.g. an ELECTRA discriminator; DeBERTa-v3 ships no MLM head
    missing = common.new_weights(teacher, info)
    fail_if(missing, f"teacher '{args.teacher}' has no trained MLM head ({', '.join(missing[:3])} "
                     f"missing from its weights); pass a masked LM with its head to --teacher")
    fail_if(len(tokenizer) > teacher.config.vocab_size,
            f"the tokenizer has {len(tokenizer)} tokens but the teacher's vocabulary only "
            f"{teacher.config.vocab_size}; pass a teacher folder with its own tokenizer")
    check_length(args, skeleton)
    student, groups = student_and_groups(args, teacher, AutoModelForMaskedLM, device, dist)
    return tokenizer, teacher, student, groups


def load_task(args, dist, device):
    """GLUE: tokenizer, teacher (a fine-tuned classifier), student, groups, train and dev sets."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
    common.quiet_loaders()  # no load reports: the log says which heads are new
    spec = common.GLUE_TASKS[args.task]
    base = args.teacher or common.demo_encoder("--teacher (a classifier fine-tuned on the task)")
    config = common.from_pretrained(AutoConfig, base, "teacher", "--teacher")
    skeleton = common.encoder_skeleton(config)
    check_length(args, skeleton)
    tokenizer = common.from_pretrained(AutoTokenizer, base, "tokenizer", "--teacher")
    # DistilBERT and ModernBERT take no token types
    takes_types = "token_type_ids" in inspect.signature(skeleton.forward).parameters
    data, eval_sets = common.glue_splits(args, spec, tokenizer, takes_types, demo_data(args))
    log(dist, f"data: {args.task}, " + ", ".join(f"{len(data[split])} {split}" for split in data))
    if args.teacher is None:  # the offline demo's: MiniLM fine-tuned on the polarity split
        settings = {k: v for k, v in common.DEMO_TEACHER.items() if k != "max_length"}
        sizes = (len(data["train"]), sum(map(len, eval_sets.values())))
        folder = common.demo_teacher_folder(
            base, **settings, max_length=args.max_seq_length, cache_dir=args.cache_dir, sizes=sizes)
        args.teacher = str(common.fine_tuned_teacher(
            base, spec, tokenizer, data["train"], eval_sets, folder, **settings, dist=dist,
            device=device))
    teacher, info = common.from_pretrained(AutoModelForSequenceClassification, args.teacher,
                                           "teacher", "--teacher", output_loading_info=True)
    missing = common.new_weights(teacher, info)
    fail_if(missing, f"teacher '{args.teacher}' has no trained classification head ("
            f"{', '.join(missing[:3])} missing from its weights); pass a classifier fine-tuned on "
            f"{spec.name}")
    fail_if(teacher.config.num_labels != spec.num_labels,
            f"teacher '{args.teacher}' has num_labels={teacher.config.num_labels} but {spec.name} "
            f"has {spec.num_labels}; pass a classifier fine-tuned on {spec.name}")
    student, groups = student_and_groups(args, teacher, AutoModelForSequenceClassification,
                                         device, dist, num_labels=spec.num_labels)
    return tokenizer, teacher, student, groups, data["train"], eval_sets


def student_and_groups(args, teacher, auto_class, device, dist, **head):
    """The student (--student, or blocks of the teacher or --student_from) and alignment groups,
    on `device`; `head`: num_labels for a classifier."""
    depth = len(transformer_blocks(teacher))
    if args.student:  # a smaller pretrained model, its head new
        student = common.from_pretrained(auto_class, args.student, "student", "--student", **head)
        which = args.student
        fail_if(student.config.vocab_size != teacher.config.vocab_size,
                f"student vocabulary ({student.config.vocab_size}) differs from the teacher's "
                f"({teacher.config.vocab_size}); pass a student with the teacher's tokenizer")
    else:
        source = teacher
        if args.student_from != "teacher":  # a pretrained encoder's blocks (the authors' student)
            common.set_seed(args.seed)  # the new classifier's initialisation
            source, info = common.from_pretrained(
                auto_class, args.student_from, "student_from", "--student_from",
                output_loading_info=True, **head)
            mine = source.config
            theirs = teacher.config
            kind = (mine.model_type, mine.hidden_size, mine.vocab_size)
            fail_if(kind != (theirs.model_type, theirs.hidden_size, theirs.vocab_size),
                    f"--student_from '{args.student_from}' is a {mine.model_type} of width "
                    f"{mine.hidden_size}, vocabulary {mine.vocab_size}; the teacher a "
                    f"{theirs.model_type} of {theirs.hidden_size}, {theirs.vocab_size}: pass a "
                    f"model of the teacher's kind")
            missing = [] if head else common.new_weights(source, info)  # mlm: no head arguments
            fail_if(missing, f"--student_from '{args.student_from}' has no trained MLM head "
                             f"({', '.join(missing[:1])} missing)")
        if args.student_num_layers and not args.student_layers:
            layers = common.default_student_layers(len(transformer_blocks(source)),
                                                   args.student_num_layers)
            args.student_layers = ",".join(map(str, layers))
        # IIT: the student is the teacher (or --student_from) with fewer blocks: embeddings, listed
        # blocks and whole head copied (official: blocks 0,2,4,7,9,11 of 12, MLM transform random).
        student = common.init_student_from_teacher(source, common.parse_layers(args.student_layers))
        if source is teacher:
            which = f"its blocks {args.student_layers}"
        else:
            new_head = ", a new classifier" if head else ""
            which = f"blocks {args.student_layers} of {args.student_from}{new_head}"
    try:
        groups = alignments(args.alignment, depth, len(transformer_blocks(student)))
    except ValueError as e:
        raise UserError(f"{e}; pass another --alignment") from None
    log(dist, f"teacher: {args.teacher} ({type(teacher).__name__}, {depth} blocks); "
              f"student: {which}")
    teacher.to(device).eval().requires_grad_(False)
    student.to(device).train()
    if torch.device(device).type == "cuda":  # SPEED-UP (appendix A), MLM heads only
        for model in (teacher, student):
            pad_vocabulary(model)
    return student, groups


# ==== 4. SETTINGS ====
@dataclasses.dataclass
class Args:  # BOILERPLATE: resolve_args fills the fields left at None
    task: str = option("mlm", "mlm (a masked LM) or a GLUE task (a classifier): cola, sst2, mrpc, "
                       "stsb, qqp, mnli, qnli, rte, wnli")
    preset: str = option("auto", "auto | demo | paper (auto: paper with CUDA, else demo)")
    # --- models and data
    teacher: str | None = option(None, "A masked LM (mlm) or a classifier fine-tuned on the task: "
                                 "folder or hub id (demo: MiniLM, fitted once)")
    student: str | None = option(None, "Instead of blocks: a smaller pretrained model (new head)")
    student_from: str | None = option(None, "Whose blocks: teacher, or a model of its kind")
    student_layers: str | None = option(None, "Blocks copied into the student (paper 0,2,4,7,9,11)")
    student_num_layers: int | None = option(None, "Or N evenly spaced blocks")
    dataset_name: str | None = option(None, "mlm: hub dataset with a 'text' column (paper: "
                                      "Salesforce/wikitext)")
    dataset_config_name: str | None = option(None, "mlm: its config (paper: wikitext-103-raw-v1)")
    data_dir: str | None = option(None, "GLUE: the official files, the task folder or glue_data/")
    train_file: str | None = option(None, "mlm: plain text, a paragraph per line; GLUE: CSV/JSON "
                                    "(hub columns) or .tsv")
    validation_file: str | None = option(None, "Laid out as --train_file")
    max_seq_length: int | None = option(None, "Longer inputs are cut (mlm: into chunks)")
    min_seq_length: int = option(12, "Shorter sequences are dropped (official: 12)")
    # --- optimisation (official: AdamW, no decay on biases and LayerNorm weights)
    per_device_train_batch_size: int | None = option(None, "Per device, micro-step (paper 40)")
    per_device_eval_batch_size: int = option(32, "Sequences per evaluation batch")
    gradient_accumulation_steps: int | None = option(None, "Micro-steps per step (paper 6)")
    learning_rate: float | None = option(None, "Peak AdamW learning rate (5e-4)")
    weight_decay: float | None = option(None, "AdamW weight decay (0; GLUE paper 0.01)")
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float | None = option(None, "AdamW beta2 (0.98; GLUE paper 0.999)")
    adam_epsilon: float = option(1e-6, "AdamW epsilon")
    warmup_ratio: float | None = option(None, "Linear warm-up share, then decay (0.05; GLUE 0.1)")
    max_grad_norm: float | None = option(None, "Gradient-norm clipping (5; GLUE paper 1)")
    num_train_epochs: float | None = option(None, "Epochs (paper 3)")
    max_steps: int | None = option(None, "Optimiser steps; > 0 overrides the epochs (demo 200)")
    max_train_samples: int | None = option(None, "Keep the first N training sequences")
    max_eval_samples: int | None = option(None, "Keep the first N validation ones (demo 256)")
    # --- the method (defaults: TASK_DEFAULTS, PRESETS)
    temperature: float | None = option(None, "T of the KL terms, with T^2 (mlm 2, GLUE 20)")
    alpha_ce: float | None = option(None, "L_ce, the soft-target KL (mlm 0.25, baseline "
                                    "0.33; GLUE 0.7)")
    alpha_mlm: float | None = option(None, "mlm: L_mlm, the masked-LM loss (0.25, baseline 0.33)")
    alpha_cos: float | None = option(None, "mlm: L_cos, the hidden-state cosine (0.25, "
                                     "baseline 0.33)")
    alpha_task: float | None = option(None, "GLUE: L_task, the gold labels' cross-entropy (0.3)")
    alpha_iit: float | None = option(None, "L_iit, counterfactual KL (mlm 0.25, GLUE 1); 0: no IIT")
    alpha_iit_cos: float | None = option(None, "mlm: L_iit_cos, the IIT cosine (0; +COS sets it)")
    alignment: str = option("full", "full | middle | late | a map 'T,T:S;T:S'; a group a batch")
    interchange_mode: str | None = option(None, "consecutive | random (GLUE paper) | masked tokens")
    source_pairing: str | None = option(None, "GLUE: fixed (a permutation drawn once) | "
                                        "batch (paper: shuffled in each batch)")
    kl_reduction: str | None = option(None, "GLUE: batchmean | mean (paper: also / classes)")
    interchange_prop: float = option(0.3, "Swapped share of min(base, source) length")
    mlm_probability: float = option(0.15, "Share of real tokens chosen for MLM per batch")
    mlm_smoothing: float | None = option(None, "Masking weight count^-s (paper 0.7); 0: uniform")
    # --- run
    seed: int = option(56, "Seed of data order, source pairing, masking and interventions")
    deterministic: bool = option(False, "Ask torch for deterministic kernels")
    output_dir: str | None = option(None, "The student, checkpoints, args.json, results.json")
    overwrite_output_dir: bool = option(False, "Allow writing over a finished run")
    logging_steps: int | None = option(None, "Print the loss terms every N optimiser steps")
    save_steps: int | None = option(None, "Write output_dir/checkpoint-<step>/ every N (0: never)")
    resume_from_checkpoint: str | None = option(None, "A checkpoint-<step> folder, or 'latest'")
    bf16: bool | None = common.bf16_flag()
    compile: bool | None = common.switch("Compile each encoder block and the KL (unset: on CUDA)")
    device: str = option("auto", "auto | cpu | cuda | mps")
    num_proc: int | None = option(None, "Processes for tokenisation (paper: up to 8)")
    cache_dir: str | None = option(None, "Demo corpus and teacher (default ~/.cache/bert-distill)")
    track: bool = option(False, "Log to Weights & Biases (imported only when set)")


# The task's defaults. mlm: the paper's. GLUE: the loss of the authors' task-level command
# (Causal-Distill-XXS). Both: DIITO's optimiser settings and consecutive spans.
DIITO = dict(interchange_mode="consecutive", weight_decay=0.0, adam_beta2=0.98, warmup_ratio=0.05,
            max_grad_norm=5.0)
TASK_DEFAULTS = {
    "mlm": dict(temperature=2.0, alpha_ce=0.25, alpha_mlm=0.25, alpha_cos=0.25, alpha_iit=0.25,
                alpha_iit_cos=0.0, student_from="teacher", **DIITO),
    "glue": dict(temperature=20.0, alpha_ce=0.7, alpha_task=0.3, alpha_iit=1.0,
                 student_from="teacher", source_pairing="fixed", kl_reduction="batchmean", **DIITO),
}
PRESETS = {
    "mlm": {
        "paper": dict(
            teacher="google-bert/bert-base-uncased", student_layers="0,2,4,7,9,11",
            dataset_name="Salesforce/wikitext", dataset_config_name="wikitext-103-raw-v1",
            max_seq_length=512, per_device_train_batch_size=40, gradient_accumulation_steps=6,
            learning_rate=5e-4, num_train_epochs=3.0, max_steps=-1, logging_steps=50,
            save_steps=2000, output_dir="runs/iit-paper", num_proc=min(8, os.cpu_count() or 1),
            mlm_smoothing=0.7),
        # CPU, offline: MiniLM teaches 3 of 6 blocks; uniform masking (smoothing hurts short runs)
        "demo": dict(
            teacher=None, student_layers="0,3,5", max_seq_length=64, per_device_train_batch_size=8,
            gradient_accumulation_steps=1, learning_rate=5e-4, num_train_epochs=1.0, max_steps=200,
            max_eval_samples=256, logging_steps=10, save_steps=50, output_dir="runs/iit-demo",
            mlm_smoothing=0.0),
    },
    "glue": {
        # the authors' task-level command and code: a pretrained student, BertAdam's settings
        "paper": dict(
            student_from="google-bert/bert-base-uncased", student_layers="0,1,2,3,4,5",
            interchange_mode="random", source_pairing="batch", kl_reduction="mean",
            weight_decay=0.01, adam_beta2=0.999, warmup_ratio=0.1, max_grad_norm=1.0,
            max_seq_length=128, per_device_train_batch_size=32, gradient_accumulation_steps=1,
            learning_rate=2e-5, num_train_epochs=5.0, max_steps=-1, logging_steps=50,
            save_steps=1000),
        # the teacher's blocks and our loss and optimiser settings
        "demo": dict(
            student_layers="0,3,5", max_seq_length=common.DEMO_TEACHER["max_length"],
            per_device_train_batch_size=16, gradient_accumulation_steps=1, learning_rate=1e-4,
            num_train_epochs=6.0, max_steps=-1, logging_steps=5, save_steps=0),
    },
}


def resolve_args(args: Args) -> str:
    """Fill unset (None) flags: the preset's, else the task default. Returns why the preset runs."""
    fail_if(args.task != "mlm" and args.task not in common.GLUE_TASKS,
            f"--task '{args.task}' is not supported; pass --task mlm (masked-LM distillation) or a "
            f"GLUE task: {', '.join(common.GLUE_TASKS)}")
    fail_if(args.preset not in ("auto", "demo", "paper"),
            f"--preset '{args.preset}' is not one of auto, demo, paper")
    why = "asked for with --preset"
    if args.preset == "auto" and torch.cuda.is_available():
        args.preset = "paper"
        why = "a CUDA device is present"
    elif args.preset == "auto":
        args.preset = "demo"
        why = "no CUDA device found; pass --preset paper for the paper's setting"
    kind = "mlm" if args.task == "mlm" else "glue"
    preset = PRESETS[kind][args.preset]
    preset_skipped = {"dataset_name", "dataset_config_name"} if args.train_file else set()
    if args.student_num_layers or args.student:  # an explicit student wins over the preset's
        preset_skipped |= {"student_layers", "student_from"} if args.student else {"student_layers"}
    common.apply_preset(args, {k: v for k, v in preset.items() if k not in preset_skipped})
    common.apply_preset(args, TASK_DEFAULTS[kind])
    if args.output_dir is None:
        args.output_dir = f"runs/iit-{args.task}" + ("-demo" if args.preset == "demo" else "")
    return why


def loss_weights(args: Args) -> dict:
    if args.task == "mlm":
        names = ("temperature", "alpha_ce", "alpha_mlm", "alpha_cos", "alpha_iit", "alpha_iit_cos")
    else:
        names = ("temperature", "alpha_ce", "alpha_task", "alpha_iit", "kl_reduction")
    return {name: getattr(args, name) for name in names}


# ==== 5. TRAINING AND EVALUATION ====
@torch.no_grad()
def perplexity(model, eval_ids, tokenizer, args: Args, device, seed: int = 1234) -> float:
    """exp(mean masked CE) in fp32; uniform 15% masking, a fixed seed: the same for every model."""
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    total = 0.0
    count = 0
    size = args.per_device_eval_batch_size
    for start in range(0, len(eval_ids), size):
        chunk = eval_ids[start:start + size]["input_ids"]
        padded = tokenizer.pad({"input_ids": chunk}, return_tensors="pt")
        ids = padded["input_ids"]
        attn = padded["attention_mask"]
        masked, labels = mlm_mask(
            ids, attn, tokenizer.mask_token_id, len(tokenizer), set(tokenizer.all_special_ids),
            0.15, weights=None, generator=generator)
        logits = model(input_ids=masked.to(device), attention_mask=attn.to(device)).logits
        losses = F.cross_entropy(logits.flatten(0, 1).float(), labels.to(device).flatten(),
                                 reduction="sum")
        total += losses.item()
        count += int((labels != -100).sum())
    model.train(was_training)
    return math.exp(total / max(count, 1))


def dev_scores(model, eval_sets, tokenizer, args: Args, device) -> dict:
    """GLUE's counterpart of perplexity: common.classifier_scores on the dev sets."""
    spec = common.GLUE_TASKS[args.task]
    return common.classifier_scores(
        model, eval_sets, spec, tokenizer.pad_token_id, args.per_device_eval_batch_size, device,
        args.bf16)


def optimiser_steps(args: Args, num_sequences: int, dist) -> tuple[int, int]:
    """(--max_steps, else --num_train_epochs of this rank's full steps; steps per epoch)."""
    per_rank = math.ceil(num_sequences / args.per_device_train_batch_size) // dist.world_size
    fail_if(per_rank < args.gradient_accumulation_steps,
            f"an epoch has {per_rank} batches per device, fewer than one optimiser step "
            f"({args.gradient_accumulation_steps}); pass a smaller --per_device_train_batch_size "
            f"or --gradient_accumulation_steps")
    per_epoch = per_rank // args.gradient_accumulation_steps
    total = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * per_epoch)
    return total, per_epoch


# What a resumed run must share with its checkpoint: they decide the data order and schedule.
RESUME_SIGNATURE = (
    "task", "seed", "per_device_train_batch_size", "gradient_accumulation_steps",
    "max_train_samples", "max_seq_length", "min_seq_length", "alignment", "interchange_mode",
    "student_layers", "teacher", "student_from", "source_pairing")


def main(args: Args) -> dict:
    # BOILERPLATE: settings, input checks, devices
    why = resolve_args(args)
    checkpoint = check_args(args)
    dist, device = common.init_distributed(args.device)
    args.bf16, precision = common.precision(device, args.bf16)
    args.compile = device.type == "cuda" if args.compile is None else args.compile
    log(dist, f"preset: {args.preset} ({why})\n{precision}")
    mlm = args.task == "mlm"

    # IIT: the task's models, data, batches, objective and evaluation
    if mlm:
        tokenizer, teacher, student, groups = load_models(args, dist, device)
        train_set, eval_set = load_data(args, tokenizer, dist)
        masking = token_weights(train_set, len(tokenizer), args.mlm_smoothing,
                                tokenizer.all_special_ids)
        build_batch = make_batch
        objective = distillation_loss
        evaluate = perplexity
        unit = "sequences"
    else:
        tokenizer, teacher, student, groups, train_set, eval_set = load_task(args, dist, device)
        masking = None
        build_batch = make_task_batch
        objective = task_distillation_loss
        evaluate = dev_scores
        unit = "examples"
    use_iit = args.alpha_iit > 0 or (args.alpha_iit_cos or 0) > 0
    weights = loss_weights(args)
    pairs = held_out_pairs(args, eval_set, tokenizer, device)
    # SPEED-UP (appendix A): one forward, if a probe finds it exact
    runs, schedule = choose_runs(teacher, student, groups, pairs[0])
    compiled_text = "; encoder blocks and KL compiled" if args.compile else ""
    log(dist, f"schedule: {schedule}{compiled_text}")
    # IIT: each example's fixed source: a permutation drawn once (officially)
    source_of = np.random.default_rng(args.seed).permutation(len(train_set))
    total_steps, per_epoch = optimiser_steps(args, len(train_set), dist)
    accumulation = args.gradient_accumulation_steps
    signature = {name: getattr(args, name) for name in RESUME_SIGNATURE}
    signature |= {"world_size": dist.world_size, "total_steps": total_steps}
    optimizer, scheduler, state = common.optimizer_and_state(
        args, student, total_steps, checkpoint, signature, dist)
    sequences = args.per_device_train_batch_size * accumulation * dist.world_size
    log(dist, f"training: {total_steps} steps of {sequences} {unit}, alignment {args.alignment}; "
              f"every setting in {Path(args.output_dir) / 'args.json'}")
    teacher_predictions = []
    teacher_score = float("nan")
    if dist.is_main:  # the figures each student is judged against
        teacher_predictions = predictions(teacher, pairs, [t for t, _ in groups], runs)
        teacher_score = evaluate(teacher, eval_set, tokenizer, args, device)
    if dist.is_main and checkpoint is None:
        state["before"] = evaluate(student, eval_set, tokenizer, args, device)
        state["agreement_before"] = interchange_agreement(
            teacher, student, pairs, groups, runs, teacher_predictions)
        log(dist, describe("before distillation", teacher_score, state["before"]))
    if checkpoint is None:  # seeded after the one-off work above, which used the RNG
        common.set_seed(args.seed + dist.rank, args.deterministic)
    elif dist.rank > 0:  # the checkpoint holds rank 0's RNG state: keep ranks' draws apart
        common.set_seed(args.seed + dist.rank + 7919 * state["step"], args.deterministic)  # a prime
    # SPEED-UPS (appendix A): speed_up, and on CUDA batches built ahead
    kl = speed_up(teacher, student, args.bf16, args.compile, dist)
    ahead = device.type == "cuda"
    batches = training_batches(build_batch, train_set, source_of, tokenizer, masking, args, dist,
                               state, use_iit, ahead)
    if ahead:
        batches = prefetch(batches)
    model = common.ddp(student, dist, device)
    tracker = common.start_outputs(args, dist, f"iit-{args.task}")

    # IIT: the training loop
    step = state["step"]
    start_time = time.time()
    first_step = step
    window_start = start_time  # throughput since the last step line
    window_tokens = 0
    running = {}
    running_count = 0
    while step < total_steps:
        for micro in range(accumulation):
            epoch, batches_done, tokens, batch = next(batches)
            batch = to_device(batch, device)
            window_tokens += tokens
            # IIT: a group per micro-batch (as officially), alike on all ranks and on resume
            group = None
            if use_iit:
                choice = np.random.default_rng([args.seed, step, micro]).integers(len(groups))
                group = groups[choice]
            last_micro = micro == accumulation - 1
            # DDP averages gradients at the last micro-batch
            sync = contextlib.nullcontext() if last_micro or not dist.enabled else model.no_sync()
            with sync:
                with common.autocast(device, args.bf16):
                    loss, terms = objective(model, teacher, batch, group, **weights, runs=runs,
                                            kl=kl)
                (loss / accumulation).backward()
            # tensors, read at logging and save steps only: a read waits for the GPU
            for name, value in terms.items():
                running[name] = running.get(name, 0.0) + value.detach()
            running_count += 1
            state["loss_sum"] = state["loss_sum"] + loss.detach()
            state["loss_count"] += 1
        torch.nn.utils.clip_grad_norm_(student.parameters(), args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step % args.logging_steps == 0 or step == total_steps:
            mean = {name: float(value) / running_count for name, value in running.items()}
            terms_text = " ".join(f"{name} {value:.4f}" for name, value in mean.items())
            lr = scheduler.get_last_lr()[0]
            now = time.time()
            left = (now - start_time) / (step - first_step) * (total_steps - step)
            speed = common.progress(window_tokens, now - window_start, left)
            log(dist, f"step {step}/{total_steps} epoch {epoch} lr {lr:.2e} {terms_text} ({speed})")
            if tracker:
                tracker.log({f"train/{name}": value for name, value in mean.items()}, step=step)
            running = {}
            running_count = 0
            window_start = now
            window_tokens = 0
        state.update(step=step, epoch=epoch, batches_done=batches_done)
        if not mlm and (step % per_epoch == 0 or step == total_steps):
            metrics = evaluate(student, eval_set, tokenizer, args, device)
            scores = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            log(dist, f"epoch {epoch} dev: {scores}")
            common.keep_best(state, metrics, epoch, common.GLUE_TASKS[args.task], student,
                             tokenizer, args.output_dir, dist)
            student.train()
        if args.save_steps and step % args.save_steps == 0 and step < total_steps and dist.is_main:
            runtime = state["runtime"] + time.time() - start_time
            saved = {**state, "loss_sum": float(state["loss_sum"]), "runtime": runtime}
            common.save_checkpoint(args.output_dir, step, student, tokenizer, optimizer, scheduler,
                                   saved)

    # Evaluation and outputs (rank 0)
    results = {}
    if dist.is_main:
        state["runtime"] += time.time() - start_time
        state["loss_sum"] = float(state["loss_sum"])
        if mlm:
            score = evaluate(student, eval_set, tokenizer, args, device)
            common.save_model(args.output_dir, student, tokenizer)
        else:  # the best epoch's student (keep_best saved it) and its dev scores
            student = type(student).from_pretrained(args.output_dir).to(device)
            score = state["best"]
        agreement = interchange_agreement(
            teacher, student, pairs, groups, runs, teacher_predictions)
        results = finish(args, state, teacher_score, score, agreement, use_iit)
        if tracker:
            tracker.log({f"eval/{k}": v for k, v in results.items() if isinstance(v, float)})
            tracker.finish()
    if dist.enabled:
        torch.distributed.barrier()
    common.cleanup_distributed(dist)
    return results


def describe(when: str, teacher_score, student_score) -> str:
    if isinstance(teacher_score, float):
        return f"perplexity {when}: teacher {teacher_score:.2f}, student {student_score:.2f}"
    scores = ", ".join(f"{k} teacher {v:.4f}, student {student_score[k]:.4f}"
                       for k, v in teacher_score.items())
    return f"dev {when}: {scores}"


def finish(args: Args, state: dict, teacher_score, score, agreement: dict, use_iit: bool) -> dict:
    """The last screen, and results.json, written last."""
    results = {"train_loss": state["loss_sum"] / max(state["loss_count"], 1),
               "train_steps": state["step"], "train_runtime": state["runtime"],
               "preset": args.preset, "alignment": args.alignment, "iit": use_iit}
    if args.task == "mlm":
        results.update(teacher_perplexity=teacher_score, student_perplexity=score,
                       student_perplexity_before=state["before"])
        print(f"perplexity: student before {state['before']:.2f} -> after {score:.2f} "
              f"(teacher {teacher_score:.2f})")
    else:
        results.update(score, **{f"teacher_{k}": v for k, v in teacher_score.items()},
                       student_before=state["before"], best_epoch=state["best_epoch"],
                       history=state["history"])
        scores = ", ".join(f"{k} {teacher_score[k]:.4f} -> {v:.4f}" for k, v in score.items())
        print(f"dev, teacher -> best student (epoch {state['best_epoch']}): {scores}")
    before = state["agreement_before"]
    results.update(interchange_agreement=agreement["counterfactual"],
                   plain_agreement=agreement["plain"],
                   interchange_agreement_before=before["counterfactual"],
                   plain_agreement_before=before["plain"])
    print(f"interchange-intervention agreement with the teacher: {before['counterfactual']:.1%} -> "
          f"{agreement['counterfactual']:.1%} (with no intervention: {before['plain']:.1%} -> "
          f"{agreement['plain']:.1%})")
    common.write_json(Path(args.output_dir) / "results.json", results)
    which = "student" if args.task == "mlm" else "best student"
    print(f"saved: the {which}, results.json and args.json in {args.output_dir}")
    task = "" if args.task == "mlm" or demo_data(args) else f" --task {args.task}"
    print(f"next: python eval_tasks.py --model {args.output_dir}{task}")
    return results


# ==== APPENDIX A. SPEED-UPS ====
# The paper's three forwards (base_source_counterfactual) run the base twice: below the lowest
# intervened block k the counterfactual run equals it. ONE forward of 2B rows per model suffices:
#   1. rows [0, B) are the base input, rows [B, 2B) the source; all run blocks 0..k;
#   2. at block k rows [B, 2B) set the source's output aside and fork off the base's, with the
#      source's states at the swapped positions: the counterfactual run;
#   3. each block above k first runs the source rows alone on their kept states (up to the highest
#      intervened block), then all 2B rows, the counterfactual ones with the base's attention mask;
#   4. each higher intervened block gives the counterfactual rows its source states.
# The work is the objective's floor: 2B rows (plus the source rows' short climb), not 3B.
def hidden_state(output):
    """A block's output: its hidden state (transformers 5) or a tuple starting with it (4.x)."""
    return output[0] if isinstance(output, tuple) else output


def base_and_counterfactual(model, batch: dict, layers=None, check_mask: bool = False):
    """base_source_counterfactual from one forward of 2B rows (the sketch above). check_mask (the
    probe's; reads padding back): raise if blocks above k get no per-row mask despite padding."""
    if layers is None:
        return base_source_counterfactual(model, batch)
    blocks = transformer_blocks(model)
    B, T = batch["input_ids"].shape
    layers = sorted(set(layers))
    k = layers[0]
    base_at = tuple(batch["base_swap"])
    source_at = tuple(batch["source_swap"])
    base_rows_twice = torch.arange(B, device=batch["input_ids"].device).repeat(2)
    source_rows = slice(B, 2 * B)
    source_states = {}  # the source run's block outputs, (B, T, H)

    def per_row(value) -> bool:
        """Whether a block argument is per row and position (an attention mask)."""
        if not torch.is_tensor(value) or value.dim() < 2:
            return False
        return value.shape[0] == 2 * B and value.shape[-1] == T

    def arguments_of(rows, args, kwargs):
        """The block's arguments with every per-row tensor cut to `rows`."""
        def cut(value):
            return value[rows] if per_row(value) else value
        return (args[0], *map(cut, args[1:])), {name: cut(value) for name, value in kwargs.items()}

    def splice_at(layer):
        """Steps 2 (layer k) and 4: block `layer`'s hook writes the source states."""
        def hook(module, args, output):
            hidden = hidden_state(output)
            if layer == k:  # higher blocks' source states: step 3
                source_states[k] = hidden[B:]
            counterfactual = (hidden[:B] if layer == k else hidden[B:]).clone()
            counterfactual[base_at] = source_states[layer][source_at].to(counterfactual.dtype)
            hidden = torch.cat([hidden[:B], counterfactual])
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
        return hook

    def above_k(j):
        """Step 3, as block j's pre-hook."""
        def hook(module, args, kwargs):
            if check_mask and not any(map(per_row, [*args[1:], *kwargs.values()])):
                unpadded = batch["attention_mask"].all() and batch["source_attention_mask"].all()
                if not unpadded:
                    raise RuntimeError("base_and_counterfactual found no 2B-row attention mask")
            if j <= layers[-1]:  # block j's own arguments (ModernBERT: its attention type's)
                source_args, source_kwargs = arguments_of(source_rows, args, kwargs)
                output = module.forward(source_states[j - 1], *source_args[1:], **source_kwargs)
                source_states[j] = hidden_state(output)
            # no padding anywhere: no per-row input to cut, every row attends alike
            return arguments_of(base_rows_twice, args, kwargs)
        return hook

    handles = [blocks[layer].register_forward_hook(splice_at(layer), prepend=True)
               for layer in layers]
    handles += [blocks[j].register_forward_pre_hook(above_k(j), with_kwargs=True)
                for j in range(k + 1, len(blocks))]
    try:
        base_inputs = model_inputs(batch)
        source_inputs = model_inputs(batch, "source_")
        both = {name: torch.cat([base_inputs[name], source_inputs[name]]) for name in base_inputs}
        with encoder_output(model) as last:
            out = model(**both)
        return out.logits, last["h"]
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def one_forward_is_exact(model, layers_per_group: list, batch: dict) -> bool:
    """Whether base_and_counterfactual matches base_source_counterfactual on `model`, `batch`
    (padded, no dropout), every group (not if blocks get per-row inputs the one forward misses)."""
    was_training = model.training
    matmuls = torch.get_float32_matmul_precision()
    model.eval()
    torch.set_float32_matmul_precision("highest")  # compared in fp32, without a bf16 run's TF32
    try:
        for layers in layers_per_group:
            fast = base_and_counterfactual(model, batch, layers, check_mask=True)
            plain = base_source_counterfactual(model, batch, layers)
            if not all(torch.allclose(a, b, rtol=1e-4, atol=1e-4) for a, b in zip(fast, plain)):
                return False
        return True
    except RuntimeError:  # no per-row mask found
        return False
    finally:
        model.train(was_training)
        torch.set_float32_matmul_precision(matmuls)


def first_rows(batch: dict, n: int) -> dict:
    """A batch's first n (base, source) pairs (its (2, N) positions: rows below n)."""
    return {name: value[:, value[0] < n] if name.endswith(("_swap", "_positions")) else value[:n]
            for name, value in batch.items()}


def choose_runs(teacher, student, groups: list, batch: dict):
    """(runs, what the screen says): one forward if a probe on four held-out pairs finds it exact
    for both models, else the paper's three."""
    probe = first_rows(batch, 4)
    teacher_exact = one_forward_is_exact(teacher, [t for t, _ in groups], probe)
    if teacher_exact and one_forward_is_exact(student, [s for _, s in groups], probe):
        return base_and_counterfactual, "one forward of 2B rows per model (the probe: exact)"
    why = f"{type(teacher).__name__} gives other outputs from the one-forward schedule"
    return base_source_counterfactual, f"the paper's three forwards per model ({why})"


def compiled(function, name: str, dist, backend: str = "inductor"):
    """torch.compile(function), saying in one line where it runs eagerly: a case past dynamo's
    limit, that call; a failed compile (forward or backward), from then on."""
    import torch._dynamo
    # all blocks share a code object and so a graph budget (train/eval, grad, masks, sizes)
    torch._dynamo.config.cache_size_limit = 64
    if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):  # raise, not silently eager
        torch._dynamo.config.fail_on_recompile_limit_hit = True
    # the backward compiled with the forward: a failure raises here, not in loss.backward()
    if hasattr(torch._functorch.config, "force_non_lazy_backward_lowering"):
        torch._functorch.config.force_non_lazy_backward_lowering = True
    errors = torch._dynamo.exc.TorchDynamoException
    limit_hit = getattr(torch._dynamo.exc, "FailOnRecompileLimitHit", errors)
    fast = torch.compile(function, backend=backend, dynamic=True)
    failed = []
    past_limit = []

    def call(*args, **kwargs):
        if not failed:
            try:
                return fast(*args, **kwargs)
            except limit_hit as e:  # compiled graphs still serve the other cases
                if not past_limit:
                    log(dist, f"note: {name} runs eagerly past dynamo's limit: "
                              f"{common.first_line(e)}")
                past_limit.append(e)
            except errors as e:
                failed.append(e)  # eager computes the same values
                cause = getattr(e, "inner_exception", None) or e  # a backend's own error
                log(dist, f"note: torch.compile of {name} failed; it runs eagerly: "
                          f"{type(cause).__name__}: {common.first_line(cause)}")
        return function(*args, **kwargs)

    call.failed = failed
    call.past_limit = past_limit
    return call


def speed_up(teacher, student, bf16: bool, compile: bool, dist, backend: str = "inductor"):
    """Switches the speed-ups on; returns the KL to use. bf16: the frozen teacher in bf16 (autocast
    computes in bf16 anyway). compile: each block's forward (a compiled model would meet IIT's
    hooks, new each call) and the KL, whose (rows x tokens x 30,522) tensors cost more than the
    encoder's matmuls: fused, read once."""
    if bf16:  # weights only: buffers (e.g. ModernBERT's rotary frequencies) stay fp32
        for weight in teacher.parameters():
            weight.data = weight.data.to(torch.bfloat16)
    if not compile:
        return soft_target_kl
    for model in (teacher, student):
        for block in transformer_blocks(model):
            block.forward = compiled(block.forward, f"{type(block).__name__}.forward", dist,
                                     backend)
    return compiled(soft_target_kl, "soft_target_kl", dist, backend)


def prefetch(items):
    """`items`, each built in a thread while the caller uses the one before."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(next, items, None)
        while (item := pending.result()) is not None:
            pending = pool.submit(next, items, None)
            yield item


def pad_vocabulary(model, multiple: int = 64) -> None:
    """The MLM head's weight padded with zero rows to a multiple of 64, the logits sliced back:
    the same logits, in rows tensor cores align (BERT's 30,522 gets ~3x slower cuBLAS kernels)."""
    decoder = model.get_output_embeddings()
    if not isinstance(decoder, torch.nn.Linear) or decoder.out_features % multiple == 0:
        return
    vocab = decoder.out_features
    extra = -vocab % multiple

    def forward(hidden):  # (..., H) -> (..., V), a view of (..., V + extra)
        bias = None if decoder.bias is None else F.pad(decoder.bias, (0, extra))
        return F.linear(hidden, F.pad(decoder.weight, (0, 0, 0, extra)), bias)[..., :vocab]

    decoder.forward = forward


# ==== APPENDIX B. INPUT CHECKS: every input checked before anything is written ====
def demo_data(args: Args) -> bool:
    return args.preset == "demo" and not (args.train_file or args.data_dir or args.dataset_name)


def check_length(args: Args, skeleton) -> None:
    positions = common.max_positions(skeleton)
    fail_if(args.max_seq_length > positions,
            f"--max_seq_length {args.max_seq_length} is longer than the teacher's {positions} "
            f"positions; pass a smaller value")


def check_args(args: Args) -> Path | None:
    """Stops, in one line, at the first bad setting; returns the checkpoint to resume."""
    mlm = args.task == "mlm"
    fail_if(bool(args.train_file) != bool(args.validation_file),
            "pass both --train_file and --validation_file")
    common.require_file(args.train_file, "--train_file")
    common.require_file(args.validation_file, "--validation_file")
    if args.student_layers:
        common.parse_layers(args.student_layers)
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size",
                 "gradient_accumulation_steps", "logging_steps", "temperature"):
        fail_if(getattr(args, name) <= 0, f"--{name} must be positive, got {getattr(args, name)}")
    for name in ("alpha_ce", "alpha_mlm", "alpha_cos", "alpha_task", "alpha_iit", "alpha_iit_cos",
                 "save_steps", "mlm_smoothing"):
        fail_if((getattr(args, name) or 0) < 0, f"--{name} must not be negative")
    for name in ("interchange_prop", "mlm_probability"):
        fail_if(not 0.0 < getattr(args, name) <= 1.0, f"--{name} must be in (0, 1]")
    choices = {"interchange_mode": ("consecutive", "random", "masked")}
    if not mlm:
        choices |= {"source_pairing": ("fixed", "batch"), "kl_reduction": ("batchmean", "mean")}
    for name, values in choices.items():
        fail_if(getattr(args, name) not in values,
                f"--{name} '{getattr(args, name)}' is not one of {', '.join(values)}")
    fail_if(args.student and args.student_from != "teacher",
            "pass --student (a whole smaller model) or --student_from (blocks of one), not both")
    fail_if(mlm and not 3 <= args.min_seq_length <= args.max_seq_length,
            f"need 3 <= --min_seq_length ({args.min_seq_length}) <= --max_seq_length "
            f"({args.max_seq_length})")
    if mlm:
        only_elsewhere = ("alpha_task", "data_dir", "source_pairing", "kl_reduction")
    else:
        only_elsewhere = ("alpha_mlm", "alpha_cos", "alpha_iit_cos", "dataset_name",
                          "mlm_smoothing")
    for name in only_elsewhere:
        fail_if(getattr(args, name) is not None, f"--{name} does not apply to --task {args.task}")
    fail_if(not mlm and args.interchange_mode == "masked",
            "--interchange_mode masked swaps the MLM-masked tokens: pass consecutive or random")
    fail_if(not mlm and demo_data(args) and args.task != "sst2",
            f"the demo data is SST-2-style; for {args.task} pass --data_dir or "
            f"--train_file/--validation_file")
    # the demo teacher knows the demo data only
    fail_if(not mlm and args.teacher is None and not demo_data(args),
            f"pass --teacher, a classifier fine-tuned on {args.task} (python eval_tasks.py --model "
            f"MODEL --task {args.task} writes one)")
    common.check_output_dir(args.output_dir, args.overwrite_output_dir,
                            args.resume_from_checkpoint is not None)
    checkpoint = common.resolve_resume(args.resume_from_checkpoint, args.output_dir)
    if checkpoint is not None and not mlm:
        fail_if(checkpoint.resolve().parent != Path(args.output_dir).resolve(),
                f"the best student so far is in the run folder of '{checkpoint}'; resume with "
                f"--output_dir {checkpoint.parent}")
    return checkpoint


# ==== APPENDIX C. THE OFFLINE DEMO'S ASSETS: a corpus and a teacher, built once and cached ====
def demo_corpus(cache: Path) -> tuple[Path, Path]:
    """~100 Wikipedia articles shipped with gensim, a paragraph a line; every 10th validates."""
    folder = cache / "demo-corpus-v1"
    train = folder / "train.txt"
    valid = folder / "validation.txt"
    if train.is_file() and valid.is_file():
        return train, valid
    try:
        from gensim.corpora.wikicorpus import extract_pages, filter_wiki
        from gensim.test.utils import datapath
    except ImportError:
        raise UserError("the offline demo needs gensim (pip install --no-deps -r requirements-demo"
                        ".txt); or pass --train_file and --validation_file") from None
    articles = []
    dump = datapath("enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
    for _title, text, _pageid in extract_pages(bz2.BZ2File(dump)):
        lines = (re.sub(r"'{2,}", "", line).strip() for line in filter_wiki(text or "").split("\n"))
        markup = tuple("=*|{!:;#")  # headings, lists, tables
        paragraphs = [p for p in lines if len(p.split()) >= 8 and not p.startswith(markup)]
        if paragraphs and not text.lower().startswith("#redirect"):
            articles.append(paragraphs)
    folder.mkdir(parents=True, exist_ok=True)
    for path, held_out in ((train, False), (valid, True)):
        tmp = path.with_suffix(".tmp")
        chosen = [p for i, article in enumerate(articles) if (i % 10 == 9) == held_out
                  for p in article]
        tmp.write_text("\n".join(chosen) + "\n")
        os.replace(tmp, path)
    return train, valid


def demo_teacher(args: Args) -> Path:
    """MiniLM (common.demo_encoder) with an MLM head fitted on the demo corpus, once (~3 min)."""
    folder = common.cache_root(args.cache_dir) / "demo-teacher-minilm-mlm-v1"
    if (folder / "model.safetensors").is_file():
        return folder
    encoder = common.demo_encoder("--teacher PATH_TO_A_BERT_MLM")
    import datasets
    from transformers import AutoTokenizer, BertForMaskedLM
    from transformers import logging as transformers_logging
    common.set_seed(0)  # the new head's initialisation and dropout: the same teacher everywhere
    tokenizer = AutoTokenizer.from_pretrained(encoder)
    verbosity = transformers_logging.get_verbosity()
    # no loader report: the missing MLM head is fitted next
    transformers_logging.set_verbosity_error()
    model = BertForMaskedLM.from_pretrained(encoder)  # decoder tied to the embeddings
    transformers_logging.set_verbosity(verbosity)
    print(f"demo teacher: MiniLM has no MLM head; a new one is fitted on the demo corpus, once "
          f"(~3 min; cached in {folder})", flush=True)
    corpus = demo_corpus(common.cache_root(args.cache_dir))[0]
    data = datasets.load_dataset("text", data_files={"train": str(corpus)})
    data = tokenize_paragraphs(data, tokenizer, 64, 12, None)["train"]
    weights = token_weights(data, len(tokenizer), 0.0, tokenizer.all_special_ids)  # uniform
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(data), generator=generator).tolist()
    head = [p for n, p in model.named_parameters() if n.startswith("cls.")]
    phases = [(150, 2e-3, head), (200, 1e-4, list(model.parameters()))]
    for phase, (steps, lr, params) in enumerate(phases):
        model.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        model.train()
        for step in range(steps):
            rows = [order[((phase * 1000 + step) * 16 + j) % len(data)] for j in range(16)]
            padded = tokenizer.pad({"input_ids": data[rows]["input_ids"]}, return_tensors="pt")
            ids = padded["input_ids"]
            attn = padded["attention_mask"]
            masked, labels = mlm_mask(ids, attn, tokenizer.mask_token_id, len(tokenizer),
                                      set(tokenizer.all_special_ids), 0.15, weights, generator)
            with torch.no_grad() if phase == 0 else contextlib.nullcontext():
                hidden = model.bert(input_ids=masked, attention_mask=attn).last_hidden_state
            # only masked positions go through the costly vocabulary projection
            chosen = labels != -100
            loss = F.cross_entropy(model.cls(hidden[chosen]), labels[chosen])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step % 40 == 0 or step == steps - 1:
                print(f"  demo teacher phase {phase + 1}/2 step {step + 1}/{steps}: mlm loss "
                      f"{loss.item():.3f}", flush=True)
    common.save_model(folder, model, tokenizer)  # weights written last: a folder with them is whole
    return folder


if __name__ == "__main__":
    common.run_cli(main, Args)
