"""Causal distillation of BERT (DIITO): Wu, Geiger et al., "Causal Distillation for Language Models", NAACL 2022.

A student with fewer blocks learns from a frozen teacher as in DistilBERT and, through interchange intervention
training (IIT), to react to an intervention as the teacher does: the outputs of aligned blocks are copied from a
*source* input into a *base* input in both models, and the two models' *counterfactual* outputs must agree.

    L = a_ce L_ce + a_mlm L_mlm + a_cos L_cos + a_iit L_iit (+ a_iit_cos L_iit_cos)
    L_ce      = T^2 1/|M| sum_{p in M} KL( softmax(z_t[p]/T) || softmax(z_s[p]/T) )    z: MLM logits (base)
    L_mlm     = 1/|masked| sum_{p masked} -log p_s(x_p | masked base)
    L_cos     = 1/|M| sum_{p in M} (1 - cos(h_s[p], h_t[p]))                            h: last hidden states
    L_iit     = T^2 1/|M| sum_{p in M} KL( softmax(z~_t[p]/T) || softmax(z~_s[p]/T) )  z~: counterfactual run
    L_iit_cos = 1/|M| sum_{p in M} (1 - cos(h~_s[p], h~_t[p]))
M is every non-pad base token, T = 2, every a = 0.25 but a_iit_cos = 0 (the paper's +COS variant sets it).
On a GLUE task the same interchange trains a classifier student (z: class logits, one per example; STS-B: MSE):
    L = a_ce T^2 KL( softmax(z_t/T) || softmax(z_s/T) ) + a_task CE(z_s, y) + a_iit T^2 KL( softmax(z~_t/T) || .. )

    python iit_distill.py --task mlm                   # no CUDA device: offline CPU demo with a small real teacher
    python iit_distill.py --task mlm --preset paper    # bert-base-uncased -> 6 blocks on WikiText-103
    python iit_distill.py --task mlm --alpha_iit 0 --alpha_ce 0.33 --alpha_mlm 0.33 --alpha_cos 0.33  # baseline
    python iit_distill.py --task sst2                  # offline demo: teacher blocks 0,3,5, spans, one fixed pairing
    python iit_distill.py --task rte --preset paper --teacher T  # authors': bert-base blocks 0-5, random, in-batch
"""

import bz2
import contextlib
import dataclasses
import functools
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
from common import UserError, transformer_blocks

def arg(default, help: str):
    return dataclasses.field(default=default, metadata={"help": help})

@dataclasses.dataclass
class Args:  # BOILERPLATE: fields left at None are filled by the preset; a flag given explicitly wins
    task: str = arg("mlm", "mlm (masked LM) or GLUE (a classifier): cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli")
    preset: str = arg("auto", "auto | demo | paper (auto: paper on a CUDA machine, demo otherwise)")
    # --- models and data
    teacher: str | None = arg(None, "Teacher: a masked LM (mlm) or a classifier fine-tuned on the task; folder or "
                                    "hub id (demo: MiniLM, fitted on the demo data once)")
    student: str | None = arg(None, "Instead of teacher blocks: a smaller pretrained model of the family (new head)")
    student_from: str | None = arg(None, "Source of the student's blocks: teacher, or a pretrained model of its kind")
    student_layers: str | None = arg(None, "Teacher blocks copied into the student: 0,2,4,7,9,11 (paper)")
    student_num_layers: int | None = arg(None, "Instead of --student_layers: N evenly spaced teacher blocks")
    dataset_name: str | None = arg(None, "mlm: hub dataset with a 'text' column (paper: Salesforce/wikitext)")
    dataset_config_name: str | None = arg(None, "mlm: hub dataset config (paper: wikitext-103-raw-v1)")
    data_dir: str | None = arg(None, "GLUE: the official files, the task folder or glue_data/ holding it")
    train_file: str | None = arg(None, "mlm: plain text, a paragraph per line; GLUE: CSV/JSON (hub columns) or .tsv")
    validation_file: str | None = arg(None, "The validation file, in the same layout as --train_file")
    max_seq_length: int | None = arg(None, "Longer inputs are cut (mlm: into chunks) to this many tokens")
    min_seq_length: int = arg(12, "Shorter sequences are dropped (official: 12)")
    # --- optimisation (official: AdamW, no decay on biases and LayerNorm weights)
    per_device_train_batch_size: int | None = arg(None, "Sequences per device per micro-step (paper 40)")
    per_device_eval_batch_size: int = arg(32, "Sequences per evaluation batch")
    gradient_accumulation_steps: int | None = arg(None, "Micro-steps per optimiser step (paper 6: 240 sequences)")
    learning_rate: float | None = arg(None, "Peak AdamW learning rate (5e-4)")
    weight_decay: float | None = arg(None, "AdamW weight decay (0; GLUE paper 0.01)")
    adam_beta1: float = arg(0.9, "AdamW beta1")
    adam_beta2: float | None = arg(None, "AdamW beta2 (0.98; GLUE paper 0.999)")
    adam_epsilon: float = arg(1e-6, "AdamW epsilon")
    warmup_ratio: float | None = arg(None, "Share of steps with linear warm-up, then decay (0.05; GLUE paper 0.1)")
    max_grad_norm: float | None = arg(None, "Gradient-norm clipping (5; GLUE paper 1)")
    num_train_epochs: float | None = arg(None, "Epochs over the training set (paper 3)")
    max_steps: int | None = arg(None, "Optimiser steps; > 0 overrides --num_train_epochs (demo 200)")
    max_train_samples: int | None = arg(None, "Keep only the first N training sequences")
    max_eval_samples: int | None = arg(None, "Keep only the first N validation sequences (demo 256)")
    # --- the method (None: the preset's value, else the task's default, TASK_DEFAULTS below)
    temperature: float | None = arg(None, "Softmax temperature T of the KL terms, with the T^2 factor (mlm 2, GLUE 20)")
    alpha_ce: float | None = arg(None, "Weight of L_ce, the soft-target KL (mlm 0.25, baseline 0.33; GLUE 0.7)")
    alpha_mlm: float | None = arg(None, "mlm: weight of L_mlm, the masked-LM loss (0.25, baseline 0.33)")
    alpha_cos: float | None = arg(None, "mlm: weight of L_cos, the last-hidden-state cosine loss (0.25, baseline 0.33)")
    alpha_task: float | None = arg(None, "GLUE: weight of L_task, cross-entropy with the gold labels (0.3)")
    alpha_iit: float | None = arg(None, "Weight of L_iit, the counterfactual KL (mlm 0.25, GLUE 1); 0: no IIT")
    alpha_iit_cos: float | None = arg(None, "mlm: weight of L_iit_cos, the counterfactual cosine (0; +COS sets it)")
    alignment: str = arg("full", "full | middle | late | a map 'T,T:S;T:S'; one group is sampled per step")
    interchange_mode: str | None = arg(None, "consecutive | random (GLUE paper) | masked: which tokens are swapped")
    source_pairing: str | None = arg(None, "GLUE: fixed (a permutation, as mlm) | batch (shuffled each step; paper)")
    kl_reduction: str | None = arg(None, "GLUE: batchmean (KL per example) | mean (also / classes; paper)")
    interchange_prop: float = arg(0.3, "Swapped tokens per row, a fraction of min(base, source) length")
    mlm_probability: float = arg(0.15, "Fraction of real tokens chosen for MLM per batch")
    mlm_smoothing: float | None = arg(None, "Masking weight count(token)^-s (paper 0.7); 0: uniform (demo)")
    # --- run
    seed: int = arg(56, "Seed of data order, source pairing, masking and interventions")
    deterministic: bool = arg(False, "Ask torch for deterministic kernels")
    output_dir: str | None = arg(None, "Where the student, checkpoints, args.json and results.json go")
    overwrite_output_dir: bool = arg(False, "Allow writing over a finished run in --output_dir")
    logging_steps: int | None = arg(None, "Print the loss terms every N optimiser steps")
    save_steps: int | None = arg(None, "Write output_dir/checkpoint-<step>/ every N steps (0: never)")
    resume_from_checkpoint: str | None = arg(None, "A checkpoint-<step> folder, or 'latest' in --output_dir")
    bf16: bool | None = common.bf16_flag()
    device: str = arg("auto", "auto | cpu | cuda | mps")
    num_proc: int | None = arg(None, "Processes for tokenisation (paper: up to 8)")
    cache_dir: str | None = arg(None, "Cache of the demo corpus and teacher (default ~/.cache/bert-distill)")
    track: bool = arg(False, "Log to Weights & Biases (imported only when set)")

    def __post_init__(self):  # a flag given explicitly wins over the preset, which wins over the task's default
        self.given = {name for name, value in vars(self).items() if value is not None}
        common.apply_preset(self, TASK_DEFAULTS["mlm" if self.task == "mlm" else "glue"])

