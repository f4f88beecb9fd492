"""Guards that keep two layering rules true (issue #24, item 4), read from the syntax tree of every module.

1. timm's internals are read in one place, ``models/vit_forward.py`` (the walk): a call to ``.qkv(...)``,
   any ``_pos_embed`` and any ``._attn`` anywhere else fails. Every other module calls the walk's named
   functions (``embed_tokens``, ``attention``, ``window_attention``), so a timm release that renames
   them breaks one module, which ``tests/test_vit_forward.py`` checks against ``model(x)``.
2. Pages compute no tensors: a module under ``pages/`` (and ``app.py``) that imports torch, calls
   ``torch.*`` or ``F.*``, calls ``.backward(`` or enters ``no_grad`` / ``inference_mode`` fails. The
   computation belongs in the page's analysis module, where it is importable and tested without Streamlit.

Each checker is a function of source text, and a test feeds it code that breaks the rule, so neither guard
passes because it looks at nothing.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "analysis", "pages")
WALK = "models/vit_forward.py"  # README "Layout": the only code reading timm's ViT internals (Swin's too)
TIMM_PRIVATE = ("_pos_embed", "_attn")  # VisionTransformer._pos_embed, SwinTransformerBlock._attn
TORCH_ROOTS = {"torch", "F"}  # F: the usual alias of torch.nn.functional, named even where not imported
GRAD_MODES = {"no_grad", "inference_mode", "enable_grad", "set_grad_enabled"}


def _sources(*packages: str, app: bool = False) -> dict[str, str]:
    files = sorted(p for package in packages for p in (ROOT / package).rglob("*.py"))
    if app:
        files.append(ROOT / "app.py")
    return {p.relative_to(ROOT).as_posix(): p.read_text() for p in files}


def _root_name(node: ast.expr) -> str | None:
    """``torch`` for ``torch.nn.functional.softmax``; None where the chain does not start at a name."""
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _string_arg(call: ast.Call, index: int) -> str | None:
    arg = call.args[index] if len(call.args) > index else None
    return arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else None


# ------------------------------------------------------------------------------------ 1. timm internals
def timm_internal_reads(source: str, filename: str = "<source>") -> list[tuple[int, str]]:
    """(line, what) for each read of timm's ViT internals: ``.qkv(...)`` (also ``.qkv.forward(...)``),
    ``_pos_embed`` / ``_attn`` as an attribute, a name, an imported name, a method defined under that name
    (an override), or a string given to getattr/hasattr/setattr."""
    found = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr == "qkv":
                found.append((node.lineno, ".qkv(...)"))
            elif (isinstance(func, ast.Attribute) and func.attr in ("forward", "__call__")
                  and isinstance(func.value, ast.Attribute) and func.value.attr == "qkv"):
                found.append((node.lineno, f".qkv.{func.attr}(...)"))
            elif isinstance(func, ast.Name) and func.id in ("getattr", "hasattr", "setattr"):
                if _string_arg(node, 1) in TIMM_PRIVATE:
                    found.append((node.lineno, f"{func.id}(..., {_string_arg(node, 1)!r})"))
        elif isinstance(node, ast.Attribute) and node.attr in TIMM_PRIVATE:
            found.append((node.lineno, f".{node.attr}"))
        elif isinstance(node, ast.Name) and node.id in TIMM_PRIVATE:
            found.append((node.lineno, node.id))
        elif isinstance(node, ast.alias) and node.name.rpartition(".")[2] in TIMM_PRIVATE:
            found.append((node.lineno, f"import {node.name}"))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in TIMM_PRIVATE:
            found.append((node.lineno, f"def {node.name}"))
    return sorted(set(found))


def test_only_the_walk_reads_timm_internals():
    offenders = {path: hits for path, source in _sources(*PACKAGES, app=True).items() if path != WALK
                 for hits in [timm_internal_reads(source, path)] if hits}
    assert not offenders, (f"timm's internals read outside {WALK}; add a named function there and call it: "
                           f"{offenders}")


def test_the_walk_reads_what_the_guard_looks_for():
    """The walk module exists and reads exactly these internals, so the names guarded are the ones in use."""
    hits = {what for _, what in timm_internal_reads((ROOT / WALK).read_text(), WALK)}
    assert {".qkv(...)", "._pos_embed", "._attn"} <= hits


def test_the_guarded_names_are_timm_internals():
    """The installed timm still has them: a rename would leave the guard looking for names nobody can use."""
    from timm.layers import Attention
    from timm.models.swin_transformer import SwinTransformerBlock
    from timm.models.vision_transformer import VisionTransformer

    assert callable(getattr(VisionTransformer, "_pos_embed", None))
    assert callable(getattr(SwinTransformerBlock, "_attn", None))
    assert hasattr(Attention(dim=8, num_heads=2), "qkv")


@pytest.mark.parametrize("code, what", [
    ("q, k, v = block.attn.qkv(x).chunk(3, -1)", ".qkv(...)"),
    ("y = attn.qkv.forward(x)", ".qkv.forward(...)"),
    ("x = model._pos_embed(model.patch_embed(x))", "._pos_embed"),
    ("x = x + blk.drop_path1(blk._attn(blk.norm1(x)))", "._attn"),
    ("f = getattr(model, '_pos_embed')", "getattr(..., '_pos_embed')"),
    ("from timm.models.vision_transformer import _pos_embed", "import _pos_embed"),
    ("class V(VisionTransformer):\n    def _pos_embed(self, x):\n        return x", "def _pos_embed"),
])
def test_timm_guard_sees_a_violation(code, what):
    assert what in {found for _, found in timm_internal_reads(code)}


@pytest.mark.parametrize("code", [
    "config._attn_implementation = 'sdpa'",           # transformers' setting, not Swin's private method
    "weight = attn.qkv.weight.shape[0]",               # reading a parameter's shape is not calling timm's forward
    "ok = hasattr(b.attn, 'qkv')",
    "result = attention(block.attn, x)",               # the walk's named function
    "# model._pos_embed(x) in a comment\ntext = 'block._attn(x)'",
])
def test_timm_guard_passes_code_that_keeps_out(code):
    assert timm_internal_reads(code) == []


# ---------------------------------------------------------------------------------- 2. pages and tensors
def page_tensor_code(source: str, filename: str = "<source>") -> list[tuple[int, str, str]]:
    """(line, where, what) for each place a page touches torch: an import of torch (or a submodule), a call
    of ``torch.*`` / ``F.*`` or of a name imported from torch, ``.backward(...)``, and ``no_grad`` /
    ``inference_mode`` (as ``torch.no_grad`` or a bare name). ``where`` is the enclosing function (def,
    async def, lambda) or ``<module>``: a page's script body runs on every rerun, so it counts too."""
    tree = ast.parse(source, filename=filename)
    roots = set(TORCH_ROOTS)
    for node in ast.walk(tree):  # names bound by ``from torch import nn`` or ``import torch.nn as tnn``
        if isinstance(node, ast.Import):
            roots.update(a.asname for a in node.names if a.asname and a.name.split(".")[0] == "torch")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "torch" and not node.level:
            roots.update(a.asname or a.name for a in node.names)
    found = []

    def visit(node: ast.AST, where: str) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            where = node.name
        elif isinstance(node, ast.Lambda):
            where = f"lambda (line {node.lineno})"
        if isinstance(node, ast.Import):
            found.extend((node.lineno, where, f"import {a.name}") for a in node.names
                         if a.name.split(".")[0] == "torch")
        elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "torch":
            found.append((node.lineno, where, f"from {node.module} import ..."))
        elif isinstance(node, ast.Call):
            func = node.func
            if _root_name(func) in roots:
                found.append((node.lineno, where, f"{ast.unparse(func)}(...)"))
            elif isinstance(func, ast.Attribute) and func.attr == "backward":
                found.append((node.lineno, where, ".backward(...)"))
        if isinstance(node, (ast.Attribute, ast.Name)) and (getattr(node, "attr", None) or getattr(node, "id", None)) \
                in GRAD_MODES:
            found.append((node.lineno, where, ast.unparse(node)))
        for child in ast.iter_child_nodes(node):
            visit(child, where)

    visit(tree, "<module>")
    return sorted(set(found))


