"""What IIT and AD-KD add to a training step, measured on the scripts' own step functions.

    python tests/bench_step_cost.py            # ~10 minutes on 2 CPU cores; uses CUDA when present

Random-weight models of the papers' shapes (no download): a 12-layer bert-base-shaped teacher
(hidden 768, vocab 30,522) and a 6-layer student built from its blocks [0, 2, 4, 7, 9, 11]; batch
8 x 128 tokens. Each step is forward + backward + AdamW update. Methods are timed interleaved
(a few warm-up steps, then the median of several), so every ratio comes from the same run. Peak
memory: CUDA's allocator peak, or on CPU the peak resident set (VmHWM) of a fresh process running
only that method (model weights and optimiser state included). Work: the floating-point operations
of a step (mean over the warm-up steps) as torch.utils.flop_counter counts them (matrix products,
which dominate), so each time ratio can be read against the work ratio beneath it. System time: the
kernel's share of each step (getrusage), mostly page faults; on CPU the scripts call
common.tune_cpu_allocator(), as this benchmark does unless --default_malloc. Not collected by pytest
(the file name does not start with test_).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
import iit_distill as iit  # noqa: E402

BATCH, SEQ = 8, 128
BERT_BASE = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072)


def bert_base_config(num_labels: int | None = None, **shape):
    """bert-base's shape (or another: `shape` overrides BERT_BASE's fields)."""
    from transformers import BertConfig

    config = BertConfig(**{**BERT_BASE, **shape})
    if num_labels:
        config.num_labels = num_labels
    return config


def student_layers(teacher) -> list[int]:
    """Half the teacher's blocks, evenly spaced: [0, 2, 4, 7, 9, 11] of 12."""
    n = teacher.config.num_hidden_layers
    return common.default_student_layers(n, n // 2)


# ---- IIT vs standard distillation --------------------------------------------------------------


def wikitext_lengths(n: int, seed: int = 0, longest: int = 512) -> np.ndarray:
    """Paragraph lengths in tokens like WikiText-103's: log-normal (median ~120, mean ~165), 12 to `longest`."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(120), 0.8, n), 12, longest).astype(int)


def iit_models(device, bf16: bool = False, **shape):
    """Teacher, student (blocks 0,2,4,7,9,11 of 12), optimiser, groups and the KL, as iit_distill.main sets them up
    (on CUDA: the padded vocabulary, compiled blocks and KL, a bf16 teacher)."""
    from transformers import BertForMaskedLM

    torch.manual_seed(0)
    teacher = BertForMaskedLM(bert_base_config(**shape)).to(device).eval().requires_grad_(False)
    student = common.init_student_from_teacher(teacher, student_layers(teacher)).to(device).train()
    for model in (teacher, student) if device.type == "cuda" else ():  # as iit_distill.student_and_groups
        iit.pad_vocabulary(model)
    kl = iit.speed_up(teacher, student, bf16, device.type == "cuda", common.Dist())  # as main, after the probe
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5, fused=device.type == "cuda")
    groups = iit.alignments("full", teacher.config.num_hidden_layers, len(student_layers(teacher)))
    return teacher, student, optimizer, groups, kl


def iit_batch(device, batch: int = BATCH, seq: int = SEQ, lengths=None, seed: int = 0) -> dict:
    """One masked batch as make_batch builds it. lengths: (base, source) real tokens per row, padded as make_batch
    pads (sources cut to the longest base); None: every row `seq` tokens, no padding."""
    g = torch.Generator().manual_seed(seed)
    base_len, source_len = (torch.full((batch,), seq),) * 2 if lengths is None else map(torch.as_tensor, lengths)
    T = int(base_len.max())
    source_len = source_len.clamp(max=T)
    ids, src = (torch.randint(1000, 30000, (batch, T), generator=g) for _ in range(2))
    attn, src_attn = ((torch.arange(T)[None] < n[:, None]).long() for n in (base_len, source_len))
    ids[:, 0] = 101
    labels = torch.where((torch.rand(batch, T, generator=g) < 0.15) & attn.bool(), ids, torch.full_like(ids, -100))
    base_swap, source_swap = iit.interchange_masks(base_len, source_len, T, 0.3, "consecutive", generator=g)
    return {k: v.to(device) for k, v in dict(
        input_ids=ids * attn, attention_mask=attn, labels=labels, label_positions=iit.positions_of(labels != -100),
        source_input_ids=src * src_attn, source_attention_mask=src_attn, base_swap=iit.positions_of(base_swap),
        source_swap=iit.positions_of(source_swap)).items()}


def grouped_lengths(batch: int, count: int, longest: int = 512, seed: int = 0) -> list:
    """`count` batches' (base, source) lengths as iit_distill.micro_batches deals WikiText-like paragraphs: sorted
    by length within a window, spread over the window's range (longest first); each row's source a random one."""
    lengths = wikitext_lengths(50 * batch, seed, longest)
    rng = np.random.default_rng(seed)
    window = -np.sort(-lengths)  # longest first
    picks = np.linspace(0, len(window) // batch - 1, count).astype(int)
    return [(window[p * batch:(p + 1) * batch], rng.choice(lengths, batch)) for p in picks]


def iit_step_fn(method: str, device, batch: int = BATCH, seq: int = SEQ, bf16: bool = False, lengths=None,
                **shape):
    """One optimiser step of iit_distill.py (bf16: under autocast, as the script on CUDA). lengths: a list of
    batches' (base, source) lengths, cycled through; `step.real_tokens` and `step.padded_tokens` per step, mean."""
    teacher, student, optimizer, groups, kl = iit_models(device, bf16, **shape)
    batches = [iit_batch(device, batch, seq, rows, seed) for seed, rows in enumerate(lengths or [None])]
    alpha_iit = 0.0 if method == "standard" else 0.25
    calls = [0]

    def step():
        # FULL alignment samples one group per step; cycle through them so each median sees all layers.
        group = None if method == "standard" else groups[calls[0] % len(groups)]
        inputs = batches[calls[0] % len(batches)]
        calls[0] += 1
        runs = iit.base_source_counterfactual if method == "iit_naive" else iit.base_and_counterfactual
        with common.autocast(device, bf16):
            loss, _ = iit.distillation_loss(student, teacher, inputs, group, alpha_iit=alpha_iit, runs=runs, kl=kl)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step.real_tokens = statistics.mean(int(b["attention_mask"].sum()) for b in batches)
    step.padded_tokens = statistics.mean(b["attention_mask"].numel() for b in batches)
    step.kl = kl
    return step


# ---- AD-KD vs vanilla KD -----------------------------------------------------------------------


def adkd_step_fn(method: str, device, batch: int = BATCH, seq: int = SEQ, bf16: bool = False, **shape):
    """kd: vanilla KD, teacher forward every step (as KD code ordinarily runs); kd_cached: the same with
    the teacher's logits cached (as adkd_distill.py caches them); adkd: the script's step after
    the first epoch (teacher maps and logits cached); adkd_naive: the teacher's attributions recomputed
    every step, as the official code does."""
    import adkd_distill as adkd
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    config = bert_base_config(num_labels=2, **shape)
    teacher = BertForSequenceClassification(config).to(device).eval().requires_grad_(False)
    student = common.init_student_from_teacher(teacher, student_layers(teacher)).to(device).train()
    uses_attr = method.startswith("adkd")
    if uses_attr:  # as adkd_distill.load_student: the double backward needs eager attention
        student.set_attn_implementation("eager")
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5, fused=device.type == "cuda")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (batch, seq), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    batch = {k: v.to(device) for k, v in dict(
        input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids),
        labels=torch.randint(2, (batch,), generator=g), index=torch.arange(batch)).items()}
    cache = adkd.TeacherCache(teacher, num_labels=2, ig_steps=1, topk=config.hidden_size, need_maps=uses_attr,
                              bf16=bf16)
    if method in ("adkd", "kd_cached"):
        cache(batch)  # warm: what every step after the first epoch sees

    def step():
        if method in ("kd", "adkd_naive"):
            cache.maps.clear(), cache.logits.clear()  # recompute the teacher's side this step
        teacher_maps, teacher_logits = cache(batch)
        loss, _ = adkd.adkd_loss(student, batch, teacher_maps, teacher_logits, alpha=0.8,
                                 beta=1.0 if uses_attr else 0.0, temperature=2.0, ig_steps=1, bf16=bf16)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


