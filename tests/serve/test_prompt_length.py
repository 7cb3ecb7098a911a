"""The prompt length the server assumes for a chat without max_tokens (the rest of the context is then
generated) is the length the engine's batch builder gives the same prompt, for each way media reach the LM
(IDEFICS's wrapped markers, OpenFlamingo's plain ones, LLaVA's markers expanded to feature positions)."""

from __future__ import annotations

import numpy as np
import pytest
from serve_util import FAMILIES, tiny_model

from lmmrt.runtime.batch import build_batch
from lmmrt.serve.prompt_length import prompt_length


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_length_is_the_batch_length(family):
    model = tiny_model(family)
    image = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    for prompt, n_images in [("User: hi\nAssistant:", 0), ("User: <image>and<image><image> differ?\nAssistant:", 3),
                             ([1, 40, 3, 41, 42], 1)]:
        batch = build_batch(model, [prompt], [[image] * n_images])
        assert prompt_length(model, prompt) == batch.lengths[0], (family, prompt)
