"""A SentenceTransformer checkpoint's own pipeline survives wrapping, training and saving; MPNet
checkpoints its layers; Unsloth's keywords are accepted; the bundled model's hub id works everywhere.

Names containing "roundtrip", "compat", "save" or "wrapper" also run against sentence-transformers 5.x
(scripts/test.sh).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import embedtune
from embedtune import EmbedtuneError, FastModel, save_merged, to_sentence_transformer
from embedtune.loading import DEFAULT_MODEL_ID, bundled_model_path, load_info

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import make_tiny_model, make_tiny_st_model  # noqa: E402

TEXTS = ["def add(a, b): return a + b", "Return the sum of two numbers.", "Open a file for reading.", "x"]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_st")


@pytest.fixture(scope="module")
def dense_dir(tiny_root):
    return make_tiny_st_model(tiny_root, "bert_dense", dense_dims=(48, 16), normalize=True)


@pytest.fixture(scope="module")
def dense_nonorm_dir(tiny_root):
    return make_tiny_st_model(tiny_root, "bert_dense_nonorm", dense_dims=(24,), normalize=False)


def _names(st) -> list[str]:
    return [type(m).__name__ for m in st]


def _stock(folder) -> "object":
    from sentence_transformers import SentenceTransformer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return SentenceTransformer(str(folder), device="cpu")


def _encode_fresh(folder: Path, out: Path) -> np.ndarray:
    """Embeddings from a plain `SentenceTransformer(folder)` in a new process (no embedtune import)."""
    code = ("import sys, json, numpy as np; from sentence_transformers import SentenceTransformer; "
            "m = SentenceTransformer(sys.argv[1], device='cpu'); "
            "np.save(sys.argv[2], m.encode(json.loads(sys.argv[3]))); "
            "print(json.dumps([type(x).__name__ for x in m]))")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code, str(folder), str(out), json.dumps(TEXTS)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return np.load(out), json.loads(done.stdout.strip().splitlines()[-1])


def _perturb(st) -> None:
    """Stand-in for training: move the encoder's and every head module's weights."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in st.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("which", ["dense", "nonorm"])
def test_wrapper_keeps_the_checkpoints_pipeline_and_save_roundtrip(which, fast, dense_dir, dense_nonorm_dir,
                                                                     tmp_path):
    folder = dense_dir if which == "dense" else dense_nonorm_dir
    stock = _stock(folder)
    model, tok = FastModel.from_pretrained(str(folder), max_seq_length=64, fast=fast)
    st = to_sentence_transformer(model, tok)
    assert _names(st) == _names(stock)
    assert ("Normalize" in _names(st)) == (which == "dense"), "Normalize only where the checkpoint has it"
    want = stock.encode(TEXTS, convert_to_tensor=True)
    got = st.encode(TEXTS, convert_to_tensor=True)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-5

    dense = [m for m in st if type(m).__name__ == "Dense"]
    assert all(p.requires_grad for m in dense for p in m.parameters()), "full fine-tuning trains the Dense layers"
    _perturb(st)
    st.eval()
    expected = st.encode(TEXTS)
    save_merged(st, tmp_path / "saved")
    reloaded, names = _encode_fresh(tmp_path / "saved", tmp_path / "emb.npy")
    assert names == _names(stock)
    assert reloaded.shape == expected.shape
    assert np.abs(reloaded - expected).max() < 1e-5


def test_wrapper_normalize_and_pooling_overrides(dense_dir, dense_nonorm_dir):
    model, tok = FastModel.from_pretrained(str(dense_dir), max_seq_length=64)
    assert _names(to_sentence_transformer(model, tok, normalize=False)) == ["Transformer", "Pooling", "Dense", "Dense"]
    st = to_sentence_transformer(model, tok, pooling="cls")
    assert st[1].get_config_dict().get("pooling_mode") in ("cls", ["cls"]) or st[1].get_config_dict().get(
        "pooling_mode_cls_token")
    assert _names(st)[2:] == ["Dense", "Dense", "Normalize"]
    model, tok = FastModel.from_pretrained(str(dense_nonorm_dir), max_seq_length=64)
    assert _names(to_sentence_transformer(model, tok, normalize=True))[-1] == "Normalize"
    assert load_info(model).normalize is False


