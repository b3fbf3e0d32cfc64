"""The GPU path, checked on the CPU: no host sync of ours in a training micro-step (IIT, AD-KD), the compiled blocks
keep the interchange (a failed backward compile falls back in one line), eight ranks step alike, batches built ahead
are the batches built inline, lengths read from Arrow, and a GPU user's own torch kept by the requirements."""

import itertools
import os
import random
import subprocess
import sys
import traceback

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import BertForMaskedLM

import common
import iit_distill as iit
from bench_step_cost import wikitext_lengths
from conftest import ROOT, WORDS, tiny_config

OURS = ("iit_distill.py", "common.py")


class HostSyncs(TorchDispatchMode):
    """Records the ops that make the host wait for a GPU (a value read back: item, bool, nonzero, indexing by a bool
    mask), with the innermost frame of our own files or of the library that asked for them."""

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        waits = name.startswith(("aten._local_scalar_dense", "aten.nonzero", "aten.is_nonzero", "aten.masked_select"))
        if name.startswith(("aten.index.", "aten.index_put", "aten._index_put")):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            waits = any(index is not None and index.dtype == torch.bool for index in indices)
        if waits:
            frames = [frame for frame in traceback.extract_stack()[:-1] if "/torch/" not in frame.filename]
            self.found.append((name, os.path.basename(frames[-1].filename), frames[-1].lineno))
        return func(*args, **kwargs)


def padded_batch(vocab=120, B=4, T=10, seed=1):
    """A make_batch-shaped MLM batch with padding in base and source, its positions found on the host."""
    g = torch.Generator().manual_seed(seed)
    ids, source = torch.randint(5, vocab, (2, B, T), generator=g)
    attn = torch.ones(B, T, dtype=torch.long)
    source_attn = attn.clone()
    attn[0, 7:] = 0
    source_attn[1, 6:] = 0
    base_mask, source_mask = iit.interchange_masks(attn.sum(1), source_attn.sum(1), T, 0.4, generator=g)
    labels = torch.where((torch.rand(ids.shape, generator=g) < 0.3) & attn.bool(), ids, -100)
    return dict(input_ids=ids * attn, attention_mask=attn, labels=labels,
                label_positions=iit.positions_of(labels != -100), source_input_ids=source * source_attn,
                source_attention_mask=source_attn, base_swap=iit.positions_of(base_mask),
                source_swap=iit.positions_of(source_mask))


def models(seed=0):
    torch.manual_seed(seed)
    config = tiny_config(120, layers=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    teacher = BertForMaskedLM(config).eval().requires_grad_(False)  # no dropout: runs comparable
    return teacher, common.init_student_from_teacher(teacher, [0, 3]).train()


def test_a_fast_micro_step_of_ours_never_waits_for_the_device():
    """main's micro-step: the batch to the device, the objective on the one-forward schedule, the backward, the
    loss terms added up as tensors. transformers' own mask check (padding_mask.all()) is theirs, not ours."""
    teacher, student = models()
    batch = padded_batch()
    running = {}
    syncs = HostSyncs()
    with syncs:
        on_device = iit.to_device(batch, "cpu")
        loss, terms = iit.distillation_loss(student, teacher, on_device, ((0, 1), (0,)),
                                            runs=iit.base_and_counterfactual)
        (loss / 2).backward()
        for name, value in terms.items():
            running[name] = running.get(name, 0.0) + value.detach()
    ours = [sync for sync in syncs.found if sync[1] in OURS]
    assert not ours, ours
    assert syncs.found, "the probe sees no sync at all: it would miss ours too"  # transformers' mask check
    # and the paper's three forwards with bool masks, which the probe must catch, do wait
    plain = HostSyncs()
    with plain:
        mask = batch["attention_mask"].bool()
        values = iit.get_activations(student, batch["input_ids"], batch["attention_mask"], [0])[0][mask]
        iit.forward_with_interchange(student, batch["input_ids"], batch["attention_mask"], {0: (mask, values)})
    assert any(sync[1] == "iit_distill.py" for sync in plain.found)


def test_a_cached_adkd_micro_step_never_waits_for_the_device():
    """AD-KD's micro-step once the teacher cache holds the batch's examples: the cache read with the host's indices,
    the student's IG forward, the double backward, the terms kept as tensors. The probe does not see `tolist` on the
    CPU, so the batch's indices lie on the meta device, where reading them fails as it waits on a GPU."""
    import adkd_distill as adkd
    from transformers import BertForSequenceClassification
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny_config(120, layers=2, num_labels=3)).eval().requires_grad_(False)
    student = common.init_student_from_teacher(teacher, [1]).train()
    student.set_attn_implementation("eager")
    batch = padded_batch()
    batch = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 labels=torch.tensor([0, 2, 1, 1]), index=torch.tensor([7, 3, 5, 8]))
    cache = adkd.TeacherCache(teacher, 3, ig_steps=2, topk=16, need_maps=True, bf16=False)
    cache(batch)  # first sight: the teacher's pass reads the lengths back, once per example
    batch["index"] = batch["index"].to("meta")
    syncs = HostSyncs()
    with syncs:
        maps, logits = cache(batch, [7, 3, 5, 8])
        loss, terms = adkd.adkd_loss(student, batch, maps, logits, alpha=0.5, beta=1.0, temperature=2.0,
                                     ig_steps=2)
        loss.backward()
        running = {name: value / 2 for name, value in terms.items()}
    assert running and not [sync for sync in syncs.found if sync[1] == "adkd_distill.py"], syncs.found
    assert syncs.found, "the probe sees no sync at all: it would miss ours too"  # transformers' mask check
    with pytest.raises(NotImplementedError):  # the indices read from the batch: a wait on a GPU
        cache(batch)


