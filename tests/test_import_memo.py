"""transformers' start-up scans remembered between CLI runs (`embedtune.import_memo`):

- the distributions map is served from the memo while the distributions on `sys.path` are unchanged,
  and computed again when one is added, or when the memo file is corrupt; each environment (`sys.path`)
  keeps its own, whatever the working folder; a memo folder that cannot be written or read is no error;
- an import structure is served while the scanned folder's files are unchanged, computed again when
  one changes; a structure of another shape is not kept;
- on the installed transformers, a process whose scans come from the memo builds the same lazy tables
  (the `transformers` and `transformers.models` import structures, the distributions map) as a plain
  process, without reading the model files; the console script installs the hook, importing
  embedtune does not; `EMBEDTUNE_IMPORT_MEMO_DIR=off` turns it off.
"""

from __future__ import annotations

import json
import sys
import textwrap

from embedtune import import_memo
from fresh_interpreter import console_main_code, fresh


def _counting(result):
    calls = []

    def compute(*args):
        calls.append(args)
        return result() if callable(result) else result

    return compute, calls


def test_distributions_map_is_served_until_a_distribution_is_added(tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "alpha-1.0.dist-info").mkdir(parents=True)
    monkeypatch.setattr(sys, "path", [str(site), *sys.path])
    memo = tmp_path / "memo"
    compute, calls = _counting({"alpha": ["alpha"]})
    assert import_memo.remembered_packages_distributions(memo, compute) == {"alpha": ["alpha"]}
    assert import_memo.remembered_packages_distributions(memo, compute) == {"alpha": ["alpha"]}
    assert len(calls) == 1
    (site / "beta-2.0.dist-info").mkdir()  # a distribution installed
    compute2, calls2 = _counting({"alpha": ["alpha"], "beta": ["beta"]})
    assert import_memo.remembered_packages_distributions(memo, compute2) == {"alpha": ["alpha"], "beta": ["beta"]}
    assert len(calls2) == 1
    (written,) = memo.iterdir()
    written.write_text("{not json")
    assert import_memo.remembered_packages_distributions(memo, compute2)["beta"] == ["beta"]
    assert len(calls2) == 2
    assert [p.name for p in memo.iterdir()] == [written.name]  # rewritten in place, no temporary left
    other = tmp_path / "other-env"
    other.mkdir()
    monkeypatch.setattr(sys, "path", [str(other), *sys.path[1:]])  # another environment: a memo of its own
    compute3, calls3 = _counting({"gamma": ["gamma"]})
    assert import_memo.remembered_packages_distributions(memo, compute3) == {"gamma": ["gamma"]}
    monkeypatch.setattr(sys, "path", [str(site), *sys.path[1:]])
    assert import_memo.remembered_packages_distributions(memo, compute2)["beta"] == ["beta"]
    assert len(calls2) == 2 and len(calls3) == 1 and len(list(memo.iterdir())) == 2


def test_runs_from_other_folders_share_the_distributions_map(tmp_path, monkeypatch):
    """`sys.path[0]` is the working folder (`python -m`, `python -c`: "") or the script's: runs of one
    environment from other folders find the map one of them wrote, unless that folder holds
    distributions of its own (a source checkout's egg-info), which then count."""
    site = tmp_path / "site"
    (site / "alpha-1.0.dist-info").mkdir(parents=True)
    here, there = tmp_path / "project-a", tmp_path / "project-b"
    here.mkdir(), there.mkdir()
    memo = tmp_path / "memo"
    compute, calls = _counting({"alpha": ["alpha"]})
    rest = sys.path[1:]
    monkeypatch.chdir(here)
    monkeypatch.setattr(sys, "path", ["", str(site), *rest])  # python -c in project-a
    assert import_memo.remembered_packages_distributions(memo, compute) == {"alpha": ["alpha"]}
    monkeypatch.setattr(sys, "path", [str(there), str(site), *rest])  # python -m from project-b
    assert import_memo.remembered_packages_distributions(memo, compute) == {"alpha": ["alpha"]}
    assert len(calls) == 1 and len(list(memo.iterdir())) == 1
    (there / "project_b.egg-info").mkdir()  # a distribution in the working folder: part of the key
    compute2, calls2 = _counting({"alpha": ["alpha"], "project_b": ["project_b"]})
    assert import_memo.remembered_packages_distributions(memo, compute2)["project_b"] == ["project_b"]
    assert len(calls2) == 1


