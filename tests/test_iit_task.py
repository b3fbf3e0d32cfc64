"""iit_distill.py on a fine-tuned classifier (--task sst2 ... wnli), and interchange-intervention agreement."""

import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertForMaskedLM

import common
import iit_distill as iit
from conftest import tiny_config
from test_adkd import write_glue


def classifier(tokenizer_dir, num_labels, layers=4, seed=0, dropout=0.0):
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = tiny_config(len(tok), layers=layers, num_labels=num_labels, hidden_dropout_prob=dropout,
                         attention_probs_dropout_prob=dropout)
    model = BertForSequenceClassification(config).eval()
    with torch.no_grad():  # weights of a trained model's size, so that every block changes the logits
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model, tok


@pytest.fixture(scope="module")
def teacher_dirs(tmp_path_factory, tokenizer_dir):
    """Saved tiny 'fine-tuned' classifiers with 1, 2 and 3 labels."""
    folders = {}
    for num_labels in (1, 2, 3):
        model, tok = classifier(tokenizer_dir, num_labels)
        folders[num_labels] = tmp_path_factory.mktemp(f"classifier{num_labels}")
        model.save_pretrained(str(folders[num_labels]))
        tok.save_pretrained(str(folders[num_labels]))
    return folders


def task_batch(tok, spec_name="sst2", swap_own=False, seed=0):
    """A make_task_batch batch of 4 examples (pairs for MNLI), their sources, padding on both sides."""
    import datasets

    spec = common.GLUE_TASKS[spec_name]
    rng = np.random.default_rng(seed)
    words = "the film was good bad great terrible plot acting story love hate fun boring not very".split()
    rows = {key: [" ".join(rng.choice(words, size=int(rng.integers(2, 9)))) for _ in range(6)]
            for key in spec.sentence_keys}
    rows["label"] = [float(x) for x in rng.uniform(0, 5, 6)] if spec.is_regression else \
        [int(x) for x in rng.integers(spec.num_labels, size=6)]
    data = common.tokenize_glue(datasets.DatasetDict(train=datasets.Dataset.from_dict(rows)), tok, spec, 32, True)
    source_of = np.arange(6) if swap_own else np.array([3, 4, 5, 0, 1, 2])
    args = iit.Args(task=spec_name, interchange_prop=0.5, preset="demo")
    iit.resolve_args(args)
    batch = iit.make_task_batch(data["train"], [0, 1, 2, 3], source_of, tok, args, True,
                                generator=torch.Generator().manual_seed(seed))
    if swap_own:  # the same positions in base and source: the intervention writes each state back in place
        batch["source_swap"] = batch["base_swap"].clone()
    return batch


