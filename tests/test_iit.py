"""Tests of iit_distill.py: the intervention math, masking, losses, layer maps, and whole runs."""

import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForMaskedLM, BertForMaskedLM, BertForSequenceClassification

import common
import iit_distill as iit
from conftest import ROOT, WORDS, tiny_config


def tiny_mlm(layers=4, dropout=0.0, seed=0, vocab=120):
    torch.manual_seed(seed)
    return BertForMaskedLM(tiny_config(vocab, layers=layers, hidden_dropout_prob=dropout,
                                       attention_probs_dropout_prob=dropout)).eval()


def batch_with_padding(vocab=120, B=4, T=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (B, T), generator=g)
    src = torch.randint(5, vocab, (B, T), generator=g)
    attn, src_attn = torch.ones(B, T, dtype=torch.long), torch.ones(B, T, dtype=torch.long)
    attn[1, 7:] = 0
    attn[3, 5:] = 0
    src_attn[2, 6:] = 0
    ids[attn == 0] = 0
    src[src_attn == 0] = 0
    return ids, attn, src, src_attn


# ---- interventions -------------------------------------------------------------------------------


def test_get_activations_are_block_outputs():
    model = tiny_mlm()
    ids, attn, _, _ = batch_with_padding()
    acts = iit.get_activations(model, ids, attn, [0, 2])
    hidden = model(input_ids=ids, attention_mask=attn, output_hidden_states=True).hidden_states
    assert torch.allclose(acts[0], hidden[1]) and torch.allclose(acts[2], hidden[3])  # block l = hidden_states[l+1]


def test_interchange_with_own_activations_is_identity():
    model = tiny_mlm()
    ids, attn, _, _ = batch_with_padding()
    base = model(input_ids=ids, attention_mask=attn).logits
    acts = iit.get_activations(model, ids, attn, [1, 3])
    mask = attn.bool()  # every real position, so the whole state is overwritten
    out = iit.forward_with_interchange(model, ids, attn, {1: (mask, acts[1][mask]), 3: (mask, acts[3][mask])})
    assert torch.allclose(out.logits, base, atol=1e-6)
    # and an interchange with *other* values does change the output (the test can fail)
    values = torch.randn_like(acts[1][mask])
    out = iit.forward_with_interchange(model, ids, attn, {1: (mask, values)}, output_hidden_states=True)
    assert not torch.allclose(out.logits, base, atol=1e-3)
    assert torch.equal(out.hidden_states[2][mask], values)  # recorded hidden states see the swap too


def test_interchange_equals_manual_block_splice():
    model = tiny_mlm()
    g = torch.Generator().manual_seed(3)
    ids, src = torch.randint(5, 120, (2, 8), generator=g), torch.randint(5, 120, (2, 8), generator=g)
    attn = torch.ones_like(ids)  # no padding: blocks can be called with attention_mask=None
    base_mask = torch.zeros(2, 8, dtype=torch.bool)
    base_mask[0, 2:5], base_mask[1, 0:3] = True, True
    src_mask = torch.zeros(2, 8, dtype=torch.bool)
    src_mask[0, 4:7], src_mask[1, 5:8] = True, True
    layer = 1

    def blocks_until(x, upto):
        h = model.bert.embeddings(input_ids=x)
        for block in model.bert.encoder.layer[:upto + 1]:
            h = iit.hidden_state(block(h, None))
        return h

    src_state = blocks_until(src, layer)
    h = blocks_until(ids, layer).clone()
    h[base_mask] = src_state[src_mask]  # the k-th source position feeds the k-th base position
    for block in model.bert.encoder.layer[layer + 1:]:
        h = iit.hidden_state(block(h, None))
    manual = model.cls(h)
    acts = iit.get_activations(model, src, attn, [layer])
    out = iit.forward_with_interchange(model, ids, attn, {layer: (base_mask, acts[layer][src_mask])})
    assert torch.allclose(out.logits, manual, atol=1e-5)


