"""`sliced`: each rank reads only the byte ranges of its own slices from the HF safetensors files."""

from __future__ import annotations

import torch

from shardstate.io.reader import ReadAccount, byte_view
from shardstate.loaders.base import LoadTarget, open_checked
from shardstate.spec import byte_runs
from shardstate.store.model_dir import ModelDir


def load_sliced(target: LoadTarget, directory: ModelDir) -> ReadAccount:
    with ReadAccount() as account:
        checkpoint = open_checked(target.specs, directory.path, account)
        plan = [(checkpoint.tensors[copy.source], dest, copy) for dest, copy in target.zero_padding_and_plan()]
        plan.sort(key=lambda item: (str(item[0].file), item[0].entry.begin, item[2].src))
        for location, dest, copy in plan:
            entry = location.entry
            # Same dtype into contiguous memory: read straight into the parameter; else read, then copy once.
            direct = entry.dtype == dest.dtype and dest.is_contiguous()
            staging = dest if direct else torch.empty(dest.shape, dtype=entry.dtype)
            memory = byte_view(staging)
            filled = 0
            for offset, length in byte_runs(entry.shape, entry.dtype.itemsize, copy.src):
                account.read_into(location.file, entry.begin + offset, memory[filled : filled + length])
                filled += length
            if staging is not dest:
                dest.copy_(staging)
    return account
