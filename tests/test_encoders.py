"""Every encoder family in every script: BERT, RoBERTa, XLM-R, ELECTRA, DeBERTa-v2/v3, DistilBERT, ModernBERT.

Tiny random masked LMs of each family (tests/encoders.py), each with a real tokenizer of its kind: the
structure helpers, the student cut from teacher blocks, the two IIT schedules, IIT and AD-KD runs, and
eval_tasks.py on GLUE, SQuAD and CoNLL; then the layouts that are refused with one line.
"""

import json
import math
import random

import pytest
import torch

import adkd_distill as adkd
import common
import eval_tasks
import iit_distill as iit
from conftest import WORDS
from encoders import FAMILIES, NAMES, save_masked_lm, tiny_config


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """family -> folder of a saved tiny masked LM with its tokenizer."""
    folders = {}
    for family in FAMILIES:
        folders[family] = tmp_path_factory.mktemp(family)
        save_masked_lm(family, folders[family])
    return folders


def load(folder, cls=None, **kw):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    return (cls or AutoModelForMaskedLM).from_pretrained(str(folder), **kw).eval(), \
        AutoTokenizer.from_pretrained(str(folder))


def padded_pairs(tok, n=4, seed=0):
    """Base and source batches of real text, both with padding: input ids, attention masks."""
    rng = random.Random(seed)
    def texts():
        return [" ".join(rng.choice(WORDS + NAMES) for _ in range(rng.randint(3, 12))) for _ in range(n)]
    base, source = tok(texts(), padding=True, return_tensors="pt"), tok(texts(), padding=True, return_tensors="pt")
    T = max(base["input_ids"].shape[1], source["input_ids"].shape[1])
    def pad(x, value):
        return torch.nn.functional.pad(x, (0, T - x.shape[1]), value=value)
    return (pad(base["input_ids"], tok.pad_token_id), pad(base["attention_mask"], 0),
            pad(source["input_ids"], tok.pad_token_id), pad(source["attention_mask"], 0))


# ---- structure -------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_blocks_embeddings_and_positions_are_found(teachers, family):
    model, tok = load(teachers[family])
    blocks = common.transformer_blocks(model)
    assert len(blocks) == 4 and all(b is not blocks[0] for b in blocks[1:])
    embeddings = common.embedding_module(model)
    seen = {}
    handle = embeddings.register_forward_hook(lambda m, a, out: seen.update(out=out))
    ids = tok(["John won the war in 1889 ."], return_tensors="pt")["input_ids"]
    hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    handle.remove()
    if family != "electra":  # ELECTRA projects the embeddings (width 16) to the blocks' width (32)
        assert torch.equal(seen["out"], hidden[0])  # the embedding module's output enters block 0
    longest = 128  # RoBERTa and XLM-R keep 130 position rows, counted from padding_idx + 1
    assert common.max_positions(model) == longest
    assert common.max_positions(common.encoder_skeleton(model.config)) == longest
    model(input_ids=torch.full((1, longest), 5))  # the longest input runs


@pytest.mark.parametrize("family", FAMILIES)
def test_student_holds_the_teacher_blocks_bit_for_bit(teachers, family, tmp_path):
    teacher, tok = load(teachers[family])
    layers = [0, 3, 2]
    student = common.init_student_from_teacher(teacher, layers)
    assert len(common.transformer_blocks(student)) == 3
    depth_field = "n_layers" if family == "distilbert" else "num_hidden_layers"
    assert student.config.to_dict()[depth_field] == 3
    if family == "modernbert":  # blocks 0 and 3 attend globally, 2 in a sliding window
        assert student.config.layer_types == ["full_attention", "full_attention", "sliding_attention"]
        assert [b.attention_type for b in common.transformer_blocks(student)] == student.config.layer_types
    for i, layer in enumerate(layers):
        mine, theirs = common.transformer_blocks(student)[i].state_dict(), \
            common.transformer_blocks(teacher)[layer].state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    in_blocks = {id(p) for p in common.transformer_blocks(teacher).parameters()}
    t, s = dict(teacher.named_parameters()), dict(student.named_parameters())
    for name in [n for n, p in t.items() if id(p) not in in_blocks]:  # embeddings and the whole MLM head
        assert torch.equal(s[name], t[name]), name
    # saved and loaded back, the student is the same model (its config describes the blocks it holds)
    common.save_model(tmp_path, student, tok)
    reloaded, _ = load(tmp_path)
    ids = tok(["Mary wrote a book about the river in London ."], return_tensors="pt")["input_ids"]
    torch.testing.assert_close(reloaded(input_ids=ids).logits, student.eval()(input_ids=ids).logits)


