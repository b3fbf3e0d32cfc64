"""AD-KD: attribution-driven knowledge distillation of a fine-tuned BERT into a smaller BERT, on
GLUE. Wu, Chen, Quan, Wang, Wang, "AD-KD: Attribution-Driven Knowledge Distillation for Language
Model Compression", ACL 2023 (arXiv:2305.10010; official code brucewsy/AD-KD).

The student learns the gold labels, the teacher's soft labels, and *why* the teacher decides: each
input token's Integrated-Gradients attribution at the embedding output, reduced to one score per
token and L2-normalised over the sequence.

    L      = (1 - alpha) * CE(z_s, y) + alpha * KD(z_s, z_t; T) + beta * L_attr
    IG(e)  = e * (1/m) * sum_{k=1..m} dF/de |_{(k/m) e}    (e: the embedding output; zero baseline)
    L_attr = sum over views c of ||a_t^c - a_s^c||^2 / #(a_t^c != 0),  a^c = normalise(||IG_c||_2)

The teacher's a^c comes from its top-K embedding dimensions; with more than two classes each class
is a view (multi-view). The official scripts use m = 1: gradient x input.

    python adkd_distill.py --task sst2                 # no CUDA: the offline demo (MiniLM)
    python adkd_distill.py --task mnli --preset paper  # a bert-base teacher, a BERT-6 student
    python adkd_distill.py --task sst2 --beta 0        # plain KD: the same run without L_attr
Read on in order: the method, data and models, settings, main; then the appendices. Differences
from the official code: README.md, AD-KD "Implementation details".
"""

import contextlib
import dataclasses
import importlib.util
import inspect
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DistributedSampler
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

import common
from common import embedding_module, fail_if, log, option


# ==== 1. THE METHOD (it needs only torch and common.embedding_module: copy it freely) ====
def integrated_gradients(model, input_ids, attention_mask, token_type_ids, targets, steps: int = 1,
                         create_graph: bool = False, bf16: bool = False):
    """IG at the embedding output, zero baseline, the m = `steps` points as one batch of m*B rows;
    targets (V, B): a row per view. create_graph: a loss on the attributions trains the model (eager
    attention). token_type_ids: None for models without them. -> (V, B, T, H), and (B, C): the
    logits at k = m, the real input."""
    B = input_ids.shape[0]
    found = {}
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
    inputs = {name: value.repeat(steps, 1) for name, value in inputs.items() if value is not None}

    def interpolate(module, args, output):  # the k-th copy of the batch gets e = (k/m) x, k = 1..m
        x = output[:B]  # (B, T, H): the first copy's embedding output, the real input
        alphas = torch.arange(1, steps + 1, device=x.device, dtype=x.dtype) / steps  # (m,)
        # (m*B, T, H); requires_grad_: dF/d(points) even from a frozen model
        points = (alphas[:, None, None, None] * x[None]).reshape(output.shape).requires_grad_(True)
        found['x'] = x
        found['points'] = points
        return points

    with torch.enable_grad():
        handle = embedding_module(model).register_forward_hook(interpolate)  # the first module
        try:
            with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(**inputs).logits
        finally:
            handle.remove()
        logits = logits.view(steps, B, -1).float()  # (m, B, C)
        x = found["x"]
        points = found["points"]
        attributions = []
        for target in targets:
            target = target.expand(steps, B)  # (m, B)
            # F_i = -log softmax(z_i)[target_i]; one-output models (STS-B): (pred_i - target_i)^2
            if logits.shape[-1] == 1:
                F_i = (logits[..., 0] - target.float()) ** 2  # (m, B)
            else:
                log_p = F.log_softmax(logits, dim=-1)
                F_i = -log_p.gather(-1, target.long()[..., None])[..., 0]  # (m, B)
            # Examples do not interact in BERT: one gradient of sum_{k,i} F_i gives each dF_i/de
            (grads,) = torch.autograd.grad(F_i.sum(), points, create_graph=create_graph,
                                           retain_graph=True)
            # AD-KD: IG_i(x) = x_i * (1/m) * sum_{k=1..m} dF_i/de |_{e = (k/m) x_i}
            attributions.append(x * grads.view(steps, *x.shape).float().mean(0))  # (B, T, H)
    attributions = torch.stack(attributions)  # (V, B, T, H)
    return (attributions if create_graph else attributions.detach()), logits[-1]