def test_task_loss_against_a_hand_computation(teacher_dirs):
    teacher = AutoModelForSequenceClassification.from_pretrained(str(teacher_dirs[3])).eval()
    tok = AutoTokenizer.from_pretrained(str(teacher_dirs[3]))
    student = common.init_student_from_teacher(teacher, [0, 3]).eval()
    batch = task_batch(tok, "mnli")
    defaults = iit.Args(task="mnli", preset="demo")  # the task path's: a_ce 0.7, a_task 0.3, a_iit 1, T 20
    iit.resolve_args(defaults)
    assert (defaults.alpha_ce, defaults.alpha_task, defaults.alpha_iit, defaults.temperature) == (0.7, 0.3, 1.0, 20.0)
    weights = dict(temperature=2.0, alpha_ce=0.6, alpha_task=0.4, alpha_iit=0.5)
    group = ((1, 2), (1,))
    loss, terms = iit.task_distillation_loss(student, teacher, batch, group, **weights)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    z_t, z_s = teacher(**inputs).logits.double(), student(**inputs).logits.double()
    T = 2.0
    p_t = torch.softmax(z_t / T, -1)
    kl = ((p_t * (p_t.log() - torch.log_softmax(z_s / T, -1))).sum(-1).mean() * T * T).float()
    ce = F.cross_entropy(z_s, batch["labels"]).float()
    assert kl > 1e-3  # the fixture's models differ
    torch.testing.assert_close(terms["ce"], kl, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(terms["task"], ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, 0.6 * kl + 0.4 * ce + 0.5 * terms["iit"], rtol=1e-4, atol=1e-6)
    assert terms["iit"] > 0 and not torch.isclose(terms["iit"], terms["ce"])
    # regression (STS-B): (z_s - z_t)^2 in place of T^2 KL, MSE with the gold score in place of CE
    teacher1 = AutoModelForSequenceClassification.from_pretrained(str(teacher_dirs[1])).eval()
    student1 = common.init_student_from_teacher(teacher1, [0, 3]).eval()
    batch1 = task_batch(tok, "stsb")
    _, terms1 = iit.task_distillation_loss(student1, teacher1, batch1, None)
    inputs1 = {k: batch1[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    y_t, y_s = teacher1(**inputs1).logits[:, 0], student1(**inputs1).logits[:, 0]
    torch.testing.assert_close(terms1["ce"], ((y_s - y_t) ** 2).mean(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(terms1["task"], ((y_s - batch1["labels"]) ** 2).mean(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("schedule", ["fast", "plain"])
def test_swapping_in_the_bases_own_states_makes_iit_equal_kd(teacher_dirs, schedule):
    runs = {"fast": iit.base_and_counterfactual, "plain": iit.base_source_counterfactual}[schedule]
    """The source is the base and the swap writes each state back where it came from: the intervention is the
    identity, so the counterfactual KL equals the plain KD term."""
    teacher = AutoModelForSequenceClassification.from_pretrained(str(teacher_dirs[2])).eval()
    tok = AutoTokenizer.from_pretrained(str(teacher_dirs[2]))
    student = common.init_student_from_teacher(teacher, [0, 3]).eval()
    batch = task_batch(tok, "sst2", swap_own=True)
    assert batch["base_swap"].any() and not batch["attention_mask"].all()
    for group in iit.alignments("full", 4, 2):
        _, terms = iit.task_distillation_loss(student, teacher, batch, group, runs=runs)
        torch.testing.assert_close(terms["iit"], terms["ce"], rtol=1e-5, atol=1e-6)
    other = task_batch(tok, "sst2")  # real sources: the intervention changes the outputs
    _, terms = iit.task_distillation_loss(student, teacher, other, ((2, 3), (1,)), runs=runs)
    assert not torch.isclose(terms["iit"], terms["ce"], rtol=1e-3)


def test_agreement_is_one_for_the_teacher_itself_and_an_identical_student(teacher_dirs, tokenizer_dir):
    teacher = AutoModelForSequenceClassification.from_pretrained(str(teacher_dirs[3])).eval()
    tok = AutoTokenizer.from_pretrained(str(teacher_dirs[3]))
    batches = [task_batch(tok, "mnli", seed=s) for s in range(3)]
    same_blocks = [((0,), (0,)), ((1, 2), (1, 2)), ((3,), (3,))]
    copy = common.init_student_from_teacher(teacher, [0, 1, 2, 3])
    for student in (teacher, copy):
        for runs in (iit.base_and_counterfactual, iit.base_source_counterfactual):
            assert iit.interchange_agreement(teacher, student, batches, same_blocks, runs) == \
                {"counterfactual": 1.0, "plain": 1.0}
    other, _ = classifier(tokenizer_dir, 3, seed=7)  # another model disagrees somewhere
    found = iit.interchange_agreement(teacher, other, batches, same_blocks)
    assert found["counterfactual"] < 1.0 and found["plain"] < 1.0
    # MLM: over the masked positions only; the teacher against itself agrees everywhere
    torch.manual_seed(0)
    mlm = BertForMaskedLM(tiny_config(len(tok), layers=4)).eval()
    ids = batches[0]["input_ids"]
    labels = torch.where(batches[0]["attention_mask"].bool() & (torch.rand(ids.shape) < 0.5), ids, -100)
    mlm_batch = {**batches[0], "labels": labels}
    assert iit.interchange_agreement(mlm, mlm, [mlm_batch], same_blocks) == {"counterfactual": 1.0, "plain": 1.0}
    half = common.init_student_from_teacher(mlm, [0, 3])
    found = iit.interchange_agreement(mlm, half, [mlm_batch], [((0, 1), (0,)), ((2, 3), (1,))])
    assert 0.0 <= found["counterfactual"] <= 1.0 and 0.0 <= found["plain"] <= 1.0


def run_args(tmp_path, task, teacher_dir, **kw):
    write_glue(tmp_path / "glue", task, n_train=24, n_dev=8)
    base = dict(task=task, preset="paper", data_dir=str(tmp_path / "glue"), teacher=str(teacher_dir),
                student_from="teacher", student_layers="0,3", output_dir=str(tmp_path / "out"), max_seq_length=32,
                per_device_train_batch_size=8, num_train_epochs=2.0, logging_steps=1, save_steps=0)
    return iit.Args(**{**base, **kw})


@pytest.mark.parametrize("task,num_labels,keys", [("sst2", 2, ["eval_accuracy"]),
                                                  ("mnli", 3, ["eval_accuracy", "eval_accuracy_mm"]),
                                                  ("stsb", 1, ["eval_pearson", "eval_spearmanr"])])
def test_task_runs_write_the_best_student_and_agreement(tmp_path, teacher_dirs, task, num_labels, keys):
    results = iit.main(run_args(tmp_path, task, teacher_dirs[num_labels]))
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["train_steps"] == 6 and saved["best_epoch"] in (0, 1) and len(saved["history"]) == 2
    for key in keys:
        assert math.isfinite(saved[key]) and math.isfinite(saved[f"teacher_{key}"])
    for key in ("interchange_agreement", "plain_agreement", "interchange_agreement_before", "plain_agreement_before"):
        assert 0.0 <= saved[key] <= 1.0 and saved[key] == results[key]
    best = max(saved["history"], key=lambda h: common.selection_score(common.GLUE_TASKS[task], h))
    assert {k: best[k] for k in keys} == {k: saved[k] for k in keys}  # the saved student is the best epoch's
    student = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "out"))
    assert student.config.num_hidden_layers == 2 and student.config.num_labels == num_labels


def test_task_resume_reproduces_the_straight_run(tmp_path, teacher_dirs):
    from safetensors.torch import load_file

    a, b = tmp_path / "a", tmp_path / "b"
    straight = iit.main(run_args(tmp_path, "sst2", teacher_dirs[2], output_dir=str(a), max_steps=5, save_steps=2))
    shutil.copytree(a / "checkpoint-2", b / "checkpoint-2")  # an interrupted run, resumed in its own folder
    resumed = iit.main(run_args(tmp_path, "sst2", teacher_dirs[2], output_dir=str(b), max_steps=5, save_steps=2,
                                resume_from_checkpoint="latest"))
    wa, wb = (load_file(str(run / "checkpoint-4" / "model.safetensors")) for run in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert resumed["history"] == straight["history"] and resumed["train_loss"] == pytest.approx(straight["train_loss"])


@pytest.mark.parametrize("problem", ["task", "no head", "labels", "masked mode", "mlm flag",
                                     "demo teacher, own data", "resume elsewhere"])
def test_task_bad_input_is_one_line_and_writes_nothing(tmp_path, teacher_dirs, tiny_mlm_dir, problem):
    task, kw, message = {
        "task": ("sst2", dict(task="sst5"), "pass --task mlm (masked-LM distillation) or a GLUE task"),
        "no head": ("sst2", dict(teacher=str(tiny_mlm_dir)), "has no trained classification head"),
        "labels": ("mnli", {}, "num_labels=2 but mnli has 3"),
        "masked mode": ("sst2", dict(interchange_mode="masked"), "--interchange_mode masked"),
        "mlm flag": ("sst2", dict(alpha_cos=0.5), "--alpha_cos does not apply to --task sst2"),
        "demo teacher, own data": ("sst2", dict(teacher=None, preset="demo"), "pass --teacher, a classifier"),
        "resume elsewhere": ("sst2", dict(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2")),
                             "the best student so far is in the run folder"),
    }[problem]
    (tmp_path / "a" / "checkpoint-2").mkdir(parents=True)  # another run's checkpoint, in name only
    for name in ("model.safetensors", "training_state.pt"):
        (tmp_path / "a" / "checkpoint-2" / name).touch()
    args = run_args(tmp_path, task, teacher_dirs[2], **{k: v for k, v in kw.items() if k != "task"})
    args.task = kw.get("task", task)
    with pytest.raises(common.UserError, match=re.escape(message)) as info:
        iit.main(args)
    assert "\n" not in str(info.value) and not (tmp_path / "out").exists()


# ---- the authors' task-level setting: whole sources, --student_from, in-batch pairing, their KL normalisation -----

def test_a_source_longer_than_every_base_row_is_not_cut(teacher_dirs):
    import datasets

    tok = AutoTokenizer.from_pretrained(str(teacher_dirs[2]))
    spec = common.GLUE_TASKS["sst2"]
    rows = {"sentence": ["good", "bad film", "a very good film with a terrible plot and boring acting but fun"],
            "label": [1, 0, 1]}
    data = common.tokenize_glue(datasets.DatasetDict(train=datasets.Dataset.from_dict(rows)), tok, spec, 32, True)
    train = data["train"]
    settings = iit.Args(task="sst2", preset="demo")
    iit.resolve_args(settings)
    batch = iit.make_task_batch(train, [0, 1], {0: 2, 1: 2}, tok, settings, True,
                                generator=torch.Generator().manual_seed(0))
    source = train[2]["input_ids"]
    assert len(source) > max(len(train[i]["input_ids"]) for i in (0, 1))
    for row in range(2):  # the whole source, its last word and [SEP] included, reaches the source run
        n = int(batch["source_attention_mask"][row].sum())
        assert batch["source_input_ids"][row, :n].tolist() == source and source[-1] == tok.sep_token_id
    assert batch["input_ids"].shape == batch["source_input_ids"].shape  # the base rows padded to the source's length
    teacher = AutoModelForSequenceClassification.from_pretrained(str(teacher_dirs[2])).eval()
    alone = common.classification_batch(train[[0, 1]], tok.pad_token_id, False, "cpu")
    with torch.no_grad():  # the base run does not change with the extra padding
        torch.testing.assert_close(iit.base_source_counterfactual(teacher, batch)[0],
                                   teacher(**iit.model_inputs(alone)).logits, rtol=1e-5, atol=1e-6)
        for group in iit.alignments("full", 4, 2):  # and both schedules agree on such a batch
            fast, plain = iit.base_and_counterfactual(teacher, batch, group[0]), \
                iit.base_source_counterfactual(teacher, batch, group[0])
            torch.testing.assert_close(fast[0], plain[0], rtol=1e-4, atol=1e-5)


def test_student_from_copies_a_pretrained_models_blocks_and_a_new_classifier(teacher_dirs, tiny_mlm_dir, tmp_path,
                                                                              tokenizer_dir):
    teacher = AutoModelForSequenceClassification.from_pretrained(str(teacher_dirs[3]))
    args = iit.Args(task="mnli", student_from=str(tiny_mlm_dir), student_layers="1,3", seed=5)
    student, groups = iit.student_and_groups(args, teacher, AutoModelForSequenceClassification, "cpu",
                                             common.Dist(), num_labels=3)
    pretrained = BertForMaskedLM.from_pretrained(str(tiny_mlm_dir)).state_dict()
    weights = student.state_dict()
    for key, value in weights.items():
        if key.startswith("bert.embeddings."):
            assert torch.equal(value, pretrained[key]), key
        elif key.startswith("bert.encoder.layer."):
            i = int(key.split(".")[3])
            assert torch.equal(value, pretrained[key.replace(f"layer.{i}.", f"layer.{[1, 3][i]}.", 1)]), key
    assert student.config.num_labels == 3 and groups == iit.alignments("full", 4, 2)
    assert not torch.equal(weights["classifier.weight"], teacher.state_dict()["classifier.weight"])  # new
    again, _ = iit.student_and_groups(args, teacher, AutoModelForSequenceClassification, "cpu", common.Dist(),
                                      num_labels=3)  # the new classifier is drawn from --seed
    assert torch.equal(again.state_dict()["classifier.weight"], weights["classifier.weight"])
    # mlm: the MLM head comes from the pretrained model too
    mlm_teacher = BertForMaskedLM.from_pretrained(str(teacher_dirs[3]), ignore_mismatched_sizes=True)
    mlm_student, _ = iit.student_and_groups(iit.Args(task="mlm", student_from=str(tiny_mlm_dir), student_layers="0"),
                                            mlm_teacher, BertForMaskedLM, "cpu", common.Dist())
    head = {k: v for k, v in mlm_student.state_dict().items() if k.startswith("cls.")}
    assert head and all(torch.equal(v, pretrained[k]) for k, v in head.items())
    _, tok = classifier(tokenizer_dir, 3)  # another width: refused in one line
    config = tiny_config(len(tok), num_labels=3)
    config.hidden_size = 48
    wide = AutoModelForSequenceClassification.from_config(config)
    wide.save_pretrained(str(tmp_path / "wide"))
    with pytest.raises(common.UserError, match="of width 48") as info:
        iit.student_and_groups(iit.Args(task="mnli", student_from=str(tmp_path / "wide"), student_layers="0"),
                               teacher, AutoModelForSequenceClassification, "cpu", common.Dist(), num_labels=3)
    assert "\n" not in str(info.value)


def test_in_batch_pairing_is_fresh_each_step_and_the_same_after_a_resume(tmp_path, teacher_dirs, monkeypatch):
    indices = list(range(10, 26))
    pairs = [iit.in_batch_sources(indices, 56, step, 0) for step in range(4)]
    assert all(sorted(p.values()) == indices and list(p) == indices for p in pairs)  # a permutation of the batch
    assert len({tuple(p.values()) for p in pairs}) == 4 and pairs[0] == iit.in_batch_sources(indices, 56, 0, 0)
    seen, original = {}, iit.in_batch_sources

    def record(run):
        def sources(indices, seed, step, micro):
            seen.setdefault(run, {})[(step, micro)] = original(indices, seed, step, micro)
            return seen[run][(step, micro)]
        return sources

    a, b = tmp_path / "a", tmp_path / "b"
    monkeypatch.setattr(iit, "in_batch_sources", record("straight"))
    iit.main(run_args(tmp_path, "sst2", teacher_dirs[2], output_dir=str(a), max_steps=5, save_steps=2,
                      source_pairing="batch"))
    shutil.copytree(a / "checkpoint-2", b / "checkpoint-2")
    monkeypatch.setattr(iit, "in_batch_sources", record("resumed"))
    iit.main(run_args(tmp_path, "sst2", teacher_dirs[2], output_dir=str(b), max_steps=5, save_steps=2,
                      source_pairing="batch", resume_from_checkpoint="latest"))
    assert sorted(seen["resumed"]) == [(step, 0) for step in (2, 3, 4)]
    assert all(seen["resumed"][key] == seen["straight"][key] for key in seen["resumed"])


def test_the_paper_preset_is_the_authors_setting_with_their_kl_normalisation(teacher_dirs, tmp_path):
    args = iit.Args(task="mnli", preset="paper", output_dir=str(tmp_path / "out"), teacher="x")
    iit.resolve_args(args)
    assert (args.student_from, args.student_layers) == ("google-bert/bert-base-uncased", "0,1,2,3,4,5")
    assert (args.interchange_mode, args.source_pairing, args.kl_reduction) == ("random", "batch", "mean")
    assert (args.alpha_ce, args.alpha_task, args.alpha_iit, args.temperature) == (0.7, 0.3, 1.0, 20.0)
    assert (args.weight_decay, args.adam_beta2, args.adam_epsilon, args.warmup_ratio, args.max_grad_norm) == \
        (0.01, 0.999, 1e-6, 0.1, 1.0)
    assert (args.per_device_train_batch_size, args.learning_rate, args.num_train_epochs, args.max_seq_length) == \
        (32, 2e-5, 5.0, 128)
    given = iit.Args(task="mnli", preset="paper", output_dir=str(tmp_path / "out"), teacher="x",
                     interchange_mode="consecutive", kl_reduction="batchmean")
    iit.resolve_args(given)  # a flag given explicitly wins over the preset
    assert (given.interchange_mode, given.kl_reduction, given.source_pairing) == ("consecutive", "batchmean", "batch")
    # one step's loss against the authors' normalisation: T^2 KLDivLoss(reduction='mean') over batch x classes
    teacher = AutoModelForSequenceClassification.from_pretrained(str(teacher_dirs[3])).eval()
    student = common.init_student_from_teacher(teacher, [0, 3]).eval()
    with torch.no_grad():
        student.classifier.weight.add_(0.5 * torch.randn_like(student.classifier.weight))
    batch, group = task_batch(AutoTokenizer.from_pretrained(str(teacher_dirs[3])), "mnli"), ((1, 2), (1,))
    loss, terms = iit.task_distillation_loss(student, teacher, batch, group, **iit.loss_weights(args))
    with torch.no_grad():
        z_t = iit.base_source_counterfactual(teacher, batch, group[0])[0].double()
        z_s = iit.base_source_counterfactual(student, batch, group[1])[0].double()
    T, B, kl = 20.0, len(batch["labels"]), torch.nn.KLDivLoss(reduction="mean")
    kd = T * T * kl(torch.log_softmax(z_s[:B] / T, -1), torch.softmax(z_t[:B] / T, -1))
    causal = T * T * kl(torch.log_softmax(z_s[B:] / T, -1), torch.softmax(z_t[B:] / T, -1))
    ce = F.cross_entropy(z_s[:B], batch["labels"])
    torch.testing.assert_close(terms["ce"].double(), kd, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(terms["iit"].double(), causal, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(loss.double(), 0.7 * kd + 0.3 * ce + 1.0 * causal, rtol=1e-4, atol=1e-7)
    # ours: the same KL summed over the 3 classes, so 3 times larger
    _, ours = iit.task_distillation_loss(student, teacher, batch, group, **{**iit.loss_weights(args),
                                                                            "kl_reduction": "batchmean"})
    torch.testing.assert_close(ours["ce"], 3 * terms["ce"], rtol=1e-5, atol=1e-7)