def test_hooks_are_removed_even_after_an_error():
    model = tiny_mlm()
    ids, attn, _, _ = batch_with_padding()
    mask = attn.bool()
    model(input_ids=ids, attention_mask=attn, output_hidden_states=True)  # transformers adds its own hooks

    def hooks():
        return [(list(b._forward_hooks), list(b._forward_pre_hooks)) for b in model.bert.encoder.layer]

    before = hooks()
    iit.get_activations(model, ids, attn, [2])
    iit.forward_with_interchange(model, ids, attn, {1: (mask, torch.zeros(int(mask.sum()), 32))})
    with pytest.raises(RuntimeError):  # wrong number of values
        iit.forward_with_interchange(model, ids, attn, {1: (mask, torch.zeros(3, 32))})
    iit.base_and_counterfactual(model, dict(input_ids=ids, attention_mask=attn, source_input_ids=ids,
                                            source_attention_mask=attn, base_swap=iit.positions_of(mask),
                                            source_swap=iit.positions_of(mask)), [1, 2])
    assert hooks() == before


def test_gradient_flows_into_values():
    model = tiny_mlm()
    ids, attn, _, _ = batch_with_padding()
    mask = attn.bool()
    values = torch.randn(int(mask.sum()), 32, requires_grad=True)
    iit.forward_with_interchange(model, ids, attn, {2: (mask, values)}).logits.sum().backward()
    assert values.grad is not None and values.grad.abs().sum() > 0


@pytest.mark.parametrize("alignment", ["full", "middle", "late", "0,1:0;2,3:1"])
def test_fast_schedule_equals_plain_schedule(alignment):
    """One 2B-row forward per model gives the official 3+3-forward schedule's losses and gradients."""
    teacher = tiny_mlm(layers=4, seed=0)
    student_a = common.init_student_from_teacher(teacher, [0, 3]).train()
    student_b = common.init_student_from_teacher(teacher, [0, 3]).train()
    ids, attn, src, src_attn = batch_with_padding()
    base_swap, src_swap = iit.interchange_masks(attn.sum(1), src_attn.sum(1), ids.shape[1], 0.4)
    labels = torch.where(torch.rand(ids.shape) < 0.3, ids, torch.full_like(ids, -100))
    batch = dict(input_ids=ids, attention_mask=attn, labels=labels, source_input_ids=src,
                 source_attention_mask=src_attn, base_swap=iit.positions_of(base_swap),
                 source_swap=iit.positions_of(src_swap))
    for group in iit.alignments(alignment, 4, 2):
        losses = []
        for student, runs in ((student_a, iit.base_and_counterfactual), (student_b, iit.base_source_counterfactual)):
            student.zero_grad()
            loss, terms = iit.distillation_loss(student, teacher, batch, group, alpha_iit_cos=0.5, runs=runs)
            loss.backward()
            losses.append((loss, terms))
        (loss_a, terms_a), (loss_b, terms_b) = losses
        assert terms_a["iit"] > 0
        for k in terms_a:
            assert torch.allclose(terms_a[k], terms_b[k], atol=1e-5, rtol=1e-4), (group, k)
        for (name, pa), pb in zip(student_a.named_parameters(), student_b.parameters()):
            assert torch.allclose(pa.grad, pb.grad, atol=1e-5, rtol=1e-3), (group, name)


# ---- token selection and masking -----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["consecutive", "random", "masked"])
def test_interchange_masks_equal_counts_and_no_padding(mode):
    g = torch.Generator().manual_seed(0)
    T = 30
    base_len = torch.tensor([30, 12, 20, 5, 17])
    src_len = torch.tensor([14, 30, 9, 25, 3])
    candidates = torch.rand(5, T, generator=g) < 0.2
    b, s = iit.interchange_masks(base_len, src_len, T, 0.3, mode, base_candidates=candidates, generator=g)
    assert torch.equal(b.sum(1), s.sum(1))
    pos = torch.arange(T)
    assert not (b & (pos >= base_len[:, None])).any() and not (s & (pos >= src_len[:, None])).any()
    if mode == "masked":
        assert not (b & ~candidates).any()
        assert torch.equal(b.sum(1), torch.minimum((candidates & (pos < base_len[:, None])).sum(1), src_len))
    else:
        assert b.sum(1).tolist() == [int(0.3 * min(x, y)) for x, y in zip(base_len.tolist(), src_len.tolist())]
    if mode == "consecutive":
        for row in b.tolist() + s.tolist():
            idx = [i for i, v in enumerate(row) if v]
            assert idx == list(range(idx[0], idx[0] + len(idx))) if idx else True