def test_plain_hf_checkpoint_keeps_the_guides_head(tiny_root):
    model, tok = FastModel.from_pretrained(str(make_tiny_model("bert", tiny_root)), max_seq_length=64)
    assert _names(to_sentence_transformer(model, tok)) == ["Transformer", "Pooling", "Normalize"]


def test_wrapper_keeps_the_checkpoints_similarity_and_default_prompt_through_save(dense_nonorm_dir, tmp_path):
    """A dot-product checkpoint with a default prompt is saved as one: its config_sentence_transformers.json's
    similarity_fn_name and default_prompt_name survive wrapping and `save_merged`."""
    import shutil

    folder = tmp_path / "dot_model"
    shutil.copytree(dense_nonorm_dir, folder)
    settings_file = folder / "config_sentence_transformers.json"
    settings = json.loads(settings_file.read_text())
    settings.update(similarity_fn_name="dot", prompts={"query": "query: ", "document": ""},
                    default_prompt_name="query")
    settings_file.write_text(json.dumps(settings))
    stock = _stock(folder)
    assert (stock.similarity_fn_name, stock.default_prompt_name) == ("dot", "query")

    model, tok = FastModel.from_pretrained(str(folder), max_seq_length=64)
    st = to_sentence_transformer(model, tok)
    assert (st.similarity_fn_name, st.default_prompt_name) == ("dot", "query")
    assert (st.encode(TEXTS, convert_to_tensor=True) - stock.encode(TEXTS, convert_to_tensor=True)).abs().max() < 1e-5
    save_merged(st, tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config_sentence_transformers.json").read_text())
    assert (saved["similarity_fn_name"], saved["default_prompt_name"]) == ("dot", "query")
    reloaded = _stock(tmp_path / "saved")
    assert (reloaded.similarity_fn_name, reloaded.default_prompt_name) == ("dot", "query")


def test_wrapper_lowercases_as_the_checkpoints_transformer_module_and_save_roundtrip(dense_nonorm_dir, tmp_path):
    """A cased tokenizer under a Transformer module saved with `do_lower_case: true` (sentence-transformers 5's
    layout): the texts are lowercased in training as stock loading does, and the saved model lowercases too."""
    import shutil

    folder = tmp_path / "lowercased"
    shutil.copytree(dense_nonorm_dir, folder)
    tokenizer_file = folder / "tokenizer.json"
    tokenizer_json = json.loads(tokenizer_file.read_text())
    tokenizer_json["normalizer"]["lowercase"] = False  # a cased WordPiece tokenizer
    tokenizer_file.write_text(json.dumps(tokenizer_json))
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "do_lower_case": False}))
    module_config = json.loads((folder / "sentence_bert_config.json").read_text())
    (folder / "sentence_bert_config.json").write_text(json.dumps({**module_config, "do_lower_case": True}))
    texts = ["Open A File For READING.", "open a file for reading.", "Return The Sum"]
    stock = _stock(folder)
    want = stock.encode(texts, convert_to_tensor=True)
    assert (want[0] - want[1]).abs().max() < 1e-6, "stock loading lowercases the input"

    model, tok = FastModel.from_pretrained(str(folder), max_seq_length=64)
    assert tok(texts[0])["input_ids"] == tok(texts[1])["input_ids"], "the tokenizer that trains lowercases"
    st = to_sentence_transformer(model, tok)
    assert (st.encode(texts, convert_to_tensor=True) - want).abs().max() < 1e-5
    _perturb(st)
    st.eval()
    expected = st.encode(texts)
    save_merged(st, tmp_path / "saved")
    reloaded = _stock(tmp_path / "saved").encode(texts)
    assert np.abs(reloaded - expected).max() < 1e-5
    assert np.abs(reloaded[0] - reloaded[1]).max() < 1e-6, "the saved model lowercases"


def test_lora_freezes_the_dense_layers_and_save_roundtrip(dense_dir, tmp_path):
    model, tok = FastModel.from_pretrained(str(dense_dir), max_seq_length=64)
    model = FastModel.get_peft_model(model, r=4)
    st = to_sentence_transformer(model, tok)
    dense = [m for m in st if type(m).__name__ == "Dense"]
    assert len(dense) == 2 and not any(p.requires_grad for m in dense for p in m.parameters())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    st.eval()
    expected = st.encode(TEXTS)
    assert expected.shape == (len(TEXTS), 16)
    save_merged(st, tmp_path / "merged")
    got, names = _encode_fresh(tmp_path / "merged", tmp_path / "emb.npy")
    assert names == ["Transformer", "Pooling", "Dense", "Dense", "Normalize"]
    assert np.abs(got - expected).max() < 1e-5


