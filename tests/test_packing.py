"""The packed fast path equals the padded path: outputs per sequence and gradients, on CPU in fp32."""

from __future__ import annotations

import pytest
import torch

from embedtune import FastModel
from embedtune.packing import PACKED_FORWARDS, disable_fast_path, enable_fast_path
from embedtune.graphs import _fixed_stream_on, _packed_forwards
from embedtune.packing.varlen import PackedBatch, bucketed_sdpa, padded_sdpa, varlen_attention
from tiny_models import make_tiny_model

ARCHS = sorted(PACKED_FORWARDS)
TEXTS = [
    "short",
    "a much longer sentence with many more tokens in it so that padding matters a lot here",
    "def f(x):\n    return x + 1",
    "another medium length sentence",
]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_packed")


def _no_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def _load(arch, root, lora: bool):
    torch.manual_seed(0)
    model, tok = FastModel.from_pretrained(str(make_tiny_model(arch, root)), max_seq_length=64, fast=False)
    if lora:
        model = FastModel.get_peft_model(model, r=4)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
    _no_dropout(model)
    return model, tok


def _outputs_and_grads(model, batch):
    model.zero_grad()
    out = model(**batch).last_hidden_state
    mask = batch["attention_mask"].bool()
    weights = torch.linspace(0.5, 1.5, out.shape[-1])
    (out[mask] * weights).pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return out.detach(), grads


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_packed_equals_padded(arch, lora, padding_side, tiny_root):
    """Reference: HF's padded forward on a right-padded batch (BERT-family position ids assume it).
    The packed path must match it per sequence for either padding side."""
    _check_packed_equals_padded(arch, lora, padding_side, tiny_root)


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_stream_padded_to_a_token_multiple_equals_padded(arch, tiny_root, monkeypatch):
    """The same with the packed stream padded to a token multiple (filler sequences), as used for
    static shapes under compile; architectures whose attention takes a per-sequence bias (MPNet,
    DeBERTa) ignore the multiple and stay exact trivially."""
    streams = []
    original = PackedBatch.from_mask.__func__

    def spy(cls, mask, token_multiple=None):
        plan = original(cls, mask, token_multiple)
        streams.append((plan.tokens, plan.stream))
        return plan

    monkeypatch.setattr(PackedBatch, "from_mask", classmethod(spy))
    _check_packed_equals_padded(arch, False, "right", tiny_root, token_multiple=64)
    assert streams
    if arch not in ("mpnet", "deberta-v2"):
        assert all(stream % 64 == 0 and stream > tokens for tokens, stream in streams), streams


FIXED_STREAM_ARCHS = [a for a in ARCHS if a not in ("mpnet", "deberta-v2")]  # bias-taking attention: host plans


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("arch", FIXED_STREAM_ARCHS)
def test_fixed_length_stream_equals_padded(arch, lora, tiny_root, monkeypatch):
    """The same with the stream a fixed length built on the device (what CUDA graph capture uses,
    `embedtune.graphs`): fillers past the real tokens, filler rows of `pack` zero, `unpack` drops them."""
    plans = []
    original = PackedBatch.fixed.__func__

    def spy(cls, mask, stream):
        plan = original(cls, mask, stream)
        plans.append(plan)
        return plan

    monkeypatch.setattr(PackedBatch, "fixed", classmethod(spy))
    _check_packed_equals_padded(arch, lora, "left" if arch in ("qwen3", "llama") else "right", tiny_root,
                                stream=200)
    assert plans and all(p.stream == 200 and p.fixed_length and p.tokens == 200 for p in plans)


