"""tests/gpu_check.py's CPU mode, as a user runs it: every section on tiny shapes, so the GPU check cannot rot."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_KEYS = {"ms_per_step", "sequences_per_s", "flops_per_step", "mfu", "peak_memory_mib"}


def test_gpu_check_tiny_on_cpu(tmp_path):
    command = [sys.executable, str(ROOT / "tests" / "gpu_check.py"), "--device", "cpu", "--tiny", "--out",
               str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300,
                            env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["device"]["type"] == "cpu" and report["matmul_tflops"] > 0
    for section in ("exactness", "entry_points", "ddp", "bench", "loop", "tokenization"):
        assert report[section]["ok"] is True, (section, report[section])
    exact = report["exactness"]
    assert exact["fp32_terms"] <= 1e-4 and exact["fp32_grads"] <= 1e-4 and exact["probe_accepts_one_forward"]
    assert exact["student_blocks_bit_for_bit"] and exact["ig_completeness_error_m512"] < 0.03
    assert set(report["entry_points"]) >= {"iit_mlm", "iit_sst2", "adkd_sst2", "eval_sst2", "eval_squad",
                                           "eval_conll2003", "resume"}
    assert report["entry_points"]["resume"]["bit_for_bit"]  # one CPU process with --deterministic: exact
    for method in ("standard", "iit", "iit_naive", "kd", "adkd", "adkd_naive"):
        figures = report["bench"][method]
        assert set(figures) >= BENCH_KEYS and figures["flops_per_step"] > 0 and 0 < figures["mfu"] < 1
    ratios = report["bench"]["ratios"]
    assert 1.9 < ratios["iit_over_standard"]["work"] < 2.1  # the objective's own floor: twice the rows
    assert report["ddp"]["backend"] == "gloo" and report["tokenization"]["tokens"] > 1e5
    for step in ("standard", "iit"):  # padded, WikiText-like batches: real tokens per second, MFU on real tokens
        figures = report["bench"]["padded"][step]
        assert figures["real_tokens_per_s"] > 0 and 0 < figures["mfu"] <= figures["mfu_with_padding"]
    assert report["bench"]["compiled_kl_ran"] is None  # CPU: no compiled KL in the profile to look for
    loop = report["loop"]  # main's own loop: real tokens per second from its step lines
    assert loop["real_tokens_per_s"] > 0 and loop["device_idle_share"] is None and loop["step_lines"] == 3
    assert "vs_step_benchmark" in loop
    assert "| step | ms |" in result.stdout  # the one table
