"""The CUDA-graph step (`embedtune.graphs`) in the form it captures: columns padded to a fixed width,
one packed stream of a size class with its plan made on the device. On CPU the capture itself cannot
run; what it replays can: that form must give the loss and gradients of the plain loss (fp32, 1e-5 /
1e-4 relative). benchmarks/check_exactness_gpu.py checks the captured graph on a GPU."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from embedtune import FastModel
from embedtune.errors import EmbedtuneError
from embedtune.graphs import GraphedStep, unsupported_reason
from embedtune.losses import ContrastiveLoss
from embedtune.packing.varlen import PackedBatch
from embedtune.st import to_sentence_transformer
from tiny_models import make_tiny_model

ANCHORS = ["how to sort a list", "open a file", "x", "parse json text into a dict"]
POSITIVES = ["def sort(items): return sorted(items)", "with open(path) as f: return f.read()", "y",
             "import json\ndef parse(text):\n    return json.loads(text) and a longer tail of tokens here"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_graphs")


def _st(arch, root, lora: bool):
    torch.manual_seed(0)
    model, tok = FastModel.from_pretrained(str(make_tiny_model(arch, root)), max_seq_length=48, fast=True)
    if lora:
        model = FastModel.get_peft_model(model, r=4, random_state=0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
    st = to_sentence_transformer(model, tok)
    for m in st.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return st.train()


class EagerGraphStep:
    """A CPU stand-in for the run's GraphedStep: the loss and its backward run eagerly; `record(step,
    features, scale)` sees each call first."""

    counts, shapes, warmup_s, off_reason = {"eager": 0, "captured": 0, "replayed": 0}, 0, 0.0, None

    def __init__(self, loss, record):
        self.loss, self.record = loss, record

    def __call__(self, features, scale=1.0):
        self.record(self, features, scale)
        loss = self.loss(features)
        (loss * scale).backward()
        return loss.detach()


def _grads(st):
    return {n: p.grad.detach().clone() for n, p in st.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("arch", ["bert", "qwen3", "modernbert"])
def test_static_form_equals_plain_loss(arch, lora, root, monkeypatch):
    st = _st(arch, root, lora)
    loss_fn = ContrastiveLoss(st)
    features = [st.tokenize(ANCHORS), st.tokenize(POSITIVES)]
    st.zero_grad(set_to_none=True)
    ref_loss = loss_fn(features)
    ref_loss.backward()
    ref = _grads(st)

    plans = []
    fixed = PackedBatch.fixed.__func__
    monkeypatch.setattr(PackedBatch, "fixed", classmethod(lambda cls, m, s: plans.append(s) or fixed(cls, m, s)))
    step = GraphedStep(loss_fn, max_seq_length=48, dtype=None, token_multiple=64)
    prepared = step.prepare(features)
    batch, rows, stream = prepared.inputs, prepared.rows, prepared.stream
    real = sum(int(f["attention_mask"].sum()) for f in features)
    assert rows == (4, 4) and batch["attention_mask"].shape == (8, 48)
    assert stream % 64 == 0 and real <= stream < real + 64
    st.zero_grad(set_to_none=True)
    loss = step._forward_backward(batch, rows, stream, torch.tensor(0.5))
    assert plans == [stream]  # one forward for both columns, on a fixed-length stream
    assert torch.allclose(loss, ref_loss.detach(), atol=1e-5, rtol=0)
    ours = _grads(st)
    assert ours.keys() == ref.keys() and ref
    for name in ref:  # the backward ran on loss * 0.5 (gradient accumulation's scale)
        assert torch.allclose(ours[name], 0.5 * ref[name], atol=1e-6, rtol=1e-4), name


def test_gradient_buffers_reattached_and_kept(root):
    st = _st("bert", root, lora=True)
    step = GraphedStep(ContrastiveLoss(st), max_seq_length=48, dtype=None)
    first, second = step.params[0], step.params[1]
    first.grad, second.grad = None, torch.full_like(second, 3.0)
    step._attach_grads()
    assert torch.equal(first.grad, torch.zeros_like(first))  # set to None by the trainer: zeros
    assert torch.equal(second.grad, torch.full_like(second, 3.0))  # an eager step's gradient: kept
    buffers = [p.grad for p in step.params]
    first.grad.add_(1.0)
    step._attach_grads()  # still attached: accumulation goes on in place
    assert all(p.grad is b for p, b in zip(step.params, buffers))
    assert torch.equal(first.grad, torch.ones_like(first))


def test_unsupported_reasons(root):
    from sentence_transformers.losses import MultipleNegativesRankingLoss

    st = _st("bert", root, lora=False)
    cuda = torch.device("cuda")
    assert "CUDA" in unsupported_reason(ContrastiveLoss(st), torch.device("cpu"))
    assert unsupported_reason(ContrastiveLoss(st), cuda) is None
    assert "MultipleNegativesRankingLoss" in unsupported_reason(MultipleNegativesRankingLoss(st), cuda)
    assert "cached" in unsupported_reason(ContrastiveLoss(st, cached=True), cuda)
    mpnet = _st("mpnet", root, lora=False)
    assert "host" in unsupported_reason(ContrastiveLoss(mpnet), cuda)
    plain = _st("bert", root, lora=False)
    from embedtune.packing import disable_fast_path
    disable_fast_path(plain[0].auto_model)
    assert "fast path" in unsupported_reason(ContrastiveLoss(plain), cuda)


def test_recipe_turns_graphs_off_with_a_notice_off_gpu(root, caplog):
    from embedtune.train import TrainConfig, graph_step_for

    st = _st("bert", root, lora=False)
    trainer = SimpleNamespace(loss=ContrastiveLoss(st), model=st, args=SimpleNamespace(fp16=False, bf16=False))
    with caplog.at_level("WARNING"):
        reason = graph_step_for(trainer, TrainConfig(data="x", cuda_graphs=True))
    assert "--cuda-graphs off" in caplog.text and reason in caplog.text and "CUDA" in reason
    caplog.clear()
    with caplog.at_level("WARNING"):  # graphs chosen automatically: no warning, the summary says why
        assert graph_step_for(trainer, TrainConfig(data="x")) == reason
    assert not caplog.text


def test_fixed_plan_shapes_depend_only_on_batch_width_and_stream():
    """What a captured graph needs: every tensor of the plan has the same shape whatever the mask holds."""
    from embedtune.packing.varlen import fixed_stream

    torch.manual_seed(0)
    shapes = set()
    for real in ([3, 9, 1, 12], [12, 12, 12, 12], [1, 1, 1, 1]):
        mask = torch.zeros(4, 12, dtype=torch.long)
        for row, n in enumerate(real):
            mask[row, :n] = 1
        with fixed_stream(64):
            plan = PackedBatch.for_forward(mask)
        shapes.add(tuple(tuple(t.shape) for t in (plan.flat_index, plan.cu_seqlens, plan.position_ids, plan.width)))
        ids = torch.randint(1, 100, (4, 12))
        assert torch.equal(plan.unpack(plan.pack(ids)[:, None].float())[..., 0][mask.bool()], ids[mask.bool()].float())
        assert int(plan.cu_seqlens[-1]) == 64 and plan.position_ids.max() < 12
    assert len(shapes) == 1


def test_cuda_graphs_need_the_fast_path():
    from embedtune.errors import EmbedtuneError
    from embedtune.train import TrainConfig, check_speed_options

    with pytest.raises(EmbedtuneError, match="--cuda-graphs"):
        check_speed_options(TrainConfig(data="x", cuda_graphs=True, fast=False))


def test_summary_says_how_steps_ran():
    from embedtune.report import graphs_fact

    assert graphs_fact({"eager": 4, "captured": 4, "replayed": 153, "shapes": 4, "off": None}) == \
        "153 of 157 steps replayed (4 graphs)"
    assert graphs_fact({"off": "the model is not on a CUDA device"}) == "off: the model is not on a CUDA device"
    assert graphs_fact(None) is None


def test_capture_failure_turns_graphs_off_or_stops_clearly(root, monkeypatch, caplog):
    """The control flow around capture (CPU: capture and the eager step stubbed): a shape runs eagerly at
    first sight and is captured at its second; a failed capture turns graphs off with a notice and
    runs the step eagerly, and if torch cannot run it after the failure, the error says what to do."""
    st = _st("bert", root, lora=True)
    step = GraphedStep(ContrastiveLoss(st), max_seq_length=48, dtype=None)
    features = [st.tokenize(ANCHORS), st.tokenize(POSITIVES)]
    calls = []
    monkeypatch.setattr(step, "_eager", lambda inputs, static, scale: calls.append(static is not None) or
                        torch.tensor(1.0))
    monkeypatch.setattr(step, "_capture", lambda *a: (None, "RuntimeError: capture broke"))
    step(features)
    assert calls == [True] and step.off_reason is None  # first sight: eager, in the static form
    with caplog.at_level("WARNING"):
        step(features)
    assert step.off_reason == "RuntimeError: capture broke" and "CUDA graphs off" in caplog.text
    step(features)
    assert calls == [True, True, False]  # off: the loss as it is
    step(step.prepare(features))
    assert calls == [True, True, False, True]  # a batch prepared ahead: eager, in its static form

    ahead = GraphedStep(ContrastiveLoss(st), max_seq_length=48, dtype=None)
    assert ahead.prepare(features[:1]) == features[:1]  # one column does not merge: left as it is
    prepared = ahead.prepare(features)
    shapes = []
    monkeypatch.setattr(ahead, "_eager", lambda inputs, static, scale: shapes.append(static) or torch.tensor(1.0))
    ahead(prepared)
    ahead(features[:1])
    assert shapes == [(prepared.rows, prepared.stream), None]  # prepared ahead = prepared in the step

    broken = GraphedStep(ContrastiveLoss(st), max_seq_length=48, dtype=None)
    monkeypatch.setattr(broken, "_capture", lambda *a: (None, "RuntimeError: capture broke"))
    runs = []

    def eager(inputs, static, scale):
        runs.append(1)
        if len(runs) > 1:
            raise RuntimeError("Offset increment outside graph capture encountered unexpectedly.")
        return torch.tensor(1.0)

    monkeypatch.setattr(broken, "_eager", eager)
    broken(features)
    with pytest.raises(EmbedtuneError, match="without --cuda-graphs"):
        broken(features)


def test_a_run_resumes_with_or_without_speed_options(tmp_path):
    """--cuda-graphs and --compile change how fast a run goes, not what it computes: a run interrupted
    with them resumes without them (after a failed capture, say), and the other way round."""
    from embedtune.resilience import RUN_CONFIG, check_same_run, run_record
    from embedtune.train import TrainConfig

    data = tmp_path / "pairs.jsonl"
    data.write_text('{"anchor": "a", "positive": "b"}\n')
    (tmp_path / RUN_CONFIG).write_text(__import__("json").dumps(run_record(
        TrainConfig(data=str(data), cuda_graphs=True, compile=True))))
    check_same_run(tmp_path, TrainConfig(data=str(data)))  # no error
    with pytest.raises(EmbedtuneError, match="--batch-size"):
        check_same_run(tmp_path, TrainConfig(data=str(data), batch_size=64))


def test_recipe_hands_the_graph_step_host_batches_and_its_scale(tmp_path, monkeypatch):
    """The trainer's step under --cuda-graphs (CPU: the graph step stubbed by one that runs the loss
    eagerly): the batch reaches it still on the host (it pads and copies it itself), with gradient
    accumulation's scale, and the run trains on what it returns."""
    import importlib
    import json

    from embedtune.train import TrainConfig, run

    recipe = importlib.import_module("embedtune.train")  # the package's `train` is the function
    seen = []

    def record(step, features, scale):
        seen.append(([v.device.type for f in features for v in f.values() if torch.is_tensor(v)], scale))

    monkeypatch.setattr(recipe, "graph_step_for", lambda trainer, config: EagerGraphStep(trainer.loss, record))
    from embedtune.resilience import ResumableTrainer

    moved = []  # the trainer's move to the device (a no-op on CPU, a round trip and a sync on a GPU)
    prepare_inputs = ResumableTrainer._prepare_inputs
    monkeypatch.setattr(ResumableTrainer, "_prepare_inputs", lambda self, inputs: moved.append(1) or
                        prepare_inputs(self, inputs))
    loaders = []  # accelerate's data loader must not move batches to the device (a blocking copy each)
    get_loader = ResumableTrainer.get_train_dataloader
    monkeypatch.setattr(ResumableTrainer, "get_train_dataloader", lambda self: loaders.append(get_loader(self))
                        or loaders[-1])
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"anchor": f"how to do thing {i}", "positive": f"def thing_{i}(): pass"}) + "\n"
                            for i in range(32)))
    result = run(TrainConfig(data=str(data), max_steps=2, batch_size=4, eval=False, max_seq_length=32,
                             cuda_graphs=True, output_dir=str(tmp_path / "out"),
                             extra={"gradient_accumulation_steps": 2}))
    assert len(seen) == 4 and all(scale == 0.5 for _, scale in seen)
    assert all(devices and set(devices) == {"cpu"} for devices, _ in seen) and not moved
    assert loaders and all(hasattr(loader, "device") and loader.device is None for loader in loaders)
    assert result.metrics["cuda_graphs"]["off"] is None


def _trainer_stub(graph_step):
    from types import SimpleNamespace

    return SimpleNamespace(collect_features=lambda inputs: ([inputs], None), current_gradient_accumulation_steps=2,
                           graph_step=graph_step, _modules_of=None, optimizer=None,
                           args=SimpleNamespace(torch_empty_cache_steps=None), state=SimpleNamespace(global_step=0))


def test_graphed_step_sets_train_mode_only_when_a_module_left_it():
    """The trainer's graphed step puts every module in train mode, as the trainer's own step does:
    after an evaluation, and when only the modules are in eval mode (what `from_pretrained` leaves
    inside a wrapper whose own flag says training); it skips the walk when all already train."""
    from embedtune.resilience import ResumableTrainer

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1))
    calls = []
    train = model.train
    model.train = lambda mode=True: calls.append(mode) or train(mode)
    trainer = _trainer_stub(lambda features, scale: torch.tensor(4.0))
    model.eval()  # what an evaluation leaves
    calls.clear()
    loss = ResumableTrainer._graphed_training_step(trainer, model, {"x": torch.ones(1)})
    assert model.training and model[1].training and calls == [True] and loss.item() == 2.0
    ResumableTrainer._graphed_training_step(trainer, model, {"x": torch.ones(1)})
    assert calls == [True], "already training: no walk over the modules"
    model[1].eval()  # the wrapper says training, a module does not
    ResumableTrainer._graphed_training_step(trainer, model, {"x": torch.ones(1)})
    assert calls == [True, True] and model[1].training


def test_graph_key_holds_the_modules_modes(root):
    """A graph replays the modes it was captured in, so a step in other modes must not find it."""
    st = _st("bert", root, lora=False)
    step = GraphedStep(ContrastiveLoss(st), max_seq_length=48, dtype=None, token_multiple=64)
    seen = []
    step._eager = lambda inputs, static, scale: seen.append(static) or torch.tensor(0.0)
    features = [st.tokenize(ANCHORS), st.tokenize(POSITIVES)]
    prepared = step.prepare(features)
    step(prepared)  # first sight of this shape in train mode: eager
    st[0].eval()
    step(prepared)  # same shapes, other modes: a first sight again, not a capture of the train-mode key
    assert len(seen) == 2 and len(step._graphs) == 2


def test_steps_that_meet_a_new_shape_are_timed_and_replays_are_not(root, monkeypatch):
    """`warmup_s` (metrics.json's cuda_graphs) sums the eager first sight and the capture of each shape,
    and nothing of a plain replay (CPU: capture stubbed, the clock a counter)."""
    import embedtune.graphs as graphs

    st = _st("bert", root, lora=False)
    step = GraphedStep(ContrastiveLoss(st), max_seq_length=48, dtype=None, token_multiple=64)
    step._eager = lambda inputs, static, scale: torch.tensor(0.0)

    def capture(inputs, rows, stream):
        step._scale = torch.ones(())
        static = {k: v.clone() for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        return graphs._Graph(SimpleNamespace(replay=lambda: None), static, torch.tensor(2.0)), None

    step._capture = capture
    ticks = iter(range(1, 100))
    monkeypatch.setattr(graphs.time, "perf_counter", lambda: float(next(ticks)))
    prepared = step.prepare([st.tokenize(ANCHORS), st.tokenize(POSITIVES)])
    step(prepared)  # eager: clock 1 -> 2
    assert step.warmup_s == 1.0
    step(prepared)  # captured and replayed: clock 3 -> 4
    assert step.warmup_s == 2.0 and step.last == "captured"
    step(prepared)
    step(prepared)  # replays: the clock is not read
    assert step.warmup_s == 2.0 and step.last == "replayed" and step.counts["replayed"] == 3


def test_to_sentence_transformer_gives_one_mode_to_the_whole_tree(root):
    model, tok = FastModel.from_pretrained(str(make_tiny_model("bert", root)), max_seq_length=48)
    st = to_sentence_transformer(model, tok)
    assert len({m.training for m in st.modules()}) == 1


def test_graphed_recipe_trains_with_dropout_like_the_eager_recipe(root, tmp_path, monkeypatch):
    """Dropout on, no evaluation (nothing else puts the model in train mode): a run whose steps go
    through the graph step trains as the eager run does, loss for loss, same seed. On CPU the graph
    step is a stand-in that runs the loss eagerly, so what differs between the runs is what the
    trainer's graphed step sets up (a replayed graph keeps the modes it was captured in)."""
    import importlib
    import json

    from embedtune.train import TrainConfig, run

    recipe = importlib.import_module("embedtune.train")
    modes = []

    def record(step, features, scale):
        modes.append({m.training for m in step.loss.model.modules() if isinstance(m, torch.nn.Dropout)})

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"anchor": f"how to do thing {i}", "positive": f"def thing_{i}(): pass"}) + "\n"
                            for i in range(32)))
    model = str(make_tiny_model("bert", root))

    def losses(**speed):
        result = run(TrainConfig(data=str(data), model=model, max_steps=6, batch_size=4, eval=False,
                                 max_seq_length=32, logging_steps=1, lora_r=None, lr=1e-3, **speed))
        return [e["loss"] for e in result.metrics["history"] if "loss" in e]

    eager = losses(cuda_graphs=False)
    monkeypatch.setattr(recipe, "graph_step_for", lambda trainer, config: EagerGraphStep(trainer.loss, record))
    graphed = losses(cuda_graphs=True)
    assert modes and all(m == {True} for m in modes), "the graph step ran with dropout off"
    assert len(eager) == len(graphed) == 6
    assert graphed == pytest.approx(eager, abs=1e-6)


def _stub_capture(step, log, fail=lambda: False):
    """Capture stubbed on CPU: records each call; a 'graph' whose replay does nothing."""
    import embedtune.graphs as graphs

    def capture(inputs, rows, stream):
        log.append(("capture", stream))
        if fail():
            return None, "RuntimeError: capture broke"
        step._scale = torch.ones(())
        static = {k: v.clone() for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        return graphs._Graph(SimpleNamespace(replay=lambda: None), static, torch.tensor(2.0)), None

    step._capture = capture
    step._eager = lambda inputs, static, scale: log.append(("eager", static[1])) or torch.tensor(0.0)


def test_new_shapes_are_captured_at_first_sight_once_a_capture_worked(root):
    """The first shape runs eagerly, then is captured; every later new shape is captured at once (one
    eager step saved per shape). Compiled layers keep the eager first sight (a new size compiles), and
    a first-sight capture that fails runs that step eagerly and restores the old order for the run,
    with graphs kept on (CPU: capture and the eager step stubbed)."""
    st = _st("bert", root, lora=False)
    features = [st.tokenize(ANCHORS), st.tokenize(POSITIVES)]
    short = [st.tokenize(ANCHORS[:2]), st.tokenize(POSITIVES[:2])]
    longer = [st.tokenize(ANCHORS + ANCHORS), st.tokenize(POSITIVES + POSITIVES)]

    def run(step, batches, compile=False):
        for forward in step._packed:
            forward.compile = compile  # (FastModel's "auto" may compile later: it counts as compiled)
        log = []
        _stub_capture(step, log, fail=lambda: fails.pop(0) if fails else False)
        for batch in batches:
            step(batch)
        return [kind for kind, _ in log]

    fails = []
    step = GraphedStep(ContrastiveLoss(st), max_seq_length=48, dtype=None, token_multiple=16)
    assert run(step, [features, features, short, short, longer]) == ["eager", "capture", "capture", "capture"]
    assert step.shapes == 3 and step.counts["replayed"] == 4 and step.last == "captured"

    for compile in ("default", "auto"):
        compiled = GraphedStep(ContrastiveLoss(st), max_seq_length=48, dtype=None, token_multiple=16)
        assert run(compiled, [features, features, short, short], compile) == ["eager", "capture", "eager", "capture"]

    fails = [False, True]  # the first shape's capture works; the next shape's first-sight capture fails
    falls_back = GraphedStep(ContrastiveLoss(st), max_seq_length=48, dtype=None, token_multiple=16)
    assert run(falls_back, [features, features, short, short, longer, longer]) == [
        "eager", "capture", "capture", "eager", "capture", "eager", "capture"]
    assert falls_back.off_reason is None and not falls_back.first_sight_captures and falls_back.shapes == 3


def test_graphs_follow_a_switch_of_the_layers_kernels(root):
    """The recipe switches the fused norm on mid-run (`speed_choice.FusedSwitch`): the graphs captured
    with the plain kernels would replay them, so they are dropped, each shape runs eagerly once with the
    new kernels (their first use in the process) and is captured again; a switch back does the same
    (CPU: capture and the eager step stubbed)."""
    from embedtune.packing import set_fused_kernels

    st = _st("bert", root, lora=False)
    features = [st.tokenize(ANCHORS), st.tokenize(POSITIVES)]
    short = [st.tokenize(ANCHORS[:2]), st.tokenize(POSITIVES[:2])]
    step = GraphedStep(ContrastiveLoss(st), max_seq_length=48, dtype=None, token_multiple=16)
    for forward in step._packed:
        forward.compile = False  # as the recipe sets it where it chose graphs without compiled layers
    log = []
    _stub_capture(step, log)
    for batch in (features, features, short, features):
        step(batch)
    assert [kind for kind, _ in log] == ["eager", "capture", "capture"] and step.shapes == 2
    set_fused_kernels(st[0].auto_model, True)
    log.clear()
    for batch in (features, features, short, features, short):
        step(batch)
    assert [kind for kind, _ in log] == ["eager", "capture", "capture"], "the new kernels' first use runs eagerly"
    assert step.shapes == 2 and all(key[-1] == (True,) * len(step._packed) for key in step._graphs)
    step._pool = "a pool of the dropped graphs"
    set_fused_kernels(st[0].auto_model, False)
    log.clear()
    step(short)
    assert step._pool is None, "the dropped graphs' pool is not captured into again"
    step(short)
    assert [kind for kind, _ in log] == ["eager", "capture"] and step.shapes == 1

    held = GraphedStep(ContrastiveLoss(st), max_seq_length=48, dtype=None, token_multiple=16)
    for forward in held._packed:
        forward.compile = False
    log.clear()
    _stub_capture(held, log)
    held.hold_captures = True  # the kernels may still change: nothing is captured, nothing marked as seen
    for batch in (features, features, short, short):
        held(batch)
    assert [kind for kind, _ in log] == ["eager"] * 4 and held.shapes == 0 and not held._graphs
    held.hold_captures = False
    log.clear()
    for batch in (features, features, short):
        held(batch)
    assert [kind for kind, _ in log] == ["eager", "capture", "capture"]