def _check_packed_equals_padded(arch, lora, padding_side, tiny_root, token_multiple=None, stream=None):
    model, tok = _load(arch, tiny_root, lora)
    tok.padding_side = "right"
    ref_batch = tok(TEXTS, padding=True, return_tensors="pt")
    ref_mask = ref_batch["attention_mask"].bool()
    model.train()
    ref_out, ref_grads = _outputs_and_grads(model, ref_batch)
    tok.padding_side = padding_side
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    mask = batch["attention_mask"].bool()
    assert enable_fast_path(model, token_multiple=token_multiple)
    with _fixed_stream_on(_packed_forwards(model), stream):
        fast_out, fast_grads = _outputs_and_grads(model, batch)
    disable_fast_path(model)
    assert (fast_out[mask] - ref_out[ref_mask]).abs().max().item() < 1e-5
    assert set(fast_grads) == set(ref_grads) and ref_grads
    # relative 1e-4 per tensor; the floor (1e-6 of the largest gradient) covers gradients that are
    # zero in exact arithmetic, such as key biases, where both paths hold only rounding noise
    floor = 1e-6 * max(g.norm().item() for g in ref_grads.values())
    for name, ref in ref_grads.items():
        err = (fast_grads[name] - ref).norm().item()
        assert err <= 1e-4 * ref.norm().item() + floor, (name, err, ref.norm().item())


def test_fast_path_is_really_used(tiny_root):
    model, tok = _load("bert", tiny_root, lora=True)
    calls = []
    enable_fast_path(model)
    packed = model.get_base_model().forward
    original_fn = packed.packed_fn
    packed.packed_fn = lambda *a, **k: calls.append(1) or original_fn(*a, **k)
    model(**tok(TEXTS, padding=True, return_tensors="pt"))
    assert calls == [1]


def test_unsupported_architecture_falls_back_with_notice(caplog):
    from transformers import AlbertConfig, AlbertModel  # an architecture with no packed forward

    model = AlbertModel(AlbertConfig(vocab_size=64, embedding_size=16, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=4, intermediate_size=64))
    assert model.config.model_type not in PACKED_FORWARDS
    with caplog.at_level("WARNING"):
        assert enable_fast_path(model) is False
    assert "padded" in caplog.text


def test_packing_plan_roundtrip_and_attention():
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 0]])
    plan = PackedBatch.from_mask(mask)
    assert plan.cu_seqlens.tolist() == [0, 3, 8, 10]
    assert plan.position_ids.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 0, 1]
    x = torch.randn(3, 5, 4)
    assert torch.equal(plan.unpack(plan.pack(x))[mask.bool()], x[mask.bool()])
    q, k, v = (torch.randn(int(mask.sum()), 2, 4) for _ in range(3))
    for causal in (False, True):
        for attend in (padded_sdpa, bucketed_sdpa):
            out = attend(q, k, v, plan, scale=0.5, causal=causal)
            for b in range(3):  # each sequence attends only to itself
                s, e = plan.cu_seqlens[b].item(), plan.cu_seqlens[b + 1].item()
                ref = torch.nn.functional.scaled_dot_product_attention(
                    q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1), scale=0.5,
                    is_causal=causal).transpose(0, 1)
                assert torch.allclose(out[s:e], ref, atol=1e-6), (attend.__name__, causal, b)


def test_buckets_cover_every_token_once():
    lengths = [3, 40, 41, 7, 120, 5, 39, 118]
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    plan = PackedBatch.from_mask(mask)
    seen = torch.cat([index[valid] for index, valid in plan.buckets()])
    assert sorted(seen.tolist()) == list(range(sum(lengths)))
    padded_area = sum(index.numel() for index, _ in plan.buckets())
    assert padded_area <= 1.25 * sum(lengths)


def test_varlen_attention_casts_like_autocast():
    """Under autocast, attention gets the autocast dtype as SDPA would, even from fp32 inputs (Qwen3's
    q/k norms with fp32 master weights return fp32): on GPU fp32 would force the slow padded path."""
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    plan = PackedBatch.from_mask(mask)
    q, k, v = (torch.randn(7, 2, 8) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = varlen_attention(q, k, v, plan, scale=8 ** -0.5)
    assert out.dtype == torch.bfloat16
    ref = varlen_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), plan, scale=8 ** -0.5)
    assert torch.equal(out, ref)
    assert varlen_attention(q, k, v, plan, scale=8 ** -0.5).dtype == torch.float32  # no autocast: as given