def test_pages_compute_no_tensors():
    offenders = {path: hits for path, source in _sources("pages", app=True).items()
                 for hits in [page_tensor_code(source, path)] if hits}
    assert not offenders, ("pages are thin (widgets -> one analysis call -> figures); move the tensor code into "
                           f"the page's analysis module: {offenders}")


@pytest.mark.parametrize("code, what", [
    ("import torch", "import torch"),
    ("import torch.nn.functional as F", "import torch.nn.functional"),
    ("from torch.utils.data import DataLoader", "from torch.utils.data import ..."),
    ("def f(x):\n    return x.softmax(-1).topk(5)\nlabels = torch.full((3,), 7)", "torch.full(...)"),
    ("def f(x):\n    return F.softmax(x, dim=-1)", "F.softmax(...)"),
    ("from torch import nn\nhead = nn.Linear(3, 4)", "nn.Linear(...)"),
    ("from torch import tensor as T\ny = T([1, 2])", "T(...)"),
    ("loss.backward()", ".backward(...)"),
    ("with no_grad():\n    pass", "no_grad"),
    ("g = lambda m, x: torch.inference_mode()", "torch.inference_mode(...)"),
])
def test_page_guard_sees_a_violation(code, what):
    assert what in {found for _, _, found in page_tensor_code(code)}


