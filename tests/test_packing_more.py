"""The packed forwards of MPNet, DeBERTa-v2/v3, Gemma3 and a flagged Qwen3 equal transformers' padded forward (CPU, fp32).

Each variant is a tiny random checkpoint (`tiny_models.make_tiny_model`, config overrides for the
variants). The reference is transformers' own forward on a right-padded batch; the packed forward
must match it at every real token for either padding side, and so must the gradients of every
trainable parameter (full fine-tuning and LoRA), the pooled SentenceTransformer embeddings and the
handling of dropout in train and eval mode.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_models import make_tiny_model  # noqa: E402

from embedtune import FastModel, to_sentence_transformer  # noqa: E402
from embedtune.checkpointing import _OffloadedCheckpoint, enable_checkpointing  # noqa: E402
from embedtune.packing import PackedForward, disable_fast_path, enable_fast_path  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

# name -> (model_type, config overrides). The tiny deberta-v2 carries DeBERTa-v3's options
# (share_att_key, LayerNorm'ed relative table, log buckets, no absolute positions).
VARIANTS = {
    "mpnet": ("mpnet", {}),
    "deberta-v3": ("deberta-v2", {}),
    # separate pos_key/pos_query projections, no buckets (distances clamped at 8), absolute
    # positions and token types in the input
    "deberta-legacy": ("deberta-v2", dict(share_att_key=False, norm_rel_ebd="none", position_buckets=-1,
                                          max_relative_positions=8, position_biased_input=True,
                                          type_vocab_size=2)),
    "deberta-c2p-only": ("deberta-v2", dict(share_att_key=False, pos_att_type=["c2p"])),
    "gemma3-causal": ("gemma3_text", {}),  # sliding window 16 on layer 0, full attention on layer 1
    "gemma3-bidirectional": ("gemma3_text", dict(use_bidirectional_attention=True)),  # EmbeddingGemma
    # transformers runs Qwen3 (like Llama, Qwen2, Mistral) causal whatever this flag says: so must the packed path
    "qwen3-flagged": ("qwen3", dict(use_bidirectional_attention=True)),
}
# Parameters whose gradient flows only through the relative-position terms: they must receive one.
RELATIVE_PARAMS = {"mpnet": "relative_attention_bias", "deberta-v3": "rel_embeddings",
                   "deberta-legacy": "pos_key_proj", "deberta-c2p-only": "pos_key_proj"}

# Ragged: a length-1 row, a full-width row, lengths past Gemma3's window (16) and MPNet's and
# DeBERTa's exact-distance ranges (8 and 16), in no particular order.
LENGTHS = [9, 1, 40, 23, 2, 17]
TEXTS = [
    "hi",
    " ".join(["river"] * 60),  # truncated to the 32-token limit
    "where does the river meet the sea and why do the gulls gather there every autumn evening",
    "two words",
    "a short query about old bridges",
]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_packed_more")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads on the shared CPU cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _load(variant: str, root, lora: bool = False, dropout: float = 0.0, **peft_kwargs):
    arch, overrides = VARIANTS[variant]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = make_tiny_model(arch, root, name=variant, **overrides)
        torch.manual_seed(0)
        model, tok = FastModel.from_pretrained(str(path), max_seq_length=32, fast=False)
    if lora:
        model = FastModel.get_peft_model(model, r=4, **peft_kwargs)
        with torch.no_grad():  # fresh LoRA is a no-op (B = 0); make it matter
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = dropout
        if isinstance(getattr(module, "attention_dropout", None), float):  # Gemma3 keeps a float, not a module
            module.attention_dropout = dropout
    return model, tok


def _batch(model, padding_side: str) -> dict:
    """Random token ids at LENGTHS, padded on `padding_side` with the pad id 0."""
    gen = torch.Generator().manual_seed(7)
    width = max(LENGTHS)
    ids = torch.zeros(len(LENGTHS), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    types = torch.zeros_like(ids)
    for row, n in enumerate(LENGTHS):
        span = slice(0, n) if padding_side == "right" else slice(width - n, width)
        ids[row, span] = torch.randint(1000, 30000, (n,), generator=gen)
        types[row, span] = torch.randint(0, 2, (n,), generator=gen)
        mask[row, span] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if getattr(model.config, "type_vocab_size", 0) > 1:
        batch["token_type_ids"] = types
    return batch


def _outputs_and_grads(model, batch):
    model.zero_grad()
    out = model(**batch).last_hidden_state
    mask = batch["attention_mask"].bool()
    weights = torch.linspace(0.5, 1.5, out.shape[-1])  # a plain sum of squares after a norm is ~constant
    (out[mask] * weights).pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return out.detach()[mask], grads


def _assert_close(fast, ref, fast_grads, ref_grads):
    assert (fast - ref).abs().max().item() < 1e-5
    assert ref_grads and set(fast_grads) == set(ref_grads)
    # relative 1e-4 per tensor; the floor covers gradients that are zero in exact arithmetic
    # (key biases), where both paths hold only rounding noise
    floor = 1e-6 * max(g.norm().item() for g in ref_grads.values())
    for name, ref_grad in ref_grads.items():
        err = (fast_grads[name] - ref_grad).norm().item()
        assert err <= 1e-4 * ref_grad.norm().item() + floor, (name, err, ref_grad.norm().item())


def _count_packed_calls(model) -> list:
    """Enable the fast path and record every call of the packed function (so a fallback shows)."""
    assert enable_fast_path(model) is True
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    packed = base.__dict__.get("forward")
    assert isinstance(packed, PackedForward)
    calls, inner = [], packed.packed_fn
    packed.packed_fn = lambda *a, **k: calls.append(1) or inner(*a, **k)
    return calls


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_packed_equals_padded(variant, lora, padding_side, tiny_root, caplog):
    """Train mode (dropout 0), so the training-time code paths run; reference: right padding.
    The fast path must really run: enabled without a fallback notice, the packed function called."""
    model, _ = _load(variant, tiny_root, lora=lora)
    model.train()
    ref, ref_grads = _outputs_and_grads(model, _batch(model, "right"))
    if not lora and variant in RELATIVE_PARAMS:
        key = RELATIVE_PARAMS[variant]
        assert any(key in n and g.abs().max() > 0 for n, g in ref_grads.items()), f"no gradient reaches {key}"
    with caplog.at_level(logging.WARNING):
        calls = _count_packed_calls(model)
    assert "padded" not in caplog.text
    fast, fast_grads = _outputs_and_grads(model, _batch(model, padding_side))
    disable_fast_path(model)
    assert calls == [1]
    _assert_close(fast, ref, fast_grads, ref_grads)


@pytest.mark.parametrize("variant", ["mpnet", "deberta-v3"])
def test_padded_attention_backend_agrees(variant, tiny_root):
    """backend="padded": the biased attention in one whole-batch bucket instead of length buckets."""
    model, _ = _load(variant, tiny_root)
    model.train()
    ref, ref_grads = _outputs_and_grads(model, _batch(model, "right"))
    assert enable_fast_path(model, attention_backend="padded")
    fast, fast_grads = _outputs_and_grads(model, _batch(model, "left"))
    disable_fast_path(model)
    _assert_close(fast, ref, fast_grads, ref_grads)


def _offloading_checkpoint(fn, hidden, *rest):
    """embedtune's offloading checkpoint (GPU-only in use), forced on CPU: it passes only the hidden
    states through, so anything a layer uses must be rebuilt inside the layer to get its gradient."""
    return _OffloadedCheckpoint.apply(fn, hidden, *rest)


@pytest.mark.parametrize("variant", ["deberta-v3", "deberta-legacy", "gemma3-bidirectional"])
def test_checkpointed_layers_keep_gradients(variant, tiny_root):
    """Full fine-tuning under activation checkpointing: the relative-position tables still get gradients."""
    model, _ = _load(variant, tiny_root)
    model.train()
    ref, ref_grads = _outputs_and_grads(model, _batch(model, "right"))
    enable_checkpointing(model, True)
    for module in model.modules():
        if hasattr(module, "_gradient_checkpointing_func"):
            module._gradient_checkpointing_func = _offloading_checkpoint
    calls = _count_packed_calls(model)
    fast, fast_grads = _outputs_and_grads(model, _batch(model, "right"))
    disable_fast_path(model)
    assert calls == [1]
    _assert_close(fast, ref, fast_grads, ref_grads)


@pytest.mark.parametrize("variant, pooling", [
    ("mpnet", "mean"), ("deberta-v3", None), ("gemma3-causal", None), ("gemma3-bidirectional", "mean"),
])  # None: the default, cls for encoders and lasttoken for decoders
def test_pooled_embeddings_equal(variant, pooling, tiny_root):
    model, tok = _load(variant, tiny_root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        st_model = to_sentence_transformer(model, tok, pooling=pooling)
    ref = st_model.encode(TEXTS, convert_to_tensor=True, batch_size=len(TEXTS))
    calls = _count_packed_calls(model)
    fast = st_model.encode(TEXTS, convert_to_tensor=True, batch_size=len(TEXTS))
    disable_fast_path(model)
    assert calls == [1]
    assert (fast - ref).abs().max().item() < 1e-5
    sims = ref @ ref.T  # a degenerate (input-independent) tiny model would hide masking bugs
    assert sims[~torch.eye(len(TEXTS), dtype=torch.bool)].min().item() < 0.99


@pytest.mark.parametrize("variant", ["mpnet", "deberta-v3", "gemma3-bidirectional"])
def test_dropout_follows_train_and_eval_mode(variant, tiny_root):
    """As in the other packed forwards: dropout (hidden, attention, relative table) acts in train
    mode only, so eval-mode outputs equal the padded forward even with dropout configured."""
    model, _ = _load(variant, tiny_root, dropout=0.3)
    batch = _batch(model, "right")
    mask = batch["attention_mask"].bool()
    model.eval()
    with torch.no_grad():
        ref = model(**batch).last_hidden_state[mask]
        _count_packed_calls(model)
        eval_out = model(**batch).last_hidden_state[mask]
        model.train()
        torch.manual_seed(1)
        train_a = model(**batch).last_hidden_state[mask]
        torch.manual_seed(2)
        train_b = model(**batch).last_hidden_state[mask]
    disable_fast_path(model)
    assert (eval_out - ref).abs().max().item() < 1e-5
    assert (train_a - eval_out).abs().max().item() > 1e-3
    assert (train_a - train_b).abs().max().item() > 1e-3


# Attention-probability dropout: the padded forward calls these modules; the packed forward hands
# their p to SDPA (dropout_p) instead.
ATTENTION_PROB_DROPOUT = (".attn.dropout", ".attention.self.dropout")


def _dropout_calls(model, batch) -> set[str]:
    """Names of the nn.Dropout modules one forward runs."""
    called: set[str] = set()
    hooks = [m.register_forward_hook(lambda *_, name=name: called.add(name))
             for name, m in model.named_modules() if isinstance(m, torch.nn.Dropout)]
    with torch.no_grad():
        model(**batch)
    for hook in hooks:
        hook.remove()
    return called


@pytest.mark.parametrize("variant", ["mpnet", "deberta-v3", "deberta-legacy"])
def test_same_dropout_sites_as_padded(variant, tiny_root):
    """Every dropout of the padded forward (embeddings, relative table, attention output, FFN) runs in
    the packed one; attention-probability dropout runs inside SDPA, and acts in train mode only."""
    model, _ = _load(variant, tiny_root, dropout=0.3)
    model.train()
    batch = _batch(model, "right")
    padded = _dropout_calls(model, batch)
    probs = {name for name in padded if name.endswith(ATTENTION_PROB_DROPOUT)}
    assert probs and padded - probs
    _count_packed_calls(model)
    assert _dropout_calls(model, batch) == padded - probs
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.3 if name in probs else 0.0
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        train_out = model(**batch).last_hidden_state[mask]
        model.eval()
        eval_out = model(**batch).last_hidden_state[mask]
    disable_fast_path(model)
    assert (train_out - eval_out).abs().max().item() > 1e-3


@pytest.mark.parametrize("variant, setting", [
    ("deberta-v3", ("config", "conv_kernel_size", 3)),
    ("deberta-v3", ("config", "pos_att_type", ["c2p", "p2p"])),
    ("deberta-v3", ("model", "z_steps", 2)),
    ("gemma3-bidirectional", ("config", "attn_logit_softcapping", 50.0)),
])
def test_unusual_configurations_fall_back_with_notice(variant, setting, tiny_root, caplog):
    model, _ = _load(variant, tiny_root)
    where, name, value = setting
    setattr(model.config if where == "config" else model, name, value)
    with caplog.at_level(logging.WARNING):
        assert enable_fast_path(model) is False
    assert "padded" in caplog.text and name in caplog.text
    assert "forward" not in model.__dict__


def test_offloaded_checkpoint_recomputes_under_the_forward_autocast():
    """Trainers call backward() outside their autocast block: the offloaded recompute must run under
    the forward's autocast (a bf16 weight fed the fp32 output of a LayerNorm), as torch's does."""
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(16)
    linear = torch.nn.Linear(16, 8).to(torch.bfloat16)

    def block(h):
        return linear(norm(h))

    hidden = torch.randn(5, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _OffloadedCheckpoint.apply(block, hidden)
    out.float().sum().backward()
    grad = hidden.grad.clone()
    hidden.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = block(hidden)
    ref.float().sum().backward()
    assert torch.equal(out, ref) and torch.allclose(grad, hidden.grad)


@pytest.mark.parametrize("causal,window", [(False, None), (True, None), (False, 3), (True, 4)])
def test_attention_op_backward_matches_autograd(causal, window):
    """`embedtune::varlen_attn` writes out its CPU backward (an op has no autograd inside); it must
    equal autograd through the same bucketed SDPA, and stay finite where a window leaves a bucket's
    padding slots no key at all."""
    from embedtune.packing.varlen import PackedBatch, bucketed_sdpa, varlen_op

    torch.manual_seed(0)
    lengths = [1, 9, 12, 3, 30, 16, 20, 20, 20]  # 12 shares a 20-wide bucket: padding slots beyond the window
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    plan = PackedBatch.from_mask(mask)
    q, k, v = (torch.randn(plan.tokens, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    probe = torch.randn(plan.tokens, 2, 8, dtype=torch.float64)
    results = []
    for fn in (lambda: varlen_op(q, k, v, plan, 0.3, causal=causal, window=window, buckets=True),
               lambda: bucketed_sdpa(q, k, v, plan, 0.3, causal=causal, window=window)):
        q.grad = k.grad = v.grad = None
        out = fn()
        (out * probe).sum().backward()
        results.append((out.detach(), q.grad.clone(), k.grad.clone(), v.grad.clone()))
    for mine, ref in zip(*results):
        assert torch.isfinite(mine).all()
        torch.testing.assert_close(mine, ref, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("autocast", [False, True])
def test_lora_linear_fused_add_matches_peft(autocast):
    """`lora_linear.linear` (base + scaling * (x A^T) B^T, the second product and the sum fused into
    one addmm on packed 2-D inputs) equals peft's own LoRA layer: outputs and every gradient."""
    from peft import LoraConfig, get_peft_model

    from embedtune.packing import lora_linear

    torch.manual_seed(0)
    net = get_peft_model(torch.nn.Sequential(torch.nn.Linear(24, 40)), LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    layer = net.base_model.model[0]
    torch.nn.init.normal_(layer.lora_B["default"].weight)  # peft starts B at zero: no signal to compare
    x = torch.randn(30, 24)
    results = {}
    default = lora_linear.FUSE_LORA_ADD
    for name, fuse in [("peft", None), ("fused", True), ("unfused", False)]:
        fn = layer if fuse is None else (lambda t: lora_linear.linear(layer, t))
        xi = x.clone().requires_grad_()
        try:
            lora_linear.FUSE_LORA_ADD = bool(fuse)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = fn(xi)
            (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        finally:
            lora_linear.FUSE_LORA_ADD = default
        grads = [xi.grad] + [p.grad.clone() for p in layer.parameters() if p.grad is not None]
        layer.zero_grad(set_to_none=True)
        results[name] = (out.float().detach(), grads)
    tol = 2e-2 if autocast else 1e-5
    for name in ("fused", "unfused"):
        out, grads = results[name]
        ref, ref_grads = results["peft"]
        assert (out - ref).abs().max() <= tol * ref.abs().max()
        assert len(grads) == len(ref_grads) == 3  # input, A, B (peft freezes the base weight and bias)
        for g, r in zip(grads, ref_grads):
            assert (g.float() - r.float()).norm() <= tol * r.float().norm()


class _Projections(torch.nn.Module):
    def __init__(self, bias: bool = True):
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(24, n, bias=bias) for n in (32, 16, 16))


@pytest.mark.parametrize("case", ["plain", "plain-no-bias", "plain-fp32", "plain-bf16-weights", "plain-hooked",
                                  "lora", "lora-partial"])
def test_stacked_projections_match_one_by_one(case):
    """`lora_linear.linears` runs plain q, k, v projections as one product over stacked weights where
    autocast casts those weights anyway (fp32 master weights), and one by one otherwise: without
    autocast or with weights already in the compute dtype (a stacked copy would be kept for the
    backward), for modules with forward hooks, and for LoRA layers (stacking frozen weights every
    step measured slower). Outputs and every gradient equal the modules' own; the stacked product
    ran exactly where it should."""
    from peft import LoraConfig, get_peft_model

    from embedtune.packing import lora_linear

    torch.manual_seed(0)
    net = _Projections(bias=case != "plain-no-bias")
    if case.startswith("lora"):
        net = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"] if case == "lora-partial"
                                             else ["q", "k", "v"])).base_model.model
        for name, p in net.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p)  # peft starts B at zero: no signal to compare
    if case == "plain-bf16-weights":
        net = net.to(torch.bfloat16)
    hooked = []
    if case == "plain-hooked":  # a user's hook must still see its module run
        net.k.register_forward_hook(lambda *_: hooked.append(1))
    autocast = case != "plain-fp32"
    modules = [net.q, net.k, net.v]
    x = torch.randn(30, 24)
    probes = [torch.randn(30, n) for n in (32, 16, 16)]
    results = {}
    for name in ("one by one", "stacked"):
        xi = x.clone().requires_grad_()
        calls = []
        original = lora_linear.F.linear
        lora_linear.F.linear = lambda *a, **k: calls.append(a[1].shape) or original(*a, **k)
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                outs = lora_linear.linears(modules, xi) if name == "stacked" else [m(xi) for m in modules]
        finally:
            lora_linear.F.linear = original
        sum((o.float() * p).sum() for o, p in zip(outs, probes)).backward()
        results[name] = ([o.float().detach() for o in outs],
                         [xi.grad] + [p.grad.float().clone() for p in net.parameters() if p.grad is not None])
        net.zero_grad(set_to_none=True)
        if name == "stacked":
            stacked = any(shape[0] == 64 for shape in calls)  # one product over the 32 + 16 + 16 stacked rows
            assert stacked == (case in ("plain", "plain-no-bias")), calls
    assert len(hooked) == (2 if case == "plain-hooked" else 0)
    tol = 1e-2 if autocast else 1e-5  # bf16: the stacked and the separate products may round differently
    (outs, grads), (ref_outs, ref_grads) = results["stacked"], results["one by one"]
    for o, r in zip(outs, ref_outs):
        assert (o - r).norm() <= tol * r.norm()
    assert len(grads) == len(ref_grads) > 1
    for g, r in zip(grads, ref_grads):
        assert (g - r).norm() <= tol * r.norm()
