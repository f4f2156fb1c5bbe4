"""The CLI's deferred scikit-learn import (`embedtune.deferred_imports`), each case in a fresh interpreter:

- with the hook, importing what a run imports (embedtune.train, sentence-transformers, transformers'
  generation) loads no scikit-learn, and sentence-transformers' `pairwise_distances` still gives
  scikit-learn's result;
- transformers' candidate generator and data.metrics in the form of 5.17 (imports under
  `if is_sklearn_available():`) get the deferred functions, which give the real ones' results;
- afterwards `import sklearn.metrics` is the real package (no stand-in left);
- the console script installs it; importing embedtune alone does not;
- a module whose source imports anything else from scikit-learn runs untouched, and the hook serves
  no scikit-learn stand-ins once scikit-learn is loaded;
- sentence-transformers' evaluation package (a run with evaluation imports it) loads no
  scikit-learn or scipy.stats, and its similarity evaluator's deferred Spearman gives scipy's result;
- transformers' object-detection losses get a deferred Hungarian matching: a run loads no
  scipy.optimize, and the losses' `linear_sum_assignment` gives scipy's result;
- where transformers finds timm, its TimmWrapper config (which sentence-transformers imports) gets
  deferred ImageNet label helpers: a run loads no timm, and an image config still gets timm's labels.
"""

from __future__ import annotations

import textwrap

from embedtune.deferred_imports import DEFERRED, _imports_only
from fresh_interpreter import console_main_code, fresh

SIMILARITY = DEFERRED["sentence_transformers.util.similarity"]
SIMILARITY_LINE = SIMILARITY[0]
ROC_LINE = DEFERRED["transformers.generation.candidate_generator"][0]
SCIPY_LINE, F1_LINE = DEFERRED["transformers.data.metrics"]
TIMM_CONFIG = "transformers.models.timm_wrapper.configuration_timm_wrapper"

def test_a_run_s_imports_load_no_sklearn_and_the_function_still_works():
    seen = fresh("""
        import json, sys
        import numpy as np
        from embedtune.deferred_imports import defer_imports
        installed = defer_imports()
        import embedtune.train, embedtune.resumable_trainer
        import transformers.generation.candidate_generator
        from sentence_transformers.util import similarity
        loaded_after_imports = any(name in sys.modules for name in ("sklearn", "sklearn.metrics", "scipy.stats",
                                                                    "scipy.optimize"))
        a, b = np.random.default_rng(0).normal(size=(3, 5)), np.random.default_rng(1).normal(size=(4, 5))
        deferred = similarity.pairwise_distances(a, b, metric="manhattan")
        import sklearn.metrics
        real = sklearn.metrics.pairwise_distances(a, b, metric="manhattan")
        print(json.dumps({"installed": installed, "loaded_after_imports": loaded_after_imports,
                          "same": bool(np.array_equal(deferred, real)),
                          "real_package": hasattr(sklearn, "__version__") and hasattr(sklearn.metrics, "roc_auc_score"),
                          "deferred_is_ours": similarity.pairwise_distances.__module__}))
    """)
    assert seen["installed"] is True
    assert seen["loaded_after_imports"] is False
    assert seen["same"] is True
    assert seen["real_package"] is True
    assert seen["deferred_is_ours"] == "embedtune.deferred_imports"


def test_the_console_script_installs_it_and_importing_embedtune_does_not():
    seen = fresh(console_main_code("embedtune.deferred_imports:_DeferImports", """
        import sentence_transformers.util.similarity as similarity
        seen["sklearn"] = "sklearn" in sys.modules
        seen["ours"] = similarity.pairwise_distances.__module__
    """))
    assert seen == {"on_import": False, "sklearn": False, "ours": "embedtune.deferred_imports"}


def test_no_sklearn_stand_ins_once_sklearn_is_loaded_and_not_installed_once_nothing_is_left(tmp_path):
    seen = fresh("""
        import json, sys
        import sklearn
        from embedtune.deferred_imports import defer_imports
        defer_imports()
        import sentence_transformers.util.similarity as similarity
        import transformers.models.timm_wrapper.configuration_timm_wrapper
        print(json.dumps({"again": defer_imports(), "module": similarity.pairwise_distances.__module__}))
    """)
    assert seen["again"] is False  # every module it served is loaded, or waits for a loaded package
    assert seen["module"].startswith("sklearn.")
    seen = fresh(f"""
        import json, sys
        sys.path.insert(0, {_fake_timm_root(tmp_path)!r})
        import sklearn, scipy.stats, timm
        from embedtune.deferred_imports import defer_imports
        print(json.dumps({{"installed": defer_imports()}}))
    """)
    assert seen == {"installed": False}