def test_modernbert_block_zero_has_no_attention_norm(teachers):
    teacher, _ = load(teachers["modernbert"])
    with pytest.raises(common.UserError, match="student block 0 cannot hold teacher block 1.*attn_norm"):
        common.init_student_from_teacher(teacher, [1, 3])


# ---- IIT -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_one_forward_schedule_equals_the_three_forwards(teachers, family):
    """Loss terms and gradients of both schedules agree, with padding in base and source, for every group."""
    teacher, tok = load(teachers[family])
    torch.manual_seed(0)
    with torch.no_grad():  # weights of a trained model's size, so that the blocks change what they pass on
        for p in teacher.parameters():
            p.add_(0.2 * torch.randn_like(p))
    teacher.requires_grad_(False)
    student_a = common.init_student_from_teacher(teacher, [0, 2, 3])
    student_b = common.init_student_from_teacher(teacher, [0, 2, 3])
    ids, attn, src, src_attn = padded_pairs(tok)
    assert not attn.all() and not src_attn.all()
    base_swap, src_swap = iit.interchange_masks(attn.sum(1), src_attn.sum(1), ids.shape[1], 0.4,
                                                generator=torch.Generator().manual_seed(1))
    labels = torch.where((torch.rand(ids.shape) < 0.3) & attn.bool(), ids, torch.full_like(ids, -100))
    batch = dict(input_ids=ids, attention_mask=attn, labels=labels, source_input_ids=src,
                 source_attention_mask=src_attn, base_swap=iit.positions_of(base_swap),
                 source_swap=iit.positions_of(src_swap))
    groups = iit.alignments("full", 4, 3) + iit.alignments("3:1;1:2", 4, 3)
    for side, model in enumerate((teacher, student_a)):
        assert iit.one_forward_is_exact(model, [g[side] for g in groups], batch), family
    for group in groups:
        results = []
        for student, runs in ((student_a, iit.base_and_counterfactual), (student_b, iit.base_source_counterfactual)):
            student.zero_grad()
            loss, terms = iit.distillation_loss(student, teacher, batch, group, alpha_iit_cos=0.5, runs=runs)
            loss.backward()
            results.append(terms)
        assert results[0]["iit"] > 0
        for k in results[0]:
            torch.testing.assert_close(results[0][k], results[1][k], atol=1e-5, rtol=1e-4, msg=f"{group} {k}")
        for (name, pa), pb in zip(student_a.named_parameters(), student_b.parameters()):
            if pa.grad is not None or pb.grad is not None:
                torch.testing.assert_close(pa.grad, pb.grad, atol=1e-5, rtol=1e-3, msg=f"{group} {name}")


def test_interchange_reads_and_writes_the_same_place(teachers):
    """DeBERTa, ModernBERT, DistilBERT: swapping in the base's own block outputs leaves every output unchanged."""
    for family in ("deberta-v2", "modernbert", "distilbert"):
        model, tok = load(teachers[family])
        ids, attn, _, _ = padded_pairs(tok)
        base = model(input_ids=ids, attention_mask=attn).logits
        acts = iit.get_activations(model, ids, attn, [0, 2])
        mask = attn.bool()
        out = iit.forward_with_interchange(model, ids, attn, {0: (mask, acts[0][mask]), 2: (mask, acts[2][mask])})
        torch.testing.assert_close(out.logits, base, atol=1e-5, rtol=1e-5)


def iit_corpus(folder):
    rng = random.Random(0)
    def paragraph():
        return " ".join(rng.choice(WORDS + NAMES) for _ in range(rng.randint(8, 30))) + "."
    (folder / "train.txt").write_text("\n".join(paragraph() for _ in range(64)) + "\n")
    (folder / "valid.txt").write_text("\n".join(paragraph() for _ in range(12)) + "\n")
    return folder / "train.txt", folder / "valid.txt"


