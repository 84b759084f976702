"""`sliced`: each rank reads only the byte ranges of its own slices from the HF safetensors files (local
files: each run straight into the parameter; objects: each slice one ranged read; loaders/boxes.py)."""

from __future__ import annotations

from shardstate.io.reader import ReadAccount
from shardstate.loaders.base import LoadTarget, open_checked
from shardstate.loaders.boxes import read_boxes
from shardstate.store.model_dir import ModelDir


def load_sliced(target: LoadTarget, directory: ModelDir) -> ReadAccount:
    with ReadAccount(directory.remote_weights()) as account:
        checkpoint = open_checked(target.specs, directory.path, account, target.elsewhere)
        read_boxes([(checkpoint.tensors[copy.source], dest, copy) for dest, copy in target.zero_padding_and_plan()],
                   account)
    return account
