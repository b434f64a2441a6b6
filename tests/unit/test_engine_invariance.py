"""B5 at the engine level, as served on CPU: a seeded request gives the same tokens alone and next to
requests of other lengths. (Before per-row exact attention this case diverged at the 8th token.)"""

from __future__ import annotations

import torch

from conftest import CACHE
from mygpt.config import Settings
from mygpt.engine.engine import Engine
from mygpt.engine.loader import load_model
from mygpt.engine.runner import ModelRunner
from test_engine import Collector


def test_seeded_output_alone_equals_output_among_other_lengths(default_checkpoint):
    lm = load_model(Settings(cache_dir=CACHE, quantization="nf4"))
    runner = ModelRunner(lm.model, 16, 512, torch.float32, lm_head_dtype=torch.bfloat16, exact_attention=True)
    engine = Engine(runner, lm.tokenizer, lm.eos_token_ids)
    engine.start()
    try:

        def ids(text: str) -> list[int]:
            msgs = [{"role": "user", "content": text}]
            return lm.tokenizer.apply_chat_template(
                msgs, add_generation_prompt=True, tokenize=True, return_dict=False
            )

        ask = ids("Name three colors of the rainbow.")
        alone = Collector()
        alone.submit(engine, "alone", ask, temperature=0.9, seed=1234, max_tokens=24)
        alone.wait()
        busy = Collector()
        for i in range(3):
            busy.submit(
                engine, f"n{i}", ids(f"Tell me about the number {i}."), max_tokens=32, temperature=0.0
            )
        busy.submit(engine, "s", ask, temperature=0.9, seed=1234, max_tokens=24)
        busy.wait()
        assert busy.tokens("s") == alone.tokens("alone")
    finally:
        engine.stop()