def test_stream_padded_to_a_token_multiple():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 0]])
    plan = PackedBatch.from_mask(mask, token_multiple=16)
    assert (plan.tokens, plan.stream) == (10, 16)
    # Few distinct shapes (CUDA graphs): max_seqlen is the width (5) rounded up to a power of two, and
    # the fillers take a fixed number of slots, ceil(16 / 8) = 2, some of them empty.
    assert plan.max_seqlen == 8
    assert plan.cu_seqlens.tolist() == [0, 3, 8, 10, 16, 16]
    assert plan.position_ids.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 0, 1] + [0, 1, 2, 3, 4, 0]  # below the width
    other = PackedBatch.from_mask(torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]), token_multiple=16)
    assert other.cu_seqlens.tolist() == [0, 4, 9, 11, 16, 16] and other.max_seqlen == 8
    assert PackedBatch.from_mask(mask).max_seqlen == 5  # without a multiple: the width itself
    # Large streams: size classes 1/8 of the power of two at or below the token count apart.
    for tokens, stream in [(1000, 1024), (5000, 5120), (25000, 26624), (40000, 40960)]:
        long_mask = torch.zeros(tokens // 500 + 1, 500, dtype=torch.long)
        long_mask.view(-1)[:tokens] = 1
        big = PackedBatch.from_mask(long_mask, token_multiple=1024)
        assert (big.tokens, big.stream, big.max_seqlen) == (tokens, stream, 512)
        assert big.cu_seqlens[-1] == stream and (big.cu_seqlens.diff() <= 512).all()
    x = torch.randn(3, 5, 4)
    packed = plan.pack(x)
    assert packed.shape == (16, 4) and not packed[10:].any()
    assert torch.equal(plan.unpack(packed)[mask.bool()], x[mask.bool()])
    q, k, v = (torch.randn(16, 2, 4) for _ in range(3))
    exact = PackedBatch.from_mask(mask)
    for attend in (padded_sdpa, bucketed_sdpa):
        assert torch.allclose(attend(q, k, v, plan, scale=0.5)[:10], attend(q[:10], k[:10], v[:10], exact, scale=0.5),
                              atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_under_autocast_with_stacked_projections(arch, tiny_root, monkeypatch):
    """fp32 weights under bf16 autocast (the usual full fine-tuning) take the stacked q/k/v (and
    gate/up) product, `lora_linear.linears`: the packed forward still matches the padded one, to
    bf16 rounding (a misplaced column of the stacked output would be off by order one)."""
    from embedtune.packing import lora_linear

    stacked = []
    original = lora_linear._stacked
    monkeypatch.setattr(lora_linear, "_stacked", lambda modules, x: stacked.append(len(modules)) or original(modules, x))
    model, tok = _load(arch, tiny_root, lora=False)
    tok.padding_side = "right"
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    mask = batch["attention_mask"].bool()
    model.train()
    results = []
    for fast in (False, True):
        if fast:
            assert enable_fast_path(model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(_outputs_and_grads(model, batch))
        disable_fast_path(model)
    (ref_out, ref_grads), (fast_out, fast_grads) = results
    ref, out = ref_out[mask].float(), fast_out[mask].float()
    assert (out - ref).norm() <= 3e-2 * ref.norm()
    total = sum((fast_grads[n] - g).norm() ** 2 for n, g in ref_grads.items()) ** 0.5
    assert total <= 6e-2 * sum(g.norm() ** 2 for g in ref_grads.values()) ** 0.5
    assert bool(stacked) == (arch != "modernbert"), stacked  # ModernBERT's q/k/v is one linear already