def test_a_memo_folder_that_cannot_be_written_or_read_is_no_error(tmp_path):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the memo folder would be")
    compute, calls = _counting({"alpha": ["alpha"]})
    assert import_memo.remembered_packages_distributions(blocked, compute) == {"alpha": ["alpha"]}
    assert import_memo.remembered_packages_distributions(blocked, compute) == {"alpha": ["alpha"]}
    assert len(calls) == 2  # computed each time, as without the memo
    define, define_calls = _counting({frozenset(): {"a.b": {"C"}}})
    remembering = import_memo.remembering_define_import_structure(define, blocked)
    assert remembering(tmp_path, None) == {frozenset(): {"a.b": {"C"}}}
    assert remembering(tmp_path / "missing", None) == {frozenset(): {"a.b": {"C"}}}  # a folder it cannot scan
    assert len(define_calls) == 2 and blocked.read_text().startswith("a file")


def test_import_structure_is_served_until_a_scanned_file_changes(tmp_path):
    package = tmp_path / "models"
    (package / "bert").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "bert" / "modeling_bert.py").write_text("__all__ = ['BertModel']\n")
    memo = tmp_path / "memo"
    structure = {frozenset({"torch"}): {"bert.modeling_bert": {"BertModel"}}, frozenset(): {}}
    define, calls = _counting(lambda: {k: {m: set(n) for m, n in v.items()} for k, v in structure.items()})
    remembering = import_memo.remembering_define_import_structure(define, memo)
    assert remembering(package / "__init__.py", "models") == structure  # a file: its folder is scanned
    assert remembering(package / "__init__.py", "models") == structure
    assert len(calls) == 1
    assert remembering(package, None) == structure  # another prefix: its own memo
    assert len(calls) == 2
    (package / "bert" / "modeling_bert.py").write_text("__all__ = ['BertModel', 'BertLayer']\n")
    remembering(package / "__init__.py", "models")
    assert len(calls) == 3
    one_argument = import_memo.remembering_define_import_structure(lambda module_path: structure, tmp_path / "m4")
    assert one_argument(package / "__init__.py") == structure  # transformers 4.x's form takes no prefix
    assert one_argument(package / "__init__.py") == structure
    odd = {frozenset({"torch"}): {"bert.modeling_bert": ["BertModel"]}}  # not the shape read back: not kept
    define_odd, odd_calls = _counting(odd)
    remembering_odd = import_memo.remembering_define_import_structure(define_odd, tmp_path / "memo2")
    assert remembering_odd(package, None) is odd and remembering_odd(package, None) is odd
    assert len(odd_calls) == 2


SCAN = """
    import json, os, sys, importlib.metadata
    read = []
    real_open = open
    def counting_open(file, *args, **kwargs):
        name = os.fspath(file) if isinstance(file, (str, os.PathLike)) else ""
        if "/transformers/models/" in name and name.endswith(".py"):
            read.append(name)
        return real_open(file, *args, **kwargs)
    import builtins
    builtins.open = counting_open
    if MEMO:
        from embedtune.import_memo import remember_import_scans
        installed = remember_import_scans()
    else:
        installed = None
    import transformers
    import transformers.models
    from transformers import BertModel  # the lazy tables at work
    builtins.open = real_open
    from transformers.utils import import_utils
    def tables(lazy):
        return {"modules": sorted(lazy._modules), "class_to_module": sorted(lazy._class_to_module.items()),
                "missing_backend": sorted((k, sorted(map(str, v))) for k, v in lazy._object_missing_backend.items()),
                "all": sorted(lazy.__all__)}
    print(json.dumps({
        "installed": installed,
        "models_read": len(read),
        "wrapped": getattr(import_utils.define_import_structure, "remembered_by", None),
        "packages_distributions_restored": importlib.metadata.packages_distributions.__module__,
        "mapping": getattr(import_utils, "PACKAGE_DISTRIBUTION_MAPPING", None),  # 5.17 builds it at import
        "top": tables(transformers),
        "models": tables(transformers.models),
        "bert": BertModel.__name__,
    }))
"""