def test_compiled_blocks_keep_the_interchange_and_the_loss():
    """Regional compilation (aot_eager: no C++ toolchain) leaves the hooks outside the compiled code: the swap still
    changes exactly the rows it writes, and the loss equals the eager one."""
    teacher, student = models()
    eager_teacher, eager_student = models()
    batch = padded_batch()
    group = ((2, 3), (1,))
    eager_loss, eager_terms = iit.distillation_loss(eager_student, eager_teacher, batch, group,
                                                    runs=iit.base_and_counterfactual)
    kl = iit.speed_up(teacher, student, bf16=False, compile=True, dist=common.Dist(), backend="aot_eager")
    assert all(not isinstance(block.forward, type(eager_student.forward)) for block in
               common.transformer_blocks(student))  # every block's forward is the compiled wrapper
    loss, terms = iit.distillation_loss(student, teacher, batch, group, runs=iit.base_and_counterfactual, kl=kl)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for name in terms:
        torch.testing.assert_close(terms[name], eager_terms[name], rtol=1e-5, atol=1e-6)
    # only rows 0 and 2 swap anything: rows 1 and 3 of the counterfactual run equal the base run's
    rows = batch["base_swap"][0]
    keep = (rows == 0) | (rows == 2)
    only_two = {**batch, "base_swap": batch["base_swap"][:, keep], "source_swap": batch["source_swap"][:, keep]}
    with torch.no_grad():
        logits, _ = iit.base_and_counterfactual(teacher.eval(), only_two, group[0])
    B = len(batch["input_ids"])
    base, counterfactual = logits[:B], logits[B:]
    torch.testing.assert_close(counterfactual[[1, 3]], base[[1, 3]], rtol=1e-5, atol=1e-5)
    assert (counterfactual[[0, 2]] - base[[0, 2]]).abs().max() > 1e-3
    # the cases a run meets (train and eval, grad or not, padded or not, one row) stay within dynamo's graph budget:
    # every block shares one code object, so with the default budget of 8 a one-row batch turned them all eager
    unpadded = {**batch, "attention_mask": torch.ones_like(batch["attention_mask"]),
                "source_attention_mask": torch.ones_like(batch["attention_mask"])}
    for inputs in (iit.first_rows(batch, 1), unpadded, iit.first_rows(unpadded, 3)):
        iit.distillation_loss(student, teacher, inputs, group, runs=iit.base_and_counterfactual, kl=kl)[0].backward()
        with torch.no_grad():
            iit.predictions(student, [inputs], [group[1]], iit.base_and_counterfactual)
    wrappers = [kl] + [block.forward for model in (teacher, student) for block in common.transformer_blocks(model)]
    assert not any(wrapper.failed or wrapper.past_limit for wrapper in wrappers)


def test_a_failed_backward_compile_falls_back_with_one_note(capsys):
    """A backend whose backward compile fails: the block's forward says so in one line, once, and runs eagerly, so
    the training step's backward works (compiled lazily, the failure would surface in loss.backward())."""
    from torch._dynamo.backends.common import aot_autograd

    def planted(graph, example_inputs):
        raise RuntimeError("planted backward failure")

    backend = aot_autograd(fw_compiler=lambda graph, example_inputs: graph.forward, bw_compiler=planted)
    teacher, student = models()
    block = common.transformer_blocks(student)[1]
    block.forward = iit.compiled(block.forward, "BertLayer.forward", common.Dist(), backend)
    batch = padded_batch()
    for _ in range(2):
        loss, _ = iit.distillation_loss(student, teacher, batch, ((2, 3), (1,)), runs=iit.base_and_counterfactual)
        loss.backward()
    assert len(block.forward.failed) == 1
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "BertLayer.forward failed" in notes[0] and "planted" in notes[0], notes
    assert block.attention.self.query.weight.grad.abs().sum() > 0


