"""torch.compile of the packed layers: same outputs and gradients as the eager packed path, and
compiled once for a whole run (every layer, every batch shape), with no recompiles. Where attention
is the opaque op (here: eval on CPU; on CUDA always) the whole layer stack is one graph."""

from __future__ import annotations

import pytest
import torch

from tiny_models import make_tiny_model

from embedtune import FastModel
from embedtune.packing import disable_fast_path, enable_fast_path

TEXTS = ["short one", "a much longer text that goes on and on " * 3, "def f(x): return x + 1",
         "medium length text here", "x"]


def _forward_backward(model, batch, weight_seed: int = 0):
    out = model(**batch).last_hidden_state
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(weight_seed))
    (out * probe).sum().backward()  # a loss whose gradient reaches every weight (unlike |LN output|^2)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


def _compiled_and_eager(model, batch, mode=True, weight_seed: int = 0):
    """((out, grads) through the compiled packed layers, (out, grads) through the eager ones)."""
    enable_fast_path(model, compile=mode)
    got = _forward_backward(model, batch, weight_seed)
    disable_fast_path(model)
    enable_fast_path(model, compile=False)
    ref = _forward_backward(model, batch, weight_seed)
    disable_fast_path(model)
    return got, ref


@pytest.mark.parametrize("arch,mode,whole_stack", [("bert", True, False), ("qwen3", True, False),
                                                  ("bert", True, True), ("qwen3", True, True),
                                                  ("bert", "reduce-overhead", False)])
def test_compiled_layers_match_eager_and_compile_once(tmp_path, monkeypatch, arch, mode, whole_stack):
    """Per-layer graph (the default) and whole-stack graph. Mode "reduce-overhead" (CUDA graphs on a
    GPU; plain compiled code on CPU) also pads the packed stream to a token multiple: same results,
    still one compile."""
    from torch._dynamo.utils import counters

    from embedtune.packing import layers

    monkeypatch.setattr(layers, "WHOLE_STACK", whole_stack)
    torch._dynamo.reset()
    counters.clear()
    model, tok = FastModel.from_pretrained(make_tiny_model(arch, tmp_path), max_seq_length=64, fast=False)
    model.eval()  # dropout off: compiled and eager draw different random masks
    frames_after_first = None
    widths = set()
    # a new batch shape each step: new sequence counts, token counts and padded widths (the longest
    # sequence, which the attention op takes as an argument)
    for step, (rows, repeat) in enumerate([([0, 1], 1), ([0, 2, 3, 4], 2), ([0, 3, 4], 4), ([1, 2, 3, 4], 3)]):
        batch = tok([TEXTS[i] for i in rows] * repeat, padding=True, return_tensors="pt")
        widths.add(batch["input_ids"].shape[1])
        (out, grads), (ref, ref_grads) = _compiled_and_eager(model, batch, mode, step)
        mask = batch["attention_mask"].bool()
        assert (out - ref)[mask].abs().max() <= 1e-5
        assert grads.keys() == ref_grads.keys()
        for name, g in ref_grads.items():
            if name.endswith("key.bias"):  # softmax ignores a per-query shift: its gradient is rounding noise
                continue
            assert (grads[name] - g).norm() <= 1e-4 * g.norm() + 1e-7, name
        if step == 0:
            frames_after_first = counters["frames"]["total"]
            assert frames_after_first > 0, "nothing was compiled"
    assert len(widths) == 3
    assert counters["frames"]["total"] == frames_after_first, "recompiled for a new batch shape"


