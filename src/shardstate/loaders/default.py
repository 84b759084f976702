"""`default`: every rank reads every tensor of every file and slices out its part (vLLM's way today;
the baseline the other loaders are measured against)."""

from __future__ import annotations

from shardstate.io.reader import ReadAccount
from shardstate.loaders.base import LoadTarget, open_checked
from shardstate.spec import cut
from shardstate.store.model_dir import ModelDir


def load_default(target: LoadTarget, directory: ModelDir) -> ReadAccount:
    with ReadAccount(directory.remote_weights()) as account:
        checkpoint = open_checked(target.specs, directory.path, account, target.elsewhere)
        by_source: dict[str, list] = {}
        for dest, copy in target.zero_padding_and_plan():
            by_source.setdefault(copy.source, []).append((dest, copy))
        for header in checkpoint.headers:
            for name, entry in header.tensors.items():
                whole = account.read_tensor(header.path, entry.begin, entry.dtype, entry.shape)
                for dest, copy in by_source.get(name, []):
                    dest.copy_(cut(whole, copy.src))
    return account