# mlm: the paper's (DIITO). GLUE: the loss of the authors' task-level command (Causal-Distill-XXS); the rest: OURS.
OURS = dict(interchange_mode="consecutive", weight_decay=0.0, adam_beta2=0.98, warmup_ratio=0.05, max_grad_norm=5.0)
TASK_DEFAULTS = {"mlm": dict(temperature=2.0, alpha_ce=0.25, alpha_mlm=0.25, alpha_cos=0.25, alpha_iit=0.25,
                             alpha_iit_cos=0.0, student_from="teacher", **OURS),
                 "glue": dict(temperature=20.0, alpha_ce=0.7, alpha_task=0.3, alpha_iit=1.0, student_from="teacher",
                              source_pairing="fixed", kl_reduction="batchmean", **OURS)}
PRESETS = {
    "paper": dict(teacher="google-bert/bert-base-uncased", student_layers="0,2,4,7,9,11",
                  dataset_name="Salesforce/wikitext", dataset_config_name="wikitext-103-raw-v1", max_seq_length=512,
                  per_device_train_batch_size=40, gradient_accumulation_steps=6, learning_rate=5e-4,
                  num_train_epochs=3.0, max_steps=-1, logging_steps=50, save_steps=2000, output_dir="runs/iit-paper",
                  num_proc=min(8, os.cpu_count() or 1), mlm_smoothing=0.7),
    # CPU demo, no downloads: MiniLM teaches 3 of its 6 blocks; uniform masking (smoothing hurts short runs)
    "demo": dict(teacher=None, student_layers="0,3,5", max_seq_length=64, per_device_train_batch_size=8,
                 gradient_accumulation_steps=1, learning_rate=5e-4, num_train_epochs=1.0, max_steps=200,
                 max_eval_samples=256, logging_steps=10, save_steps=50, output_dir="runs/iit-demo", mlm_smoothing=0.0),
}
GLUE_PRESETS = {  # paper: the authors' task-level command and code (pretrained student); demo: teacher blocks, ours
    "paper": dict(student_from="google-bert/bert-base-uncased", student_layers="0,1,2,3,4,5", interchange_mode="random",
                  source_pairing="batch", kl_reduction="mean", weight_decay=0.01, adam_beta2=0.999, warmup_ratio=0.1,
                  max_grad_norm=1.0, max_seq_length=128, per_device_train_batch_size=32, gradient_accumulation_steps=1,
                  learning_rate=2e-5, num_train_epochs=5.0, max_steps=-1, logging_steps=50, save_steps=1000),
    "demo": dict(student_layers="0,3,5", max_seq_length=common.DEMO_TEACHER["max_length"],
                 per_device_train_batch_size=16, gradient_accumulation_steps=1, learning_rate=1e-4,
                 num_train_epochs=6.0, max_steps=-1, logging_steps=5, save_steps=0),
}

# ==== IIT: THE METHOD ===========================================================================
# Block l's output is read in the source run and written in the counterfactual run, by forward hooks on the same
# module (the official code reads hidden_states[l], the block's input: fixed); common.transformer_blocks finds them.
def get_activations(model, input_ids, attention_mask, layers, **inputs) -> dict:
    """The source run: {l: output of encoder block l (0-based), (B, T, H)} for each l in `layers`."""
    found, blocks = {}, transformer_blocks(model)
    def reader(layer):
        def hook(module, args, output):  # a block returns its hidden state, or a tuple that starts with it
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
    """The counterfactual run: `model` on the base input, where interventions {l: (mask (B, T), values (N, H))}
    write `values` into block l's output at the mask's True positions (row-major); grads flow into them."""
    def setter(mask, values):
        def hook(module, inputs, output):
            is_tuple = isinstance(output, tuple)
            hidden = (output[0] if is_tuple else output).clone()  # (B, T, H); no in-place write on a tracked tensor
            hidden[mask] = values.to(hidden.dtype)  # IIT: the interchange intervention
            return (hidden, *output[1:]) if is_tuple else hidden
        return hook
    # prepend: run before any hook transformers itself keeps on the block (it records hidden states)
    blocks = transformer_blocks(model)
    handles = [blocks[layer].register_forward_hook(setter(mask, values), prepend=True)
               for layer, (mask, values) in interventions.items()]
    try:
        return model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    finally:
        for handle in handles:
            handle.remove()

def interchange_masks(base_lengths: torch.Tensor, source_lengths: torch.Tensor, seq_len: int, prop: float,
                      mode: str = "consecutive", base_candidates: torch.Tensor | None = None,
                      generator: torch.Generator | None = None) -> tuple:
    """Which tokens are swapped: (base_mask, source_mask), (B, T) bool, real tokens only (the official random mode
    can pick padding). Row i swaps n = floor(prop * min(base_len, source_len)) positions, the k-th source one into
    the k-th base one: a span at a random start in each (consecutive, the paper's), random positions (random), or
    the base's MLM positions `base_candidates` and random source positions (masked)."""
    if mode not in ("consecutive", "random", "masked"):
        raise ValueError(f"interchange mode '{mode}' is not one of consecutive, random, masked")
    base_mask, source_mask = torch.zeros(2, len(base_lengths), seq_len, dtype=torch.bool)
    def sample(length: int, n: int) -> torch.Tensor:  # n of range(length), drawn without replacement
        return torch.randperm(length, generator=generator)[:n]
    for i in range(len(base_lengths)):
        base_len, source_len = int(base_lengths[i]), int(source_lengths[i])
        if mode == "masked":
            positions = base_candidates[i, :base_len].nonzero().flatten().cpu()
            n = min(len(positions), source_len)
            base_mask[i, positions[sample(len(positions), n)]] = True
            source_mask[i, sample(source_len, n)] = True
            continue
        n = int(prop * min(base_len, source_len))
        if n > 0 and mode == "consecutive":
            start = int(torch.randint(base_len - n + 1, (1,), generator=generator))
            source_start = int(torch.randint(source_len - n + 1, (1,), generator=generator))
            base_mask[i, start:start + n] = True
            source_mask[i, source_start:source_start + n] = True
        elif n > 0:
            base_mask[i, sample(base_len, n)] = True
            source_mask[i, sample(source_len, n)] = True
    return base_mask, source_mask

