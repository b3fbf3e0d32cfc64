"""Plumbing shared by the distillation and evaluation scripts.

Seeding and devices, torchrun/DDP set-up, loading models and data from a local path or the
Hugging Face Hub with one-line errors, checkpoints that resume exactly, the teacher -> student
layer map, and task scoring. Nothing here knows which distillation method is running: the method
scripts import these helpers, never the other way round.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import shutil
import socket
import sys
import urllib.parse
from pathlib import Path

import numpy as np
import torch


# ----------------------------------------------------------------------------------------------
# Errors and the command line


class UserError(Exception):
    """Bad input from the user. `run_cli` prints it as one line and exits with status 2."""


def run_cli(main, args_class, argv=None):
    """Parse `argv` into `args_class` with HfArgumentParser, run `main(args)` and turn a
    `UserError` into one `error: ...` line on stderr with exit status 2 (no traceback)."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(args_class)
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    try:
        return main(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def apply_preset(args, preset: dict) -> None:
    """Fill every field of `args` that is still None from `preset`; a flag given explicitly wins."""
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def args_to_dict(args) -> dict:
    return dataclasses.asdict(args) if dataclasses.is_dataclass(args) else dict(vars(args))


# ----------------------------------------------------------------------------------------------
# Seeding, devices, precision, DDP


def set_seed(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch once. `deterministic` asks torch for deterministic kernels
    (bitwise reproducibility on GPU is still not promised)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def get_device(name: str = "auto") -> torch.device:
    """'auto' picks cuda, then mps, then cpu; any other string is passed to torch.device."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast when asked for (CUDA or CPU), else a no-op context."""
    if bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclasses.dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str = "auto") -> tuple[Dist, torch.device]:
    """nanoGPT-style DDP: on when torchrun sets RANK/WORLD_SIZE (nccl on CUDA, gloo on CPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist(), get_device(device_name)
    dist = Dist(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))
    device = get_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist, device


def cleanup_distributed(dist: Dist) -> None:
    if dist.enabled and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# Loading models, tokenizers and datasets from a local path or the Hub


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        from huggingface_hub import constants

        host = urllib.parse.urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    except Exception:  # an old or unusual huggingface_hub: fall back to the public host
        host = "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _looks_like_path(name: str) -> bool:
    """A hub id is `name` or `namespace/name`; anything else is meant as a local path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def from_pretrained(cls, name_or_path: str, what: str, flag: str, **kwargs):
    """`cls.from_pretrained(name_or_path)` with one-line errors.

    A local folder loads directly. A hub id is tried from the local cache first, then from the Hub;
    when it is in neither and the Hub is unreachable, the error names the flag that takes a local
    path instead. `what` ("teacher", "tokenizer", ...) and `flag` ("--teacher") word the message.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{what} '{name_or_path}' is a file; {flag} takes a model folder or a hub id")
        try:
            return cls.from_pretrained(str(path), **kwargs)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"cannot load {what} from '{name_or_path}': {first}") from None
    if _looks_like_path(name_or_path):
        raise UserError(f"{what} folder '{name_or_path}' does not exist; pass an existing folder to {flag}")
    try:
        return cls.from_pretrained(name_or_path, local_files_only=True, **kwargs)
    except (OSError, ValueError):
        pass
    if not _hub_reachable():
        raise UserError(
            f"{what} '{name_or_path}' is not a local folder, not in the Hugging Face cache, and the Hub is "
            f"unreachable; pass a local model folder to {flag}"
        )
    try:
        return cls.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load {what} '{name_or_path}': {first}") from None


def load_hub_dataset(name: str, config: str | None, flag_hint: str, **kwargs):
    """`datasets.load_dataset(name, config)` from the cache or the Hub, with a one-line error naming
    the local-file flags to use instead when the Hub cannot be reached."""
    import datasets

    try:
        return datasets.load_dataset(name, config, download_mode="reuse_cache_if_exists", **kwargs)
    except Exception:
        if not _hub_reachable():
            raise UserError(
                f"dataset '{name}' ({config}) is not cached and the Hugging Face Hub is unreachable; "
                f"pass {flag_hint} instead"
            ) from None
    try:
        return datasets.load_dataset(name, config, **kwargs)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load dataset '{name}' ({config}): {first}") from None


def require_file(path: str | None, flag: str) -> None:
    """A readable, non-empty file, or a UserError naming the flag."""
    if path is None:
        return
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{flag} '{path}' does not exist")
    if p.stat().st_size == 0:
        raise UserError(f"{flag} '{path}' is empty")


# ----------------------------------------------------------------------------------------------
# Layer alignment: which teacher blocks initialise which student blocks


def parse_layers(text: str) -> list[int]:
    """'0,2,4' -> [0, 2, 4]."""
    try:
        return [int(x) for x in str(text).replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise UserError(f"layer list '{text}' is not comma-separated integers, e.g. 0,2,4,7,9,11") from None


def default_student_layers(num_teacher_layers: int, num_student_layers: int) -> list[int]:
    """Evenly spaced teacher blocks, first and last included: for 12 -> 6 this is the official
    DistilBERT / Causal-Distill choice [0, 2, 4, 7, 9, 11]."""
    if num_student_layers == 1:
        return [num_teacher_layers - 1]
    step = (num_teacher_layers - 1) / (num_student_layers - 1)
    return [int(i * step + 0.5) for i in range(num_student_layers)]


def init_student_from_teacher(teacher, layers: list[int]):
    """A copy of `teacher` (same class and width) that keeps only the encoder blocks in `layers`,
    in that order. Embeddings, pooler and task/MLM heads are copied whole."""
    n = teacher.config.num_hidden_layers
    bad = [layer for layer in layers if not 0 <= layer < n]
    if not layers or bad:
        raise UserError(f"student layers {layers} must be non-empty and within the teacher's 0..{n - 1}")
    config = teacher.config.__class__.from_dict(teacher.config.to_dict())
    config.num_hidden_layers = len(layers)
    student = teacher.__class__(config)
    source = teacher.state_dict()
    mapped = {}
    for key in student.state_dict():
        if ".encoder.layer." in key:
            prefix, rest = key.split(".encoder.layer.", 1)
            index, tail = rest.split(".", 1)
            key_in_teacher = f"{prefix}.encoder.layer.{layers[int(index)]}.{tail}"
        else:
            key_in_teacher = key
        mapped[key] = source[key_in_teacher].clone()
    student.load_state_dict(mapped, strict=True)
    return student


# ----------------------------------------------------------------------------------------------
# Outputs and checkpoints: everything is written to a temporary name, then renamed


def write_json(path: str | Path, obj) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def save_model(output_dir: str | Path, model, tokenizer) -> None:
    """`save_pretrained` model and tokenizer into a temporary sibling folder, then move the files in,
    so `output_dir` never holds half a model."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = output_dir / ".saving"
    shutil.rmtree(tmp, ignore_errors=True)
    unwrap(model).save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    for f in tmp.iterdir():
        os.replace(f, output_dir / f.name)
    tmp.rmdir()


def unwrap(model):
    """The bare model inside DistributedDataParallel (no wrapper prefixes in saved weights)."""
    return model.module if hasattr(model, "module") else model


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(output_dir: str | Path, step: int, model, tokenizer, optimizer, scheduler, state: dict,
                    keep: int = 2) -> Path:
    """`output_dir/checkpoint-<step>/`: the model (save_pretrained, safetensors), tokenizer and
    `training_state.pt` (optimizer, scheduler, RNG states and whatever `state` holds, e.g. the data
    position). Written under a temporary name and renamed; only the newest `keep` are kept."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    unwrap(model).save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": rng_state(), **state}, tmp / "training_state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    old = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    for p in old[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path, model, optimizer, scheduler) -> dict:
    """Restore what `save_checkpoint` wrote into `model`, `optimizer`, `scheduler` and the RNGs;
    return the rest of the saved state. Weights come from safetensors, the rest with
    `weights_only=True`. A missing or corrupt checkpoint is a one-line UserError."""
    from safetensors.torch import load_file

    path = Path(path)
    weights, state_file = path / "model.safetensors", path / "training_state.pt"
    if not weights.is_file() or not state_file.is_file():
        raise UserError(f"checkpoint '{path}' has no model.safetensors and training_state.pt; "
                        f"pass a checkpoint-<step> folder to --resume_from_checkpoint")
    try:
        tensors = load_file(str(weights))
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"checkpoint '{path}' is corrupt ({type(e).__name__}); pass another one") from None
    bare = unwrap(model)
    missing, unexpected = bare.load_state_dict(tensors, strict=False)
    # Tied weights (the MLM decoder shares the word embeddings) are saved once; anything else missing
    # means the checkpoint belongs to another model.
    tied = set(getattr(bare, "_tied_weights_keys", None) or [])
    if unexpected or any(k not in tied and "decoder" not in k for k in missing):
        raise UserError(f"checkpoint '{path}' does not match this model (missing {list(missing)[:3]}, "
                        f"unexpected {list(unexpected)[:3]})")
    optimizer.load_state_dict(state.pop("optimizer"))
    scheduler.load_state_dict(state.pop("scheduler"))
    set_rng_state(state.pop("rng"))
    return state


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = sorted(Path(output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return found[-1] if found else None