def test_smoothed_masking_count_specials_and_80_10_10():
    g = torch.Generator().manual_seed(0)
    V, B, T = 50, 64, 40
    ids = torch.randint(5, V, (B, T), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3  # [CLS] ... [SEP]
    attn = torch.ones(B, T, dtype=torch.long)
    attn[::2, 30:] = 0
    ids[attn == 0] = 0
    weights = torch.ones(V)
    weights[:5] = 0
    weights[7] = 50.0  # a token with a large weight is masked far more often
    masked, labels = iit.mlm_mask(ids, attn, 4, V, {0, 1, 2, 3, 4}, 0.15, weights, g)
    chosen = labels != -100
    assert int(chosen.sum()) == math.ceil(0.15 * int(attn.sum()))  # exact count per batch, as officially
    assert not chosen[attn == 0].any() and not chosen[:, 0].any()
    assert torch.equal(labels[chosen], ids[chosen])
    assert chosen[ids == 7].float().mean() > 5 * chosen[ids == 8].float().mean()
    frac_mask = (masked[chosen] == 4).float().mean().item()
    frac_same = (masked[chosen] == ids[chosen]).float().mean().item()
    assert 0.75 < frac_mask < 0.85 and 0.06 < frac_same < 0.16
    assert torch.equal(masked[~chosen], ids[~chosen])


def test_uniform_masking_rate():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 100, (200, 50), generator=g)
    attn = torch.ones_like(ids)
    _, labels = iit.mlm_mask(ids, attn, 4, 100, {0, 1, 2, 3, 4}, 0.15, None, g)
    assert abs((labels != -100).float().mean().item() - 0.15) < 0.01


def test_token_weights_smoothing():
    import datasets

    data = datasets.Dataset.from_dict({"input_ids": [[2, 10, 10, 10, 10, 11, 3]]})
    w = iit.token_weights(data, 20, 0.7, [0, 1, 2, 3, 4])
    assert w[2] == 0 and w[3] == 0
    assert torch.isclose(w[10], torch.tensor(4.0 ** -0.7)) and w[11] == 1.0 and w[12] == 1.0  # unseen: count 1


# ---- losses ---------------------------------------------------------------------------------------


def test_soft_target_kl_zero_for_equal_logits_and_T_squared():
    g = torch.Generator().manual_seed(0)
    z_t = torch.randn(2, 5, 30, generator=g)
    positions = torch.ones(2, 5, dtype=torch.bool)
    positions[1, 3:] = False
    assert iit.masked_mean(iit.soft_target_kl(z_t.clone(), z_t, 2.0), positions).abs() < 1e-6
    z_s = torch.randn(2, 5, 30, generator=g)
    T = 3.0
    p_t = torch.softmax(z_t[positions] / T, -1)
    kl = (p_t * (p_t.log() - torch.log_softmax(z_s[positions] / T, -1))).sum(-1).mean()
    assert torch.allclose(iit.masked_mean(iit.soft_target_kl(z_s, z_t, T), positions), kl * T**2, atol=1e-5)


def test_mlm_loss_reads_only_labelled_base_rows():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 6, 20, generator=g)
    labels = torch.full((3, 6), -100)
    labels[0, 1], labels[2, 4], labels[2, 5] = 7, 3, 19
    expected = F.cross_entropy(z.flatten(0, 1), labels.flatten(), ignore_index=-100)
    assert torch.allclose(iit.mlm_loss(z, labels), expected)
    # the fast schedule passes (2B, T, V) logits: the counterfactual rows below the base rows are not read
    assert torch.allclose(iit.mlm_loss(torch.cat([z, 1e4 * torch.randn(3, 6, 20, generator=g)]), labels), expected)


def test_losses_ignore_padding_positions():
    g = torch.Generator().manual_seed(0)
    z_t, z_s = torch.randn(2, 5, 30, generator=g), torch.randn(2, 5, 30, generator=g)
    positions = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    loss = iit.masked_mean(iit.soft_target_kl(z_s, z_t, 2.0), positions)
    z_s_other_padding = torch.where(positions[..., None], z_s, 1e3 * torch.randn(2, 5, 30, generator=g))
    assert torch.allclose(iit.masked_mean(iit.soft_target_kl(z_s_other_padding, z_t, 2.0), positions), loss)
    per_position = iit.soft_target_kl(z_s, z_t, 2.0)
    assert torch.allclose(loss, per_position[positions].mean())


def test_cosine_distance_masked_mean():
    h = torch.randn(2, 4, 8)
    positions = torch.ones(2, 4, dtype=torch.bool)
    assert iit.masked_mean(iit.cosine_distance(h, 3 * h), positions).abs() < 1e-6
    assert torch.allclose(iit.masked_mean(iit.cosine_distance(h, -h), positions), torch.tensor(2.0))