METHODS = {
    "standard": iit_step_fn, "iit": iit_step_fn, "iit_naive": iit_step_fn,
    "kd": adkd_step_fn, "kd_cached": adkd_step_fn, "adkd": adkd_step_fn, "adkd_naive": adkd_step_fn,
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class _TotalOnly:
    """Stands in for FlopCounterMode's per-module tracker, whose tensor hooks autograd.grad rejects when
    its input is a leaf (the teacher's IG input); the benchmark needs only the total."""
    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def count_flops(step) -> int:
    """Floating-point operations of one call of `step`, as torch.utils.flop_counter counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _TotalOnly()
    with counter:
        step()
    return counter.get_total_flops()


def time_methods(steps: dict, device, warmup: int, repeats: int) -> tuple[dict, dict, dict]:
    """Per method: the wall and system times of the timed steps, and the mean FLOPs of the warm-up steps
    (counting slows a step down, hence only on the untimed ones; at least one warm-up step is run)."""
    times = {name: [] for name in steps}
    system = {name: [] for name in steps}
    flops = {name: [] for name in steps}
    for step in steps.values() if device.type == "cuda" else ():
        step()  # compile first: a compiled function whose first call runs under the FLOP counter stays eager
    for i in range(max(warmup, 1) + repeats):
        for name, step in steps.items():  # interleaved: drifts in machine speed hit every method alike
            if i < max(warmup, 1):
                flops[name].append(count_flops(step))
                continue
            sync(device)
            start, start_sys = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_stime
            step()
            sync(device)
            times[name].append(time.perf_counter() - start)
            system[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_stime - start_sys)
    return times, system, {name: statistics.mean(f) for name, f in flops.items()}


def peak_memory(name: str, device, warmup: int, default_malloc: bool) -> float:
    """MiB: CUDA allocator peak, or the peak RSS of a fresh process that runs only `name`."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        step = METHODS[name](name, device)
        for _ in range(warmup):
            step()
        return torch.cuda.max_memory_allocated() / 2**20
    flags = ["--default_malloc"] if default_malloc else []
    out = subprocess.run([sys.executable, __file__, "--only", name, "--warmup", str(warmup), *flags],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mib"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--methods", default="standard,iit,iit_naive,kd,kd_cached,adkd,adkd_naive")
    parser.add_argument("--no_memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--default_malloc", action="store_true", help="without common.tune_cpu_allocator()")
    parser.add_argument("--only", help=argparse.SUPPRESS)  # internal: one method in a fresh process
    cli = parser.parse_args()
    device = common.get_device("auto")
    if device.type == "cpu" and not cli.default_malloc:
        common.tune_cpu_allocator()  # as the scripts do on CPU
    if cli.only:
        step = METHODS[cli.only](cli.only, device)
        for _ in range(cli.warmup):
            step()
        # VmHWM: this process's own peak resident set (ru_maxrss would include the parent's, kept over exec)
        status = Path("/proc/self/status").read_text() if Path("/proc/self/status").exists() else ""
        hwm = [line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")]
        peak_kib = int(hwm[0]) if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"peak_rss_mib": peak_kib / 1024}))
        return
    names = cli.methods.split(",")
    allocator = "glibc defaults" if cli.default_malloc else "common.tune_cpu_allocator()"
    print(f"device {device}, torch threads {torch.get_num_threads()}, batch {BATCH} x {SEQ} tokens, "
          f"bert-base teacher (12 x 768), 6-layer student; {cli.warmup} warm-up + {cli.repeats} timed steps each; "
          f"CPU allocator: {allocator}")
    steps = {name: METHODS[name](name, device) for name in names}
    times, system, flops = time_methods(steps, device, cli.warmup, cli.repeats)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    memory = {} if cli.no_memory else {name: peak_memory(name, device, cli.warmup, cli.default_malloc)
                                       for name in names}
    for name in names:
        mem = f"  peak memory {memory[name]:8.0f} MiB" if name in memory else ""
        print(f"{name:11s} step {median[name] * 1000:8.0f} ms (min {min(times[name]) * 1000:.0f}, "
              f"max {max(times[name]) * 1000:.0f}, system {statistics.median(system[name]) * 1000:.0f})  "
              f"work {flops[name] / 1e9:6.0f} GFLOP{mem}")
    ratios = [("iit_over_standard", "iit", "standard"), ("iit_naive_over_standard", "iit_naive", "standard"),
              ("adkd_over_kd", "adkd", "kd"), ("adkd_naive_over_kd", "adkd_naive", "kd"),
              ("kd_cached_over_kd", "kd_cached", "kd")]
    for label, a, b in ratios:
        if a in median and b in median:
            print(f"{label}={median[a] / median[b]:.2f}  (work ratio {flops[a] / flops[b]:.2f})")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