@pytest.mark.parametrize("arch", ["bert", "qwen3", "modernbert", "gemma3_text"])
def test_whole_stack_is_one_graph_without_breaks(tmp_path, monkeypatch, arch):
    """Attention as `embedtune::varlen_attn` lets dynamo trace every layer into one graph; a graph
    break (host-side attention) would split it and bring back the per-layer launch cost. The graph is
    traced through AOTAutograd but not code-generated (backend aot_eager): the whole stack's generated
    code is checked against eager for BERT and Qwen3 above, every layer kind's below."""
    from torch._dynamo.utils import counters

    from embedtune.packing import layers

    monkeypatch.setattr(layers, "WHOLE_STACK", True)
    monkeypatch.setattr(layers, "_compiled", lambda step, mode, dynamic=True: torch.compile(
        step, dynamic=dynamic, backend="aot_eager"))
    torch._dynamo.reset()
    counters.clear()
    model, tok = FastModel.from_pretrained(make_tiny_model(arch, tmp_path), max_seq_length=64, fast=False)
    model.eval()
    base_layers = model.layers if hasattr(model, "layers") else model.encoder.layer
    assert len(base_layers) > 1
    for rows, repeat in [(2, 1), (5, 2), (3, 4)]:
        batch = tok(TEXTS[:rows] * repeat, padding=True, return_tensors="pt")
        assert layers._whole_stack(base_layers, torch.zeros(1))
        (out, grads), (ref, ref_grads) = _compiled_and_eager(model, batch)
        mask = batch["attention_mask"].bool()
        assert (out - ref)[mask].abs().max() <= 1e-5
        for name, g in ref_grads.items():
            if name.endswith("key.bias") or name.endswith("k_proj.bias"):
                continue
            assert (grads[name] - g).norm() <= 1e-4 * g.norm() + 1e-7, name
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.parametrize("arch", ["bert", "qwen3", "modernbert", "gemma3_text"])
def test_layer_step_is_one_graph_without_breaks(tmp_path, monkeypatch, arch):
    """The per-layer graph (`WHOLE_STACK` off): no graph breaks (attention is the opaque op), one
    graph per kind of layer (ModernBERT's and Gemma3's local-attention layers differ from their
    global ones), and no recompiles once every kind has been seen, whatever the batch shape."""
    from torch._dynamo.utils import counters

    from embedtune.packing import layers

    monkeypatch.setattr(layers, "WHOLE_STACK", False)
    torch._dynamo.reset()
    counters.clear()
    model, tok = FastModel.from_pretrained(make_tiny_model(arch, tmp_path), max_seq_length=64, fast=False)
    model.eval()
    frames = []
    for rows, repeat in [(2, 1), (5, 2), (3, 4)]:
        batch = tok(TEXTS[:rows] * repeat, padding=True, return_tensors="pt")
        (out, _), (ref, _) = _compiled_and_eager(model, batch)
        assert (out - ref)[batch["attention_mask"].bool()].abs().max() <= 1e-5
        frames.append(counters["frames"]["total"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert 1 <= counters["stats"]["unique_graphs"] <= 2
    assert frames[0] == frames[-1], frames


@pytest.mark.parametrize("whole_stack", [False, True])
def test_lora_compiles_once(tmp_path, monkeypatch, whole_stack):
    """Under LoRA the frozen embeddings hand the first layer an input without grad, later layers one
    with grad: compiled as is, that is a second compile of the layer graph (BERT-large on an H200: a
    62 s warm-up). One compile, and the same LoRA gradients as eager."""
    from torch._dynamo.utils import counters

    from embedtune.packing import layers

    monkeypatch.setattr(layers, "WHOLE_STACK", whole_stack)
    torch._dynamo.reset()
    counters.clear()
    path = make_tiny_model("bert", tmp_path, name="bert4", num_hidden_layers=4)
    model, tok = FastModel.from_pretrained(path, max_seq_length=64, fast=False)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, target_modules=["query", "key", "value", "dense"])
    model.eval()
    results = []
    for compile_ in (True, False):
        enable_fast_path(model, compile=compile_)
        for rows, repeat in [(2, 1), (5, 2)]:
            batch = tok(TEXTS[:rows] * repeat, padding=True, return_tensors="pt")
            results.append(_forward_backward(model, batch))
        disable_fast_path(model)
        if compile_:
            assert counters["frames"]["total"] == 1, dict(counters["frames"])
    for (out, grads), (ref, ref_grads) in zip(results[:2], results[2:]):
        assert (out - ref).abs().max() <= 1e-5
        assert grads.keys() == ref_grads.keys() and all("lora_" in name for name in grads)
        for name, g in ref_grads.items():
            assert (grads[name] - g).norm() <= 1e-4 * g.norm() + 1e-7, name


def test_attention_dispatch_checks_trace_as_constants():
    """The flash checks in `varlen_attention` run inside compiled graphs; an import attempt there
    (flash_attn absent) broke the graph at every layer on the GPU."""
    from embedtune.packing import varlen

    @torch.compile(fullgraph=True, backend="eager")
    def dispatch(x):
        return x * 2 if varlen._has_flash_attn() else x + 1

    assert torch.equal(dispatch(torch.ones(3)), torch.ones(3) * 2 if varlen._has_flash_attn() else torch.ones(3) + 1)


def test_per_layer_graph_when_the_stack_cannot_be_one(tmp_path, monkeypatch):
    """Training on CPU (where dropout would need host-side attention) compiles the layer step, not the
    stack, even when a whole-stack graph is asked for: one graph reused by every layer and every batch
    shape, equal to eager."""
    from torch._dynamo.utils import counters

    from embedtune.packing import layers

    monkeypatch.setattr(layers, "WHOLE_STACK", True)
    torch._dynamo.reset()
    counters.clear()
    model, tok = FastModel.from_pretrained(make_tiny_model("bert", tmp_path), max_seq_length=64, fast=False)
    model.train()
    for module in model.modules():  # same masks in both runs: none
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    assert not layers._whole_stack(model.encoder.layer, torch.zeros(1))
    for rows, repeat in [(2, 1), (5, 2), (3, 4), (4, 3)]:
        batch = tok(TEXTS[:rows] * repeat, padding=True, return_tensors="pt")
        enable_fast_path(model, compile=True)
        out, grads = _forward_backward(model, batch)
        enable_fast_path(model, compile=False)
        ref, ref_grads = _forward_backward(model, batch)
        disable_fast_path(model)
        assert (out - ref)[batch["attention_mask"].bool()].abs().max() <= 1e-5
        for name, g in ref_grads.items():
            if not name.endswith("key.bias"):
                assert (grads[name] - g).norm() <= 1e-4 * g.norm() + 1e-7, name
    # one graph: the first layer's input (a view of the embeddings) is copied, else it would need its own
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("arch", ["bert", "roberta", "qwen3"])
def test_identical_layers_share_one_compiled_region(tmp_path, monkeypatch, arch):
    """The whole-stack graph calls each layer as a nested compile region: identical layers share
    one subgraph, compiled once, so warm-up does not grow with depth. (Layers that compute
    something else, such as ModernBERT's local-attention layers, get their own: the per-layer
    equality test above covers them.)"""
    from embedtune.packing import layers

    monkeypatch.setattr(layers, "WHOLE_STACK", True)
    graphs = []

    def capture(gm, example_inputs):  # note the graph, compile it as usual
        from torch._inductor.compile_fx import compile_fx

        graphs.append(gm)
        return compile_fx(gm, example_inputs)

    monkeypatch.setattr(layers, "_compiled", lambda step, mode, dynamic=True: torch.compile(
        step, dynamic=dynamic, backend=capture))
    torch._dynamo.reset()
    model, tok = FastModel.from_pretrained(make_tiny_model(arch, tmp_path), max_seq_length=64, fast=False)
    model.eval()
    enable_fast_path(model, compile=True)
    batch = tok(TEXTS * 2, padding=True, return_tensors="pt")
    out = model(**batch).last_hidden_state
    disable_fast_path(model)
    enable_fast_path(model, compile=False)
    ref = model(**batch).last_hidden_state
    assert (out - ref)[batch["attention_mask"].bool()].abs().max() <= 1e-5
    (graph,) = graphs
    calls = [node for node in graph.graph.nodes if node.target is torch.ops.higher_order.invoke_subgraph]
    assert len(calls) == len(model.layers if hasattr(model, "layers") else model.encoder.layer)
    assert len({node.args[0].target for node in calls}) == 1


def test_compile_cache_folder_and_compile_time(tmp_path, monkeypatch):
    """The recipe keeps torch's compile caches where later runs find them (the user's choice wins),
    and reports the seconds spent compiling, read from torch's own timers."""
    from embedtune import compile_cache
    from embedtune.report import _compile_fact

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert compile_cache.use_persistent_compile_cache() == str(tmp_path / "mine")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    folder = compile_cache.use_persistent_compile_cache()
    assert folder == str(tmp_path / "xdg" / "embedtune" / "torch-compile")
    import os

    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == folder  # what torch reads at its next cache access

    torch._dynamo.reset()  # may clear torch's timers too: read them after it (CI saw the total drop)
    before = compile_cache.compile_seconds()
    f = torch.compile(lambda x: torch.sin(x) * 2 + 1)
    x = torch.randn(8, requires_grad=True)
    f(x).sum().backward()
    assert compile_cache.compile_seconds() > before  # forward and backward compiles are timed
    assert os.path.isdir(folder)  # torch wrote its cache there
    assert _compile_fact({"time_s": 41.94, "cache": folder}) == f"41.9 s (cache: {folder})"
    assert _compile_fact(None) is None


@pytest.mark.parametrize("whole_stack", [False, True])
def test_cached_loss_compiles_once_for_all_chunk_shapes(tmp_path, monkeypatch, whole_stack):
    """The cached loss embeds chunks of every length and width (no graph), then re-runs them (with
    graph): compiled, that is one graph per grad mode for the whole run. (Before attention's
    max_seqlen became a symbol, the first chunk of a new width recompiled the whole stack: on an
    H200 the cached loss's first steps took seconds each.)"""
    from torch._dynamo.utils import counters

    from embedtune import to_sentence_transformer
    from embedtune.losses import ContrastiveLoss
    from embedtune.packing import layers

    monkeypatch.setattr(layers, "WHOLE_STACK", whole_stack)
    torch._dynamo.reset()
    counters.clear()
    model, tok = FastModel.from_pretrained(make_tiny_model("bert", tmp_path), max_seq_length=64, fast=False)
    model.eval()  # dropout off (on CPU the whole-stack graph needs it; on CUDA it is always used)
    enable_fast_path(model, compile=True)
    st = to_sentence_transformer(model, tok, pooling="mean")
    loss_fn = ContrastiveLoss(st, cached=True, token_budget=40)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    widths, frames = set(), []
    for step in range(4):
        anchors = [" ".join(words[: 1 + (step + i) % 9]) for i in range(6)]
        positives = [" ".join(words[: 1 + (2 * step + i) % 9] * (1 + (step + i) % 3)) for i in range(6)]
        features = [st.tokenize(anchors), st.tokenize(positives)]
        widths.update(f["input_ids"].shape[1] for f in features)
        loss_fn(features, None).backward()
        frames.append(counters["frames"]["total"])
    assert len(widths) >= 4
    assert frames[0] == frames[-1] <= 2, frames  # no grad (first pass) and with grad (re-run)
