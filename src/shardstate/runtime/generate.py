"""Greedy generation with a KV cache for a batch of prompts of different lengths (left-padded)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shardstate.models.decoder import DecoderForCausalLM, KVCache

TopLogprobs = list[tuple[int, float]]  # (token id, log-probability), most likely first


@dataclass
class Generation:
    token_ids: list[list[int]]  # new tokens per prompt
    first_logits: torch.Tensor  # [batch, vocab] fp32: the logits after the prompt (the first step)
    logprobs: list[list[TopLogprobs]] | None = None  # per prompt, per new token: the step's top log-probabilities


def top_logprobs(logits: torch.Tensor, k: int) -> list[TopLogprobs]:
    """Each row's `k` most likely tokens with their log-probabilities (log-softmax in fp32 over the real
    vocabulary), most likely first: the greedy choice and how far ahead of the runners-up it was."""
    values, ids = torch.log_softmax(logits.float(), dim=-1).topk(min(k, logits.shape[-1]), dim=-1)
    return [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]


def _attention_mask(valid: torch.Tensor, cache_pos: int, steps: int, window: int | None) -> torch.Tensor:
    """[batch, 1, steps, cache_pos + steps] bool: causal, within the last `window` positions (sliding-window
    attention; None: all), no attention to padding keys. A padding query may see itself so that no row is
    all-False (its output is never used). Prompts are left-padded, so cache slots are positions plus a
    per-row constant and windows measured in slots are windows in positions."""
    total = cache_pos + steps
    query_pos = torch.arange(cache_pos, total, device=valid.device).unsqueeze(-1)
    key_pos = torch.arange(total, device=valid.device)
    causal = key_pos <= query_pos
    if window is not None:
        causal &= key_pos > query_pos - window
    mask = causal.unsqueeze(0) & valid[:, None, :total]
    mask |= (key_pos == query_pos).unsqueeze(0)
    return mask.unsqueeze(1)


@torch.inference_mode()
def greedy_generate(
    model: DecoderForCausalLM,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_token_ids: tuple[int, ...] = (),
    logprobs: int | None = None,
) -> Generation:
    """Argmax decoding. A sequence stops after emitting an id in `eos_token_ids` (kept in its output).
    With `logprobs` = k, each new token also gets its step's k most likely tokens (`top_logprobs`)."""
    device = next(model.parameters()).device
    window = model.config.sliding_window
    batch, longest = len(prompts), max(len(p) for p in prompts)
    total = longest + max_new_tokens
    ids = torch.zeros(batch, longest, dtype=torch.long, device=device)
    valid = torch.zeros(batch, total, dtype=torch.bool, device=device)
    valid[:, longest:] = True  # generated positions
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        valid[row, longest - len(prompt) :] = True
    positions = (valid[:, :longest].long().cumsum(-1) - 1).clamp(min=0)
    cache = KVCache.allocate(model, batch, total)
    outputs: list[list[int]] = [[] for _ in prompts]
    steps: list[list[TopLogprobs]] | None = None if logprobs is None else [[] for _ in prompts]
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    eos = torch.tensor(eos_token_ids, dtype=torch.long, device=device)
    cache_pos, first_logits = 0, None
    for _ in range(max_new_tokens):
        logits = model(ids, positions, _attention_mask(valid, cache_pos, ids.shape[1], window), cache, cache_pos)
        if first_logits is None:
            first_logits = logits.float().cpu()
        cache_pos += ids.shape[1]
        next_ids = logits.argmax(-1)
        tops = None if steps is None else top_logprobs(logits, logprobs)
        for row in range(batch):
            if not finished[row]:
                outputs[row].append(int(next_ids[row]))
                if steps is not None:
                    steps[row].append(tops[row])
        finished |= torch.isin(next_ids, eos)
        if bool(finished.all()):
            break
        ids = next_ids.unsqueeze(-1)
        positions = positions[:, -1:] + 1
    if first_logits is None:  # max_new_tokens == 0: still report the prompt's logits
        first_logits = model(ids, positions, _attention_mask(valid, 0, longest, window), cache, 0).float().cpu()
    return Generation(outputs, first_logits, steps)