def _scan(memo: bool, memo_dir) -> dict:
    env = {"EMBEDTUNE_IMPORT_MEMO_DIR": str(memo_dir)}
    return fresh(f"MEMO = {memo}\n" + textwrap.dedent(SCAN), env=env)


def test_installed_transformers_builds_the_same_tables_from_the_memo_without_reading_model_files(tmp_path):
    plain = _scan(False, tmp_path / "unused")
    first = _scan(True, tmp_path / "memo")  # computes and writes the memo
    served = _scan(True, tmp_path / "memo")
    assert plain["installed"] is None and first["installed"] is True and served["installed"] is True
    assert plain["models_read"] > 100 and first["models_read"] > 100  # the scan reads every model file
    assert served["models_read"] < 5  # bert's own files at most
    assert served["wrapped"] == "embedtune.import_memo"
    assert served["packages_distributions_restored"] == "importlib.metadata"
    for seen in (first, served):
        for key in ("mapping", "top", "models", "bert"):
            assert seen[key] == plain[key], key
    names = sorted(p.name for p in (tmp_path / "memo").iterdir())
    assert sum(n.startswith("import_structure-") for n in names) >= 2  # transformers' and transformers.models'
    assert not [n for n in names if n.endswith(".tmp")]


FORM_5_17 = """
import importlib.metadata

PACKAGE_DISTRIBUTION_MAPPING = importlib.metadata.packages_distributions()


def define_import_structure(module_path, prefix=None):
    return {frozenset(): {"a.b": {"C"}}}
"""


def test_a_module_in_transformers_5_17_form_gets_the_map_from_the_memo(tmp_path):
    """transformers 5.17 builds the distributions map at import; the installed version may not."""
    (tmp_path / "fake_tf" / "utils").mkdir(parents=True)
    (tmp_path / "fake_tf" / "__init__.py").write_text("")
    (tmp_path / "fake_tf" / "utils" / "__init__.py").write_text("")
    (tmp_path / "fake_tf" / "utils" / "import_utils.py").write_text(FORM_5_17)
    code = f"""
        import json, sys, importlib.metadata
        sys.path.insert(0, {str(tmp_path)!r})
        real = importlib.metadata.packages_distributions
        if SERVED:
            def refuse():
                raise AssertionError("computed, not served")
            importlib.metadata.packages_distributions = refuse
        from embedtune.import_memo import remember_import_scans
        installed = remember_import_scans("fake_tf.utils.import_utils")
        import fake_tf.utils.import_utils as iu
        restored = importlib.metadata.packages_distributions is (refuse if SERVED else real)
        print(json.dumps({{"installed": installed, "mapping": iu.PACKAGE_DISTRIBUTION_MAPPING, "restored": restored,
                          "real": real(), "structure": sorted(iu.define_import_structure(sys.path[0])[frozenset()]),
                          "wrapped": iu.define_import_structure.remembered_by}}))
    """
    env = {"EMBEDTUNE_IMPORT_MEMO_DIR": str(tmp_path / "memo")}
    first = fresh("SERVED = False\n" + textwrap.dedent(code), env=env)
    served = fresh("SERVED = True\n" + textwrap.dedent(code), env=env)
    for seen in (first, served):
        assert seen["installed"] is True and seen["restored"] is True
        assert seen["mapping"] == seen["real"] and seen["mapping"]
        assert seen["structure"] == ["a.b"] and seen["wrapped"] == "embedtune.import_memo"