@pytest.mark.parametrize("family", FAMILIES)
def test_iit_runs_and_resumes(teachers, family, tmp_path):
    train, valid = iit_corpus(tmp_path)
    def args(out, **kw):
        return iit.Args(**{**dict(task="mlm", preset="demo", teacher=str(teachers[family]), student_layers="0,3",
                                  train_file=str(train), validation_file=str(valid), max_seq_length=32,
                                  per_device_train_batch_size=8, gradient_accumulation_steps=1, max_steps=4,
                                  logging_steps=2, save_steps=2, output_dir=str(out), max_eval_samples=8), **kw})
    straight = iit.main(args(tmp_path / "a"))
    assert straight["train_steps"] == 4 and math.isfinite(straight["student_perplexity"])
    resumed = iit.main(args(tmp_path / "b", resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2")))
    a, _ = load(tmp_path / "a")
    b, _ = load(tmp_path / "b")
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-5, msg=name)
    assert resumed["train_loss"] == pytest.approx(straight["train_loss"], rel=1e-5)


def test_teacher_without_a_trained_mlm_head_is_refused(teachers, tmp_path):
    """A base model's weights, or an ELECTRA discriminator's, loaded as a masked LM leave the head random."""
    from transformers import AutoModel, ElectraForPreTraining

    train, valid = iit_corpus(tmp_path)
    cases = {}
    for family in ("roberta", "distilbert", "modernbert", "deberta-v2"):
        folder = tmp_path / f"{family}-base"
        model, tok = load(teachers[family], AutoModel)
        model.save_pretrained(str(folder))
        tok.save_pretrained(str(folder))
        cases[family] = folder
    _, tok = load(teachers["electra"])
    discriminator = ElectraForPreTraining(tiny_config("electra", tok))
    discriminator.save_pretrained(str(tmp_path / "discriminator"))
    tok.save_pretrained(str(tmp_path / "discriminator"))
    cases["electra discriminator"] = tmp_path / "discriminator"
    for name, folder in cases.items():
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        args = iit.Args(task="mlm", preset="demo", teacher=str(folder), student_layers="0,1", train_file=str(train),
                        validation_file=str(valid), max_seq_length=32, output_dir=str(out))
        with pytest.raises(common.UserError, match="no trained MLM head") as info:
            iit.main(args)
        assert "\n" not in str(info.value) and not out.exists(), name


# ---- AD-KD -----------------------------------------------------------------------------------------


def classifier(folder, num_labels):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return load(folder, AutoModelForSequenceClassification, num_labels=num_labels)


@pytest.mark.parametrize("family", FAMILIES)
def test_ig_completeness(teachers, family):
    """IG at the embedding module's output of every family sums to F(x) - F(0), closer as the steps grow."""
    from transformers import AutoModelForSequenceClassification

    # ModernBERT has no biases at all: its F then jumps right after 0 (a LayerNorm of a vanishing input), which a
    # Riemann sum resolves only with very many steps; give the fixture biases.
    biases = dict(norm_bias=True, attention_bias=True, mlp_bias=True, classifier_bias=True) \
        if family == "modernbert" else {}
    model, tok = load(teachers[family], AutoModelForSequenceClassification, num_labels=3, **biases)
    torch.manual_seed(0)
    with torch.no_grad():  # random models have zero biases and a tiny head: give F(x) - F(0) some size
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    enc = dict(tok(["John won the war", "a boring plot in Paris", "love it not"], padding=True, return_tensors="pt"))
    target = torch.tensor([0, 2, 1])

    def value(scale):  # F with the embedding output scaled: 1 is the input, 0 the baseline
        handle = common.embedding_module(model).register_forward_hook(lambda m, a, out: out * scale)
        try:
            with torch.no_grad():
                logits = model(**enc).logits
        finally:
            handle.remove()
        return -torch.log_softmax(logits, -1).gather(-1, target[:, None])[:, 0]

    delta = value(1.0) - value(0.0)
    assert delta.abs().max() > 1e-2, "degenerate fixture"
    errors = []
    for steps in (16, 512):
        attributions, _ = adkd.integrated_gradients(model, enc["input_ids"], enc["attention_mask"],
                                                    enc.get("token_type_ids"), target[None], steps=steps)
        errors.append((attributions[0].sum(dim=(1, 2)) - delta).abs().max().item())
    assert errors[1] < 0.02 * delta.abs().max() and errors[1] < errors[0], (errors, delta)


def glue_folder(root):
    folder = root / "SST-2"
    folder.mkdir(parents=True)
    rng = random.Random(0)
    for name, n in (("train.tsv", 24), ("dev.tsv", 8)):
        rows = [f"{' '.join(rng.choice(WORDS + NAMES) for _ in range(rng.randint(3, 9)))}\t{i % 2}" for i in range(n)]
        (folder / name).write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    return folder


@pytest.mark.parametrize("family", FAMILIES)
def test_adkd_runs(teachers, family, tmp_path):
    teacher, tok = classifier(teachers[family], 2)
    teacher.save_pretrained(str(tmp_path / "teacher"))
    tok.save_pretrained(str(tmp_path / "teacher"))
    results = adkd.main(adkd.Args(task="sst2", preset="paper", data_dir=str(glue_folder(tmp_path)),
                                  teacher=str(tmp_path / "teacher"), student_layers="0,3",
                                  output_dir=str(tmp_path / "o"),
                                  max_seq_length=32, per_device_train_batch_size=8, max_steps=3, logging_steps=1,
                                  save_steps=0, ig_steps=2, show_attributions=1))
    assert results["train_steps"] == 3 and 0 <= results["eval_accuracy"] <= 1
    assert all(math.isfinite(h["eval_accuracy"]) for h in results["history"])


# ---- eval_tasks.py on each tokenizer kind ------------------------------------------------------------


SQUAD_CONTEXT = ("John Smith was born in Paris, France, in 1889. Mary wrote a book about the river in London; "
                 "the king won the war (and the team lost the game).")
SQUAD_ITEMS = [("Where was John Smith born?", "Paris, France"), ("When was he born?", "1889"),
               ("Who wrote a book?", "Mary"), ("What did the king win?", "the war"),
               ("What did the team lose?", "the game")]


def squad_json(path, n_copies=1):
    qas = [{"id": f"q{i}-{k}", "question": q, "answers": [{"text": a, "answer_start": SQUAD_CONTEXT.index(a)}]}
           for k in range(n_copies) for i, (q, a) in enumerate(SQUAD_ITEMS)]
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": [
        {"context": SQUAD_CONTEXT, "qas": qas}]}]}))
    return path


