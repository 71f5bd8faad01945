"""Soundness over a real zoo: torchvision, timm and Hugging Face models built without downloads.

For each model: norm statistics and constant parameters are randomised (so a forgotten
buffer shows), a random permutation of every group must leave the outputs equal within
1e-4 relative error, lint must pass, and the group count must reach a hand-counted floor.
A negative control proves the oracle can fail on the same model: permuting only one
member of a group must change the outputs.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from permgraph import VerificationError
from permgraph.testing import EXTRA_ZOO, WIDE_ZOO, ZOO, check_sound
from tests.helpers import permuted_rows

ALL = ZOO | EXTRA_ZOO | WIDE_ZOO


@pytest.mark.filterwarnings("ignore")  # the libraries' own warnings about tiny configs
@pytest.mark.parametrize("name", list(ALL))
def test_zoo_is_sound(name: str) -> None:
    entry = ALL[name]
    model, inputs = entry.build(), entry.inputs()
    spec, err = check_sound(model, inputs)
    assert err < 1e-4
    assert len(spec.groups) >= entry.floor, spec
    # every permuted unit belongs to a state_dict tensor of the model
    state = model.state_dict()
    assert all(m.key in state for g in spec.groups for m in g.members)

    # negative control: the largest group with several members, permuted in one member only
    group = max((g for g in spec.groups if len(g.members) > 1), key=lambda g: g.size)
    broken = dataclasses.replace(spec, groups=(dataclasses.replace(group, members=group.members[:1]),))
    with pytest.raises(VerificationError) as info:
        broken.verify(model, inputs, generator=torch.Generator().manual_seed(1))
    assert info.value.culprits == (group.name,)


def test_causal_lm_returning_its_cache_is_traced_and_sound() -> None:
    """With ``use_cache`` left on, a Hugging Face causal LM returns a ``DynamicCache`` that
    torch.export cannot flatten; its key/value tensors still count as outputs, so they pin
    the heads they hold while the residual stream stays permutable."""
    entry = EXTRA_ZOO["llama"]
    model, inputs = entry.build(), {"input_ids": entry.inputs()["input_ids"]}
    spec, err = check_sound(model, inputs)
    assert err < 1e-4
    with_cache_off, _ = check_sound(entry.build(), entry.inputs())
    assert 0 < len(spec.groups) < len(with_cache_off.groups)
    assert permuted_rows(spec, "model.embed_tokens.weight", 1) == 64  # the residual stream
    assert permuted_rows(spec, "model.layers.0.self_attn.k_proj.weight", 0) == 0  # held by the cache
    assert permuted_rows(with_cache_off, "model.layers.0.self_attn.k_proj.weight", 0) > 0