def token_attribution(attributions: torch.Tensor, attention_mask: torch.Tensor,
                      topk: int | None = None):
    """(..., B, T, H) -> (..., B, T): a[p] = ||top-K(|A[p]|)||_2, 0 at padding, L2-normalised over
    the sequence."""
    magnitude = attributions.abs()  # (..., B, T, H)
    if topk is not None and topk < magnitude.shape[-1]:
        magnitude = magnitude.topk(topk, dim=-1).values  # (..., B, T, K): drop the noisy dimensions
    scores = magnitude.norm(dim=-1) * attention_mask.to(magnitude.dtype)  # (..., B, T)
    return scores / scores.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def attribution_loss(teacher_map: torch.Tensor, student_map: torch.Tensor) -> torch.Tensor:
    """sum_{b,p} (a_t - a_s)^2 / #{(b, p): a_t != 0}: the squared error per real token."""
    return ((teacher_map - student_map) ** 2).sum() / (teacher_map != 0).sum().clamp_min(1)


def view_targets(labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """(V, B): with > 2 classes one view per class; else one, the gold label (two classes give the
    same map)."""
    if num_labels > 2:
        classes = torch.arange(num_labels, device=labels.device)
        return classes[:, None].expand(num_labels, len(labels))
    return labels[None]


def teacher_token_maps(teacher, batch: dict, num_labels: int, ig_steps: int = 1,
                       topk: int | None = None, bf16: bool = False):
    """The teacher's side of L_attr, detached: per view c, a_t^c = normalise(||top-K |IG_c(x)| ||_2
    per token). -> maps (V, B, T), logits (B, C)"""
    views = view_targets(batch["labels"], num_labels)  # (V, B)
    mask = batch["attention_mask"]
    attributions, logits = integrated_gradients(
        teacher, batch["input_ids"], mask, batch.get("token_type_ids"), views, ig_steps, bf16=bf16)
    return token_attribution(attributions, mask, topk), logits


def kd_loss(student_logits, teacher_logits, temperature: float) -> torch.Tensor:
    """-sum_c softmax(z_t/T)_c log softmax(z_s/T)_c, batch mean, no T^2 (official); regression
    MSE(z_s/T, z_t/T)."""
    s = student_logits.float() / temperature
    t = teacher_logits.float() / temperature
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
    """One micro-batch's loss and terms. teacher_maps (V, B, T) and teacher_logits (B, C): the
    teacher's side (teacher_token_maps); the student in train mode, as officially."""
    labels = batch["labels"]
    mask = batch["attention_mask"]
    token_types = batch.get("token_type_ids")
    attr = teacher_logits.new_zeros(())
    if beta > 0:  # one student forward of the m IG points; its k = m chunk is the ordinary forward
        views = view_targets(labels, teacher_logits.shape[-1])  # (V, B)
        attributions, student_logits = integrated_gradients(
            student, batch["input_ids"], mask, token_types, views, ig_steps, True, bf16)
        # AD-KD: a_s^c = normalise(||IG_c(x)||_2 per token), all H dims; create_graph: a double
        # backward trains it
        student_maps = token_attribution(attributions, mask)  # (V, B, T)
        # AD-KD: L_attr = sum_c ||a_t^c - a_s^c||^2 / #(a_t^c != 0)
        attr = sum(attribution_loss(teacher_maps[c], student_maps[c]) for c in range(len(views)))
    else:  # plain KD: the ordinary forward alone
        inputs = dict(input_ids=batch["input_ids"], attention_mask=mask)
        if token_types is not None:
            inputs["token_type_ids"] = token_types
        with torch.autocast(mask.device.type, dtype=torch.bfloat16, enabled=bf16):
            student_logits = student(**inputs).logits
    # AD-KD: L_CE = CE(z_s, y)   (STS-B: MSE(pred_s, y))
    ce = task_loss(student_logits, labels)
    # AD-KD: L_KD = -sum_c softmax(z_t/T)_c log softmax(z_s/T)_c   (STS-B: MSE(z_s/T, z_t/T))
    kd = kd_loss(student_logits, teacher_logits, temperature)
    # AD-KD: L = (1 - alpha) L_CE + alpha L_KD + beta L_attr
    loss = (1 - alpha) * ce + alpha * kd + beta * attr
    return loss, {"ce": ce.detach(), "kd": kd.detach(), "attr": attr.detach()}


# ==== 2. DATA AND MODELS (GLUE: common.glue_splits, common.classification_batch) ====
def micro_batches(num_examples: int, args, dist, epoch: int, position: int):
    """This rank's micro-batches from (epoch, position) on, as (epoch, next position, indices,
    whether it ends the epoch). Each epoch is a shuffle seeded by (seed, epoch), so a resumed run
    sees the same; the last batch of an epoch may be short (as officially)."""
    sampler = DistributedSampler(range(num_examples), dist.world_size, dist.rank, shuffle=True,
                                 seed=args.seed)
    while True:
        sampler.set_epoch(epoch)
        batches = list(BatchSampler(sampler, args.per_device_train_batch_size, drop_last=False))
        for position in range(position, len(batches)):
            yield epoch, position + 1, batches[position], position + 1 == len(batches)
        epoch += 1
        position = 0


def load_teacher(args, spec, tokenizer, train_set, eval_sets, demo: bool, dist, device):
    """--teacher, or --teacher_base fine-tuned with CE into output_dir/teacher (demo: a cache the
    scripts share)."""
    folder = args.teacher
    if folder is None:
        settings = dict(batch_size=args.teacher_batch_size,
                        learning_rate=args.teacher_learning_rate, epochs=args.teacher_epochs)
        sizes = (len(train_set), sum(map(len, eval_sets.values())))
        folder = Path(args.output_dir) / "teacher"
        if demo:
            folder = common.demo_teacher_folder(args.teacher_base, **settings, sizes=sizes,
                                                max_length=args.max_seq_length,
                                                cache_dir=args.cache_dir)
        common.fine_tuned_teacher(args.teacher_base, spec, tokenizer, train_set, eval_sets, folder,
                                  **settings, dist=dist, device=device)
    teacher = common.from_pretrained(AutoModelForSequenceClassification, str(folder), "teacher",
                                     "--teacher")
    return teacher.to(device).eval().requires_grad_(False)


def load_student(args, teacher, spec: common.GlueTask):
    """--student with a new task head, or the teacher's --student_layers (the rest copied from the
    teacher)."""
    if args.student_layers:
        layers = common.parse_layers(args.student_layers)
        student = common.init_student_from_teacher(teacher, layers)
    else:
        student = common.from_pretrained(AutoModelForSequenceClassification, args.student,
                                         "student", "--student", num_labels=spec.num_labels)
        fail_if(student.config.vocab_size != teacher.config.vocab_size,
                f"student vocabulary ({student.config.vocab_size}) differs from the teacher's "
                f"({teacher.config.vocab_size}); AD-KD needs the same tokenizer")
    # AD-KD: L_attr needs a double backward through attention: eager has one, fused SDPA kernels not
    student.set_attn_implementation("eager")
    return student


# ==== 3. SETTINGS ====
@dataclasses.dataclass
class Args:  # BOILERPLATE: a field left at None is filled by resolve_args, below
    task: str = option("sst2", "GLUE task: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte or wnli")
    preset: str = option("auto", "auto | demo | paper (auto: paper with CUDA, else demo)")
    teacher: str | None = option(None, "A classifier fine-tuned on the task; None: fine-tune one")
    teacher_base: str | None = option(None, "BERT to fine-tune into the teacher (paper: bert-base)")
    student: str | None = option(None, "A smaller pretrained BERT, new head (paper: "
                                 "google/bert_uncased_L-6...)")
    student_layers: str | None = option(None, "Or the student from teacher blocks: 0,2,4,7,9,11")
    data_dir: str | None = option(None, "Official GLUE files: the task folder, or glue_data/")
    train_file: str | None = option(None, "Training CSV/JSON (hub columns), or an official .tsv")
    validation_file: str | None = option(None, "Dev file, laid out as --train_file")
    max_seq_length: int | None = option(None, "Truncate inputs to this many tokens (paper 128)")
    max_train_samples: int | None = option(None, "Keep only the first N training examples")
    max_eval_samples: int | None = option(None, "Keep only the first N examples of each dev set")
    alpha: float | None = option(None, "Weight of KD; CE gets 1 - alpha (task table)")
    beta: float | None = option(None, "Weight of L_attr, official --saliency_w; 0: plain KD")
    temperature: float | None = option(None, "KD temperature T, no T^2 factor as official")
    kd_type: str | None = option(None, "kd | kd_anneal (T falls linearly to 1 over the epochs)")
    topk: int | None = option(None, "Teacher: keep the K largest |attribution| dimensions a token")
    ig_steps: int = option(1, "Integrated-Gradients steps m (1 = gradient x input, as official)")
    per_device_train_batch_size: int | None = option(None, "Examples per device per micro-step")
    per_device_eval_batch_size: int = option(64, "Examples per evaluation batch")
    gradient_accumulation_steps: int = option(1, "Micro-steps per optimiser step")
    learning_rate: float | None = option(None, "Peak AdamW learning rate of the student")
    weight_decay: float = option(0.0, "AdamW weight decay, not on biases, LayerNorm (official 0)")
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
    seed: int = option(0, "Seed of the student run (official 0); the teacher's is 42")
    deterministic: bool = option(False, "Ask torch for deterministic kernels")
    output_dir: str | None = option(None, "Best student, checkpoints, results (runs/adkd-<task>)")
    overwrite_output_dir: bool = option(False, "Allow writing over a finished run in output_dir")
    logging_steps: int | None = option(None, "Print every loss term every N optimiser steps")
    save_steps: int | None = option(None, "Write output_dir/checkpoint-<step>/ every N (0: never)")
    resume_from_checkpoint: str | None = option(None, "A checkpoint-<step> folder, or 'latest'")
    bf16: bool | None = common.bf16_flag()
    device: str = option("auto", "auto | cpu | cuda | mps")
    cache_dir: str | None = option(None, "The demo teacher's cache (default ~/.cache/bert-distill)")
    show_attributions: int = option(3, "At the end, show token attributions of N dev examples")
    track: bool = option(False, "Log to Weights & Biases (imported only when set)")


# The task's defaults: the official script/*/*.sh rows (WNLI: RTE's row).
TASK_COLUMNS = ("kd_type", "per_device_train_batch_size", "num_train_epochs", "learning_rate",
                "alpha", "temperature", "beta", "topk", "teacher_batch_size",
                "teacher_learning_rate", "teacher_epochs")
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
# The presets win over the task's defaults.
PRESETS = {
    "paper": dict(teacher_base="google-bert/bert-base-uncased",
                  student="google/bert_uncased_L-6_H-768_A-12", max_seq_length=128,
                  logging_steps=50, save_steps=1000),
    # CPU, no downloads: MiniLM (6 blocks, width 384) fine-tuned on 160 sentences
    "demo": dict(teacher_base=None, student_layers="0,3,5",
                 max_seq_length=common.DEMO_TEACHER["max_length"], per_device_train_batch_size=16,
                 num_train_epochs=6.0, learning_rate=1e-4,
                 teacher_batch_size=common.DEMO_TEACHER["batch_size"],
                 teacher_learning_rate=common.DEMO_TEACHER["learning_rate"],
                 teacher_epochs=common.DEMO_TEACHER["epochs"], logging_steps=5, save_steps=0),
}


def resolve_args(args: Args) -> str:
    """Fill every flag left unset (None): the preset's value, else the task's row. Returns why this
    preset runs."""
    spec = common.glue_task(args.task)  # an unknown task stops here
    fail_if(args.preset not in ("auto", *PRESETS),
            f"--preset '{args.preset}' is not auto, demo or paper")
    why = "asked for with --preset"
    if args.preset == "auto" and torch.cuda.is_available():
        args.preset = "paper"
        why = "CUDA is available"
    elif args.preset == "auto":
        args.preset = "demo"
        why = "no CUDA device; pass --preset paper for the paper's setting"
    common.apply_preset(args, PRESETS[args.preset])
    common.apply_preset(args, dict(zip(TASK_COLUMNS, TASK_DEFAULTS[spec.name])))
    if args.output_dir is None:
        args.output_dir = f"runs/adkd-{args.task}" + ("-demo" if args.preset == "demo" else "")
    if args.preset == "demo" and args.teacher is None and args.teacher_base is None:
        args.teacher_base = common.demo_encoder("--teacher or --teacher_base")
    return why


# ==== 4. TRAINING AND EVALUATION ====
# The settings a resuming run must share with its checkpoint: they fix the data order and schedule
RESUME_SIGNATURE = ("task", "seed", "per_device_train_batch_size", "gradient_accumulation_steps",
                    "max_train_samples", "max_seq_length", "student_layers", "student", "teacher")


def main(args: Args) -> dict:
    # BOILERPLATE: settings, input checks, devices
    why = resolve_args(args)
    checkpoint, takes_types = check_args(args)
    spec = common.GLUE_TASKS[args.task]
    dist, device = common.init_distributed(args.device)
    args.bf16, precision = common.precision(device, args.bf16)
    flag = "--teacher" if args.teacher else "--teacher_base"
    teacher_name = args.teacher or args.teacher_base
    tokenizer = common.from_pretrained(AutoTokenizer, teacher_name, "tokenizer", flag)
    common.set_seed(args.seed + dist.rank, args.deterministic)
    common.quiet_loaders()
    data, eval_sets = common.glue_splits(args, spec, tokenizer, takes_types, demo_data(args))
    splits = ", ".join(f"{len(data[split])} {split}" for split in data)
    if args.student_layers:
        student_line = f"teacher blocks {args.student_layers}"
    else:
        student_line = f"{args.student} (new head)"
    method = "AD-KD" if args.beta > 0 else "plain KD (beta 0)"
    length = f"{args.num_train_epochs:g} epochs"
    if args.max_steps > 0:
        length = f"{args.max_steps} steps"
    log(dist, f"preset: {args.preset} ({why})\n{precision}\nteacher: {teacher_name}\n"
              f"student: {student_line}\ndata: {args.task}, {splits}")
    log(dist, f"{method}: {length} of batch {args.per_device_train_batch_size}, lr "
              f"{args.learning_rate:g}, alpha {args.alpha}, beta {args.beta}, T {args.temperature} "
              f"({args.kd_type}), top-K {args.topk}, IG steps {args.ig_steps}")
    tracker = common.start_outputs(args, dist, f"adkd-{args.task}")
    # AD-KD: the teacher (given, or fine-tuned here first), then the student
    teacher = load_teacher(args, spec, tokenizer, data["train"], eval_sets, demo_data(args), dist,
                           device)
    teacher_metrics = dev_scores(teacher, eval_sets, tokenizer, args, device)
    log(dist, "teacher dev: " + ", ".join(f"{k} {v:.4f}" for k, v in teacher_metrics.items()))
    common.set_seed(args.seed + dist.rank, args.deterministic)  # the student's new head, dropout
    student = load_student(args, teacher, spec).to(device)
    cache = TeacherCache(teacher, spec.num_labels, args.ig_steps, args.topk,
                         need_maps=args.beta > 0, bf16=args.bf16)
    # BOILERPLATE: the schedule, the optimiser and the training state
    accumulation = args.gradient_accumulation_steps
    per_rank = math.ceil(len(data["train"]) / dist.world_size)  # DistributedSampler's share
    batches_per_epoch = math.ceil(per_rank / args.per_device_train_batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / accumulation)
    total_steps = args.max_steps
    if total_steps <= 0:
        total_steps = math.ceil(args.num_train_epochs * steps_per_epoch)
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    signature = {name: getattr(args, name) for name in RESUME_SIGNATURE}
    signature |= {"world_size": dist.world_size, "total_steps": total_steps}
    optimizer, scheduler, state = common.optimizer_and_state(
        args, student, total_steps, checkpoint, signature, dist)
    if checkpoint is not None and dist.rank > 0:  # it holds rank 0's RNG state: keep dropouts apart
        common.set_seed(args.seed + dist.rank + 7919 * state["step"], args.deterministic)  # a prime
    model = common.ddp(student, dist, device)  # under torchrun: DDP averages the gradients
    # AD-KD: the training loop
    step = state["step"]
    start_time = time.time()
    first_step = step
    window_start = start_time  # a step line's throughput covers the steps since the last one
    window_tokens = 0
    running = {}
    running_count = 0
    stream = micro_batches(len(data["train"]), args, dist, state["epoch"], state["batches_done"])
    student.train()
    while step < total_steps:
        for micro in range(accumulation):
            epoch, batches_done, indices, epoch_ends = next(stream)
            rows = data["train"][indices]
            window_tokens += sum(map(len, rows["input_ids"]))  # real tokens, counted on the host
            batch = common.classification_batch(rows, tokenizer.pad_token_id, spec.is_regression,
                                                device)
            temperature = kd_temperature(args.temperature, args.kd_type, epoch, num_epochs)
            last_micro = micro == accumulation - 1 or epoch_ends
            # DDP averages gradients at the last micro-batch only
            sync = contextlib.nullcontext() if last_micro or not dist.enabled else model.no_sync()
            with sync:
                teacher_maps, teacher_logits = cache(batch, rows["index"])
                loss, terms = adkd_loss(model, batch, teacher_maps, teacher_logits,
                                        alpha=args.alpha, beta=args.beta, temperature=temperature,
                                        ig_steps=args.ig_steps, bf16=args.bf16)
                (loss / accumulation).backward()
            # tensors, read at logging steps only: reading one waits for the device
            for name, value in {"loss": loss.detach(), **terms}.items():
                running[name] = running.get(name, 0.0) + value / accumulation
            if epoch_ends:  # a short last group of the epoch is still stepped (as officially)
                break
        torch.nn.utils.clip_grad_norm_(student.parameters(), args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        running_count += 1
        if args.logging_steps and step % args.logging_steps == 0:
            mean = {name: float(value) / running_count for name, value in running.items()}
            terms_text = " ".join(f"{name} {value:.4g}" for name, value in mean.items())
            lr = scheduler.get_last_lr()[0]
            now = time.time()
            left = (now - start_time) / (step - first_step) * (total_steps - step)
            speed = common.progress(window_tokens, now - window_start, left)
            log(dist, f"step {step}/{total_steps} epoch {epoch} lr {lr:.2e} {terms_text} ({speed})")
            if tracker is not None:
                tracker.log({f"adkd/{name}": value for name, value in mean.items()}, step=step)
            running = {}
            running_count = 0
            window_start = now
            window_tokens = 0
        state.update(step=step, epoch=epoch, batches_done=batches_done)
        if epoch_ends or step == total_steps:  # dev scores each epoch, the best student kept
            metrics = dev_scores(student, eval_sets, tokenizer, args, device)
            scores = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            log(dist, f"epoch {epoch} dev: {scores}")
            common.keep_best(state, metrics, epoch, spec, student, tokenizer, args.output_dir, dist)
            student.train()
        if args.save_steps and step % args.save_steps == 0 and step < total_steps and dist.is_main:
            common.save_checkpoint(args.output_dir, step, student, tokenizer, optimizer, scheduler,
                                   state)
    # BOILERPLATE: outputs (keep_best saved the best student), results.json last
    results = {**state["best"], **{f"teacher_{k}": v for k, v in teacher_metrics.items()},
               "preset": args.preset, "best_epoch": state["best_epoch"], "train_steps": step,
               "train_runtime": round(time.time() - start_time, 1), "history": state["history"]}
    if dist.is_main:
        out_dir = Path(args.output_dir)
        if args.show_attributions > 0 and (out_dir / "config.json").is_file():
            best = AutoModelForSequenceClassification.from_pretrained(str(out_dir)).to(device)
            show_attributions(teacher, best, tokenizer, eval_sets["validation"], spec, args, device)
        common.write_json(out_dir / "results.json", results)
        after = state["best"]
        scores = ", ".join(f"{k} {teacher_metrics[k]:.4f} -> {v:.4f}" for k, v in after.items())
        print(f"\ndev, teacher -> best student (epoch {state['best_epoch']}): {scores}\nsaved the "
              f"best student, results.json and args.json in {out_dir}\nnext: python eval_tasks.py "
              f"--model {out_dir}")
    if tracker is not None:
        tracker.finish()
    if dist.enabled:
        torch.distributed.barrier()
    common.cleanup_distributed(dist)
    return results


def dev_scores(model, eval_sets, tokenizer, args: Args, device) -> dict:
    return common.classifier_scores(model, eval_sets, common.GLUE_TASKS[args.task],
                                    tokenizer.pad_token_id, args.per_device_eval_batch_size, device,
                                    args.bf16)


def show_attributions(teacher, student, tokenizer, eval_set, spec, args: Args, device) -> None:
    """The first dev examples' tokens, each with a shade per model (its gold-label map; darker =
    more important)."""
    batch = common.classification_batch(eval_set[:args.show_attributions], tokenizer.pad_token_id,
                                        spec.is_regression, device)
    labels = batch["labels"]
    mask = batch["attention_mask"]
    teacher_maps, _ = teacher_token_maps(teacher, batch, spec.num_labels, args.ig_steps, args.topk)
    gold_view = labels.long() if len(teacher_maps) > 1 else torch.zeros_like(labels).long()
    attributions, _ = integrated_gradients(student.eval(), batch["input_ids"], mask,
                                           batch.get("token_type_ids"), labels[None], args.ig_steps)
    maps = {"teacher": teacher_maps[gold_view, torch.arange(len(labels))],  # (B, T)
            "student": token_attribution(attributions[0], mask)}
    print(f"\ntoken attributions on dev (gold-label view, {args.ig_steps}-step IG; darker = more "
          f"important):")
    for i, gold in enumerate(labels.tolist()):
        gold_name = spec.label_names[gold] if spec.label_names else round(gold, 2)
        print(f"\n  example {i}: gold {gold_name}")
        ids = batch["input_ids"][i, :int(mask[i].sum())]
        tokens = tokenizer.convert_ids_to_tokens(ids.tolist())
        for start in range(0, len(tokens), 12):  # 12 tokens a line, then one shade row per model
            cells = [(token, len(token) + 1) for token in tokens[start:start + 12]]
            print(" " * 11 + "".join(token.ljust(width) for token, width in cells))
            for name, values in maps.items():  # each row scaled to its maximum
                top = max(values[i].max().item(), 1e-12)
                row = values[i, start:start + 12].tolist()
                shades = [" ▁▂▃▄▅▆▇█"[round(v / top * 8)] for v in row]
                line = "".join(shade.ljust(width) for shade, (_, width) in zip(shades, cells))
                print(f"  {name:<9}" + line)


# ==== APPENDIX A. SPEED-UP: the teacher's side once per example, not once per step ====
class TeacherCache:
    """The frozen teacher's maps and logits of each example, computed on first sight, per rank:
    the same every epoch (the teacher is in eval())."""

    def __init__(self, teacher, num_labels: int, ig_steps: int, topk: int | None, need_maps: bool,
                 bf16: bool):
        self.teacher = teacher
        self.num_labels = num_labels
        self.ig_steps = ig_steps
        self.topk = topk
        self.need_maps = need_maps
        self.bf16 = bf16
        self.maps = {}
        self.logits = {}  # by example index: (V, length), (C,)

    def __call__(self, batch: dict, indices: list[int] | None = None):
        """(maps (V, B, T) zero-padded, or None without L_attr; logits (B, C)) for a batch. indices:
        its example indices as a host list (None: read from batch["index"], a wait on a GPU)."""
        indices = batch["index"].tolist() if indices is None else indices
        missing = [j for j, i in enumerate(indices) if i not in self.logits]
        if missing:  # first sight of these examples: one teacher pass, cut to their own longest
            lengths = batch["attention_mask"][missing].sum(-1).tolist()  # read back once, here only
            T = max(lengths)
            new = {k: v[missing][:, :T] if v.dim() == 2 else v[missing] for k, v in batch.items()}
            if self.need_maps:
                maps, logits = teacher_token_maps(self.teacher, new, self.num_labels, self.ig_steps,
                                                  self.topk, self.bf16)  # (V, B', T')
            else:
                inputs = {k: new[k] for k in ("input_ids", "attention_mask", "token_type_ids")
                          if k in new}
                with torch.no_grad(), common.autocast(new["input_ids"].device, self.bf16):
                    logits = self.teacher(**inputs).logits
            for j, (index, length) in enumerate(zip([indices[m] for m in missing], lengths)):
                self.logits[index] = logits[j].detach().float()
                if self.need_maps:
                    self.maps[index] = maps[:, j, :length]
        logits = torch.stack([self.logits[i] for i in indices])
        if not self.need_maps:
            return None, logits
        T = batch["input_ids"].shape[1]
        maps = [F.pad(self.maps[i], (0, T - self.maps[i].shape[-1])) for i in indices]
        return torch.stack(maps, dim=1), logits


# ==== APPENDIX B. INPUT CHECKS: every input is read and checked before anything is written ====
def demo_data(args: Args) -> bool:
    """The offline demo's data: the demo preset, and no data given."""
    return args.preset == "demo" and not (args.data_dir or args.train_file or args.validation_file)


def check_args(args: Args) -> tuple:
    """Stops, in one line, at the first bad setting or model; returns (the checkpoint to resume,
    whether the model takes token types)."""
    spec = common.GLUE_TASKS[args.task]
    fail_if(demo_data(args) and args.task != "sst2",
            f"the demo data is SST-2-style; for {args.task} pass --data_dir or "
            f"--train_file/--validation_file")
    fail_if(args.kd_type not in ("kd", "kd_anneal"),
            f"--kd_type '{args.kd_type}' is not kd or kd_anneal")
    fail_if(args.ig_steps < 1, f"--ig_steps {args.ig_steps} must be at least 1")
    fail_if(args.track and importlib.util.find_spec("wandb") is None,
            "--track needs wandb (pip install wandb)")
    fail_if(not (args.student or args.student_layers),
            "no student: pass --student (a pretrained BERT) or --student_layers (e.g. "
            "0,2,4,7,9,11)")
    what, flag = ("teacher", "--teacher") if args.teacher else ("teacher base", "--teacher_base")
    config = common.from_pretrained(AutoConfig, args.teacher or args.teacher_base, what, flag)
    skeleton = common.encoder_skeleton(config)  # a model AD-KD cannot hook stops here
    architectures = config.architectures or []
    depth = len(common.transformer_blocks(skeleton))
    positions = common.max_positions(skeleton)
    classifier = any(a.endswith("ForSequenceClassification") for a in architectures)
    fail_if(args.teacher and not classifier,
            f"teacher '{args.teacher}' is not a fine-tuned sequence classifier ({architectures}); "
            f"pass one, or omit --teacher to fine-tune --teacher_base first")
    fail_if(args.teacher and config.num_labels != spec.num_labels,
            f"teacher '{args.teacher}' has num_labels={config.num_labels} but {spec.name} has "
            f"{spec.num_labels}; pass a teacher fine-tuned on {spec.name}")
    fail_if(args.max_seq_length > positions,
            f"--max_seq_length {args.max_seq_length} is longer than the teacher's {positions} "
            f"positions; pass a smaller value")
    layers = common.parse_layers(args.student_layers or "")
    fail_if(args.student_layers and (not layers or any(not 0 <= layer < depth for layer in layers)),
            f"--student_layers {args.student_layers} must list blocks of the teacher's "
            f"0..{depth - 1}")
    if args.student and not args.student_layers:  # a bad --student fails now, not after the teacher
        common.encoder_skeleton(common.from_pretrained(AutoConfig, args.student, "student",
                                                       "--student"))
    common.check_output_dir(args.output_dir, args.overwrite_output_dir,
                            args.resume_from_checkpoint is not None)
    checkpoint = common.resolve_resume(args.resume_from_checkpoint, args.output_dir)
    takes_types = "token_type_ids" in inspect.signature(skeleton.forward).parameters
    return checkpoint, takes_types


if __name__ == "__main__":
    common.run_cli(main, Args)