CONLL = [[("John", "B-PER"), ("Smith", "I-PER"), ("lives", "O"), ("in", "O"), ("Paris", "B-LOC"), (".", "O")],
         [("Mary", "B-PER"), ("visited", "O"), ("New", "B-LOC"), ("England", "I-LOC"), ("in", "O"),
          ("1889", "O"), ("!", "O")]]


def conll_file(path, n_copies=1):
    path.write_text("\n\n".join("\n".join(f"{w} {t}" for w, t in s) for s in CONLL * n_copies) + "\n")
    return path


@pytest.mark.parametrize("family", ["bert", "roberta", "xlm-roberta", "modernbert", "deberta-v2"])
def test_squad_gold_spans_map_back_to_their_characters(teachers, family):
    """WordPiece, byte-level BPE and Unigram offsets: each gold answer's token span covers exactly its text, and
    logits peaked there come back as exactly the answer through the post-processing."""
    import datasets

    _, tok = load(teachers[family])
    data = eval_tasks.load_squad(eval_tasks.Args(model="x", task="squad", train_file=str(squad_json(
        teachers[family].parent / f"{family}-squad.json")), validation_file=str(teachers[family].parent /
                                                                               f"{family}-squad.json")))
    examples = data["validation"]
    train = eval_tasks.prepare_squad(examples[:], tok, 48, 16)
    dev = examples.map(eval_tasks.prepare_squad, batched=True, remove_columns=examples.column_names,
                       fn_kwargs=dict(tokenizer=tok, max_len=48, stride=16))
    assert isinstance(dev, datasets.Dataset) and len(dev) > len(examples)  # several windows per question
    outputs = []
    for i in range(len(dev)):
        s, e = train["start_positions"][i], train["end_positions"][i]
        n = len(dev[i]["input_ids"])
        start, end = torch.zeros(n), torch.zeros(n)
        if s > 0:
            answer = examples[[ex["id"] for ex in examples].index(dev[i]["example_id"])]["answers"]["text"][0]
            offsets = dev[i]["offset_mapping"]
            assert SQUAD_CONTEXT[offsets[s][0]:offsets[e][1]].strip() == answer, (family, answer)
            start[s], end[e] = 10.0, 10.0
        outputs.append({"start_logits": start.numpy(), "end_logits": end.numpy()})
    best = eval_tasks.squad_best_spans(examples, dev, outputs, n_best_size=20, max_answer_length=30)
    scores = common.squad_metrics({q: b["text"] for q, b in best.items()},
                                  {ex["id"]: ex["answers"]["text"] for ex in examples})
    assert scores == {"exact_match": 100.0, "f1": 100.0}, family


