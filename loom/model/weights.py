"""Streaming the tensors of a Hugging Face safetensors checkpoint (single file or sharded)."""

from __future__ import annotations

import json
from collections.abc import Collection, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def safetensors_files(model_dir: Path) -> list[Path]:
    """The weight files of ``model_dir``, in index order; ValueError if there are none."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: malformed safetensors index ({e})") from e
        files = [model_dir / name for name in dict.fromkeys(weight_map.values())]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"{index}: shards listed but missing: {', '.join(missing)}")
        return files
    if (model_dir / SINGLE_FILE).is_file():
        return [model_dir / SINGLE_FILE]
    raise ValueError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE}")


def iter_weights(model_dir: Path, skip: Collection[str] = ()) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every weight of the checkpoint in ``model_dir`` but those named in
    ``skip``, in its stored dtype.

    Tensors are read one at a time (memory-mapped), so the whole model is never held twice.
    """
    for file in safetensors_files(model_dir):
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    if name not in skip:
                        yield name, f.get_tensor(name)
        except SafetensorError as e:
            raise ValueError(f"{file}: unreadable safetensors file ({e})") from e
