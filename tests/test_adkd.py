"""Tests of adkd_distill.py: the attribution math against its definitions, the GLUE file layouts,
the metrics against known answers, and end-to-end runs on tiny random BERTs (hidden 32)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import adkd_distill as adkd
import common
from common import UserError
from conftest import ROOT, tiny_config

# ----------------------------------------------------------------------------------------------
# fixtures: tiny classifiers and GLUE files in the official layouts (made-up sentences)


def tiny_classifier(tokenizer_dir, num_labels: int, layers: int = 4, seed: int = 0):
    from transformers import AutoTokenizer, BertForSequenceClassification

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    model = BertForSequenceClassification(tiny_config(len(tok), layers=layers, num_labels=num_labels))
    return model.eval(), tok


@pytest.fixture(scope="module")
def teacher_dirs(tmp_path_factory, tokenizer_dir):
    """Saved tiny 'fine-tuned' teachers with 1, 2 and 3 labels (random weights)."""
    folders = {}
    for num_labels in (1, 2, 3):
        model, tok = tiny_classifier(tokenizer_dir, num_labels)
        folder = tmp_path_factory.mktemp(f"teacher{num_labels}")
        model.save_pretrained(str(folder))
        tok.save_pretrained(str(folder))
        folders[num_labels] = folder
    return folders


def batch_of(tok, texts, pairs=None):
    enc = tok(texts, pairs, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]


WORDS = "the film was good bad great terrible plot acting story love hate fun boring not very".split()


def sentence(rng, n=None):
    return " ".join(rng.choice(WORDS, size=n or int(rng.integers(3, 9))))


def write_glue(root: Path, task: str, n_train: int = 24, n_dev: int = 8, seed: int = 0) -> Path:
    """The task's folder in the official GLUE distribution layout."""
    rng = np.random.default_rng(seed)
    folder = root / common.GLUE_TASKS[task].folder
    folder.mkdir(parents=True, exist_ok=True)

    def rows(n, split):
        out = []
        for i in range(n):
            s1, s2 = sentence(rng), sentence(rng)
            y = int(rng.integers(2))
            if task == "cola":
                out.append(f"gj04\t{y}\t{'' if y else '*'}\t{s1} .")
            elif task == "sst2":
                out.append(f"{s1} \t{y}")
            elif task == "mrpc":
                out.append(f"{y}\t{1000 + i}\t{2000 + i}\t{s1}.\t{s2}.")
            elif task == "stsb":
                out.append(f"{i}\tmain-news\t2012\t0001\t{i:04d}\tnone\tnone\t{s1}\t{s2}\t{rng.uniform(0, 5):.3f}")
            elif task == "qqp":
                out.append(f"{i}\t{2 * i}\t{2 * i + 1}\t{s1}?\t{s2}?\t{y}")
            elif task == "mnli":
                gold = ["entailment", "neutral", "contradiction"][int(rng.integers(3))]
                parses = "\t".join(["( x )"] * 4)
                votes = "\t".join([gold] * (1 if split == "train" else 5))
                out.append(f"{i}\t{31193 + i}\t{31193 + i}n\tfiction\t{parses}\t{s1}\t{s2}\t{votes}\t{gold}")
            elif task in ("qnli", "rte"):
                out.append(f"{i}\t{s1}\t{s2}\t{['entailment', 'not_entailment'][y]}")
            elif task == "wnli":
                out.append(f"{i}\t{s1}\t{s2}\t{y}")
        return out

    headers = {
        "sst2": "sentence\tlabel", "mrpc": "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String",
        "stsb": "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
        "qqp": "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
        "qnli": "index\tquestion\tsentence\tlabel", "rte": "index\tsentence1\tsentence2\tlabel",
        "wnli": "index\tsentence1\tsentence2\tlabel",
    }
    mnli_head = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
                 "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\t")
    for split, name in common.GLUE_TASKS[task].files:
        if task == "mnli":
            header = [mnli_head + ("label1\tgold_label" if split == "train" else
                                   "label1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label")]
        else:
            header = [headers[task]] if task in headers else []  # CoLA has no header
        lines = header + rows(n_train if split == "train" else n_dev, split)
        (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


# ----------------------------------------------------------------------------------------------
# AD-KD math


def value_at(model, input_ids, attention_mask, token_type_ids, target, scale: float):
    """F_i with the embedding output multiplied by `scale` (0 = the IG baseline)."""
    handle = model.bert.embeddings.register_forward_hook(lambda m, i, o: o * scale)
    try:
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits
    finally:
        handle.remove()
    if logits.shape[-1] == 1:
        return (logits[:, 0] - target) ** 2
    return -torch.log_softmax(logits, -1).gather(-1, target[:, None])[:, 0]


def ig(model, input_ids, attention_mask, token_type_ids, target, **kwargs):
    """integrated_gradients for one view (B,) -> (B, T, H)."""
    views = target[None]  # (1, B)
    attributions, _ = adkd.integrated_gradients(model, input_ids, attention_mask, token_type_ids, views, **kwargs)
    return attributions[0]


@pytest.mark.parametrize("num_labels", [3, 1])
def test_ig_completeness_and_convergence(tokenizer_dir, num_labels):
    model, tok = tiny_classifier(tokenizer_dir, num_labels, seed=1)
    with torch.no_grad():
        # Freshly initialised BERT has zero biases, and a post-LayerNorm block with zero biases is
        # scale invariant: F(a x) = F(x) for every a > 0, so all of F(x) - F(0) would sit in a jump
        # at a = 0. Trained models have biases; give the fixture some (and a larger head).
        for name, p in model.named_parameters():
            if name.endswith("bias") and "LayerNorm" not in name:
                p.normal_(0, 0.5)
        model.classifier.weight.mul_(20)
    ids, mask, types = batch_of(tok, ["the film was very good", "a boring plot", "love it not"])
    target = torch.tensor([0, 2, 1]) if num_labels == 3 else torch.tensor([1.5, -0.5, 0.7])
    delta = value_at(model, ids, mask, types, target, 1.0) - value_at(model, ids, mask, types, target, 0.0)  # (B,)
    assert delta.abs().min() > 1e-2, "degenerate fixture"
    errors = {}
    for steps in (2, 8, 64):
        attributions = ig(model, ids, mask, types, target, steps=steps)  # (B, T, H)
        assert attributions.shape == (*ids.shape, model.config.hidden_size)
        errors[steps] = ((attributions.sum(dim=(1, 2)) - delta).abs() / delta.abs()).max().item()
    assert errors[64] < 0.03, errors
    assert errors[64] < errors[8] < errors[2], errors


def test_ig_one_step_is_gradient_times_input(tokenizer_dir):
    model, tok = tiny_classifier(tokenizer_dir, 3)
    ids, mask, types = batch_of(tok, ["the film was very good", "a boring plot"])
    target = torch.tensor([2, 0])
    out = model(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
    x = out.hidden_states[0]  # the embedding output, (B, T, H)
    F_i = -torch.log_softmax(out.logits, -1)[torch.arange(2), target]
    (grad,) = torch.autograd.grad(F_i.sum(), x)
    expected = grad * x
    got = ig(model, ids, mask, types, target, steps=1)
    torch.testing.assert_close(got, expected.detach(), rtol=1e-4, atol=1e-7)
    assert not got.requires_grad


def test_create_graph_trains_the_student(tokenizer_dir):
    model, tok = tiny_classifier(tokenizer_dir, 2)
    model.train()
    ids, mask, types = batch_of(tok, ["the film was very good", "a boring plot"])
    attributions = ig(model, ids, mask, types, torch.tensor([1, 0]), steps=2, create_graph=True)
    assert attributions.requires_grad
    teacher_map = torch.rand(ids.shape) * mask
    teacher_map = teacher_map / teacher_map.norm(dim=-1, keepdim=True)
    loss = adkd.attribution_loss(teacher_map, adkd.token_attribution(attributions, mask))
    loss.backward()
    # the gradient reaches the blocks only through d(attribution)/d(theta): second order
    grads = [p.grad for n, p in model.named_parameters() if "encoder.layer.1." in n]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert torch.isfinite(torch.stack([g.abs().sum() for g in grads])).all()


def test_token_attribution_topk_norm_and_padding():
    A = torch.tensor([[[3.0, -4.0, 0.0, 1.0], [0.5, 0.5, -2.0, 0.0], [9.0, 9.0, 9.0, 9.0]]])  # (1, 3, 4)
    mask = torch.tensor([[1, 1, 0]])
    got = adkd.token_attribution(A, mask, topk=2)
    raw = torch.tensor([5.0, math.sqrt(4.0 + 0.25), 0.0])  # top-2 |dims|: (4, 3) and (2, 0.5); pad -> 0
    torch.testing.assert_close(got[0], raw / raw.norm())
    assert got[0, 2] == 0
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(1))
    everything = adkd.token_attribution(A, mask)  # student side: all dimensions
    raw_all = torch.tensor([math.sqrt(26.0), math.sqrt(4.5), 0.0])
    torch.testing.assert_close(everything[0], raw_all / raw_all.norm())
    assert torch.equal(adkd.token_attribution(A, mask, topk=4), everything)


def test_attribution_loss_values():
    t = torch.tensor([[0.6, 0.8, 0.0], [1.0, 0.0, 0.0]])
    assert adkd.attribution_loss(t, t.clone()).item() == 0.0
    s = torch.tensor([[0.8, 0.6, 0.0], [0.0, 1.0, 0.0]])
    expected = (0.04 + 0.04 + 1.0 + 1.0) / 3  # summed squared error / 3 non-zero teacher entries
    assert adkd.attribution_loss(t, s).item() == pytest.approx(expected)


def test_two_class_views_are_the_same_map(tokenizer_dir):
    model, tok = tiny_classifier(tokenizer_dir, 2)
    ids, mask, types = batch_of(tok, ["the film was very good", "a boring plot"])
    maps = [adkd.token_attribution(ig(model, ids, mask, types, torch.full((2,), c)), mask)
            for c in (0, 1)]
    torch.testing.assert_close(maps[0], maps[1], rtol=1e-4, atol=1e-6)
    assert len(adkd.view_targets(torch.tensor([1, 0]), 2)) == 1
    assert [v.tolist() for v in adkd.view_targets(torch.tensor([1, 0]), 3)] == [[0, 0], [1, 1], [2, 2]]


def test_kd_and_temperature():
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    p = torch.softmax(t / 2, -1)
    expected = -(p * torch.log_softmax(s / 2, -1)).sum(-1).mean()
    torch.testing.assert_close(adkd.kd_loss(s, t, 2.0), expected)
    assert adkd.kd_loss(s[:, :1], t[:, :1], 2.0).item() == pytest.approx(((s[:, 0] - t[:, 0]) ** 2).mean().item() / 4)
    assert [adkd.kd_temperature(4.0, "kd_anneal", e, 4) for e in range(4)] == [4.0, 3.0, 2.0, 1.0]
    assert adkd.kd_temperature(4.0, "kd", 3, 4) == 4.0


def test_teacher_cache_matches_direct_computation(tokenizer_dir):
    teacher, tok = tiny_classifier(tokenizer_dir, 3)
    teacher.requires_grad_(False)
    ids, mask, types = batch_of(tok, ["the film was very good", "a boring plot", "fun"])
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types,
             "labels": torch.tensor([0, 1, 2]), "index": torch.tensor([7, 3, 5])}
    cache = adkd.TeacherCache(teacher, 3, ig_steps=2, topk=20, need_maps=True, bf16=False)
    maps, logits = cache(batch)
    assert maps.shape == (3, 3, ids.shape[1]) and logits.shape == (3, 3)
    for c in range(3):
        direct = adkd.token_attribution(
            ig(teacher, ids, mask, types, torch.full((3,), c), steps=2), mask, topk=20)
        torch.testing.assert_close(maps[c], direct, rtol=1e-4, atol=1e-6)
    # a later batch with other padding reuses the entries: no teacher call
    calls = []
    handle = teacher.register_forward_hook(lambda *a: calls.append(1))
    rows = [2, 0]  # the same examples in another batch, padded to their own longest
    T = int(mask[rows].sum(-1).max())
    reordered = {k: v[rows][:, :T] if v.dim() == 2 else v[rows] for k, v in batch.items()}
    maps2, logits2 = cache(reordered)
    handle.remove()
    assert not calls
    torch.testing.assert_close(maps2[:, 1], maps[:, 0, :maps2.shape[-1]])
    torch.testing.assert_close(logits2, logits[[2, 0]])


