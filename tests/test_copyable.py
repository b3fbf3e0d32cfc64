"""The functions the README calls copyable really are: each one's source, executed in a fresh namespace that
holds only `torch`, `F` and `math` (what a reader's own file has) and common.py's two structure helpers
`transformer_blocks` and `embedding_module` (copied with them), gives the module's own result. And each script's
whole method section, pasted alone (with numpy and contextlib, which a reader's file has too), runs the losses."""

import contextlib
import inspect
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import BertForMaskedLM, BertForSequenceClassification

import adkd_distill as adkd
import common
import iit_distill as iit
from conftest import tiny_config

def copied(function):
    """`function` re-created from its source text alone, as a reader pasting it would get it."""
    namespace = {"torch": torch, "F": F, "math": math, "transformer_blocks": common.transformer_blocks,
                 "embedding_module": common.embedding_module}
    exec(compile(inspect.getsource(function), f"<copy of {function.__name__}>", "exec"), namespace)
    return namespace[function.__name__]

def same(a, b):
    if isinstance(a, torch.Tensor):
        return torch.allclose(a, b, atol=1e-6)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if hasattr(a, "logits"):
        return same(a.logits, b.logits)
    return a == b

@pytest.fixture(scope="module")
def mlm():
    torch.manual_seed(0)
    model = BertForMaskedLM(tiny_config(120, layers=4)).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 120, (3, 9), generator=g)
    attn = torch.ones_like(ids)
    attn[1, 6:] = 0
    return model, ids, attn

@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_config(120, layers=2, num_labels=3)).eval()
    model.set_attn_implementation("eager")
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(5, 120, (3, 7), generator=g)
    attn = torch.ones_like(ids)
    attn[2, 5:] = 0
    return model, ids, attn

def iit_cases(model, ids, attn):
    mask = attn.bool()
    values = torch.randn(int(mask.sum()), 32, generator=torch.Generator().manual_seed(3))
    logits_s, logits_t = torch.randn(2, 3, 9, 120, generator=torch.Generator().manual_seed(4))
    labels = torch.where(torch.rand(ids.shape, generator=torch.Generator().manual_seed(5)) < 0.3, ids, -100)
    labels[0, 1] = ids[0, 1]
    lengths = attn.sum(1)
    return {
        "get_activations": lambda f: f(model, ids, attn, [0, 2]),
        "forward_with_interchange": lambda f: f(model, ids, attn, {1: (mask, values)}),
        # a fixed generator state per call, so both versions draw the same positions
        "interchange_masks": lambda f: f(lengths, lengths.flip(0), ids.shape[1], 0.4,
                                         generator=torch.Generator().manual_seed(6)),
        "alignments": lambda f: [f(name, 12, 6) for name in ("full", "middle", "late", "9:3;10,11:4")],
        "soft_target_kl": lambda f: f(logits_s, logits_t, 2.0),
        "cosine_distance": lambda f: f(logits_s, logits_t),
        "masked_mean": lambda f: f(logits_s[..., 0], mask),
        "mlm_loss": lambda f: f(logits_s, labels),
    }

def adkd_cases(model, ids, attn):
    target = torch.tensor([0, 2, 1])
    attributions = torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(7))
    maps = torch.rand(2, 3, 7, generator=torch.Generator().manual_seed(8))
    logits = torch.randn(2, 3, 3, generator=torch.Generator().manual_seed(9))
    return {
        # one view (the gold-label view) and every class's view, 4 IG points
        "integrated_gradients": lambda f: [f(model, ids, attn, None, targets, steps=4) for targets in
                                           (target[None], torch.arange(3)[:, None].expand(3, 3))],
        "token_attribution": lambda f: f(attributions, attn, 5),
        "attribution_loss": lambda f: f(maps[0] * attn, maps[1] * attn),
        "kd_loss": lambda f: f(logits[0], logits[1], 2.0),
        "task_loss": lambda f: f(logits[0], target),
        "view_targets": lambda f: [f(target, 3), f(target, 2)],
        "kd_temperature": lambda f: [f(4.0, "kd_anneal", epoch, 5) for epoch in range(5)],
    }

@pytest.mark.parametrize("name", list(iit_cases(None, torch.zeros(3, 9), torch.ones(3, 9))))
def test_iit_function_runs_from_its_source_alone(name, mlm):
    call = iit_cases(*mlm)[name]
    function = getattr(iit, name)
    with torch.no_grad():
        assert same(call(copied(function)), call(function)), name

@pytest.mark.parametrize("name", list(adkd_cases(None, torch.zeros(3, 7), torch.ones(3, 7))))
def test_adkd_function_runs_from_its_source_alone(name, classifier):
    call = adkd_cases(*classifier)[name]
    function = getattr(adkd, name)
    assert same(call(copied(function)), call(function)), name


