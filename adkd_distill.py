"""AD-KD: attribution-driven knowledge distillation of a fine-tuned BERT into a smaller BERT, on GLUE.

Wu, Chen, Quan, Wang, Wang, "AD-KD: Attribution-Driven Knowledge Distillation for Language Model
Compression", ACL 2023 (arXiv:2305.10010; official code brucewsy/AD-KD). The student learns the gold
labels, the teacher's soft labels, and *why* the teacher decides: each input token's Integrated-Gradients
attribution at the embedding output, reduced to one score per token and L2-normalised over the sequence.

    L      = (1 - alpha) * CE(z_s, y) + alpha * KD(z_s, z_t; T) + beta * L_attr
    IG(x)  = x * (1/m) * sum_{k=1..m} dF/de |_{e = (k/m) x}        (zero baseline; m = 1 is gradient x input)
    L_attr = sum over views c of ||a_t^c - a_s^c||^2 / #tokens,   a^c = normalise(||IG_c(x)||_2 per token)

The teacher's token score keeps only its top-K embedding dimensions; with more than two classes each class
is a view (multi-view). The official scripts use the 1-step `saliency_mse` losses: numerically IG with m = 1.

    python adkd_distill.py --task sst2                  # no CUDA: the offline demo (MiniLM teacher, 200 sentences)
    python adkd_distill.py --task mnli --preset paper   # bert-base teacher fine-tuned first, BERT-6 student
    python adkd_distill.py --task sst2 --beta 0         # the plain-KD baseline: the same run without L_attr
Differences from the official code: README.md, AD-KD "Implementation details".
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import inspect
import math
import time
from pathlib import Path

import datasets
import torch
import torch.nn.functional as F
import transformers
from torch.utils.data import BatchSampler, DistributedSampler
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

import common
from common import UserError, embedding_module


# ---- BOILERPLATE: settings. None: from the preset, then the task row (official script/*/*.sh; WNLI: RTE's row)
TASK_COLUMNS = ("kd_type", "per_device_train_batch_size", "num_train_epochs", "learning_rate", "alpha",
                "temperature", "beta", "topk", "teacher_batch_size", "teacher_learning_rate", "teacher_epochs")
TASK_DEFAULTS = {  # kd_type   batch epochs lr  alpha  T    beta  top-K  teacher: batch lr  epochs
    "cola": ("kd",        32, 10.0, 4e-5, 0.9, 1.0, 1.0,   768,  8,  2e-5, 5.0),
    "mnli": ("kd_anneal", 64, 6.0,  4e-5, 0.8, 3.0, 10.0,  768,  32, 2e-5, 5.0),
    "mrpc": ("kd_anneal", 16, 10.0, 3e-5, 0.9, 4.0, 10.0,  768,  8,  5e-5, 5.0),
    "qnli": ("kd",        32, 6.0,  4e-5, 0.9, 3.0, 100.0, 768,  32, 2e-5, 5.0),
    "qqp":  ("kd_anneal", 32, 8.0,  4e-5, 1.0, 4.0, 50.0,  734,  32, 3e-5, 5.0),
    "rte":  ("kd",        16, 12.0, 2e-5, 0.9, 2.0, 10.0,  700,  16, 5e-5, 4.0),
    "sst2": ("kd",        32, 6.0,  5e-5, 0.8, 2.0, 1.0,   768,  32, 2e-5, 5.0),
    "stsb": ("kd",        16, 8.0,  5e-5, 0.8, 3.0, 1.0,   640,  4,  3e-5, 4.0),
    "wnli": ("kd",        16, 12.0, 2e-5, 0.9, 2.0, 10.0,  700,  16, 5e-5, 4.0),
}
PRESETS = {
    "paper": dict(teacher_base="google-bert/bert-base-uncased", student="google/bert_uncased_L-6_H-768_A-12",
                  max_seq_length=128, logging_steps=50, save_steps=1000),
    # CPU demo, no downloads: MiniLM (6 layers, hidden 384) fine-tuned on 160 sentences; its blocks 0, 3, 5.
    "demo": dict(teacher_base=None, student_layers="0,3,5", max_seq_length=common.DEMO_TEACHER["max_length"],
                 per_device_train_batch_size=16, num_train_epochs=6.0, learning_rate=1e-4,
                 teacher_batch_size=common.DEMO_TEACHER["batch_size"],
                 teacher_learning_rate=common.DEMO_TEACHER["learning_rate"],
                 teacher_epochs=common.DEMO_TEACHER["epochs"], logging_steps=5, save_steps=0),
}

def option(default, help_text: str):
    return dataclasses.field(default=default, metadata={"help": help_text})

@dataclasses.dataclass
class Args:
    task: str = option("sst2", "GLUE task: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte or wnli")
    preset: str = option("auto", "auto | demo | paper (auto: paper with CUDA, else demo); fills unset flags")
    teacher: str | None = option(None, "BERT classifier fine-tuned on the task; None: fine-tune --teacher_base")
    teacher_base: str | None = option(None, "Pretrained BERT fine-tuned into the teacher (paper: bert-base)")
    student: str | None = option(None, "Pretrained smaller BERT, new head (paper: google/bert_uncased_L-6...)")
    student_layers: str | None = option(None, "Or build the student from these teacher blocks, e.g. 0,2,4,7,9,11")
    data_dir: str | None = option(None, "Official GLUE files: the task folder, or glue_data/ holding it")
    train_file: str | None = option(None, "Training CSV/JSON with the hub's column names, or an official .tsv")
    validation_file: str | None = option(None, "Dev CSV/JSON with the hub's column names, or an official .tsv")
    max_seq_length: int | None = option(None, "Truncate inputs to this many tokens (paper 128, demo 64)")
    max_train_samples: int | None = option(None, "Keep only the first N training examples")
    max_eval_samples: int | None = option(None, "Keep only the first N examples of each dev set")
    alpha: float | None = option(None, "AD-KD alpha: weight of KD, CE gets 1 - alpha (task table)")
    beta: float | None = option(None, "AD-KD beta: weight of L_attr, official --saliency_w; 0 = plain KD")
    temperature: float | None = option(None, "KD temperature T, no T^2 factor as official (task table)")
    kd_type: str | None = option(None, "kd | kd_anneal (T falls linearly to 1 over the epochs)")
    topk: int | None = option(None, "Teacher: keep the K largest |attribution| dimensions per token")
    ig_steps: int = option(1, "Integrated-Gradients steps m (1 = gradient x input, as official)")
    per_device_train_batch_size: int | None = option(None, "Examples per device per micro-step (task table)")
    per_device_eval_batch_size: int = option(64, "Examples per evaluation batch")
    gradient_accumulation_steps: int = option(1, "Micro-steps per optimiser step")
    learning_rate: float | None = option(None, "Peak AdamW learning rate of the student (task table)")
    weight_decay: float = option(0.0, "AdamW weight decay, not on biases and LayerNorm (official 0)")
    adam_beta1: float = option(0.9, "AdamW beta1 (official: the library default)")
    adam_beta2: float = option(0.999, "AdamW beta2 (official: the library default)")
    adam_epsilon: float = option(1e-8, "AdamW epsilon (official 1e-8)")
    warmup_ratio: float = option(0.0, "Fraction of steps with linear warm-up (official: none)")
    max_grad_norm: float = option(1.0, "Gradient-norm clipping (official 1.0)")
    num_train_epochs: float | None = option(None, "Student epochs (task table)")
    max_steps: int = option(-1, "Student optimiser steps; > 0 overrides --num_train_epochs")
    teacher_batch_size: int | None = option(None, "Teacher fine-tuning batch size")
    teacher_learning_rate: float | None = option(None, "Teacher fine-tuning learning rate")
    teacher_epochs: float | None = option(None, "Teacher fine-tuning epochs")
    seed: int = option(0, "Seed of the student run (official 0); the teacher is fine-tuned with seed 42")
    deterministic: bool = option(False, "Ask torch for deterministic kernels")
    output_dir: str | None = option(None, "Best student, checkpoints, results (default runs/adkd-<task>)")
    overwrite_output_dir: bool = option(False, "Allow writing over a finished run in output_dir")
    logging_steps: int | None = option(None, "Print every loss term every N optimiser steps")
    save_steps: int | None = option(None, "Write output_dir/checkpoint-<step>/ every N steps (0: never)")
    resume_from_checkpoint: str | None = option(None, "A checkpoint-<step> folder, or 'latest' in output_dir")
    bf16: bool | None = common.bf16_flag()
    device: str = option("auto", "auto | cpu | cuda | mps")
    cache_dir: str | None = option(None, "Where the demo teacher is cached (default ~/.cache/bert-distill)")
    show_attributions: int = option(3, "At the end, show the token attributions of this many dev examples")
    track: bool = option(False, "Log to Weights & Biases (imported only when set)")


# ---- AD-KD: the method. These functions need only torch and the model passed in: copy them freely.
def integrated_gradients(model, input_ids, attention_mask, token_type_ids, targets, steps: int = 1,
                         create_graph: bool = False, bf16: bool = False):
    """IG at the embedding output, zero baseline, the m = `steps` points as one batch of m*B rows; targets (V, B): a
    row per view. create_graph: a loss on the attributions trains it (eager attention). token_type_ids: None for
    models without them. -> (V, B, T, H), (B, C)"""
    B, found = input_ids.shape[0], {}
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
    inputs = {name: tensor.repeat(steps, 1) for name, tensor in inputs.items() if tensor is not None}

    def interpolate(module, args, output):  # the k-th copy of the batch gets e = (k/m) x, k = 1..m
        x = output[:B]  # (B, T, H): the first copy's embedding output, the real input
        alphas = torch.arange(1, steps + 1, device=x.device, dtype=x.dtype) / steps  # (m,)
        # (m*B, T, H); requires_grad_: we need dF/d(points) from a frozen model too
        points = (alphas[:, None, None, None] * x[None]).reshape(output.shape).requires_grad_(True)
        found["x"], found["points"] = x, points
        return points

    with torch.enable_grad():
        handle = embedding_module(model).register_forward_hook(interpolate)  # the encoder's first module
        try:
            with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(**inputs).logits
        finally:
            handle.remove()
        logits, x, points = logits.view(steps, B, -1).float(), found["x"], found["points"]  # (m, B, C)
        attributions = []
        for target in targets:  # F_i = -log softmax(z_i)[target_i]; one-output models (STS-B): (pred_i - target_i)^2
            target = target.expand(steps, B)  # (m, B)
            F_i = ((logits[..., 0] - target.float()) ** 2 if logits.shape[-1] == 1
                   else -F.log_softmax(logits, dim=-1).gather(-1, target.long()[..., None])[..., 0])  # (m, B)
            # Examples do not interact inside BERT: one gradient of sum_{k,i} F_i gives every dF_i/de.
            (grads,) = torch.autograd.grad(F_i.sum(), points, create_graph=create_graph, retain_graph=True)
            # AD-KD: IG_i(x) = x_i * (1/m) * sum_{k=1..m} dF_i/de |_{e = (k/m) x_i}
            attributions.append(x * grads.view(steps, *x.shape).float().mean(0))  # (B, T, H)
    attributions = torch.stack(attributions)  # (V, B, T, H)
    return (attributions if create_graph else attributions.detach()), logits[-1]

def token_attribution(attributions: torch.Tensor, attention_mask: torch.Tensor, topk: int | None = None):
    """(..., B, T, H) -> (..., B, T): a[p] = ||top-K(|A[p]|)||_2, 0 at padding, L2-normalised over the sequence."""
    magnitude = attributions.abs()  # (..., B, T, H)
    if topk is not None and topk < magnitude.shape[-1]:
        magnitude = magnitude.topk(topk, dim=-1).values  # (..., B, T, K): drop the noisy dimensions
    scores = magnitude.norm(dim=-1) * attention_mask.to(magnitude.dtype)  # (..., B, T)
    return scores / scores.norm(dim=-1, keepdim=True).clamp_min(1e-12)

def attribution_loss(teacher_map: torch.Tensor, student_map: torch.Tensor) -> torch.Tensor:
    """sum_{b,p} (a_t - a_s)^2 / #{(b, p): a_t != 0}: the squared error per real token."""
    return ((teacher_map - student_map) ** 2).sum() / (teacher_map != 0).sum().clamp_min(1)