@pytest.mark.parametrize("family", ["bert", "roberta", "xlm-roberta", "modernbert", "deberta-v2"])
def test_conll_gold_tags_score_one_through_the_features(teachers, family, tmp_path):
    """The first sub-token of each word carries its tag; gold logits there give entity F1 = 1.0. Byte-level BPE
    reads each pre-split word as it reads it in running text (with its leading space)."""
    data = eval_tasks.load_conll(eval_tasks.Args(model="x", task="conll2003", train_file=str(conll_file(
        tmp_path / "c.txt")), validation_file=str(tmp_path / "c.txt")))
    tok = eval_tasks.load_tokenizer(str(teachers[family]), "conll2003")
    head = eval_tasks.task_head(eval_tasks.Args(model="x", task="conll2003"), data)
    features = data.map(eval_tasks.prepare_conll, batched=True, remove_columns=data["train"].column_names,
                        fn_kwargs=dict(tokenizer=tok, label_to_id=head["label2id"], max_len=64))
    outputs = []
    for row in features["validation"]:
        logits = torch.zeros(len(row["input_ids"]), len(head["label2id"]))
        for position, label in enumerate(row["labels"]):
            if label >= 0:
                logits[position, label] = 1.0
        outputs.append({"logits": logits.numpy()})
    predictions = eval_tasks.conll_tags(outputs, features["validation"]["word_index"], data["validation"]["tags"],
                                        head["id2label"])
    assert common.conll_metrics(predictions, data["validation"]["tags"])["f1"] == 1.0
    # the words of a pre-split sentence are tokenised as in running text, each after a space
    words = [w for w, _ in CONLL[1]]
    split = tok(words, is_split_into_words=True, add_special_tokens=False).tokens()
    _, plain = load(teachers[family])
    running = plain(" " + " ".join(words), add_special_tokens=False).tokens()
    assert split == running, (family, split, running)


@pytest.mark.parametrize("family", FAMILIES)
def test_eval_tasks_glue_squad_conll(teachers, family, tmp_path):
    glue = glue_folder(tmp_path / "glue")
    squad = squad_json(tmp_path / "squad.json", n_copies=2)
    conll = conll_file(tmp_path / "conll.txt", n_copies=4)
    base = dict(model=str(teachers[family]), max_steps=2, per_device_train_batch_size=4, logging_steps=1000,
                save_steps=0, device="cpu", seed=0)
    runs = {"sst2": dict(data_dir=str(glue)), "squad": dict(train_file=str(squad), validation_file=str(squad),
                                                            max_seq_length=48, doc_stride=16),
            "conll2003": dict(train_file=str(conll), validation_file=str(conll))}
    expected = {"sst2": "eval_accuracy", "squad": "eval_f1", "conll2003": "eval_f1"}
    for task, flags in runs.items():
        results = eval_tasks.main(eval_tasks.Args(task=task, output_dir=str(tmp_path / task), **base, **flags))
        assert math.isfinite(results[expected[task]]) and results["train_steps"] == 2, (family, task)


# ---- refused layouts -------------------------------------------------------------------------------


def test_shared_and_causal_layouts_are_refused(tmp_path, teachers):
    """ALBERT (one block for every depth) and decoder-only models: one line saying why, nothing written."""
    import transformers

    _, tok = load(teachers["bert"])
    size = dict(vocab_size=len(tok), hidden_size=32, num_attention_heads=2, intermediate_size=64)
    albert = transformers.AlbertConfig(embedding_size=16, **size)
    models = {"shared across depth": transformers.AlbertForMaskedLM(albert),
              "attends causally": transformers.GPT2LMHeadModel(transformers.GPT2Config(
                  vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2)),
              "attends causally ": transformers.LlamaForCausalLM(transformers.LlamaConfig(
                  num_hidden_layers=2, num_key_value_heads=2, **size))}
    for i, (message, model) in enumerate(models.items()):
        folder = tmp_path / f"model{i}"
        model.save_pretrained(str(folder))
        tok.save_pretrained(str(folder))
        with pytest.raises(common.UserError, match=message.strip()) as info:
            iit.main(iit.Args(task="mlm", preset="demo", teacher=str(folder), student_layers="0",
                              output_dir=str(tmp_path / "iit"), train_file=str(iit_corpus(tmp_path)[0]),
                              validation_file=str(tmp_path / "valid.txt")))
        assert "\n" not in str(info.value) and "pass a" in str(info.value)
        with pytest.raises(common.UserError, match=message.strip()):
            adkd.main(adkd.Args(task="sst2", preset="paper", data_dir=str(tmp_path / "glue"), teacher_base=str(folder),
                                student_layers="0", output_dir=str(tmp_path / "adkd")))
        assert not (tmp_path / "iit").exists() and not (tmp_path / "adkd").exists()