def test_standard_distillation_has_no_iit_terms():
    teacher = tiny_mlm()
    student = common.init_student_from_teacher(teacher, [0, 3])
    ids, attn, _, _ = batch_with_padding()
    batch = dict(input_ids=ids, attention_mask=attn, labels=torch.where(attn.bool(), ids, -100))
    loss, terms = iit.distillation_loss(student, teacher, batch, None)
    assert set(terms) == {"ce", "mlm", "cos"}
    assert torch.allclose(loss, 0.25 * (terms["ce"] + terms["mlm"] + terms["cos"]))
    # the defaults are the paper's weights, and the script's settings resolve to the same ones
    weights = dict(temperature=2.0, alpha_ce=0.25, alpha_mlm=0.25, alpha_cos=0.25, alpha_iit=0.25, alpha_iit_cos=0.0)
    assert torch.equal(iit.distillation_loss(student, teacher, batch, None, **weights)[0], loss)
    settings = iit.Args(task="mlm", preset="demo")
    iit.resolve_args(settings)
    assert iit.loss_weights(settings) == weights


# ---- layer maps --------------------------------------------------------------------------------------


def test_layer_maps():
    assert common.default_student_layers(12, 6) == [0, 2, 4, 7, 9, 11]  # the official choice
    assert iit.alignments("full", 12, 6) == [((0, 1), (0,)), ((2, 3), (1,)), ((4, 5), (2,)), ((6, 7), (3,)),
                                            ((8, 9), (4,)), ((10, 11), (5,))]
    assert iit.alignments("middle", 12, 6) == [((6,), (3,))]
    assert iit.alignments("late", 12, 6) == [((9,), (3,)), ((10,), (4,))]
    assert iit.alignments("full", 12, 3) == [((0, 1, 2, 3), (0,)), ((4, 5, 6, 7), (1,)), ((8, 9, 10, 11), (2,))]
    assert iit.alignments("9:3;10,11:4", 12, 6) == [((9,), (3,)), ((10, 11), (4,))]
    with pytest.raises(ValueError):
        iit.alignments("12:3", 12, 6)
    with pytest.raises(ValueError):
        iit.alignments("diagonal", 12, 6)


def test_student_copies_the_listed_teacher_blocks_and_the_whole_head():
    teacher = tiny_mlm(layers=4)
    student = common.init_student_from_teacher(teacher, [0, 3])
    assert student.config.num_hidden_layers == 2
    t, s = teacher.state_dict(), student.state_dict()
    for key in t:
        if ".encoder.layer.3." in key:
            assert torch.equal(s[key.replace(".layer.3.", ".layer.1.")], t[key])
        elif ".encoder.layer." not in key:
            assert torch.equal(s[key], t[key])  # embeddings and the MLM head, transform included
    with pytest.raises(common.UserError):
        common.init_student_from_teacher(teacher, [0, 4])


# ---- whole runs ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)

    def paragraph():
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 40))) + "."

    (folder / "train.txt").write_text("\n".join(paragraph() for _ in range(120)) + "\n")
    (folder / "valid.txt").write_text("\n".join(paragraph() for _ in range(24)) + "\n")
    return folder


def run_args(tiny_mlm_dir, corpus, out, **kw):
    base = dict(task="mlm", preset="demo", teacher=str(tiny_mlm_dir), student_layers="0,3",
                train_file=str(corpus / "train.txt"), validation_file=str(corpus / "valid.txt"),
                max_seq_length=32, per_device_train_batch_size=8, gradient_accumulation_steps=2,
                max_steps=8, logging_steps=4, save_steps=0, output_dir=str(out), max_eval_samples=16)
    base.update(kw)
    return iit.Args(**base)


def test_end_to_end_run_writes_a_loadable_student(tiny_mlm_dir, corpus, tmp_path):
    results = iit.main(run_args(tiny_mlm_dir, corpus, tmp_path / "run"))
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    for key in ("teacher_perplexity", "student_perplexity", "train_loss", "train_steps", "train_runtime"):
        assert key in saved and saved[key] == results[key]
    assert saved["train_steps"] == 8 and math.isfinite(saved["student_perplexity"])
    assert json.loads((tmp_path / "run" / "args.json").read_text())["alpha_iit"] == 0.25
    student = AutoModelForMaskedLM.from_pretrained(tmp_path / "run")
    assert student.config.num_hidden_layers == 2