def test_console_script_installs_the_hook_importing_embedtune_does_not_and_off_turns_it_off(tmp_path):
    code = console_main_code("embedtune.import_memo:_RememberImportScans", """
        hook = next((f for f in sys.meta_path if isinstance(f, _RememberImportScans)), None)
        seen["warming"] = getattr(hook, "child", None) is not None
        import transformers
        from transformers.utils import import_utils
        seen["wrapped"] = getattr(import_utils.define_import_structure, "remembered_by", None)
        if seen["warming"]:
            hook.child.wait()  # its files, before the test reads the folder
    """)
    memo = {"EMBEDTUNE_IMPORT_MEMO_DIR": str(tmp_path / "memo")}
    # an empty memo: the console script starts the child that writes it; a full one: no child
    assert fresh(code, env=memo) == {"on_import": False, "warming": True, "wrapped": "embedtune.import_memo"}
    assert fresh(code, env=memo) == {"on_import": False, "warming": False, "wrapped": "embedtune.import_memo"}
    assert fresh(code, env={"EMBEDTUNE_IMPORT_MEMO_DIR": "off"}) == {"on_import": False, "warming": False, "wrapped": None}
    assert not (tmp_path / "off").exists()
    assert all(json.loads(p.read_text())["key"] for p in (tmp_path / "memo").iterdir())


def test_a_miss_waits_for_the_warming_childs_file_and_no_longer(tmp_path):
    """On a miss, the map (and an import structure) is read from the file the warming child writes, as
    soon as it is there; a child that ends without writing it, or takes longer than `WAIT_S`, leaves
    the computing to the run."""
    import threading
    import time
    from types import SimpleNamespace

    memo = tmp_path / "memo"
    compute, calls = _counting({"alpha": ["alpha"]})
    running = import_memo.Warming(SimpleNamespace(poll=lambda: None))
    name, key = import_memo._distributions_memo()
    writer = threading.Timer(0.2, lambda: import_memo._write(memo, name, key, {"beta": ["beta"]}))
    writer.start()
    started = time.monotonic()
    assert import_memo.remembered_packages_distributions(memo, compute, running) == {"beta": ["beta"]}
    assert calls == [] and time.monotonic() - started < import_memo.WAIT_S
    writer.join()

    ended = import_memo.Warming(SimpleNamespace(poll=lambda: 0))  # ended without writing it: no wait at all
    assert import_memo.remembered_packages_distributions(tmp_path / "other", compute, ended) == {"alpha": ["alpha"]}
    assert len(calls) == 1
    slow = import_memo.Warming(SimpleNamespace(poll=lambda: None), seconds=0.3)  # the misses share the wait
    started = time.monotonic()
    assert import_memo._await(slow, lambda: import_memo._read(tmp_path / "slow", name, key)) is None
    assert import_memo._await(slow, lambda: import_memo._read(tmp_path / "slower", name, key)) is None
    assert 0.3 <= time.monotonic() - started < 1.0 and slow.left_s == 0.0

    structure = {frozenset({"torch"}): {"modeling_x": {"XModel"}}}
    scanned = tmp_path / "pkg"
    scanned.mkdir()
    (scanned / "modeling_x.py").write_text("__all__ = ['XModel']\n")
    define, defined = _counting(structure)
    warmed = import_memo.remembering_define_import_structure(define, tmp_path / "warmed")
    assert warmed(str(scanned)) == structure and len(defined) == 1  # as the child writes it
    reading = import_memo.remembering_define_import_structure(define, tmp_path / "warmed", running)
    assert reading(str(scanned)) == structure and len(defined) == 1


def test_the_warming_child_writes_the_memos_the_run_reads(tmp_path):
    """`start_warming` starts a child only where the map is not in the memo; the child writes the
    installed environment's map (equal to `packages_distributions()`) and transformers' two import
    structures."""
    import importlib.metadata
    import os

    memo = tmp_path / "memo"
    child = import_memo.start_warming(memo)
    if not import_memo._spare_cpu():
        assert child is None
        return
    assert child is not None and child.wait(timeout=120) == 0
    name, key = import_memo._distributions_memo()
    assert import_memo._read(memo, name, key) == {k: list(v) for k, v in importlib.metadata.packages_distributions().items()}
    assert len([f for f in os.listdir(memo) if f.startswith("import_structure-")]) == 2
    assert import_memo.start_warming(memo) is None  # the map is there: no child