def test_adkd_loss_terms(tokenizer_dir):
    """adkd_loss = (1 - a) CE + a KD + b * sum over the 3 views of attribution_loss; L_attr = 0 when
    the teacher is the student itself (dropout off so train mode is deterministic)."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(0)
    config = tiny_config(len(tok), layers=2, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    student = BertForSequenceClassification(config).train()
    student.set_attn_implementation("eager")  # as load_student: double backward through attention
    ids, mask, types = batch_of(tok, ["the film was very good", "a boring plot", "fun"])
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types,
             "labels": torch.tensor([0, 2, 1]), "index": torch.arange(3)}
    same = adkd.TeacherCache(student, 3, ig_steps=1, topk=None, need_maps=True, bf16=False)
    maps, logits = same(batch)
    loss, terms = adkd.adkd_loss(student, batch, maps, logits, alpha=0.5, beta=10.0, temperature=2.0)
    assert terms["attr"].item() < 1e-10
    ce = torch.nn.functional.cross_entropy(logits, batch["labels"])
    torch.testing.assert_close(terms["ce"], ce)
    torch.testing.assert_close(loss.detach(), 0.5 * ce + 0.5 * adkd.kd_loss(logits, logits, 2.0) + 10 * terms["attr"])

    other, _ = tiny_classifier(tokenizer_dir, 3, layers=2, seed=5)
    t_maps, t_logits = adkd.TeacherCache(other.requires_grad_(False), 3, 1, None, True, False)(batch)
    loss, terms = adkd.adkd_loss(student, batch, t_maps, t_logits, alpha=0.5, beta=10.0, temperature=2.0)
    expected = sum(adkd.attribution_loss(t_maps[c], maps[c]) for c in range(3))
    assert terms["attr"].item() > 1e-7  # random tiny models have similar maps: compare relatively
    torch.testing.assert_close(terms["attr"], expected, rtol=1e-4, atol=0.0)
    loss.backward()
    assert student.bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# data and metrics


@pytest.mark.parametrize("task", list(common.GLUE_TASKS))
def test_every_glue_layout_parses(tmp_path, task):
    write_glue(tmp_path, task, n_train=6, n_dev=4)
    spec = common.GLUE_TASKS[task]
    data = common.load_glue(task, data_dir=str(tmp_path))
    assert list(data) == [split for split, _ in spec.files]
    for split in data:
        assert data[split].column_names == [*spec.sentence_keys, "label"]
        assert len(data[split]) == (6 if split == "train" else 4)
        assert all(isinstance(s, str) and s for k in spec.sentence_keys for s in data[split][k])
    labels = data["train"]["label"]
    if spec.is_regression:
        assert all(0.0 <= y <= 5.0 for y in labels)
    else:
        assert set(labels) <= set(range(spec.num_labels))


def test_glue_label_strings_map_to_hub_ids(tmp_path):
    folder = write_glue(tmp_path, "rte", n_train=2, n_dev=2)
    (folder / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta b\tc\tentailment\n"
                                      "1\td e\tf\tnot_entailment\n")
    assert common.load_glue("rte", data_dir=str(tmp_path))["train"]["label"] == [0, 1]


def test_glue_metrics_known_answers():
    m = common.glue_metrics("mrpc", [1, 1, 0, 0, 1], [1, 0, 0, 1, 1])
    assert m["accuracy"] == pytest.approx(0.6) and m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) with TP=2, TN=1, FP=1, FN=1
    assert common.glue_metrics("cola", [1, 1, 0, 0, 1], [1, 0, 0, 1, 1])["matthews_correlation"] == \
        pytest.approx((2 * 1 - 1 * 1) / math.sqrt(3 * 3 * 2 * 2))
    s = common.glue_metrics("stsb", [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0])
    assert s["spearmanr"] == pytest.approx(0.8) and s["pearson"] == pytest.approx(0.8)
    assert common.glue_metrics("mnli", [0, 1, 2, 2], [0, 1, 1, 2]) == {"accuracy": 0.75}
    scipy_stats = pytest.importorskip("scipy.stats")
    x, y = np.random.default_rng(0).normal(size=(2, 50))
    s = common.glue_metrics("stsb", x, np.round(y, 1))
    assert s["spearmanr"] == pytest.approx(scipy_stats.spearmanr(x, np.round(y, 1))[0])


# ----------------------------------------------------------------------------------------------
# end to end


def tiny_args(tmp_path, task, teacher_dir, **kw):
    write_glue(tmp_path / "glue", task)
    base = dict(task=task, preset="paper", data_dir=str(tmp_path / "glue"), teacher=str(teacher_dir),
                student_layers="0,2", output_dir=str(tmp_path / "out"), max_seq_length=32,
                per_device_train_batch_size=8, num_train_epochs=2.0, logging_steps=1, save_steps=0,
                ig_steps=2, show_attributions=1)
    base.update(kw)
    return adkd.Args(**base)


def run_cli(args: list[str], cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "adkd_distill.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("task,num_labels,keys", [
    ("sst2", 2, ["eval_accuracy"]),
    ("mnli", 3, ["eval_accuracy", "eval_accuracy_mm"]),
    ("stsb", 1, ["eval_pearson", "eval_spearmanr"]),
])
def test_cli_end_to_end(tmp_path, teacher_dirs, task, num_labels, keys):
    """Binary, 3-class (multi-view, kd_anneal, matched + mismatched) and regression from the command line."""
    write_glue(tmp_path / "glue", task)
    out = tmp_path / "out"
    proc = run_cli(["--task", task, "--preset", "paper", "--data_dir", str(tmp_path / "glue"),
                    "--teacher", str(teacher_dirs[num_labels]), "--student_layers", "0,2", "--output_dir", str(out),
                    "--max_seq_length", "32", "--per_device_train_batch_size", "8", "--num_train_epochs", "2",
                    "--logging_steps", "1", "--save_steps", "0", "--ig_steps", "2"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    for k in keys:
        assert isinstance(results[k], float) and isinstance(results["teacher_" + k], float)
    assert results["train_steps"] == 6 and results["best_epoch"] in (0, 1)
    log = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert len(log) == 6 and all(" ce " in line and " kd " in line and " attr " in line for line in log)
    attr = [float(line.split(" attr ")[1].split()[0]) for line in log]
    assert all(math.isfinite(a) and a > 0 for a in attr)
    assert "teacher" in proc.stdout and "student" in proc.stdout and "example 0" in proc.stdout
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    student = AutoModelForSequenceClassification.from_pretrained(str(out))
    assert student.config.num_hidden_layers == 2 and student.config.num_labels == num_labels
    assert len(AutoTokenizer.from_pretrained(str(out))) > 100
    assert json.loads((out / "args.json").read_text())["task"] == task


def test_resume_is_exact_mid_epoch(tmp_path, teacher_dirs):
    """Straight run to step 5 (3 steps per epoch) vs the same run resumed from its step-2 checkpoint
    (mid-epoch): identical weights at step 4 (dropout RNG, data order, schedule, and the teacher
    cache refilled from cold all line up)."""
    from safetensors.torch import load_file

    a, b = tmp_path / "a", tmp_path / "b"
    adkd.main(tiny_args(tmp_path, "sst2", teacher_dirs[2], output_dir=str(a), max_steps=5, save_steps=2,
                        show_attributions=0))
    adkd.main(tiny_args(tmp_path, "sst2", teacher_dirs[2], output_dir=str(b), max_steps=5, save_steps=2,
                        show_attributions=0, resume_from_checkpoint=str(a / "checkpoint-2")))
    wa, wb = load_file(str(a / "checkpoint-4/model.safetensors")), load_file(str(b / "checkpoint-4/model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    start = load_file(str(a / "checkpoint-2/model.safetensors"))
    assert any(not torch.equal(start[k], wa[k]) for k in wa)  # it did train after step 2
    assert not (b / "checkpoint-2").exists()  # b started at step 2


def test_teacher_is_fine_tuned_when_not_given(tmp_path, tiny_mlm_dir):
    """No --teacher: --teacher_base is fine-tuned first and saved; the student is a pretrained BERT
    (--student) with a new head rather than teacher layers."""
    from transformers import AutoConfig

    args = tiny_args(tmp_path, "rte", tiny_mlm_dir, teacher=None, teacher_base=str(tiny_mlm_dir),
                     student=str(tiny_mlm_dir), student_layers=None, teacher_epochs=1.0, teacher_batch_size=8,
                     num_train_epochs=1.0, show_attributions=0)
    results = adkd.main(args)
    teacher_config = AutoConfig.from_pretrained(str(tmp_path / "out/teacher"))
    assert teacher_config.architectures == ["BertForSequenceClassification"] and teacher_config.num_labels == 2
    assert "teacher_eval_accuracy" in results and "eval_accuracy" in results
    assert AutoConfig.from_pretrained(str(tmp_path / "out")).num_hidden_layers == 4


# ----------------------------------------------------------------------------------------------
# bad input: one line, exit 2, no traceback, nothing written


def test_cli_unknown_task(tmp_path):
    proc = run_cli(["--task", "sst5", "--output_dir", str(tmp_path / "out")], cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "unknown GLUE task 'sst5'" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("problem", ["missing_files", "bad_label", "num_labels", "not_a_classifier"])
def test_bad_input_is_one_user_error_and_writes_nothing(tmp_path, teacher_dirs, tiny_mlm_dir, problem):
    args = tiny_args(tmp_path, "mnli", teacher_dirs[3])
    folder = tmp_path / "glue" / "MNLI"
    if problem == "missing_files":
        (folder / "dev_mismatched.tsv").unlink()
        message = "dev_mismatched.tsv is missing"
    elif problem == "bad_label":
        text = (folder / "train.tsv").read_text().splitlines()
        text[3] = text[3].rsplit("\t", 1)[0] + "\tmaybe"
        (folder / "train.tsv").write_text("\n".join(text) + "\n")
        message = "label 'maybe' is not a mnli label"
    elif problem == "num_labels":
        args.teacher = str(teacher_dirs[2])
        message = "num_labels=2 but mnli has 3"
    else:
        args.teacher = str(tiny_mlm_dir)
        message = "not a fine-tuned sequence classifier"
    with pytest.raises(UserError) as info:
        adkd.main(args)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()