def test_custom_module_class_is_refused(dense_dir, tmp_path):
    import shutil

    folder = tmp_path / "custom"
    shutil.copytree(dense_dir, folder)
    modules = json.loads((folder / "modules.json").read_text())
    modules[2]["type"] = "modeling_custom.MyDense"
    (folder / "modules.json").write_text(json.dumps(modules))
    model, tok = FastModel.from_pretrained(str(folder), max_seq_length=64)
    with pytest.raises(EmbedtuneError, match="modeling_custom.MyDense.*trust_remote_code"):
        to_sentence_transformer(model, tok)


@pytest.mark.parametrize("lora_r", [None, 4])
def test_train_keeps_the_dense_layers(dense_dir, tmp_path, lora_r):
    from safetensors.torch import load_file

    rows = [{"anchor": f"question number {i} about {w}", "positive": f"answer {i}: {w} is here"}
            for i, w in enumerate(["cats", "dogs", "files", "lists", "sums", "loops", "maps", "sets"] * 2)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        st, metrics = embedtune.train(str(data), model=str(dense_dir), output_dir=str(tmp_path / "run"), max_steps=2,
                                      batch_size=4, max_seq_length=32, lora_r=lora_r, eval=False, lr=1e-2)
    assert _names(st) == ["Transformer", "Pooling", "Dense", "Dense", "Normalize"]
    saved = tmp_path / "run" / "model"
    dims = [json.loads((saved / e["path"] / "config.json").read_text()).get("out_features")
            for e in json.loads((saved / "modules.json").read_text()) if e["type"].endswith("Dense")]
    assert dims == [48, 16]
    base_dense = next(p for p in sorted(dense_dir.iterdir()) if "Dense" in p.name)
    new_dense = next(p for p in sorted(saved.iterdir()) if "Dense" in p.name)
    before, after = load_file(str(base_dense / "model.safetensors")), load_file(str(new_dense / "model.safetensors"))
    moved = any(not torch.equal(before[k], after[k].to(before[k].dtype)) for k in before)
    assert moved == (lora_r is None), "Dense trains in full fine-tuning, stays frozen under LoRA"
    reloaded = _stock(saved)
    assert reloaded.encode(TEXTS).shape == (len(TEXTS), 16)


# ------------------------------------------------------------------ B2: MPNet gradient checkpointing


def _grads(model_dir, fast: bool, mode, lora: bool):
    torch.manual_seed(0)
    model, tok = FastModel.from_pretrained(str(model_dir), max_seq_length=64, fast=fast)
    if lora:
        model = FastModel.get_peft_model(model, r=4, use_gradient_checkpointing=mode, random_state=0)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    elif mode:
        from embedtune.checkpointing import enable_checkpointing

        enable_checkpointing(model, mode)
    model.train()
    batch = tok(["a short one", "a somewhat longer sentence for the checkpointing test"], padding=True,
                return_tensors="pt")
    torch.manual_seed(1)
    model(**batch).last_hidden_state.pow(2).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("mode,lora,short_of_memory", [
    (True, True, False), ("unsloth", True, False), ("True", False, False),  # memory to spare: run as is
    ("unsloth", True, True), ("True", False, True), ("always", True, False),  # checkpointed
])
def test_mpnet_gradient_checkpointing_is_exact(tiny_root, fast, mode, lora, short_of_memory, monkeypatch):
    from embedtune import checkpointing

    if short_of_memory:
        monkeypatch.setattr(checkpointing, "free_memory_bytes", lambda device: 1 << 10)
    mpnet = make_tiny_model("mpnet", tiny_root)
    want = _grads(mpnet, fast, False, lora)
    got = _grads(mpnet, fast, mode, lora)
    assert set(got) == set(want)
    if not lora:
        assert any("relative_attention_bias" in n for n in got), "the shared position bias must get its gradient"
    for n in want:
        assert torch.allclose(got[n], want[n], rtol=1e-4, atol=1e-5), n


def test_mpnet_checkpointing_is_on(tiny_root):
    model, _ = FastModel.from_pretrained(str(make_tiny_model("mpnet", tiny_root)), max_seq_length=64)
    model = FastModel.get_peft_model(model, r=4, use_gradient_checkpointing="unsloth")
    assert all(layer.gradient_checkpointing for layer in model.get_base_model().encoder.layer)


# ------------------------------------------------------------------ B3: Unsloth's keywords


MINILM = str(bundled_model_path())


@pytest.mark.parametrize("kwargs", [dict(load_in_4bit=False), dict(load_in_8bit=False), dict(load_in_16bit=True),
                                    dict(load_in_16bit=False), dict(fast_inference=False, gpu_memory_utilization=0.5,
                                    max_lora_rank=16, random_state=3407, use_exact_model_name=True, token=None)])
def test_unsloth_load_keywords_are_accepted(kwargs):
    model, _ = FastModel.from_pretrained(MINILM, max_seq_length=32, **kwargs)
    assert load_info(model).full_finetuning is False


@pytest.mark.parametrize("name", ["load_in_4bit", "load_in_8bit"])
def test_quantized_loading_is_a_one_line_error(name):
    with pytest.raises(EmbedtuneError, match=f"{name}=True: quantized training is not supported") as err:
        FastModel.from_pretrained(MINILM, max_seq_length=32, **{name: True})
    assert "\n" not in str(err.value)


def test_full_finetuning_trains_every_weight():
    model, _ = FastModel.from_pretrained(MINILM, max_seq_length=32, full_finetuning=True)
    assert load_info(model).full_finetuning is True
    with pytest.warns(UserWarning, match="full_finetuning"):
        same = FastModel.get_peft_model(model, r=8)
    assert same is model and all(p.requires_grad for p in model.parameters())
    # the guide's step 6 runs unchanged: merging a model without adapters gives the model back
    assert same.merge_and_unload() is model
    copied = copy.deepcopy(same)
    assert copied.merge_and_unload() is copied


def test_unsloth_mode_switches():
    model, _ = FastModel.from_pretrained(MINILM, max_seq_length=32)
    assert FastModel.for_inference(model) is model and not any(m.training for m in model.modules())
    assert FastModel.for_training(model) is model and all(m.training for m in model.modules())


def test_lora_init_is_seeded_as_in_unsloth():
    """Unsloth's get_peft_model seeds the LoRA init (random_state=3407): the same program, the same model."""
    def lora_a(**kwargs):
        model, _ = FastModel.from_pretrained(MINILM, max_seq_length=32)
        peft = FastModel.get_peft_model(model, r=4, **kwargs)
        torch.rand(3)  # whatever the program draws next does not reach back into the init
        return torch.cat([p.detach().flatten() for n, p in peft.named_parameters() if "lora_A" in n])

    torch.manual_seed(1)
    first = lora_a()
    torch.manual_seed(2)
    assert torch.equal(first, lora_a())
    assert not torch.equal(first, lora_a(random_state=7))


def test_unsloth_peft_keywords():
    from peft import PeftModel

    model, _ = FastModel.from_pretrained(MINILM, max_seq_length=32)
    peft = FastModel.get_peft_model(model, r=4, finetune_vision_layers=False, finetune_language_layers=True,
                                    finetune_attention_modules=True, finetune_mlp_modules=False, random_state=3407,
                                    use_rslora=True, loftq_config={}, max_seq_length=32,
                                    use_gradient_checkpointing="FALSE")
    assert isinstance(peft, PeftModel)
    lora_modules = {n.rsplit(".lora_A", 1)[0] for n, _ in peft.named_parameters() if ".lora_A" in n}
    assert lora_modules and all(".attention." in n for n in lora_modules), sorted(lora_modules)[:4]
    assert peft.peft_config["default"].use_rslora is True
    assert not peft.get_base_model().is_gradient_checkpointing

    model, _ = FastModel.from_pretrained(MINILM, max_seq_length=32)
    mlp = FastModel.get_peft_model(model, r=4, finetune_attention_modules=False, use_gradient_checkpointing="true")
    names = {n.rsplit(".lora_A", 1)[0] for n, _ in mlp.named_parameters() if ".lora_A" in n}
    assert names and not any(".attention." in n for n in names)
    assert mlp.get_base_model().is_gradient_checkpointing


def test_unsloth_peft_keyword_errors():
    model, _ = FastModel.from_pretrained(MINILM, max_seq_length=32)
    with pytest.raises(EmbedtuneError, match="loftq_config"):
        FastModel.get_peft_model(model, r=4, loftq_config={"loftq_bits": 4})
    with pytest.raises(EmbedtuneError, match="nothing to fine-tune"):
        FastModel.get_peft_model(model, r=4, finetune_attention_modules=False, finetune_mlp_modules=False)


# ------------------------------------------------------------------ N1: the bundled model's hub id


def test_compat_transformer_resolves_the_bundled_hub_id(monkeypatch, tmp_path):
    import sentence_transformers

    import embedtune

    embedtune.install_compat()  # what building a model with embedtune installs

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    module = sentence_transformers.models.Transformer(model_name_or_path=DEFAULT_MODEL_ID, max_seq_length=32)
    assert module.get_word_embedding_dimension() == 384
    sentence_transformers.models.Transformer("all-MiniLM-L6-v2", max_seq_length=32)
    with pytest.raises(Exception):  # other names are left alone
        sentence_transformers.models.Transformer(str(tmp_path / "nope"), max_seq_length=32)


def test_adapter_of_the_bundled_model_records_the_hub_id_and_reloads(tmp_path):
    from embedtune.lora import load_adapter

    model, tok = FastModel.from_pretrained(DEFAULT_MODEL_ID, max_seq_length=32)
    peft = FastModel.get_peft_model(model, r=4)
    peft.save_pretrained(str(tmp_path / "adapter"))
    recorded = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == DEFAULT_MODEL_ID
    again, _ = load_adapter(tmp_path / "adapter")
    assert load_info(again).source == DEFAULT_MODEL_ID


def test_guide_program_runs_with_the_hub_id_offline(tmp_path):
    """The guide's program with BASE_MODEL_ID = the hub id, offline with an empty HF cache, trains and saves."""
    from embedtune.data import build_stdlib_pairs, write_jsonl

    held_out = 64  # what this test checks is the load by hub id and the saves; tests/test_guide.py runs the guide's split
    data = write_jsonl(build_stdlib_pairs()[:held_out + 16], tmp_path / "pairs.jsonl")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"),
           "GUIDE_BASE_MODEL_ID": DEFAULT_MODEL_ID, "GUIDE_DATASET": str(data), "GUIDE_MAX_SEQ_LENGTH": "32",
           "GUIDE_TEST_SIZE": str(held_out)}
    env.pop("HF_HUB_CACHE", None)
    env.pop("SENTENCE_TRANSFORMERS_HOME", None)
    guide = Path(__file__).with_name("guide_program.py")
    done = subprocess.run([sys.executable, str(guide)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "embeddings_merged" / "modules.json").exists()
    assert (tmp_path / "embeddings_merged_hf" / "model.safetensors").exists()


def test_a_run_trains_documents_with_the_checkpoints_passage_prompt(dense_nonorm_dir, tmp_path):
    """An E5-style checkpoint names its document prompt "passage": the recipe trains and evaluates the
    documents with it, as `encode_document` and `embedtune eval` use it (they were trained with none)."""
    import shutil

    from embedtune.monitoring import Phases
    from embedtune.train import TrainConfig, load_model

    folder = tmp_path / "e5_like"
    shutil.copytree(dense_nonorm_dir, folder)
    settings_file = folder / "config_sentence_transformers.json"
    settings = json.loads(settings_file.read_text())
    settings.update(prompts={"query": "query: ", "passage": "passage: "})
    settings_file.write_text(json.dumps(settings))
    model = load_model(TrainConfig(data="unused.jsonl", model=str(folder), max_seq_length=32), Phases())
    assert (model.query_prompt, model.document_prompt) == ("query: ", "passage: ")
    given = load_model(TrainConfig(data="unused.jsonl", model=str(folder), max_seq_length=32,
                                   document_prompt="doc: "), Phases())
    assert given.document_prompt == "doc: "  # --document-prompt still wins