def test_resume_reproduces_the_straight_run(tiny_mlm_dir, corpus, tmp_path):
    straight = iit.main(run_args(tiny_mlm_dir, corpus, tmp_path / "a", max_steps=6, save_steps=3))
    first = tmp_path / "b"
    iit.main(run_args(tiny_mlm_dir, corpus, first, max_steps=3, save_steps=3))
    # The first run ended at step 3; continue the 6-step schedule from a step-3 checkpoint of the long run.
    resumed = iit.main(run_args(tiny_mlm_dir, corpus, first, max_steps=6, save_steps=3,
                                resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3")))
    a = AutoModelForMaskedLM.from_pretrained(tmp_path / "a").state_dict()
    b = AutoModelForMaskedLM.from_pretrained(first).state_dict()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    assert resumed["train_loss"] == pytest.approx(straight["train_loss"], rel=1e-5)
    assert resumed["student_perplexity_before"] == pytest.approx(straight["student_perplexity_before"])
    with pytest.raises(common.UserError, match="other settings"):  # a checkpoint of another run's schedule
        iit.main(run_args(tiny_mlm_dir, corpus, tmp_path / "c", max_steps=6, gradient_accumulation_steps=1,
                          resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3")))


def cli(*argv, env_extra=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", **(env_extra or {}))
    return subprocess.run([sys.executable, str(ROOT / "iit_distill.py"), *argv], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)


def test_bad_input_gives_one_line_and_writes_nothing(tiny_mlm_dir, corpus, tmp_path):
    classifier = tmp_path / "classifier"
    BertForSequenceClassification(tiny_config(120, layers=2)).save_pretrained(classifier)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    common_flags = ["--student_layers", "0,1", "--max_steps", "2", "--max_seq_length", "32"]
    files = ["--train_file", str(corpus / "train.txt"), "--validation_file", str(corpus / "valid.txt")]
    cases = {
        "task": (["--task", "ner", "--teacher", str(tiny_mlm_dir)] + files, "--task mlm"),
        "missing file": (["--teacher", str(tiny_mlm_dir), "--train_file", str(tmp_path / "nope.txt"),
                          "--validation_file", str(corpus / "valid.txt")], "does not exist"),
        "empty file": (["--teacher", str(tiny_mlm_dir), "--train_file", str(empty),
                        "--validation_file", str(corpus / "valid.txt")], "is empty"),
        "no teacher": (["--teacher", str(tmp_path / "no_such_model")] + files, "does not exist"),
        "classifier": (["--teacher", str(classifier)] + files, "no trained MLM head"),
        "layers": (["--teacher", str(tiny_mlm_dir), "--student_layers", "0,9"] + files, "within the teacher"),
        "hub": (["--teacher", "bert-base-uncased"] + files, "unreachable"),
        "too long": (["--teacher", str(tiny_mlm_dir), "--max_seq_length", "512"] + files, "longer than the teacher"),
        "batch": (["--teacher", str(tiny_mlm_dir), "--per_device_train_batch_size", "0"] + files, "must be positive"),
        "accumulation": (["--teacher", str(tiny_mlm_dir), "--gradient_accumulation_steps", "500"] + files,
                         "fewer than one optimiser step"),
        "device": (["--teacher", str(tiny_mlm_dir), "--device", "cuda:7"] + files, "not available"),
    }
    for name, (argv, expected) in cases.items():
        out = tmp_path / f"out-{name.replace(' ', '_')}"
        argv = ["--task", "mlm", *common_flags, *argv, "--output_dir", str(out)]
        result = cli(*argv)
        assert result.returncode != 0, name
        lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and expected in lines[0], (name, result.stderr[-500:])
        assert "Traceback" not in result.stderr, name
        assert not (out / "model.safetensors").exists(), name


def test_torchrun_two_processes_on_cpu(tiny_mlm_dir, corpus, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           str(ROOT / "iit_distill.py"), "--task", "mlm", "--preset", "demo", "--teacher", str(tiny_mlm_dir),
           "--student_layers", "0,3", "--train_file", str(corpus / "train.txt"),
           "--validation_file", str(corpus / "valid.txt"), "--max_seq_length", "32",
           "--per_device_train_batch_size", "4", "--max_steps", "4", "--logging_steps", "2",
           "--save_steps", "2", "--max_eval_samples", "8", "--output_dir", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                            env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((out / "results.json").read_text())["train_steps"] == 4
    assert result.stdout.count("perplexity: student before") == 1  # rank 0 alone logs and saves
    assert (out / "checkpoint-2" / "training_state.pt").is_file()