def test_page_guard_names_the_function():
    code = "import streamlit as st\n\ndef _score(x):\n    return torch.topk(x, 5)\n\nst.write(lambda: F.relu(1))\n"
    assert [(where, what) for _, where, what in page_tensor_code(code)] == [
        ("_score", "torch.topk(...)"), ("lambda (line 6)", "F.relu(...)")]


@pytest.mark.parametrize("code", [
    "import streamlit as st\nst.caption('profiled with `torch.profiler`; torch.compile is slow')",
    "from analysis.channel_importance import taylor_importance\nscores = taylor_importance(model, batches, 'self')",
    "frame = df.mean()\nbest = rows.topk",
])
def test_page_guard_passes_a_thin_page(code):
    assert page_tensor_code(code) == []


# ------------------------------------------------------------------------------------ 3. the method table
TABLE = "models/methods.py"


def method_key_literals(source: str, keys: set[str], filename: str = "<source>") -> list[tuple[int, str]]:
    """(line, key) for each string literal equal to a method key of the table (``"tome"``, ``"dynamicvit"``):
    code that names a method instead of looping over the table. f-string pieces count too."""
    return sorted({(node.lineno, node.value) for node in ast.walk(ast.parse(source, filename=filename))
                   if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in keys})


def _method_keys() -> set[str]:
    from models.methods import METHODS

    return set(METHODS)


def _setting_keys() -> set[str]:
    """The keys of the methods' settings and paper flags (``"rho"``, ``"prune"``): picking a method by its setting's
    key (``main_setting.key == "rho"``) names it as surely as its own key does."""
    from models.methods import METHODS

    # A model setting (the input size, ``size``) picks no method: it changes what is loaded, for every method.
    return {s.key for m in METHODS.values() if not m.model_setting for s in m.settings} | {
        m.paper_flag for m in METHODS.values() if m.paper_flag}


def test_no_page_or_analysis_names_a_method():
    """Issue #24: the method table is the only place a method is named; pages and analyses loop over it, and pick
    methods by the table's fields (``stage_pruning``), never by a setting's key."""
    keys = _method_keys() | _setting_keys()
    offenders = {path: hits for path, source in _sources("analysis", "pages", app=True).items()
                 for hits in [method_key_literals(source, keys, path)] if hits}
    assert not offenders, f"method or setting keys written out in analysis/ or pages/ (loop over " \
                          f"models.methods.METHODS, pick by its fields): {offenders}"


