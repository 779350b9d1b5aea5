"""KVRows: the duck-typed Cache contract it relies on, planned (fixed) buffers, growth that
survives running out of memory."""

from __future__ import annotations

import pytest
import torch

import chatglm3.model.kv_rows as kv_rows
from chatglm3.model.kv_rows import KVRows


def rows_for(model, **kwargs) -> KVRows:
    cfg = model.config
    return KVRows(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim,
                  torch.device("cpu"), torch.float32, **kwargs)


class Spy:
    """Stands in for a cache object and records which of its attributes are read."""

    def __init__(self, inner: KVRows) -> None:
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "read", [])

    def __getattr__(self, name: str):
        self.read.append(name)
        return getattr(self._inner, name)


def test_a_decoding_step_uses_only_update_and_our_mask(tiny_model_fp32) -> None:
    """What kv_rows' docstring says about transformers' glm code and masking utils: the forward
    pass reads nothing of the cache but `update` (once per layer), and every attention layer
    gets the very 4-D mask object made by prepare_step."""
    model = tiny_model_fp32
    kv = rows_for(model, rows=2, capacity=64)
    spy = Spy(kv)
    positions = torch.tensor([5, 9])
    mask = kv.prepare_step(positions, read_len=16)
    seen_masks = []
    hooks = [layer.self_attn.register_forward_pre_hook(
        lambda _m, _a, kw: seen_masks.append(kw["attention_mask"]), with_kwargs=True)
        for layer in model.model.layers]
    try:
        with torch.inference_mode():
            model(input_ids=torch.tensor([[11], [12]]), position_ids=positions[:, None],
                  attention_mask=mask, cache=spy, logits_to_keep=1)
    finally:
        for h in hooks:
            h.remove()
    assert spy.read == ["update"] * model.config.num_hidden_layers
    assert len(seen_masks) == model.config.num_hidden_layers
    assert all(m is mask for m in seen_masks)
    assert mask.shape == (2, 1, 1, 16) and mask.dtype == torch.bool


def test_update_returns_only_the_read_length(tiny_model_fp32) -> None:
    kv = rows_for(tiny_model_fp32, rows=4, capacity=1024)
    kv.prepare_step(torch.tensor([3, 7]), read_len=256)
    k = torch.randn(2, *kv.shape)[:, :, None]
    keys, values = kv.update(k, k, 0)
    assert keys.shape == (2, kv.shape[0], 256, kv.shape[1])
    assert keys.data_ptr() == kv.keys[0].data_ptr()  # a view: the address a graph holds
    torch.testing.assert_close(kv.keys[0][1, :, 7], k[1, :, 0])


def test_planned_rows_never_reallocate(tiny_model_fp32) -> None:
    kv = rows_for(tiny_model_fp32, rows=2, capacity=512, growable=False)
    addresses = [t.data_ptr() for t in kv.keys + kv.values]
    kv.reserve(2, 512)
    kv.reset()
    assert [t.data_ptr() for t in kv.keys + kv.values] == addresses and kv.version == 0
    with pytest.raises(RuntimeError, match="planned once at 2 rows of 512"):
        kv.reserve(3, 10)
    with pytest.raises(RuntimeError, match="planned once"):
        kv.reserve(1, 513)


def test_growth_out_of_memory_leaves_the_cache_whole(tiny_model_fp32, monkeypatch) -> None:
    """Out of memory halfway through growing: the old buffers stay, all of one shape, with
    their contents; the next growth works."""
    kv = rows_for(tiny_model_fp32, rows=1, capacity=256)
    kv.keys[1][0, :, 5] = 1.5
    made = []
    real_empty = kv._empty

    def failing_empty(rows: int, capacity: int) -> torch.Tensor:
        made.append(1)
        if len(made) == 3:
            raise torch.OutOfMemoryError("injected")
        return real_empty(rows, capacity)

    monkeypatch.setattr(kv, "_empty", failing_empty)
    with pytest.raises(torch.OutOfMemoryError):
        kv.reserve(2, 1000)
    assert {(t.shape[0], t.shape[2]) for t in kv.keys + kv.values} == {(1, 256)}
    assert kv.version == 0 and float(kv.keys[1][0, 0, 5, 0]) == 1.5
    monkeypatch.setattr(kv, "_empty", real_empty)
    kv.reserve(2, 1000)
    assert (kv.rows, kv.capacity, kv.version) == (2, 1024, 1)
    assert float(kv.keys[1][0, 0, 5, 0]) == 1.5
    kv.reset()
    assert (kv.rows, kv.capacity, kv.version) == (1, 256, 2)


def test_bytes_per_token(tiny_model_fp32) -> None:
    assert rows_for(tiny_model_fp32).bytes_per_token == 2 * 2 * 2 * 64 * 4