def test_only_a_source_whose_every_sklearn_import_is_the_served_line_gets_the_stand_ins(tmp_path):
    def source(text: str) -> str:
        path = tmp_path / f"m{len(list(tmp_path.iterdir()))}.py"
        path.write_text(textwrap.dedent(text))
        return str(path)

    assert _imports_only(source(f"import numpy\n{SIMILARITY_LINE}\n"), SIMILARITY)
    transformers_5_17 = f"""
        from ..utils import ModelOutput, is_sklearn_available
        if is_sklearn_available():
            {ROC_LINE}
        def f():
            return is_sklearn_available()
        """
    assert _imports_only(source(transformers_5_17), (ROC_LINE,))
    assert not _imports_only(source(f"{SIMILARITY_LINE}\nfrom sklearn.metrics import roc_auc_score\n"), SIMILARITY)
    assert not _imports_only(source("from sklearn.metrics import pairwise_distances, roc_auc_score\n"), SIMILARITY)
    assert not _imports_only(source(f"{SIMILARITY_LINE}\nimport sklearn.utils\n"), SIMILARITY)
    assert not _imports_only(source("import numpy\n"), SIMILARITY)  # nothing to serve
    both = (SCIPY_LINE, F1_LINE)
    assert _imports_only(source(f"if True:\n    {SCIPY_LINE}\n    {F1_LINE}\n"), both)
    assert not _imports_only(source(f"{SCIPY_LINE}\n"), both)
    assert not _imports_only(source(f"{SCIPY_LINE}\n{F1_LINE}\nimport scipy.linalg\n"), both)
    assert not _imports_only(str(tmp_path / "missing.py"), SIMILARITY)
    assert not _imports_only(None, SIMILARITY)


def test_transformers_5_17_generation_and_metrics_get_the_deferred_functions(tmp_path):
    """A stand-in `transformers` package laid out as 5.17's: its generation module imports roc_curve,
    and its data.metrics scipy.stats' and scikit-learn's scores, at their top when scikit-learn is
    installed."""
    root = tmp_path / "transformers"
    (root / "generation").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "utils.py").write_text(  # 5.17's check: importlib's find_spec, which reads a loaded module's spec
        "import importlib.util\nclass ModelOutput: pass\n"
        "def is_sklearn_available():\n    return importlib.util.find_spec('sklearn') is not None\n")
    (root / "generation" / "__init__.py").write_text("")
    (root / "generation" / "candidate_generator.py").write_text(
        f"from ..utils import ModelOutput, is_sklearn_available\nif is_sklearn_available():\n    {ROC_LINE}\n")
    (root / "data" / "metrics").mkdir(parents=True)
    (root / "data" / "__init__.py").write_text("from .metrics import glue\n")
    (root / "data" / "metrics" / "__init__.py").write_text(
        f"from ...utils import is_sklearn_available\nif is_sklearn_available():\n    {SCIPY_LINE}\n    {F1_LINE}\n"
        "def glue(a, b):\n    return pearsonr(a, b)[0], spearmanr(a, b)[0], f1_score(a, b), matthews_corrcoef(a, b)\n")
    seen = fresh(f"""
        import json, sys
        sys.path.insert(0, {str(tmp_path)!r})
        from embedtune.deferred_imports import defer_imports
        defer_imports()
        import transformers.generation.candidate_generator as generator
        import transformers.data
        loaded = [name for name in ("sklearn", "scipy.stats") if name in sys.modules]
        ours = generator.roc_curve.__module__
        glue = transformers.data.glue([0, 1, 1, 0], [0, 1, 0, 0])
        from scipy.stats import pearsonr, spearmanr
        from sklearn.metrics import f1_score, matthews_corrcoef
        a, b = [0, 1, 1, 0], [0, 1, 0, 0]
        real_glue = (pearsonr(a, b)[0], spearmanr(a, b)[0], f1_score(a, b), matthews_corrcoef(a, b))
        fpr, tpr, _ = generator.roc_curve([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
        from sklearn.metrics import roc_curve
        real_fpr, real_tpr, _ = roc_curve([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
        print(json.dumps({{"loaded": loaded, "ours": ours, "glue": [float(x) for x in glue] == [float(x) for x in real_glue],
                          "same": fpr.tolist() == real_fpr.tolist() and tpr.tolist() == real_tpr.tolist()}}))
    """)
    assert seen == {"loaded": [], "ours": "embedtune.deferred_imports", "same": True, "glue": True}