def alignments(name: str, num_teacher_layers: int, num_student_layers: int) -> list:
    """Which blocks are swapped: groups (teacher blocks, student blocks), one sampled per step. Official, for 12 -> 6:
    full {T0,T1->S0}, ..., {T10,T11->S5}; middle {T6->S3}; late {T9->S3}, {T10->S4}; else a map like '0,1:0;2,3:1'."""
    nt, ns = num_teacher_layers, num_student_layers
    if name == "full" and ns > nt:
        raise ValueError(f"alignment 'full' needs a teacher block per student block (teacher {nt}, student {ns})")
    if name == "full":
        groups = [(tuple(range(i * nt // ns, (i + 1) * nt // ns)), (i,)) for i in range(ns)]
    elif name == "middle":
        groups = [((nt // 2,), (ns // 2,))]
    elif name == "late":
        late = [((min(3 * nt // 4 + i, nt - 1),), (min(ns // 2 + i, ns - 1),)) for i in (0, 1)]
        groups = list(dict.fromkeys(late))  # a small student may have room for one group only
    else:
        try:
            groups = [tuple(tuple(int(x) for x in side.replace(" ", "").split(",") if x != "")
                            for side in group.split(":")) for group in name.split(";")]
        except ValueError:
            groups = []
        if not groups or any(len(g) != 2 or not g[0] or not g[1] for g in groups):
            raise ValueError(f"alignment '{name}' is not full, middle, late or a map like '9:3;10:4'")
        groups = [(tuple(sorted(set(t))), tuple(sorted(set(s)))) for t, s in groups]
    for teacher_layers, student_layers in groups:
        if any(not 0 <= t < nt for t in teacher_layers) or any(not 0 <= s < ns for s in student_layers):
            raise ValueError(f"alignment group {teacher_layers}->{student_layers} is outside the teacher's "
                             f"0..{nt - 1} or the student's 0..{ns - 1} blocks")
    return groups

# The losses, per position: z are MLM logits (..., V), h last hidden states (..., H), M the positions used.
def soft_target_kl(student_logits, teacher_logits, temperature: float) -> torch.Tensor:
    """(...,) for logits (..., V): T^2 * KL( softmax(z_t/T) || softmax(z_s/T) ), in fp32 (bf16 logits not copied)."""
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1, dtype=torch.float32)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=-1, dtype=torch.float32)
    return F.kl_div(log_p_student, log_p_teacher, reduction="none", log_target=True).sum(-1) * temperature**2

def cosine_distance(student_hidden, teacher_hidden) -> torch.Tensor:
    """(...,) for states (..., H): 1 - cos(h_s, h_t)."""
    return 1.0 - F.cosine_similarity(student_hidden.float(), teacher_hidden.float(), dim=-1)

def masked_mean(values, positions) -> torch.Tensor:
    """1/|M| * sum_{p in M} values[p]; values outside M (padding) must be finite and are ignored."""
    return (values * positions).sum() / positions.sum()

def mlm_loss(student_logits, labels) -> torch.Tensor:
    """1/|masked| * sum_{p masked} -log p_s(x_p | masked input); labelled positions only (logits may have more rows)."""
    rows, cols = (labels != -100).nonzero(as_tuple=True)
    return F.cross_entropy(student_logits[rows, cols].float(), labels[rows, cols])

@contextlib.contextmanager
def encoder_output(model):
    """Records the encoder's last hidden state in the next forward, what the head reads: {"h": (R, T, H)}."""
    found = {}
    handle = common.unwrap(model).base_model.register_forward_hook(lambda _m, _a, output: found.update(h=output[0]))
    try:
        yield found
    finally:
        handle.remove()

def model_inputs(batch: dict, run: str = "") -> dict:
    """The base run's (run "") or the source run's (run "source_") model inputs: ids, mask, token types if any."""
    return {key: batch[run + key] for key in ("input_ids", "attention_mask", "token_type_ids") if run + key in batch}

def base_source_counterfactual(model, batch: dict, layers=None):
    """The paper's three forwards: logits z (R, T, V) (classifiers: (R, C)) and last hidden states h (R, T, H); rows
    [0, B) are the base run and, when `layers` are intervened on, rows [B, 2B) the counterfactual run."""
    with encoder_output(model) as base_h:
        base = model(**model_inputs(batch))
    if layers is None:  # standard distillation: the base run alone
        return base.logits, base_h["h"]
    # IIT: the source run: the aligned blocks' outputs on the source input
    source = get_activations(model, **model_inputs(batch, "source_"), layers=layers)
    # IIT: the counterfactual run: the base input, with the source's states at the swapped positions
    swaps = {layer: (batch["base_swap"], source[layer][batch["source_swap"]]) for layer in layers}
    with encoder_output(model) as counterfactual_h:
        counterfactual = forward_with_interchange(model, interventions=swaps, **model_inputs(batch))
    return torch.cat([base.logits, counterfactual.logits]), torch.cat([base_h["h"], counterfactual_h["h"]])

def distillation_loss(student, teacher, batch: dict, weights, group=None, schedule: str = "fast"):
    """Loss of one micro-batch and its terms. `batch`: masked base `input_ids`, `attention_mask`, MLM `labels` and,
    for IIT, the masked `source_input_ids`, `source_attention_mask` and swap masks `base_swap`, `source_swap`.
    `weights`: any object with .temperature and .alpha_*. `group`: (teacher blocks, student blocks) or None."""
    # SPEED-UP: schedule 'fast' gets the rows of the 'plain' three forwards from one (base_and_counterfactual, below)
    runs = base_and_counterfactual if schedule == "fast" and group is not None else base_source_counterfactual
    teacher_layers, student_layers = group if group is not None else (None, None)
    with torch.no_grad():  # the teacher is frozen; the student's source run is not detached (as officially)
        z_t, h_t = runs(teacher, batch, teacher_layers)
    z_s, h_s = runs(student, batch, student_layers)
    M = batch["attention_mask"].bool()  # (B, T): every non-pad base token, in the base and the counterfactual run
    base, counterfactual = slice(0, len(M)), slice(len(M), 2 * len(M))  # the rows of each run
    kl = (fused_soft_target_kl() if z_s.is_cuda else soft_target_kl)(z_s, z_t, weights.temperature)  # (R, T)
    cos = cosine_distance(h_s, h_t)  # (R, T)
    # L_ce = T^2 * 1/|M| * sum_{p in M} KL( softmax(z_t[p]/T) || softmax(z_s[p]/T) )
    terms = {"ce": masked_mean(kl[base], M)}
    # L_mlm = 1/|masked| * sum_{p masked} -log p_s(x_p | masked base)     (reads the base rows only)
    terms["mlm"] = mlm_loss(z_s, batch["labels"])
    # L_cos = 1/|M| * sum_{p in M} (1 - cos(h_s[p], h_t[p]))
    terms["cos"] = masked_mean(cos[base], M)
    loss = weights.alpha_ce * terms["ce"] + weights.alpha_mlm * terms["mlm"] + weights.alpha_cos * terms["cos"]
    if group is not None:
        # IIT: the student's counterfactual output must match the teacher's counterfactual output.
        # L_iit = T^2 * 1/|M| * sum_{p in M} KL( softmax(z~_t[p]/T) || softmax(z~_s[p]/T) )
        terms["iit"] = masked_mean(kl[counterfactual], M)
        # L_iit_cos = 1/|M| * sum_{p in M} (1 - cos(h~_s[p], h~_t[p]))
        terms["iit_cos"] = masked_mean(cos[counterfactual], M)
        loss = loss + weights.alpha_iit * terms["iit"] + weights.alpha_iit_cos * terms["iit_cos"]
    return loss, terms

# What IIT trains: does the student react to an intervention as the teacher does?
@torch.no_grad()
def predictions(model, batches: list, layer_groups: list, schedule: str = "plain") -> list:
    """Per batch, (1 + G, B, ...): predictions (argmax; one output: its value) in the base run, then per group."""
    runs = base_and_counterfactual if schedule == "fast" else base_source_counterfactual
    was_training, found = model.training, []
    model.eval()
    for batch in batches:
        B, rows = len(batch["labels"]), []
        for layers in layer_groups:
            z = runs(model, batch, layers)[0]  # (2B, ...): base rows, then counterfactual rows
            z = z[..., 0] if z.shape[-1] == 1 else z.argmax(-1)
            if not rows:  # the base run is the same for every group
                rows.append(z[:B])
            rows.append(z[B:])
        found.append(torch.stack(rows))
    model.train(was_training)
    return found

def interchange_agreement(teacher, student, batches: list, groups: list, schedule: str = "plain",
                          teacher_predictions: list | None = None) -> dict:
    """Interchange-intervention agreement on held-out (base, source) pairs: the share of predictions where the student
    after an intervention predicts what the teacher predicts after the aligned one, over every group ("counterfactual"),
    and with no intervention ("plain"). Scored: MLM, the masked base positions; classifiers, every pair (one output:
    within 0.5). teacher_predictions: predictions(teacher, ...), computed once for several students."""
    teacher_predictions = teacher_predictions or predictions(teacher, batches, [t for t, _ in groups], schedule)
    student_predictions = predictions(student, batches, [s for _, s in groups], schedule)
    same = scored = 0
    for batch, t, s in zip(batches, teacher_predictions, student_predictions):
        positions = batch["labels"] != -100 if batch["labels"].dim() == 2 else torch.ones_like(batch["labels"]).bool()
        agree = (t - s).abs() <= 0.5 if t.is_floating_point() else t == s  # (1 + G, B, ...)
        same, scored = same + agree[:, positions].sum(-1), scored + int(positions.sum())
    return {"counterfactual": float(same[1:].sum()) / (scored * len(groups)), "plain": float(same[0]) / scored}

# ==== SPEED-UP: base, source and counterfactual runs in ONE forward of 2B rows (schedule='fast', the default)
# The counterfactual run equals the base run below the lowest intervened block k, so it forks off there.
def _hidden(output):  # a block returns its hidden state (transformers 5) or a tuple that starts with it (4.x)
    return output[0] if isinstance(output, tuple) else output

def base_and_counterfactual(model, batch: dict, layers):
    """A drop-in for base_source_counterfactual from one forward of 2B rows: rows [0, B) are the base run; rows
    [B, 2B) start as the source, become the counterfactual at block k = min(layers) (the base's block-k output,
    source states spliced in) and then get the base's attention mask. Deeper source states: source rows alone."""
    blocks = transformer_blocks(model)
    (B, T), layers, k = batch["input_ids"].shape, sorted(set(layers)), min(layers)
    base_swap, source_swap = batch["base_swap"], batch["source_swap"]
    base_rows_twice = torch.arange(B, device=batch["input_ids"].device).repeat(2)
    has_padding = not bool(batch["attention_mask"].all() and batch["source_attention_mask"].all())
    source_states = {}  # the source run's block outputs, (B, T, H)
    def per_row(value):  # what a block gets per row and position besides the hidden states: an attention mask
        return torch.is_tensor(value) and value.dim() >= 2 and value.shape[0] == 2 * B and value.shape[-1] == T
    def take(args, kwargs, rows):  # the block's arguments with every per-row tensor cut to `rows`
        pick = lambda value: value[rows] if per_row(value) else value  # noqa: E731
        return (args[0], *map(pick, args[1:])), {name: pick(value) for name, value in kwargs.items()}
    def splice_at(layer):  # block `layer`'s forward hook: the counterfactual rows get the source states
        def hook(_module, _args, output):
            hidden = _hidden(output)
            if layer == k:  # the source rows' state at block k; deeper ones come from the pre-hooks below
                source_states[k] = hidden[B:]
            counterfactual = (hidden[:B] if layer == k else hidden[B:]).clone()  # at block k it forks off the base
            counterfactual[base_swap] = source_states[layer][source_swap].to(counterfactual.dtype)
            hidden = torch.cat([hidden[:B], counterfactual])
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
        return hook
    def above_k(j):  # block j > k's pre-hook: the source run goes on alone, then the counterfactual gets the base mask
        def hook(module, args, kwargs):
            if has_padding and not any(map(per_row, [*args[1:], *kwargs.values()])):
                raise RuntimeError("base_and_counterfactual found no 2B-row attention mask; use schedule='plain'")
            if j <= layers[-1]:  # block j's own arguments (ModernBERT: its attention type's), the source rows' mask
                source_args, source_kwargs = take(args, kwargs, slice(B, 2 * B))
                source_states[j] = _hidden(module.forward(source_states[j - 1], *source_args[1:], **source_kwargs))
            return take(args, kwargs, base_rows_twice)  # no padding anywhere: every row attends alike, no change
        return hook
    handles = [blocks[layer].register_forward_hook(splice_at(layer), prepend=True) for layer in layers]
    handles += [blocks[j].register_forward_pre_hook(above_k(j), with_kwargs=True) for j in range(k + 1, len(blocks))]
    try:
        base_inputs, source_inputs = model_inputs(batch), model_inputs(batch, "source_")
        with encoder_output(model) as last:
            out = model(**{name: torch.cat([base_inputs[name], source_inputs[name]]) for name in base_inputs})
        return out.logits, last["h"]
    finally:
        for handle in handles:
            handle.remove()

# ==== SPEED-UP on CUDA: the vocabulary-sized tensors (rows x tokens x 30,522) cost more than the encoder's matmuls
@functools.cache
def fused_soft_target_kl():
    """soft_target_kl compiled, lazily (else eager): fused kernels read the logits once, not ~10 times; same values."""
    import torch._dynamo
    torch._dynamo.config.suppress_errors = True
    return torch.compile(soft_target_kl, dynamic=True)

def pad_vocabulary(model, multiple: int = 64) -> None:
    """The MLM head's projection through its weight padded with zero rows to a multiple of 64, logits sliced back:
    the same logits, in rows the tensor cores align (BERT's 30,522 makes cuBLAS pick ~3x slower kernels)."""
    decoder = model.get_output_embeddings()
    if not isinstance(decoder, torch.nn.Linear) or decoder.out_features % multiple == 0:
        return
    extra, vocab = -decoder.out_features % multiple, decoder.out_features
    def forward(hidden):  # (..., H) -> (..., V), a view of (..., V + extra)
        bias = None if decoder.bias is None else F.pad(decoder.bias, (0, extra))
        return F.linear(hidden, F.pad(decoder.weight, (0, 0, 0, extra)), bias)[..., :vocab]
    decoder.forward = forward

@torch.no_grad()
def one_forward_is_exact(model, groups: list, batch: dict) -> bool:
    """Whether base_and_counterfactual gives base_source_counterfactual's outputs on `model` for every group, on
    `batch` (padded rows, dropout off); if not (blocks get per-row inputs the fork misses), the plain schedule runs."""
    was_training, matmuls = model.training, torch.get_float32_matmul_precision()
    model.eval()
    torch.set_float32_matmul_precision("highest")  # compared in fp32, without the TF32 a bf16 run allows
    try:
        return all(torch.allclose(fast, plain, rtol=1e-4, atol=1e-4) for layers in groups for fast, plain in
                   zip(base_and_counterfactual(model, batch, layers), base_source_counterfactual(model, batch, layers)))
    except RuntimeError:  # no per-row mask found
        return False
    finally:
        model.train(was_training)
        torch.set_float32_matmul_precision(matmuls)

# ==== BOILERPLATE: data. Each paragraph becomes [CLS] tokens [SEP]; long ones are cut into chunks. ==========
def demo_corpus(cache: Path) -> tuple[Path, Path]:
    """~100 Wikipedia articles shipped with gensim, one paragraph per line; every 10th article validates."""
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
    articles = []
    dump = datapath("enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
    for _title, text, _pageid in extract_pages(bz2.BZ2File(dump)):
        lines = (re.sub(r"'{2,}", "", line).strip() for line in filter_wiki(text or "").split("\n"))
        paragraphs = [p for p in lines if len(p.split()) >= 8 and not p.startswith(tuple("=*|{!:;#"))]
        if paragraphs and not text.lower().startswith("#redirect"):
            articles.append(paragraphs)
    folder.mkdir(parents=True, exist_ok=True)
    for path, fold in ((train, lambda i: i % 10 != 9), (valid, lambda i: i % 10 == 9)):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("\n".join(p for i, article in enumerate(articles) if fold(i) for p in article) + "\n")
        os.replace(tmp, path)
    return train, valid

def tokenize_paragraphs(raw, tokenizer, max_len: int, min_len: int, num_proc: int | None):
    """[CLS] paragraph [SEP] in chunks of at most `max_len` tokens; those under `min_len` are dropped."""
    cls, sep, body = tokenizer.cls_token_id, tokenizer.sep_token_id, max_len - 2
    def encode(batch):
        out = []
        for ids in tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]:
            for start in range(0, max(len(ids), 1), body):
                piece = [cls] + ids[start:start + body] + [sep]
                if len(piece) >= min_len:
                    out.append(piece)
        return {"input_ids": out}
    return raw.map(encode, batched=True, remove_columns=raw["train"].column_names, num_proc=num_proc, desc="tokenizing")

def load_data(args: Args, tokenizer, dist, log):
    """Tokenised train and validation sequences (rank 0 tokenises first; the others read its cache)."""
    import datasets
    with common.main_process_first(dist):
        if args.preset == "demo" and args.train_file is None and args.dataset_name is None:
            args.train_file, args.validation_file = map(str, demo_corpus(common.cache_root(args.cache_dir)))
        if args.train_file:
            raw = datasets.load_dataset("text", data_files=dict(train=args.train_file, validation=args.validation_file))
        else:
            raw = common.load_hub_dataset(args.dataset_name, args.dataset_config_name,
                                          "--train_file and --validation_file (plain text, one paragraph per line)")
            if "text" not in raw["train"].column_names:
                raise UserError(f"dataset '{args.dataset_name}' has no 'text' column; pass --train_file instead")
            raw = datasets.DatasetDict(train=raw["train"], validation=raw["validation"])
        tokens = tokenize_paragraphs(raw, tokenizer, args.max_seq_length, args.min_seq_length, args.num_proc)
    for split in tokens:
        limit = args.max_train_samples if split == "train" else args.max_eval_samples
        tokens[split] = tokens[split].select(range(min(limit, len(tokens[split])))) if limit else tokens[split]
    train_ids, eval_ids = tokens["train"], tokens["validation"]
    if len(train_ids) == 0 or len(eval_ids) == 0:
        raise UserError(f"no sequence of at least {args.min_seq_length} tokens in the train or validation data; "
                        f"pass longer paragraphs or a smaller --min_seq_length")
    log(f"data: {args.train_file or args.dataset_name}: {len(train_ids)} training and {len(eval_ids)} validation "
        f"sequences of {args.min_seq_length} to {args.max_seq_length} tokens")
    return train_ids, eval_ids

def token_weights(train_ids, vocab_size: int, smoothing: float, special_ids) -> torch.Tensor:
    """Masking weight max(count, 1)^-smoothing per vocabulary id (rare words masked more); 0 for specials."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, len(train_ids), 10_000):
        chunk = train_ids[start:start + 10_000]["input_ids"]
        counts += np.bincount(np.concatenate([np.asarray(x) for x in chunk]), minlength=vocab_size)[:vocab_size]
    weights = np.maximum(counts, 1).astype(np.float64) ** (-smoothing)
    weights[list(special_ids)] = 0.0
    return torch.tensor(weights, dtype=torch.float32)

def mlm_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, mask_token_id: int, vocab_size: int,
             special_ids, probability: float = 0.15, weights: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking 80% [MASK] / 10% random / 10% kept: (masked ids, labels; -100: not predicted). weights=None:
    each real non-special token with `probability` (evaluation). weights (V,), as officially: ceil(probability *
    real tokens) positions per batch, drawn without replacement with chance proportional to weights[token]."""
    device = input_ids.device
    special = torch.isin(input_ids, torch.tensor(sorted(special_ids), device=device))
    candidates = attention_mask.bool() & ~special  # (B, T)
    if weights is None:
        chosen = (torch.rand(input_ids.shape, generator=generator, device=device) < probability) & candidates
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

def make_batch(train_ids, source_of: np.ndarray, indices: list[int], tokenizer, weights, args: Args, device,
               with_iit: bool, generator: torch.Generator | None = None) -> dict:
    """Base sequences and, for IIT, sources cut/padded to the longest base (as officially), all masked; swap masks."""
    vocab, special, mask_id = len(tokenizer), set(tokenizer.all_special_ids), tokenizer.mask_token_id
    base = tokenizer.pad({"input_ids": train_ids[indices]["input_ids"]}, return_tensors="pt")
    ids, attention, length = base["input_ids"], base["attention_mask"], base["input_ids"].shape[1]
    source = [s[:length] for s in train_ids[[int(source_of[i]) for i in indices]]["input_ids"]]
    source = tokenizer.pad({"input_ids": source}, padding="max_length", max_length=length, return_tensors="pt")
    batch = {"attention_mask": attention}
    batch["input_ids"], batch["labels"] = mlm_mask(ids, attention, mask_id, vocab, special, args.mlm_probability,
                                                   weights, generator)
    if with_iit:
        batch["source_attention_mask"] = source["attention_mask"]
        batch["source_input_ids"], _ = mlm_mask(source["input_ids"], source["attention_mask"], mask_id, vocab, special,
                                                args.mlm_probability, weights, generator)
        batch["base_swap"], batch["source_swap"] = interchange_masks(
            attention.sum(1), source["attention_mask"].sum(1), length, args.interchange_prop,
            args.interchange_mode, base_candidates=batch["labels"] != -100, generator=generator)
    return {name: value.to(device) for name, value in batch.items()}

# ==== BOILERPLATE: models =======================================================================
def demo_teacher(args: Args) -> Path:
    """MiniLM (common.demo_encoder) with an MLM head fitted on the demo corpus; built once (~3 min), then cached."""
    folder = common.cache_root(args.cache_dir) / "demo-teacher-minilm-mlm-v1"
    if (folder / "model.safetensors").is_file():
        return folder
    encoder = common.demo_encoder("--teacher PATH_TO_A_BERT_MLM")
    import datasets
    from transformers import AutoTokenizer, BertForMaskedLM, logging as transformers_logging
    common.set_seed(0)  # the new head's initialisation and dropout: the same teacher on every machine
    tokenizer = AutoTokenizer.from_pretrained(encoder)
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # not the loader's report: the MLM head is missing, and fitted next
    model = BertForMaskedLM.from_pretrained(encoder)  # decoder tied to the embeddings
    transformers_logging.set_verbosity(verbosity)
    print(f"demo teacher: MiniLM has no MLM head; a new one is fitted on the demo corpus, once (~3 min; cached in "
          f"{folder})", flush=True)
    data = datasets.load_dataset("text", data_files={"train": str(demo_corpus(common.cache_root(args.cache_dir))[0])})
    data = tokenize_paragraphs(data, tokenizer, 64, 12, None)["train"]
    weights = token_weights(data, len(tokenizer), 0.0, tokenizer.all_special_ids)  # uniform masking
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(data), generator=generator).tolist()
    head = [p for n, p in model.named_parameters() if n.startswith("cls.")]
    for phase, (steps, lr, params) in enumerate([(150, 2e-3, head), (200, 1e-4, list(model.parameters()))]):
        model.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        model.train()
        for step in range(steps):  # batches of 16 sequences of up to 64 tokens
            chunk = data[[order[((phase * 1000 + step) * 16 + j) % len(data)] for j in range(16)]]["input_ids"]
            padded = tokenizer.pad({"input_ids": chunk}, return_tensors="pt")
            ids, attn = padded["input_ids"], padded["attention_mask"]
            masked, labels = mlm_mask(ids, attn, tokenizer.mask_token_id, len(tokenizer),
                                      set(tokenizer.all_special_ids), 0.15, weights, generator)
            with torch.no_grad() if phase == 0 else contextlib.nullcontext():
                hidden = model.bert(input_ids=masked, attention_mask=attn).last_hidden_state  # (B, T, H)
            chosen = labels != -100  # only the masked positions go through the (costly) vocabulary projection
            loss = F.cross_entropy(model.cls(hidden[chosen]), labels[chosen])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step % 40 == 0 or step == steps - 1:
                print(f"  demo teacher phase {phase + 1}/2 step {step + 1}/{steps}: mlm loss {loss.item():.3f}",
                      flush=True)
    common.save_model(folder, model, tokenizer)  # weights written last: a folder with them holds a whole teacher
    return folder

def load_models(args: Args, dist, device, log):
    """Tokenizer, teacher (frozen), student (initialised from it) and the alignment groups."""
    from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer, logging as transformers_logging
    transformers_logging.disable_progress_bar()  # no per-file bars when weights are loaded and saved
    with common.main_process_first(dist):  # the demo teacher is fitted, or a hub model downloaded, once
        if args.teacher is None:
            args.teacher = str(demo_teacher(args))
        skeleton = common.encoder_skeleton(common.from_pretrained(AutoConfig, args.teacher, "teacher", "--teacher"))
        teacher, info = common.from_pretrained(AutoModelForMaskedLM, args.teacher, "teacher", "--teacher",
                                               output_loading_info=True)
        tokenizer = common.from_pretrained(AutoTokenizer, args.teacher, "tokenizer", "--teacher")
    if missing := common.new_weights(teacher, info):  # e.g. an ELECTRA discriminator; DeBERTa-v3 ships no MLM head
        raise UserError(f"teacher '{args.teacher}' has no trained MLM head ({', '.join(missing[:3])} missing from its "
                        f"weights); pass a masked LM with its head to --teacher")
    if len(tokenizer) > teacher.config.vocab_size:
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens but the teacher's vocabulary only "
                        f"{teacher.config.vocab_size}; pass a teacher folder with its own tokenizer")
    check_length(args, skeleton)
    return (tokenizer, teacher, *student_and_groups(args, teacher, AutoModelForMaskedLM, device, log))

def check_length(args: Args, skeleton) -> None:
    if args.max_seq_length > common.max_positions(skeleton):
        raise UserError(f"--max_seq_length {args.max_seq_length} is longer than the teacher's "
                        f"{common.max_positions(skeleton)} positions; pass a smaller value")

def student_and_groups(args: Args, teacher, auto_class, device, log, **head):
    """The student (--student, or blocks of the teacher or --student_from) and the alignment groups, on `device`."""
    depth = len(transformer_blocks(teacher))
    if args.student:  # a smaller pretrained model of the family, its head new
        student, which = common.from_pretrained(auto_class, args.student, "student", "--student", **head), args.student
        if student.config.vocab_size != teacher.config.vocab_size:
            raise UserError(f"student vocabulary ({student.config.vocab_size}) differs from the teacher's "
                            f"({teacher.config.vocab_size}); pass a student with the teacher's tokenizer")
    else:
        source = teacher
        if args.student_from != "teacher":  # a pretrained encoder's blocks (the authors' task-level student)
            common.set_seed(args.seed)  # the new classifier's initialisation
            source, info = common.from_pretrained(auto_class, args.student_from, "student_from", "--student_from",
                                                  output_loading_info=True, **head)
            mine, theirs = source.config, teacher.config
            if (mine.model_type, mine.hidden_size, mine.vocab_size) != (theirs.model_type, theirs.hidden_size,
                                                                      theirs.vocab_size):
                raise UserError(f"--student_from '{args.student_from}' is a {mine.model_type} of width "
                                f"{mine.hidden_size}, vocabulary {mine.vocab_size}; the teacher a {theirs.model_type} "
                                f"of {theirs.hidden_size}, {theirs.vocab_size}: pass a model of the teacher's kind")
            if not head and (missing := common.new_weights(source, info)):  # mlm (no head arguments)
                raise UserError(f"--student_from '{args.student_from}' has no trained MLM head ({missing[0]} missing)")
        if args.student_num_layers and not args.student_layers:
            args.student_layers = ",".join(map(str, common.default_student_layers(
                len(transformer_blocks(source)), args.student_num_layers)))
        # IIT: the student is the teacher (or --student_from) with fewer blocks: the embeddings, the listed blocks
        # and the whole head are copied (official: blocks 0,2,4,7,9,11 of 12; it leaves the MLM transform random).
        student = common.init_student_from_teacher(source, common.parse_layers(args.student_layers))
        which = f"its blocks {args.student_layers}" if source is teacher else \
            f"blocks {args.student_layers} of {args.student_from}" + (", a new classifier" if head else "")
    try:
        groups = alignments(args.alignment, depth, len(transformer_blocks(student)))
    except ValueError as e:
        raise UserError(f"{e}; pass another --alignment") from None
    log(f"teacher: {args.teacher} ({type(teacher).__name__}, {depth} blocks); student: {which}")
    teacher.to(device).eval().requires_grad_(False)
    student.to(device).train()
    for model in (teacher, student) if torch.device(device).type == "cuda" else ():  # SPEED-UP (CUDA; MLM heads)
        pad_vocabulary(model)
    return student, groups

# ==== TASK PATH: IIT on a fine-tuned classifier (--task cola ... wnli) ========================================
# The same interchange, alignments and schedules, on training examples; the outputs are class logits (one per example).
def in_batch_sources(indices: list[int], seed: int, step: int, micro: int) -> dict:
    """--source_pairing batch (the authors'): sources from the micro-batch, shuffled per (seed, step, micro-batch)."""
    order = np.random.default_rng([seed, step, micro, 1]).permutation(len(indices))
    return {i: indices[j] for i, j in zip(indices, order)}

def task_distillation_loss(student, teacher, batch: dict, weights, group=None, schedule: str = "fast"):
    """One micro-batch's loss and terms, as distillation_loss; `batch` from make_task_batch (gold `labels` (B,))."""
    runs = base_and_counterfactual if schedule == "fast" and group is not None else base_source_counterfactual
    teacher_layers, student_layers = group if group is not None else (None, None)
    with torch.no_grad():
        z_t = runs(teacher, batch, teacher_layers)[0]  # (R, C)
    z_s, labels, B = runs(student, batch, student_layers)[0], batch["labels"], len(batch["labels"])
    # T^2 KL per example; one output (STS-B): (z_s - z_t)^2, which is T^2 MSE(z_s/T, z_t/T). kl_reduction 'mean'
    # also divides by the C classes, as the authors' KLDivLoss(reduction='mean') (their effective weights)
    kd = (z_s - z_t)[:, 0].float() ** 2 if z_s.shape[-1] == 1 else soft_target_kl(z_s, z_t, weights.temperature) / \
        (z_s.shape[-1] if weights.kl_reduction == "mean" else 1)
    # L_ce = T^2 * 1/B * sum_i KL( softmax(z_t[i]/T) || softmax(z_s[i]/T) )
    terms = {"ce": kd[:B].mean()}
    # L_task = 1/B * sum_i -log p_s(y_i | x_i)     (STS-B: 1/B * sum_i (z_s[i] - y_i)^2)
    terms["task"] = F.mse_loss(z_s[:B, 0].float(), labels.float()) if z_s.shape[-1] == 1 else \
        F.cross_entropy(z_s[:B].float(), labels)
    loss = weights.alpha_ce * terms["ce"] + weights.alpha_task * terms["task"]
    if group is not None:
        # IIT: L_iit = T^2 * 1/B * sum_i KL( softmax(z~_t[i]/T) || softmax(z~_s[i]/T) ), z~: counterfactual logits
        terms["iit"] = kd[B:].mean()
        loss = loss + weights.alpha_iit * terms["iit"]
    return loss, terms

def make_task_batch(data, source_of, indices: list[int], pad_id: int, spec, args: Args, device, with_iit: bool,
                    generator: torch.Generator | None = None) -> dict:
    """Base examples and, for IIT, their sources (source_of[i]), padded to the longer (none is cut), and swap masks."""
    batch = common.classification_batch(data[indices], pad_id, spec.is_regression, "cpu")
    if with_iit:
        source = common.classification_batch(data[[int(source_of[i]) for i in indices]], pad_id, False, "cpu")
        T = max(batch["input_ids"].shape[1], source["input_ids"].shape[1])
        for run, rows in (("", batch), ("source_", source)):
            for name, value in model_inputs(rows).items():
                batch[run + name] = F.pad(value, (0, T - value.shape[1]), value=pad_id if name == "input_ids" else 0)
        batch["base_swap"], batch["source_swap"] = interchange_masks(
            batch["attention_mask"].sum(1), batch["source_attention_mask"].sum(1), T, args.interchange_prop,
            args.interchange_mode, generator=generator)
    return {name: value.to(device) for name, value in batch.items()}

def load_task(args: Args, spec, dist, device, log):
    """Tokenizer, data, teacher (a fine-tuned classifier; the demo's is fitted once), student and alignment groups."""
    import datasets
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as transformers_logging
    datasets.disable_progress_bars()
    transformers_logging.set_verbosity_error()  # no load report: the log says which heads are new
    base = args.teacher or common.demo_encoder("--teacher (a classifier fine-tuned on the task)")
    skeleton = common.encoder_skeleton(common.from_pretrained(AutoConfig, base, "teacher", "--teacher"))
    check_length(args, skeleton)
    tokenizer = common.from_pretrained(AutoTokenizer, base, "tokenizer", "--teacher")
    raw = common.demo_polarity() if demo_data(args) else \
        common.load_glue(args.task, args.data_dir, args.train_file, args.validation_file)
    for split in raw:
        limit = args.max_train_samples if split == "train" else args.max_eval_samples
        raw[split] = raw[split].select(range(min(limit, len(raw[split])))) if limit else raw[split]
    takes_types = "token_type_ids" in inspect.signature(skeleton.forward).parameters  # not DistilBERT, ModernBERT
    data = common.tokenize_glue(raw, tokenizer, spec, args.max_seq_length, takes_types)
    eval_sets = {split: data[split] for split in spec.validation_splits}
    log(f"data: {args.task}, " + ", ".join(f"{len(data[split])} {split}" for split in data))
    if args.teacher is None:  # the offline demo's: MiniLM fine-tuned on the polarity split, as adkd_distill.py's
        settings = {k: v for k, v in common.DEMO_TEACHER.items() if k != "max_length"}
        folder = common.demo_teacher_folder(base, **settings, max_length=args.max_seq_length, cache_dir=args.cache_dir,
                                            sizes=(len(data["train"]), sum(map(len, eval_sets.values()))))
        args.teacher = str(common.fine_tuned_teacher(base, spec, tokenizer, data["train"], eval_sets, folder,
                                                     **settings, dist=dist, device=device))
    teacher, info = common.from_pretrained(AutoModelForSequenceClassification, args.teacher, "teacher", "--teacher",
                                           output_loading_info=True)
    if missing := common.new_weights(teacher, info):
        raise UserError(f"teacher '{args.teacher}' has no trained classification head ({', '.join(missing[:3])} "
                        f"missing from its weights); pass a classifier fine-tuned on {spec.name}")
    if teacher.config.num_labels != spec.num_labels:
        raise UserError(f"teacher '{args.teacher}' has num_labels={teacher.config.num_labels} but {spec.name} has "
                        f"{spec.num_labels}; pass a classifier fine-tuned on {spec.name}")
    return (tokenizer, teacher, *student_and_groups(args, teacher, AutoModelForSequenceClassification, device, log,
                                                    num_labels=spec.num_labels), data["train"], eval_sets)

# ==== BOILERPLATE: checks, optimiser, evaluation, resume; then `main` with the training loop ================
def demo_data(args: Args) -> bool:  # the offline demo's data: the demo preset, and no data given
    return args.preset == "demo" and not (args.train_file or args.data_dir or args.dataset_name)

def resolve_args(args: Args) -> tuple[str, Path | None]:
    """Fill the unset flags from the preset and check them before anything is written: (why, checkpoint)."""
    mlm = args.task == "mlm"
    if not mlm and args.task not in common.GLUE_TASKS:
        raise UserError(f"--task '{args.task}' is not supported; pass --task mlm (masked-LM distillation) or a GLUE "
                        f"task: {', '.join(common.GLUE_TASKS)}")
    if args.preset not in ("auto", *PRESETS):
        raise UserError(f"--preset '{args.preset}' is not one of auto, demo, paper")
    why = "asked for with --preset"
    if args.preset == "auto":
        args.preset, why = ("paper", "a CUDA device is present") if torch.cuda.is_available() else \
            ("demo", "no CUDA device found; pass --preset paper for the paper's setting")
    ignored = {"dataset_name", "dataset_config_name"} if args.train_file else set()  # local files win
    if args.student_num_layers or args.student:  # a student given explicitly wins over the preset's
        ignored |= {"student_layers", "student_from"} if args.student else {"student_layers"}
    for name, value in (PRESETS if mlm else GLUE_PRESETS)[args.preset].items():
        if name not in args.given | ignored:
            setattr(args, name, value)
    args.output_dir = args.output_dir or f"runs/iit-{args.task}" + ("-demo" if args.preset == "demo" else "")
    if bool(args.train_file) != bool(args.validation_file):
        raise UserError("pass both --train_file and --validation_file")
    common.require_file(args.train_file, "--train_file")
    common.require_file(args.validation_file, "--validation_file")
    if args.student_layers:
        common.parse_layers(args.student_layers)
    positive = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                "logging_steps", "temperature")
    not_negative = ("alpha_ce", "alpha_mlm", "alpha_cos", "alpha_task", "alpha_iit", "alpha_iit_cos", "save_steps",
                    "mlm_smoothing")
    bad = [f"--{name} must be positive, got {getattr(args, name)}" for name in positive if getattr(args, name) <= 0]
    bad += [f"--{name} must not be negative" for name in not_negative if (getattr(args, name) or 0) < 0]
    bad += [f"--{name} must be in (0, 1]" for name in ("interchange_prop", "mlm_probability")
            if not 0.0 < getattr(args, name) <= 1.0]
    choices = {"interchange_mode": ("consecutive", "random", "masked")} | ({} if mlm else {
        "source_pairing": ("fixed", "batch"), "kl_reduction": ("batchmean", "mean")})
    bad += [f"--{name} '{getattr(args, name)}' is not one of {', '.join(values)}" for name, values in choices.items()
            if getattr(args, name) not in values]
    if args.student and args.student_from != "teacher":
        bad.append("pass --student (a whole smaller model) or --student_from (blocks of one), not both")
    if mlm and not 3 <= args.min_seq_length <= args.max_seq_length:
        bad.append(f"need 3 <= --min_seq_length ({args.min_seq_length}) <= --max_seq_length ({args.max_seq_length})")
    only = ("alpha_mlm", "alpha_cos", "alpha_iit_cos", "dataset_name", "mlm_smoothing") if not mlm else \
        ("alpha_task", "data_dir", "source_pairing", "kl_reduction")
    bad += [f"--{name} does not apply to --task {args.task}" for name in only if getattr(args, name) is not None]
    if not mlm and args.interchange_mode == "masked":
        bad.append("--interchange_mode masked swaps the MLM-masked tokens: pass consecutive or random")
    if not mlm and demo_data(args) and args.task != "sst2":
        bad.append(f"the demo data is SST-2-style; for {args.task} pass --data_dir or --train_file/--validation_file")
    if not mlm and args.teacher is None and not demo_data(args):  # the demo teacher knows the demo data only
        bad.append(f"pass --teacher, a classifier fine-tuned on {args.task} (python eval_tasks.py --model MODEL "
                   f"--task {args.task} writes one)")
    if bad:
        raise UserError(bad[0])
    common.check_output_dir(args.output_dir, args.overwrite_output_dir, args.resume_from_checkpoint is not None)
    checkpoint = common.resolve_resume(args.resume_from_checkpoint, args.output_dir)
    if not mlm and checkpoint and checkpoint.resolve().parent != Path(args.output_dir).resolve():
        raise UserError(f"the best student so far is in the run folder of '{checkpoint}'; resume with --output_dir "
                        f"{checkpoint.parent}")
    return why, checkpoint

def optimiser_steps(args: Args, num_sequences: int, dist) -> tuple[int, int]:
    """(--max_steps, else --num_train_epochs of full optimiser steps over this rank's batches; steps per epoch)."""
    batches = math.ceil(num_sequences / args.per_device_train_batch_size) // dist.world_size  # per rank and epoch
    if batches < args.gradient_accumulation_steps:
        raise UserError(f"an epoch has {batches} batches per device, fewer than one optimiser step "
                        f"({args.gradient_accumulation_steps}); pass a smaller --per_device_train_batch_size or "
                        f"--gradient_accumulation_steps")
    per_epoch = batches // args.gradient_accumulation_steps
    return (args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * per_epoch)), per_epoch

@torch.no_grad()
def perplexity(model, eval_ids, tokenizer, args: Args, device, seed: int = 1234) -> float:
    """exp(mean CE over masked positions) in fp32; uniform 15% masking from a fixed seed: same for every model."""
    generator = torch.Generator().manual_seed(seed)
    was_training, total, count = model.training, 0.0, 0
    model.eval()
    for start in range(0, len(eval_ids), args.per_device_eval_batch_size):
        chunk = eval_ids[start:start + args.per_device_eval_batch_size]["input_ids"]
        padded = tokenizer.pad({"input_ids": chunk}, return_tensors="pt")
        ids, attn = padded["input_ids"], padded["attention_mask"]
        masked, labels = mlm_mask(ids, attn, tokenizer.mask_token_id, len(tokenizer), set(tokenizer.all_special_ids),
                                  0.15, weights=None, generator=generator)
        logits = model(input_ids=masked.to(device), attention_mask=attn.to(device)).logits
        total += F.cross_entropy(logits.flatten(0, 1).float(), labels.to(device).flatten(), reduction="sum").item()
        count += int((labels != -100).sum())
    model.train(was_training)
    return math.exp(total / max(count, 1))

def micro_batches(lengths: np.ndarray, args: Args, dist, epoch: int, position: int):
    """This rank's micro-batches from (epoch, position) on, as (epoch, next position, indices). Each epoch (seeded
    by it, so a resumed run sees the same) is shuffled, sorted by length in windows of 50 batches (as the official
    group_by_size), its batches shuffled and dealt to the ranks, the last partial optimiser step dropped."""
    size, accumulation = args.per_device_train_batch_size, args.gradient_accumulation_steps
    while True:
        rng = np.random.default_rng([args.seed, epoch])
        order, batches = rng.permutation(len(lengths)), []
        for start in range(0, len(order), 50 * size):
            window = order[start:start + 50 * size]
            window = window[np.argsort(-lengths[window], kind="stable")]
            batches += [window[i:i + size].tolist() for i in range(0, len(window), size)]
        batches = [batches[i] for i in rng.permutation(len(batches))]
        mine = batches[dist.rank:len(batches) // dist.world_size * dist.world_size:dist.world_size]
        for position in range(position, len(mine) // accumulation * accumulation):
            yield epoch, position + 1, mine[position]
        epoch, position = epoch + 1, 0

def held_out_pairs(args: Args, eval_set, tokenizer, device, seed: int = 1234) -> list[dict]:
    """interchange_agreement's pairs of validation examples, masked and swapped from `seed`: the same for every run."""
    generator = torch.Generator().manual_seed(seed)
    source_of, size = torch.randperm(len(eval_set), generator=generator).numpy(), args.per_device_eval_batch_size
    def batch(indices):
        if args.task == "mlm":
            return make_batch(eval_set, source_of, indices, tokenizer, None, args, device, True, generator)
        return make_task_batch(eval_set, source_of, indices, tokenizer.pad_token_id, common.GLUE_TASKS[args.task],
                               args, device, True, generator)
    return [batch(list(range(start, min(start + size, len(eval_set))))) for start in range(0, len(eval_set), size)]

def training_state(args: Args, checkpoint, student, optimizer, scheduler, total_steps: int, before, dist) -> dict:
    """A fresh training state (before(): measured on the initial student) or `checkpoint`'s (same settings needed)."""
    keys = ("task", "seed", "per_device_train_batch_size", "gradient_accumulation_steps", "max_train_samples",
            "max_seq_length", "min_seq_length", "alignment", "interchange_mode", "student_layers", "teacher",
            "student_from", "source_pairing")
    signature = {k: getattr(args, k) for k in keys} | {"world_size": dist.world_size, "total_steps": total_steps}
    if checkpoint is None:
        measured = before() if dist.is_main else {}
        common.set_seed(args.seed + dist.rank, args.deterministic)  # after the one-off work that used the RNG
        return {"step": 0, "epoch": 0, "batches_done": 0, "loss_sum": 0.0, "loss_count": 0, "runtime": 0.0,
                "best_score": -math.inf, "best_epoch": -1, "best": {}, "history": [], **measured,
                "signature": signature}
    state = common.load_checkpoint(checkpoint, student, optimizer, scheduler)
    if changed := {k: (state["signature"].get(k), v) for k, v in signature.items() if state["signature"].get(k) != v}:
        raise UserError(f"checkpoint '{checkpoint}' was written by a run with other settings {changed} "
                        f"(saved, now); pass the same flags to resume")
    if dist.rank > 0:  # the checkpoint holds rank 0's RNG state; keep the ranks' masking independent
        common.set_seed(args.seed + dist.rank + 7919 * state["step"], args.deterministic)
    return state

def keep_best(state: dict, metrics: dict, epoch: int, spec, student, tokenizer, args: Args, dist) -> None:
    """The task path's epoch end: dev scores in the history, the best (common.selection_score) student in output_dir."""
    state["history"].append({"epoch": epoch, "step": state["step"], **metrics})
    if common.selection_score(spec, metrics) > state["best_score"]:
        state.update(best_score=common.selection_score(spec, metrics), best_epoch=epoch, best=metrics)
        if dist.is_main:
            common.save_model(args.output_dir, student, tokenizer)

def main(args: Args) -> dict:
    # BOILERPLATE: set-up --------------------------------------------------------------------------
    why, checkpoint = resolve_args(args)
    dist, device = common.init_distributed(args.device)
    log = functools.partial(print, flush=True) if dist.is_main else (lambda *a, **k: None)
    args.bf16, precision = common.precision(device, args.bf16)
    log(f"preset: {args.preset} ({why})\n{precision}")
    mlm, spec = args.task == "mlm", common.GLUE_TASKS.get(args.task)
    if mlm:
        tokenizer, teacher, student, groups = load_models(args, dist, device, log)
        train_set, eval_set = load_data(args, tokenizer, dist, log)
    else:
        tokenizer, teacher, student, groups, train_set, eval_set = load_task(args, spec, dist, device, log)
    pairs = held_out_pairs(args, eval_set if mlm else eval_set["validation"], tokenizer, device)
    use_iit, schedule = args.alpha_iit > 0 or (args.alpha_iit_cos or 0) > 0, "fast"
    probe = {name: value[:4] for name, value in pairs[0].items()}  # four held-out pairs (agreement uses them too)
    if not all(one_forward_is_exact(model, [group[side] for group in groups], probe)
                           for side, model in enumerate((teacher, student))):
        schedule = "plain"
        log(f"schedule: the plain three forwards per model ({type(teacher).__name__} gives other outputs from the "
            f"one-forward schedule)")
    lengths = np.array([len(x) for x in train_set["input_ids"]])
    # IIT: each example's source is fixed for the whole run: a permutation drawn once (as officially).
    source_of = np.random.default_rng(args.seed).permutation(len(train_set))
    weights = token_weights(train_set, len(tokenizer), args.mlm_smoothing, tokenizer.all_special_ids) if mlm else None
    (total_steps, per_epoch), accumulation = optimiser_steps(args, len(lengths), dist), args.gradient_accumulation_steps
    optimizer, scheduler = common.adamw(student, args.learning_rate, total_steps, args.warmup_ratio, args.weight_decay,
                                        betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    log(f"training: {total_steps} steps of {args.per_device_train_batch_size * accumulation * dist.world_size} "
        f"{'sequences' if mlm else 'examples'}, alignment {args.alignment}; every setting in "
        f"{Path(args.output_dir) / 'args.json'}")
    evaluate = functools.partial(perplexity, eval_ids=eval_set, tokenizer=tokenizer, args=args, device=device) if mlm \
        else functools.partial(common.classifier_scores, eval_sets=eval_set, spec=spec, pad_id=tokenizer.pad_token_id,
                               batch_size=args.per_device_eval_batch_size, device=device, bf16=args.bf16)
    teacher_predictions = predictions(teacher, pairs, [t for t, _ in groups], schedule) if dist.is_main else []
    agreement = functools.partial(interchange_agreement, teacher, batches=pairs, groups=groups, schedule=schedule,
                                  teacher_predictions=teacher_predictions)
    teacher_score = evaluate(teacher) if dist.is_main else float("nan")
    before_key = "student_perplexity_before" if mlm else "student_before"
    state = training_state(args, checkpoint, student, optimizer, scheduler, total_steps,
                           lambda: {before_key: evaluate(student), "agreement_before": agreement(student)}, dist)
    if checkpoint or not dist.is_main:
        log(f"resumed from {checkpoint} at step {state['step']}")
    elif mlm:
        log(f"perplexity before distillation: teacher {teacher_score:.2f}, student {state[before_key]:.2f}")
    else:
        log("dev before distillation: " + ", ".join(f"{k} teacher {v:.4f}, student {state[before_key][k]:.4f}"
                                                    for k, v in teacher_score.items()))
    model = torch.nn.parallel.DistributedDataParallel(
        student, device_ids=[dist.local_rank] if device.type == "cuda" else None) if dist.enabled else student
    tracker = None
    if dist.is_main:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        common.write_json(Path(args.output_dir) / "args.json", dataclasses.asdict(args))
        if args.track:
            import wandb  # only when asked for
            tracker = wandb.init(project="bert-distill", config=dataclasses.asdict(args))
    # IIT: the training loop (the log lines report progress) ---------------------------------------
    step, start_time = state["step"], time.time()
    running, running_count, stream = {}, 0, micro_batches(lengths, args, dist, state["epoch"], state["batches_done"])
    while step < total_steps:
        for micro in range(accumulation):
            epoch, batches_done, indices = next(stream)
            # IIT: one alignment group per micro-batch (as officially); the same on every rank and after a resume
            group = groups[np.random.default_rng([args.seed, step, micro]).integers(len(groups))] if use_iit else None
            sources = in_batch_sources(indices, args.seed, step, micro) if args.source_pairing == "batch" else source_of
            batch = make_batch(train_set, source_of, indices, tokenizer, weights, args, device, use_iit) if mlm else \
                make_task_batch(train_set, sources, indices, tokenizer.pad_token_id, spec, args, device, use_iit)
            with model.no_sync() if dist.enabled and micro < accumulation - 1 else contextlib.nullcontext():
                with common.autocast(device, args.bf16):
                    loss, terms = (distillation_loss if mlm else task_distillation_loss)(model, teacher, batch, args,
                                                                                          group, schedule)
                (loss / accumulation).backward()
            running = {name: running.get(name, 0.0) + value.item() for name, value in terms.items()}
            running_count += 1
            state["loss_sum"], state["loss_count"] = state["loss_sum"] + loss.item(), state["loss_count"] + 1
        torch.nn.utils.clip_grad_norm_(student.parameters(), args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step % args.logging_steps == 0 or step == total_steps:
            mean = {name: value / running_count for name, value in running.items()}
            log(f"step {step}/{total_steps} epoch {epoch} lr {scheduler.get_last_lr()[0]:.2e} " +
                " ".join(f"{name} {value:.4f}" for name, value in mean.items()))
            if tracker:
                tracker.log({f"train/{name}": value for name, value in mean.items()}, step=step)
            running, running_count = {}, 0
        state.update(step=step, epoch=epoch, batches_done=batches_done)
        if not mlm and (step % per_epoch == 0 or step == total_steps):  # the task path: dev scores every epoch
            metrics = evaluate(student)
            log(f"epoch {epoch} dev: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            keep_best(state, metrics, epoch, spec, student, tokenizer, args, dist)
            student.train()
        if args.save_steps and step % args.save_steps == 0 and step < total_steps and dist.is_main:
            state["runtime"], start_time = state["runtime"] + time.time() - start_time, time.time()
            common.save_checkpoint(args.output_dir, step, student, tokenizer, optimizer, scheduler, state)
    # Evaluation and outputs (rank 0) -------------------------------------------------------------
    results = {}
    if dist.is_main:
        state["runtime"] += time.time() - start_time
        results = finish(args, state, student, tokenizer, teacher_score, evaluate, agreement, use_iit, device)
        if tracker:
            tracker.log({f"eval/{k}": v for k, v in results.items() if isinstance(v, float)})
            tracker.finish()
        log(f"saved: the {'student' if mlm else 'best student'}, results.json and args.json in {args.output_dir}")
        log(f"next: python eval_tasks.py --model {args.output_dir}" + ("" if mlm or demo_data(args) else
                                                                         f" --task {args.task}"))
    if dist.enabled:
        torch.distributed.barrier()
    common.cleanup_distributed(dist)
    return results

def finish(args: Args, state: dict, student, tokenizer, teacher_score, evaluate, agreement, use_iit, device) -> dict:
    """The last screen and results.json (written last); MLM: the final student saved, GLUE: the best one kept."""
    results = {"train_loss": state["loss_sum"] / max(state["loss_count"], 1), "train_steps": state["step"],
               "train_runtime": state["runtime"], "preset": args.preset, "alignment": args.alignment, "iit": use_iit}
    if args.task == "mlm":
        results.update(teacher_perplexity=teacher_score, student_perplexity=evaluate(student),
                       student_perplexity_before=state["student_perplexity_before"])
        common.save_model(args.output_dir, student, tokenizer)
        print(f"perplexity: student before {results['student_perplexity_before']:.2f} -> after "
              f"{results['student_perplexity']:.2f} (teacher {teacher_score:.2f})")
    else:  # the best epoch's student, saved in output_dir by keep_best
        student = type(student).from_pretrained(args.output_dir).to(device)
        results.update(state["best"], **{f"teacher_{k}": v for k, v in teacher_score.items()},
                       student_before=state["student_before"], best_epoch=state["best_epoch"], history=state["history"])
        scores = ", ".join(f"{k} {teacher_score[k]:.4f} -> {v:.4f}" for k, v in state["best"].items())
        print(f"dev, teacher -> best student (epoch {state['best_epoch']}): {scores}")
    after, before = agreement(student), state["agreement_before"]
    results.update(interchange_agreement=after["counterfactual"], plain_agreement=after["plain"],
                   interchange_agreement_before=before["counterfactual"], plain_agreement_before=before["plain"])
    print(f"interchange-intervention agreement with the teacher: {before['counterfactual']:.1%} -> "
          f"{after['counterfactual']:.1%} (with no intervention: {before['plain']:.1%} -> {after['plain']:.1%})")
    common.write_json(Path(args.output_dir) / "results.json", results)
    return results

if __name__ == "__main__":
    common.run_cli(main, Args)