def test_method_guard_sees_a_violation():
    keys = _method_keys()
    assert {"tome", "dynamicvit", "evit"} <= keys
    bad = ['METHODS["tome"].bind(model, {})', 'if method.key == "dynamicvit":\n    pass',
           'DEFAULTS = {"evit": [0.7]}', "key = f'{m}_{\"tome\"}'"]
    for source in bad:
        assert method_key_literals(source, keys), source
    settings = _setting_keys()
    assert {"rho", "prop_attn", "fuse", "prune"} <= settings
    for source in ['pruning = [m for m in METHODS.values() if m.main_setting.key == "rho"]',
                   'keys = {part: f"vl_{part}" for part in ("layers", "prune")}']:
        assert not method_key_literals(source, keys), source
        assert method_key_literals(source, keys | settings), source
    assert not method_key_literals('for m in METHODS.values():\n    label = f"tr_{m.key}"  # "tome"', keys)


# ------------------------------------------------------------------------------------ 4. the engine table
ENGINE_TABLE = "analysis/timing/engines.py"


def _engine_strings() -> set[str]:
    from analysis.timing.engines import ENGINES

    return set(ENGINES) | {"torch.compile"}


def engine_string_comparisons(source: str, strings: set[str], filename: str = "<source>") -> list[tuple[int, str]]:
    """(line, what) for each comparison with an engine's name (``engine == "onnxruntime"``, ``key in ("eager",
    "compile")``), each ``.endswith`` / ``.startswith`` of a string holding one (``" [onnxruntime]"``), and each use
    of the old name suffix: code that picks an engine by its string instead of the table's fields."""
    def names_engine(node: ast.AST) -> bool:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value in strings
        return isinstance(node, (ast.Tuple, ast.List, ast.Set)) and any(names_engine(e) for e in node.elts)

    found = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Compare) and any(names_engine(n) for n in [node.left, *node.comparators]):
            found.append((node.lineno, "comparison with an engine's name"))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("endswith", "startswith", "removesuffix")
              and any(isinstance(a, ast.Constant) and isinstance(a.value, str)
                      and any(s in a.value for s in strings if s != "eager") for a in node.args)):
            found.append((node.lineno, f".{node.func.attr}(engine name)"))
        elif ((isinstance(node, ast.Name) and node.id == "ENGINE_SUFFIX")
              or (isinstance(node, ast.Attribute) and node.attr == "ENGINE_SUFFIX")
              or (isinstance(node, ast.alias) and node.name == "ENGINE_SUFFIX")):
            found.append((node.lineno, "ENGINE_SUFFIX"))
    return sorted(set(found))


def test_no_page_or_analysis_compares_engine_strings():
    """Issue #31: the engine table is the only place an engine is told apart by its name; everything else loops over
    ``analysis.timing.engines.ENGINES`` or asks a record (``is_reference``, ``one_batch``, ``tag``)."""
    strings = _engine_strings()
    offenders = {path: hits for path, source in _sources("analysis", "pages", app=True).items() if path != ENGINE_TABLE
                 for hits in [engine_string_comparisons(source, strings, path)] if hits}
    assert not offenders, f"engine names compared outside {ENGINE_TABLE}: {offenders}"


def test_engine_guard_sees_a_violation():
    strings = _engine_strings()
    assert {"eager", "compile", "onnxruntime"} <= strings
    for bad in ['if args.engine == "onnxruntime":\n    pass', 'x = r.engine != "torch.compile"',
                'if key in ("eager", "compile"):\n    pass', 'rows = [r for r in rows if r.model.endswith(" [onnxruntime]")]',
                'from analysis.timing.onnx_engine import ENGINE_SUFFIX']:
        assert engine_string_comparisons(bad, strings), bad
    for fine in ['Breakdown(engine="onnxruntime")', 'def f(engine: str = "eager"):\n    pass',
                 'pattern = re.compile("x")', 'if e.is_reference:\n    pass']:
        assert not engine_string_comparisons(fine, strings), fine