def _stand_in_similarity(tmp_path, source: str, **helpers: str) -> dict:
    """Import a stand-in `sentence_transformers.util.similarity` of `source` (beside it, a module per
    `helpers` entry) with the hook installed, in a fresh interpreter: the module its
    `pairwise_distances` comes from, its `runs` counter, and whether `sklearn` is the real package."""
    package = tmp_path / "sentence_transformers" / "util"
    package.mkdir(parents=True)
    (tmp_path / "sentence_transformers" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    for name, text in helpers.items():
        (package / f"{name}.py").write_text(text)
    (package / "similarity.py").write_text(source)
    return fresh(f"""
        import json, sys
        sys.path.insert(0, {str(tmp_path)!r})
        from embedtune.deferred_imports import defer_imports
        defer_imports()
        import sentence_transformers.util.similarity as similarity
        import sklearn
        print(json.dumps({{"module": similarity.pairwise_distances.__module__, "runs": getattr(similarity, "runs", None),
                          "sklearn_real": hasattr(sklearn, "__version__")}}))
    """)


def test_another_source_runs_untouched(tmp_path):
    """A module at TARGET's name whose source imports more than that one name is executed as it is: it
    gets the real scikit-learn."""
    seen = _stand_in_similarity(tmp_path, f"{SIMILARITY_LINE}\nfrom sklearn.metrics import roc_auc_score\n")
    assert seen["module"].startswith("sklearn.") and seen["sklearn_real"] is True


def test_a_module_that_wants_more_of_the_package_meanwhile_runs_again_plainly(tmp_path):
    """Its own source serves the stand-ins, but a module it imports wants another part of scikit-learn,
    which the stand-ins do not have: the module is run again with the real package, and gets the real
    function."""
    seen = _stand_in_similarity(tmp_path, f"from . import helper\n{SIMILARITY_LINE}\nruns = globals().get('runs', 0) + 1\n",
                                helper="import sklearn.utils\n")
    assert seen["module"].startswith("sklearn.") and seen["sklearn_real"] is True and seen["runs"] == 1


def _fake_timm_root(tmp_path) -> str:
    """A stand-in `timm` whose `timm.data` has the ImageNet label helpers transformers' config calls."""
    data = tmp_path / "timm" / "data"
    data.mkdir(parents=True)
    (tmp_path / "timm" / "__init__.py").write_text("")
    (data / "__init__.py").write_text(textwrap.dedent("""
        def infer_imagenet_subset(config):
            return "imagenet-1k" if config.get("num_classes") == 2 else None
        class ImageNetInfo:
            def __init__(self, subset):
                self.subset = subset
            def label_names(self):
                return ["n01", "n02"]
            def label_descriptions(self, as_dict=False):
                return {"n01": "tench", "n02": "goldfish"}
    """))
    return str(tmp_path)


def _assert_sources_served(names: list[str]) -> None:
    """The installed sources of these modules import their packages by exactly the lines served."""
    import importlib.util

    for name in names:
        assert _imports_only(importlib.util.find_spec(name).origin, DEFERRED[name]), name


def test_transformers_timm_config_source_is_served():
    _assert_sources_served([TIMM_CONFIG])


def test_where_transformers_finds_timm_a_run_loads_none_and_image_configs_still_get_its_labels(tmp_path):
    """transformers imports timm's model zoo (0.4 s) for the TimmWrapper config, which
    sentence-transformers' Transformer module imports; here transformers is told timm is installed
    (it also wants torchvision) and finds a stand-in timm."""
    seen = fresh(f"""
        import json, sys
        sys.path.insert(0, {_fake_timm_root(tmp_path)!r})
        import transformers.utils, transformers.utils.import_utils as import_utils
        available = lambda: True
        transformers.utils.is_timm_available = import_utils.is_timm_available = available
        import_utils.BACKENDS_MAPPING["timm"] = (available, import_utils.BACKENDS_MAPPING["timm"][1])
        from embedtune.deferred_imports import defer_imports
        installed = defer_imports()
        import embedtune.train, embedtune.resumable_trainer
        import sentence_transformers
        config_module = sys.modules.get({TIMM_CONFIG!r})
        loaded_after_imports = "timm" in sys.modules or "timm.data" in sys.modules
        from transformers import TimmWrapperConfig
        ours = sys.modules[{TIMM_CONFIG!r}].infer_imagenet_subset.__module__
        config = TimmWrapperConfig.from_dict({{"architecture": "resnet18", "num_classes": 2}})
        import timm.data
        print(json.dumps({{"installed": installed, "imported_by_the_run": config_module is not None,
                          "loaded_after_imports": loaded_after_imports, "ours": ours,
                          "labels": config.id2label, "real_after": hasattr(timm.data, "ImageNetInfo")}}))
    """)
    assert seen == {"installed": True, "imported_by_the_run": True, "loaded_after_imports": False,
                    "ours": "embedtune.deferred_imports", "labels": {"0": "tench", "1": "goldfish"},
                    "real_after": True}


def test_detection_losses_get_a_deferred_hungarian_matching_that_gives_scipy_s_result():
    losses = [name for name in DEFERRED if name.startswith("transformers.loss.")]
    seen = fresh(f"""
        import importlib, json, sys
        import numpy as np
        from embedtune.deferred_imports import defer_imports
        defer_imports()
        import embedtune.train, embedtune.resumable_trainer
        import transformers.loss.loss_utils
        losses = {losses!r}
        imported = [name for name in losses if name in sys.modules]
        loaded = "scipy.optimize" in sys.modules
        ours = {{name: importlib.import_module(name).linear_sum_assignment.__module__ for name in losses}}
        cost = np.random.default_rng(0).normal(size=(5, 7))
        rows, cols = importlib.import_module(losses[0]).linear_sum_assignment(cost)
        from scipy.optimize import linear_sum_assignment
        real_rows, real_cols = linear_sum_assignment(cost)
        print(json.dumps({{"imported": imported, "loaded": loaded, "ours": sorted(set(ours.values())),
                          "same": rows.tolist() == real_rows.tolist() and cols.tolist() == real_cols.tolist()}}))
    """)
    assert seen["imported"] == losses  # all of them come with transformers' loss registry
    assert seen == {"imported": losses, "loaded": False, "ours": ["embedtune.deferred_imports"], "same": True}
    _assert_sources_served(losses)  # this transformers' sources are the ones served


def test_a_run_with_evaluation_loads_no_sklearn_and_the_evaluators_scores_are_scipy_s():
    evaluators = [name for name in DEFERRED if name.startswith("sentence_transformers.sentence_transformer.evaluation.")]
    seen = fresh("""
        import importlib, json, sys
        import numpy as np
        from embedtune.deferred_imports import defer_imports
        defer_imports()
        import embedtune.train, embedtune.evaluate
        from sentence_transformers.evaluation import InformationRetrievalEvaluator, EmbeddingSimilarityEvaluator
        loaded = [name for name in ("sklearn", "scipy.stats") if name in sys.modules]
        similarity = sys.modules["sentence_transformers.sentence_transformer.evaluation.embedding_similarity"]
        a, b = np.random.default_rng(0).normal(size=20), np.random.default_rng(1).normal(size=20)
        deferred = similarity.spearmanr(a, b)[0]
        from scipy.stats import spearmanr
        print(json.dumps({"loaded": loaded, "ours": similarity.spearmanr.__module__,
                          "same": float(deferred) == float(spearmanr(a, b)[0])}))
    """)
    assert seen == {"loaded": [], "ours": "embedtune.deferred_imports", "same": True}
    _assert_sources_served(evaluators)  # this sentence-transformers' sources are the ones served