def test_eight_ranks_step_alike():
    """Each optimiser step's eight micro-batches come from one length window: the longest rank's padded tokens are
    within 15% of the mean rank's (dealt at random, about twice)."""
    lengths = wikitext_lengths(40 * 8 * 300, seed=3)
    args = iit.Args(seed=56, per_device_train_batch_size=40, gradient_accumulation_steps=2)
    streams = [iit.micro_batches(lengths, args, common.Dist(rank, rank, 8, True), 0, 0) for rank in range(8)]
    ratios = []
    for _ in range(100):  # optimiser steps
        padded = [sum(len(indices) * lengths[indices].max() for _, _, indices in (next(s), next(s))) for s in streams]
        ratios.append(max(padded) / np.mean(padded))
    assert np.mean(ratios) <= 1.15, np.mean(ratios)
    # every sequence is dealt once per epoch, to one rank
    epoch = [indices for s in [iit.micro_batches(lengths[:4000], args, common.Dist(r, r, 8, True), 0, 0)
                               for r in range(8)] for _, _, indices in _epoch(s)]
    flat = [i for indices in epoch for i in indices]
    assert len(flat) == len(set(flat))


def _epoch(stream):
    for epoch, position, indices in stream:
        if epoch > 0:
            return
        yield epoch, position, indices


@pytest.fixture(scope="module")
def train_set(tokenizer_dir):
    import datasets
    from transformers import AutoTokenizer

    rng = random.Random(0)
    text = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 40))) for _ in range(64)]
    raw = datasets.DatasetDict(train=datasets.Dataset.from_dict({"text": text}))
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return iit.tokenize_paragraphs(raw, tokenizer, 32, 4, None)["train"], tokenizer


def test_lengths_come_from_arrow(train_set):
    data, _ = train_set
    assert iit.sequence_lengths(data).tolist() == [len(x) for x in data["input_ids"]]
    picked = data.select([5, 2, 9])
    assert iit.sequence_lengths(picked).tolist() == [len(x) for x in picked["input_ids"]]


def test_batches_built_ahead_are_the_batches_built_inline_and_resume(train_set):
    data, tokenizer = train_set
    args = iit.Args(task="mlm", preset="demo", max_seq_length=32, per_device_train_batch_size=4,
                    gradient_accumulation_steps=2, source_pairing="batch")
    iit.resolve_args(args)
    masking = iit.token_weights(data, len(tokenizer), 0.7, tokenizer.all_special_ids)

    def batches(state, ahead=True):
        return iit.training_batches(iit.make_batch, data, np.arange(len(data)), tokenizer, masking, args,
                                    common.Dist(), state, True, ahead)

    start = {"step": 0, "epoch": 0, "batches_done": 0}
    inline = list(itertools.islice(batches(start), 10))
    ahead = list(itertools.islice(iit.prefetch(batches(start)), 10))
    for (e1, p1, t1, b1), (e2, p2, t2, b2) in zip(inline, ahead):
        assert (e1, p1, t1) == (e2, p2, t2) and b1.keys() == b2.keys()
        assert all(torch.equal(b1[k], b2[k]) for k in b1)
    # a run resumed at step 3 (6 micro-batches in) sees the same batches as the straight run
    resumed = list(itertools.islice(batches({"step": 3, "epoch": 0, "batches_done": 6}), 4))
    for (_, _, _, b1), (_, _, _, b2) in zip(ahead[6:], resumed):
        assert all(torch.equal(b1[k], b2[k]) for k in b1)
    # on the CPU (ahead=False) the batches draw from torch's global RNG, as they always did
    torch.manual_seed(5)
    first = next(batches(start, ahead=False))[3]
    torch.manual_seed(5)
    assert torch.equal(next(batches(start, ahead=False))[3]["input_ids"], first["input_ids"])


def test_requirements_keep_a_gpu_users_torch(tmp_path):
    """A cluster image's torch (here a stand-in: torch 2.11.0's metadata ahead on the path) satisfies the requirement,
    so pip installs no other torch over it."""
    site = tmp_path / "site"
    info = site / "torch-2.11.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.11.0\n")
    (info / "INSTALLER").write_text("pip\n")
    (info / "RECORD").write_text("")
    env = {**os.environ, "PYTHONPATH": str(site), "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "-r", str(ROOT / "requirements.txt")],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Requirement already satisfied: torch" in result.stdout and "2.11.0" in result.stdout
    assert "Would install" not in result.stdout or "torch" not in result.stdout.split("Would install")[1]
