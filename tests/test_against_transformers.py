"""shardstate's TP runtime against transformers' LlamaForCausalLM on the same checkpoint (fp32)."""

from __future__ import annotations

import pytest
import torch

from conftest import PROMPTS, transformers_greedy
from shardstate import LLM

STEPS = 8


@pytest.mark.parametrize(
    "tp", [1, 2, pytest.param(4, marks=pytest.mark.slow)], ids=lambda tp: f"tp{tp}"
)
@pytest.mark.parametrize("name", ["gqa_untied", "mha_tied"])
def test_logits_and_greedy_tokens_match_transformers(checkpoints, name, tp):
    model_dir = checkpoints[name]
    ref_tokens, ref_logits = transformers_greedy(model_dir, PROMPTS, STEPS)
    assert len({tuple(t) for t in ref_tokens}) > 1, "the reference model should not repeat one answer"
    with LLM(model_dir, tensor_parallel_size=tp, load_format="sliced") as llm:
        outputs = llm.generate(PROMPTS, max_new_tokens=STEPS, ignore_eos=True)
    logits = torch.stack([o.logits for o in outputs])
    assert logits.shape == ref_logits.shape == (len(PROMPTS), 203)
    scale = ref_logits.abs().max()
    assert (logits - ref_logits).abs().max() / scale < 1e-4
    assert [o.token_ids for o in outputs] == ref_tokens