# ---- the method sections, pasted whole: the losses readers copy --------------------------------------------------

def method_section(module) -> dict:
    """The functions between a script's "1. THE METHOD" banner and the next banner, executed in a namespace that holds
    only torch, F, math, numpy, contextlib and common.py's two structure helpers."""
    source = inspect.getsource(module)
    start = source.index("# ==== 1. THE METHOD")
    section = source[start:source.index("# ==== 2.", start)]
    namespace = {"torch": torch, "F": F, "math": math, "np": np, "contextlib": contextlib,
                 "transformer_blocks": common.transformer_blocks, "embedding_module": common.embedding_module}
    exec(compile(section, f"<method section of {module.__name__}>", "exec"), namespace)
    return namespace


def test_the_iit_objectives_run_from_the_method_section_alone(mlm, classifier):
    copy = method_section(iit)
    model, ids, attn = mlm
    student = common.init_student_from_teacher(model, [0, 1, 2, 3]).eval()  # the teacher itself, block for block
    g = torch.Generator().manual_seed(11)
    source_ids = torch.randint(5, 120, ids.shape, generator=g)
    base_mask, source_mask = iit.interchange_masks(attn.sum(1), attn.sum(1), ids.shape[1], 0.4, generator=g)
    labels = torch.where(torch.rand(ids.shape, generator=g) < 0.3, ids, -100)
    labels[0, 1] = ids[0, 1]
    batch = dict(input_ids=ids, attention_mask=attn, labels=labels, source_input_ids=source_ids,
                 source_attention_mask=attn, base_swap=iit.positions_of(base_mask),
                 source_swap=iit.positions_of(source_mask))
    group = ((1, 2), (1, 2))
    with torch.no_grad():
        loss, terms = copy["distillation_loss"](student, model, batch, group, alpha_iit_cos=0.5)
        same_loss, same_terms = iit.distillation_loss(student, model, batch, group, alpha_iit_cos=0.5)
    assert same((loss, terms), (same_loss, same_terms))
    # the student is the teacher: every soft-target, cosine and counterfactual term is 0, L_mlm the MLM loss
    for name in ("ce", "cos", "iit", "iit_cos"):
        assert abs(float(terms[name])) < 1e-5, name
    logits = model(input_ids=ids, attention_mask=attn).logits
    assert torch.allclose(terms["mlm"], F.cross_entropy(logits.flatten(0, 1), labels.flatten()), atol=1e-5)
    # the task objective on a classifier: the same, with the gold labels' cross-entropy
    model, ids, attn = classifier
    student = common.init_student_from_teacher(model, [0, 1]).eval()
    targets = torch.tensor([0, 2, 1])
    masks = iit.interchange_masks(attn.sum(1), attn.flip(0).sum(1), ids.shape[1], 0.5, generator=g)
    batch = dict(input_ids=ids, attention_mask=attn, labels=targets, source_input_ids=ids.flip(0),
                 source_attention_mask=attn.flip(0), base_swap=iit.positions_of(masks[0]),
                 source_swap=iit.positions_of(masks[1]))
    with torch.no_grad():
        loss, terms = copy["task_distillation_loss"](student, model, batch, ((0,), (0,)))
        assert same((loss, terms), iit.task_distillation_loss(student, model, batch, ((0,), (0,))))
    assert abs(float(terms["ce"])) < 1e-5 and abs(float(terms["iit"])) < 1e-5
    logits = model(input_ids=ids, attention_mask=attn).logits
    assert torch.allclose(terms["task"], F.cross_entropy(logits, targets), atol=1e-5)


def test_the_adkd_loss_runs_from_the_method_section_alone(classifier):
    copy = method_section(adkd)
    model, ids, attn = classifier
    batch = dict(input_ids=ids, attention_mask=attn, labels=torch.tensor([0, 2, 1]))
    maps, logits = copy["teacher_token_maps"](model, batch, 3)
    assert same((maps, logits), adkd.teacher_token_maps(model, batch, 3))
    loss, terms = copy["adkd_loss"](model, batch, maps, logits, alpha=0.5, beta=10.0, temperature=2.0)
    assert same(terms, adkd.adkd_loss(model, batch, maps, logits, alpha=0.5, beta=10.0, temperature=2.0)[1])
    # the student is the teacher (dropout off): its maps equal the teacher's, L_attr is 0
    assert terms["attr"] < 1e-10
    expected = 0.5 * F.cross_entropy(logits, batch["labels"]) + 0.5 * adkd.kd_loss(logits, logits, 2.0)
    assert torch.allclose(loss.detach(), expected, atol=1e-5)