def view_targets(labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """(V, B): over two classes one view per class; else one, the gold label (two classes give the same map)."""
    if num_labels > 2:
        return torch.arange(num_labels, device=labels.device)[:, None].expand(num_labels, len(labels))
    return labels[None]

def kd_loss(student_logits, teacher_logits, temperature: float) -> torch.Tensor:
    """-sum_c softmax(z_t/T)_c log softmax(z_s/T)_c, batch mean, no T^2 (official); regression MSE(z_s/T, z_t/T)."""
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
    """teacher_maps (B, V, T), teacher_logits (B, C) from the TeacherCache; the student in train mode, as official."""
    labels, mask = batch["labels"], batch["attention_mask"]
    inputs = (batch["input_ids"], mask, batch.get("token_type_ids"))
    attr = teacher_logits.new_zeros(())
    if beta > 0:  # one student forward of the m IG points; its k = m chunk is the ordinary forward for CE and KD
        views = view_targets(labels, teacher_logits.shape[-1])  # (V, B)
        attributions, student_logits = integrated_gradients(student, *inputs, views, ig_steps, True, bf16)
        # AD-KD: a_s^c = normalise(||IG_c(x)||_2 per token), all H dims; create_graph: a double backward trains it
        student_maps = token_attribution(attributions, mask)  # (V, B, T)
        # AD-KD: L_attr = sum_c ||a_t^c - a_s^c||^2 / #(a_t^c != 0)
        attr = sum(attribution_loss(teacher_maps[:, c], student_maps[c]) for c in range(len(views)))
    else:  # plain KD: only the ordinary forward
        student_logits = common.classifier_logits(student, batch, bf16)
    # AD-KD: L_CE = CE(z_s, y)   (STS-B: MSE(pred_s, y))
    ce = task_loss(student_logits, labels)
    # AD-KD: L_KD = -sum_c softmax(z_t/T)_c log softmax(z_s/T)_c   (STS-B: MSE(z_s/T, z_t/T))
    kd = kd_loss(student_logits, teacher_logits, temperature)
    # AD-KD: L = (1 - alpha) L_CE + alpha L_KD + beta L_attr
    loss = (1 - alpha) * ce + alpha * kd + beta * attr
    return loss, {"ce": ce.detach(), "kd": kd.detach(), "attr": attr.detach()}


# ---- AD-KD speed-up: the teacher's side once per example (and in adkd_loss, one student forward for all terms)
class TeacherCache:
    """The frozen teacher's maps and logits of each example (the same every epoch), computed once, per rank."""

    def __init__(self, teacher, num_labels: int, ig_steps: int, topk: int | None, need_maps: bool, bf16: bool):
        self.teacher, self.num_labels, self.ig_steps, self.topk = teacher, num_labels, ig_steps, topk
        self.need_maps, self.bf16, self.maps, self.logits = need_maps, bf16, {}, {}  # by index: (V, length), (C,)

    def __call__(self, batch: dict):
        """(maps (B, V, T) zero-padded, or None without L_attr; logits (B, C)) for a training batch."""
        indices = batch["index"].tolist()
        missing = [j for j, i in enumerate(indices) if i not in self.logits]
        if missing:  # first sight of these examples: one teacher pass over them, cut to their own longest
            T = int(batch["attention_mask"][missing].sum(-1).max())
            new = {k: v[missing][:, :T] if v.dim() == 2 else v[missing] for k, v in batch.items()}
            inputs = (new["input_ids"], new["attention_mask"], new.get("token_type_ids"))  # (B', T')
            if self.need_maps:
                views = view_targets(new["labels"], self.num_labels)  # (V, B')
                attributions, logits = integrated_gradients(self.teacher, *inputs, views, self.ig_steps, bf16=self.bf16)
                # AD-KD: a_t^c = normalise(||top-K |IG_c(x)| ||_2 per token), a constant
                maps = token_attribution(attributions, inputs[1], self.topk).transpose(0, 1)  # (B', V, T')
            else:
                with torch.no_grad():
                    logits = common.classifier_logits(self.teacher, new, self.bf16)
            for j, (index, length) in enumerate(zip(new["index"].tolist(), inputs[1].sum(-1).tolist())):
                self.logits[index] = logits[j].detach().float()
                if self.need_maps:
                    self.maps[index] = maps[j, :, :length]
        logits = torch.stack([self.logits[i] for i in indices])
        if not self.need_maps:
            return None, logits
        T = batch["input_ids"].shape[1]
        return torch.stack([F.pad(self.maps[i], (0, T - self.maps[i].shape[-1])) for i in indices]), logits


# ---- BOILERPLATE: models (data: common.load_glue, common.demo_polarity; batches and scores: common.py too)
def load_teacher(args: Args, spec, tokenizer, train_set, eval_sets, out_dir: Path, demo: bool, dist, device):
    """--teacher, or --teacher_base fine-tuned with CE into output_dir/teacher (demo: a cache shared by the scripts)."""
    folder = args.teacher
    if folder is None:
        settings = dict(batch_size=args.teacher_batch_size, learning_rate=args.teacher_learning_rate,
                        epochs=args.teacher_epochs)
        sizes = (len(train_set), sum(map(len, eval_sets.values())))
        folder = common.demo_teacher_folder(args.teacher_base, **settings, max_length=args.max_seq_length,
                                            cache_dir=args.cache_dir, sizes=sizes) if demo else out_dir / "teacher"
        common.fine_tuned_teacher(args.teacher_base, spec, tokenizer, train_set, eval_sets, folder, **settings,
                                  dist=dist, device=device)
    teacher = common.from_pretrained(AutoModelForSequenceClassification, str(folder), "teacher", "--teacher")
    return teacher.to(device).eval().requires_grad_(False)

def load_student(args: Args, teacher, spec: common.GlueTask):
    """--student with a new task head, or the teacher's --student_layers (the rest copied from the teacher)."""
    if args.student_layers:
        student = common.init_student_from_teacher(teacher, common.parse_layers(args.student_layers))
    else:
        student = common.from_pretrained(AutoModelForSequenceClassification, args.student, "student", "--student",
                                         num_labels=spec.num_labels)
        if student.config.vocab_size != teacher.config.vocab_size:
            raise UserError(f"student vocabulary ({student.config.vocab_size}) differs from the teacher's "
                            f"({teacher.config.vocab_size}); AD-KD needs the same tokenizer")
    # AD-KD: L_attr needs a double backward through attention: eager has one, the fused SDPA kernels do not
    student.set_attn_implementation("eager")
    return student


# ---- BOILERPLATE: the training loop (the teacher's fine-tuning, when it has to be, is common.fine_tuned_teacher)
def log(dist, text: str) -> None:
    if dist.is_main:
        print(text, flush=True)

def optimizer_and_state(model, args: Args, total_steps: int, resume: Path | None, dist):
    optimizer, scheduler = common.adamw(model, args.learning_rate, total_steps, args.warmup_ratio, args.weight_decay,
                                        betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    state = dict(step=0, epoch=0, batches_done=0, best_score=-math.inf, best_epoch=-1, best={}, history=[])
    if resume is not None:
        state.update(common.load_checkpoint(resume, model, optimizer, scheduler))
        log(dist, f"resumed from {resume}: step {state['step']}, {state['batches_done']} batches into epoch "
                  f"{state['epoch']}")
        if dist.rank > 0:  # the checkpoint holds rank 0's RNG state; keep the ranks' dropout independent
            common.set_seed(args.seed + dist.rank + 7919 * state["step"])
    return optimizer, scheduler, state

def keep_best(state: dict, metrics: dict, epoch: int, spec, model, tokenizer, out_dir: Path, dist) -> None:
    """Save the best epoch in out_dir (official: CoLA MCC, MRPC F1, STS-B Spearman, MNLI m + mm, others accuracy)."""
    score = common.selection_score(spec, metrics)
    state["history"].append({"epoch": epoch, "step": state["step"], **metrics})
    if score > state["best_score"]:
        state.update(best_score=score, best_epoch=epoch, best=metrics)
        if dist.is_main:
            common.save_model(out_dir, model, tokenizer)

def train(args: Args, spec, model, train_set, eval_sets, out_dir: Path, tokenizer, dist, device,
          cache: TeacherCache, resume: Path | None = None, tracker=None) -> dict:
    """Train with adkd_loss (the teacher's side from `cache`), evaluate each epoch, keep the best in out_dir."""
    batch_size, accumulation = args.per_device_train_batch_size, args.gradient_accumulation_steps
    sampler = DistributedSampler(range(len(train_set)), dist.world_size, dist.rank, shuffle=True, seed=args.seed)
    steps_per_epoch = math.ceil(math.ceil(len(sampler) / batch_size) / accumulation)
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    optimizer, scheduler, state = optimizer_and_state(model, args, total_steps, resume, dist)
    ddp_model = torch.nn.parallel.DistributedDataParallel(model) if dist.enabled else model  # averages gradients
    sums, window, started = {}, 0, time.time()
    for epoch in range(state["epoch"], num_epochs):
        sampler.set_epoch(epoch)  # the epoch's order depends only on (seed, epoch): exact resume
        batches = list(BatchSampler(sampler, batch_size, drop_last=False))
        model.train()
        for b in range(state["batches_done"] if epoch == state["epoch"] else 0, len(batches)):
            if state["step"] >= total_steps:
                break
            batch = common.classification_batch(train_set[batches[b]], tokenizer.pad_token_id, spec.is_regression,
                                                device)
            last_micro = (b + 1) % accumulation == 0 or b + 1 == len(batches)
            with ddp_model.no_sync() if dist.enabled and not last_micro else contextlib.nullcontext():
                temperature = kd_temperature(args.temperature, args.kd_type, epoch, num_epochs)
                loss, terms = adkd_loss(ddp_model, batch, *cache(batch), alpha=args.alpha, beta=args.beta,
                                        temperature=temperature, ig_steps=args.ig_steps, bf16=args.bf16)
                (loss / accumulation).backward()
            for k, v in {"loss": loss.detach(), **terms}.items():  # tensors: no device sync per micro-step
                sums[k] = sums.get(k, 0.0) + v / accumulation
            if not last_micro:
                continue
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"], state["batches_done"], window = state["step"] + 1, b + 1, window + 1
            if args.logging_steps and state["step"] % args.logging_steps == 0:
                logged = {k: float(v) / window for k, v in sums.items()}
                log(dist, f"step {state['step']}/{total_steps} epoch {epoch} "
                          f"lr {scheduler.get_last_lr()[0]:.2e} " + " ".join(f"{k} {v:.4g}" for k, v in logged.items()))
                if tracker is not None:
                    tracker.log({f"adkd/{k}": v for k, v in logged.items()}, step=state["step"])
                sums, window = {}, 0
            if dist.is_main and args.save_steps and state["step"] % args.save_steps == 0 \
                    and state["step"] < total_steps:  # (the final model is saved anyway)
                common.save_checkpoint(out_dir, state["step"], model, tokenizer, optimizer, scheduler,
                                       {**state, "epoch": epoch})
        metrics = common.classifier_scores(model, eval_sets, spec, tokenizer.pad_token_id,
                                           args.per_device_eval_batch_size, device, args.bf16)
        log(dist, f"epoch {epoch} dev: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        keep_best(state, metrics, epoch, spec, model, tokenizer, out_dir, dist)
        state.update(epoch=epoch + 1, batches_done=0)  # (the epoch that reaches total_steps is the last)
    return {**state, "runtime": round(time.time() - started, 1)}


# ---- main: the attributions shown at the end, the input checks, main
def show_attributions(teacher, student, tokenizer, eval_set, spec, args: Args, device) -> None:
    """The first dev examples' tokens, each with a shade per model (its gold-label map; darker = more important)."""
    batch = common.classification_batch(eval_set[:args.show_attributions], tokenizer.pad_token_id, spec.is_regression,
                                        device)
    inputs = (batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
    maps = {name: token_attribution(integrated_gradients(model.eval(), *inputs, batch["labels"][None],
                                                         args.ig_steps)[0][0], inputs[1], topk)  # (B, T)
            for name, model, topk in (("teacher", teacher, args.topk), ("student", student, None))}
    print(f"\ntoken attributions on dev (gold-label view, {args.ig_steps}-step IG; darker = more important):")
    for i, gold in enumerate(batch["labels"].tolist()):
        print(f"\n  example {i}: gold {spec.label_names[gold] if spec.label_names else round(gold, 2)}")
        tokens = tokenizer.convert_ids_to_tokens(batch["input_ids"][i, :int(inputs[1][i].sum())].tolist())
        for start in range(0, len(tokens), 12):  # 12 tokens a line, then one shade row per model
            cells = [(token, len(token) + 1) for token in tokens[start:start + 12]]
            print(" " * 11 + "".join(token.ljust(width) for token, width in cells))
            for name, values in maps.items():  # each row scaled to its maximum
                top = max(values[i].max().item(), 1e-12)
                shades = [" ▁▂▃▄▅▆▇█"[round(v / top * 8)] for v in values[i, start:start + 12].tolist()]
                print(f"  {name:<9}" + "".join(shade.ljust(width) for shade, (_, width) in zip(shades, cells)))

def fail_if(condition, message: str) -> None:
    if condition:
        raise UserError(message)

def check_args(args: Args) -> tuple[common.GlueTask, str, str, bool, bool]:
    spec = common.glue_task(args.task)
    fail_if(args.preset not in ("auto", *PRESETS), f"--preset '{args.preset}' is not auto, demo or paper")
    preset, why = args.preset, "asked for with --preset"
    if preset == "auto":
        preset = "paper" if torch.cuda.is_available() else "demo"
        why = "CUDA is available" if preset == "paper" else \
            "no CUDA device; pass --preset paper for the paper's setting"
    common.apply_preset(args, PRESETS[preset])
    common.apply_preset(args, dict(zip(TASK_COLUMNS, TASK_DEFAULTS[args.task])))
    if args.output_dir is None:
        args.output_dir = f"runs/adkd-{args.task}" + ("-demo" if preset == "demo" else "")
    demo_data = preset == "demo" and not (args.data_dir or args.train_file or args.validation_file)
    fail_if(demo_data and args.task != "sst2",
            f"the demo data is SST-2-style; for {args.task} pass --data_dir or --train_file/--validation_file")
    if preset == "demo" and args.teacher is None and args.teacher_base is None:
        args.teacher_base = common.demo_encoder("--teacher or --teacher_base")
    fail_if(args.kd_type not in ("kd", "kd_anneal"), f"--kd_type '{args.kd_type}' is not kd or kd_anneal")
    fail_if(args.ig_steps < 1, f"--ig_steps {args.ig_steps} must be at least 1")
    fail_if(args.track and importlib.util.find_spec("wandb") is None, "--track needs wandb (pip install wandb)")
    fail_if(not (args.student or args.student_layers),
            "no student: pass --student (a pretrained BERT) or --student_layers (e.g. 0,2,4,7,9,11)")
    what, flag = ("teacher", "--teacher") if args.teacher else ("teacher base", "--teacher_base")
    config = common.from_pretrained(AutoConfig, args.teacher or args.teacher_base, what, flag)
    skeleton = common.encoder_skeleton(config)  # a model AD-KD cannot hook stops here, in one line
    architectures, n, positions = config.architectures or [], len(common.transformer_blocks(skeleton)), \
        common.max_positions(skeleton)
    fail_if(args.teacher and not any(a.endswith("ForSequenceClassification") for a in architectures),
            f"teacher '{args.teacher}' is not a fine-tuned sequence classifier ({architectures}); "
            f"pass one, or omit --teacher to fine-tune --teacher_base first")
    fail_if(args.teacher and config.num_labels != spec.num_labels, f"teacher '{args.teacher}' has num_labels="
            f"{config.num_labels} but {spec.name} has {spec.num_labels}; pass a teacher fine-tuned on {spec.name}")
    fail_if(args.max_seq_length > positions, f"--max_seq_length {args.max_seq_length} is longer than the teacher's "
            f"{positions} positions; pass a smaller value")
    layers = common.parse_layers(args.student_layers or "")
    fail_if(args.student_layers and (not layers or any(not 0 <= layer < n for layer in layers)),
            f"--student_layers {args.student_layers} must list blocks of the teacher's 0..{n - 1}")
    if args.student and not args.student_layers:  # fail now on a bad --student, not after the teacher
        common.encoder_skeleton(common.from_pretrained(AutoConfig, args.student, "student", "--student"))
    takes_types = "token_type_ids" in inspect.signature(skeleton.forward).parameters
    return spec, preset, why, demo_data, takes_types

def main(args: Args) -> dict:
    # BOILERPLATE: read and check every input before anything is written
    spec, preset, why, demo_data, takes_types = check_args(args)
    out_dir = Path(args.output_dir)
    resume = common.resolve_resume(args.resume_from_checkpoint, out_dir)
    common.check_output_dir(out_dir, args.overwrite_output_dir, resuming=resume is not None)
    raw = common.demo_polarity() if demo_data else common.load_glue(args.task, args.data_dir, args.train_file,
                                                                     args.validation_file)
    for split in raw:
        limit = args.max_train_samples if split == "train" else args.max_eval_samples
        if limit:
            raw[split] = raw[split].select(range(min(limit, len(raw[split]))))
    tokenizer = common.from_pretrained(AutoTokenizer, args.teacher or args.teacher_base, "tokenizer",
                                       "--teacher" if args.teacher else "--teacher_base")
    # BOILERPLATE: DDP, the first screen (output_dir/args.json will hold every setting), seed, quiet loaders, data
    dist, device = common.init_distributed(args.device)
    args.bf16, precision = common.precision(device, args.bf16)
    student_line = f"teacher blocks {args.student_layers}" if args.student_layers else f"{args.student} (new head)"
    method = "AD-KD" if args.beta > 0 else "plain KD (beta 0)"
    length = f"{args.max_steps} steps" if args.max_steps > 0 else f"{args.num_train_epochs:g} epochs"
    splits = ", ".join(f"{len(raw[split])} {split}" for split in raw)
    log(dist, f"preset: {preset} ({why})\n{precision}\nteacher: {args.teacher or args.teacher_base}\n"
              f"student: {student_line}\ndata: {args.task}, {splits}")
    log(dist, f"{method}: {length} of batch {args.per_device_train_batch_size}, lr {args.learning_rate:g}, alpha "
              f"{args.alpha}, beta {args.beta}, T {args.temperature} ({args.kd_type}), top-K {args.topk}, "
              f"IG steps {args.ig_steps}")
    common.set_seed(args.seed + dist.rank, args.deterministic)
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()  # no load report: the lines above say which heads are new
    data = common.tokenize_glue(raw, tokenizer, spec, args.max_seq_length, takes_types)  # `index`: the cache key
    eval_sets = {split: data[split] for split in spec.validation_splits}
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    tracker = None
    if args.track and dist.is_main:
        tracker = importlib.import_module("wandb").init(project="bert-distill", name=f"adkd-{args.task}",
                                                        config=dataclasses.asdict(args))
    # The teacher (given, or fine-tuned here first), then the student, distilled by the loop with adkd_loss
    teacher = load_teacher(args, spec, tokenizer, data["train"], eval_sets, out_dir, demo_data, dist, device)
    teacher_metrics = common.classifier_scores(teacher, eval_sets, spec, tokenizer.pad_token_id,
                                               args.per_device_eval_batch_size, device, args.bf16)
    log(dist, "teacher dev: " + ", ".join(f"{k} {v:.4f}" for k, v in teacher_metrics.items()))
    common.set_seed(args.seed + dist.rank, args.deterministic)
    student = load_student(args, teacher, spec).to(device)
    cache = TeacherCache(teacher, spec.num_labels, args.ig_steps, args.topk, need_maps=args.beta > 0, bf16=args.bf16)
    state = train(args, spec, student, data["train"], eval_sets, out_dir, tokenizer, dist, device, cache, resume,
                  tracker)
    # BOILERPLATE: outputs (the best student is already in output_dir), results.json last, the last screen
    results = {**state["best"], **{f"teacher_{k}": v for k, v in teacher_metrics.items()}, "preset": preset,
               "best_epoch": state["best_epoch"], "train_steps": state["step"], "train_runtime": state["runtime"],
               "history": state["history"]}
    if dist.is_main:
        if args.show_attributions > 0 and (out_dir / "config.json").is_file():
            best = AutoModelForSequenceClassification.from_pretrained(str(out_dir)).to(device)
            show_attributions(teacher, best, tokenizer, eval_sets["validation"], spec, args, device)
        common.write_json(out_dir / "args.json", dataclasses.asdict(args))
        common.write_json(out_dir / "results.json", results)
        scores = ", ".join(f"{k} {teacher_metrics[k]:.4f} -> {v:.4f}" for k, v in state["best"].items())
        print(f"\ndev, teacher -> best student (epoch {state['best_epoch']}): {scores}\nsaved the best student, "
              f"results.json and args.json in {out_dir}\nnext: python eval_tasks.py --model {out_dir}")
    if tracker is not None:
        tracker.finish()
    if dist.enabled:
        torch.distributed.barrier()
    common.cleanup_distributed(dist)
    return results

if __name__ == "__main__":
    common.run_cli(main, Args)
