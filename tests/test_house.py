"""The house rules of losia_cli: no import cycles, no import up a floor (docs/architecture.md, section 1),
no function over 100 lines, a torch-free `--help`, `--debug` after the sub-command, user mistakes as
one-line `LosiaError`s from losia_cli/errors.py, optional packages through extras.require, and every
citation of docs/ naming a heading."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import losia_cli
import losia_cli.errors as losia_errors
from losia_cli.errors import LosiaError

PACKAGE = Path(losia_cli.__file__).parent
MAX_FUNCTION_LINES = 100


def _modules() -> dict[str, ast.Module]:
    """Module name -> parsed source, for every module of losia_cli."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = ast.parse(path.read_text(), str(path))
    return modules


def import_graph(modules: dict[str, ast.Module]) -> dict[str, set[str]]:
    """Module -> the losia_cli modules it imports, at module level or inside functions alike."""
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, tree in modules.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(name, node.level, node.module)
                # `from pkg import sub` imports the submodule sub; `from mod import name` the module.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def _absolute(importer: str, level: int, module: str | None) -> str:
    """The absolute name of `from <level dots><module> import ...` written in module `importer`."""
    if not level:
        return module
    is_package = (PACKAGE.parent / importer.replace(".", "/") / "__init__.py").is_file()
    parts = importer.split(".")[: None if is_package else -1]
    parts = parts[: len(parts) - level + 1]
    return ".".join([*parts, module] if module else parts)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_no_import_cycle():
    cycle = find_cycle(import_graph(_modules()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_sees_function_level_imports():
    modules = {
        "losia_cli.a": ast.parse("import losia_cli.b\n"),
        "losia_cli.b": ast.parse("def f():\n    from losia_cli.a import g\n"),
    }
    assert find_cycle(import_graph(modules)) == ["losia_cli.a", "losia_cli.b", "losia_cli.a"]


def test_no_function_over_100_lines():
    long = [
        f"{name}.{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for name, tree in _modules().items()
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, "functions over 100 lines: " + ", ".join(long)


def _imports_torch(*argv: str) -> bool:
    code = ("import sys; from losia_cli.cli import main\n"
            "try:\n    main(list(sys.argv[1:]))\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True)
    return done.stdout.strip().splitlines()[-1] == "True"


def test_help_and_recipes_ls_do_not_import_torch():
    assert not _imports_torch("--help")
    assert not _imports_torch("train", "--help")
    assert not _imports_torch("recipes", "ls")


def test_debug_is_accepted_after_the_command(capsys):
    from losia_cli.cli import main
    from losia_cli.errors import UsageError

    assert main(["recipes", "cat", "no_such_recipe"]) == 2  # one line on stderr
    assert capsys.readouterr().err.startswith("error: unknown recipe 'no_such_recipe'")
    for argv in (["--debug", "recipes", "cat", "no_such_recipe"], ["recipes", "cat", "no_such_recipe", "--debug"]):
        with pytest.raises(UsageError):  # --debug: the traceback, wherever the flag stands
            main(argv)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(config)


def _prepare(method):
    from losia_cli.methods.base import TrainContext, WarmupCosine

    return method.prepare(_tiny_llama(), TrainContext(schedule=WarmupCosine(5), total_steps=5))


def _losia_without_targets(tmp_path):
    from losia_cli.methods.losia import LosiaConfig, LosiaMethod

    _prepare(LosiaMethod(LosiaConfig(target_modules=["nope"])))


def _galore_without_targets(tmp_path):
    pytest.importorskip("galore_torch")
    from losia_cli.methods.galore import GaloreConfig, GaloreMethod

    _prepare(GaloreMethod(GaloreConfig(rank=4, target_modules=["nope"])))


def _eval_with_nothing_to_do(tmp_path):
    from rich.console import Console

    from losia_cli.eval.command import run_eval
    from losia_cli.schema import EvalConfig

    run_eval(None, None, EvalConfig(forgetting=False), tmp_path, {}, Console())


def _losia_resumed_on_another_model(tmp_path):
    from losia_cli.methods.losia import LosiaConfig, LosiaMethod

    method = LosiaMethod(LosiaConfig())
    _prepare(method)
    method.load_state_dict({**method.state_dict(), "restarts": [0] * 7})  # saved by a 6-layer model


def _package_not_installed(tmp_path):
    from losia_cli.extras import require

    require("losia_no_such_package", "no-such-package", "feature x")


@pytest.mark.parametrize("mistake, message", [
    (_losia_without_targets, "no nn.Linear matched method.target_modules"),
    (_galore_without_targets, "no 2-D weight matches target_modules"),
    (_eval_with_nothing_to_do, "nothing to evaluate"),
    (_losia_resumed_on_another_model, "^run.resume: the checkpoint has 7 LoSiA slots, this model and method config 2$"),
    (_package_not_installed, "^feature x needs the losia_no_such_package package: pip install no-such-package$"),
])
def test_user_mistakes_are_losia_errors(mistake, message, tmp_path):
    """A LosiaError is what the CLI prints as one line; a plain ValueError would be a traceback."""
    with pytest.raises(LosiaError, match=message):
        mistake(tmp_path)


def test_one_key_value_grammar_for_eval_and_bench_options():
    from losia_cli.commands.bench import BenchOptions
    from losia_cli.compose import parse_options
    from losia_cli.errors import ConfigError, UsageError
    from losia_cli.schema import EvalConfig

    cfg = parse_options(["tasks=[gsm8k@bundled:gsm8k_sample,boolq]", "limit=2", "allow_code_exec=true"], EvalConfig)
    assert cfg.tasks == ["gsm8k@bundled:gsm8k_sample", "boolq"] and cfg.limit == 2 and cfg.allow_code_exec
    assert parse_options(["tasks=humaneval"], EvalConfig).tasks == ["humaneval"]  # one value: a list of one
    opts = parse_options(["methods=floor,lora", "rank_factor=null", "model=/tmp/x-y/micro"], BenchOptions)
    assert opts.methods == ["floor", "lora"] and opts.rank_factor is None and opts.model == "/tmp/x-y/micro"
    with pytest.raises(ConfigError, match="^limits: Extra inputs"):
        parse_options(["limits=2"], EvalConfig)
    with pytest.raises(UsageError, match="expected key=value, got 'limit'"):
        parse_options(["limit"], EvalConfig)


def test_compare_reads_methods_in_the_same_grammar(monkeypatch):
    import losia_cli.compare
    from losia_cli.cli import main

    calls = []
    monkeypatch.setattr(losia_cli.compare, "compare", lambda methods, overrides, *_, **__: calls.append((methods, overrides)))
    assert main(["compare", "methods=[losia_pro,lora]", "train.max_steps=2"]) == 0
    assert main(["compare", "methods=lora,full"]) == 0
    assert main(["compare"]) == 0
    assert calls == [(["losia_pro", "lora"], ["train.max_steps=2"]), (["lora", "full"], []),
                     (["losia_pro", "lora", "full"], [])]


# --- the floors, the docs and the one-place rules (docs/architecture.md, sections 1 and 6) -----------

REPO = PACKAGE.parent
DOCS = REPO / "docs"


def floors() -> dict[str, int]:
    """Room (a module or package name) -> floor, from the ```floors block of docs/architecture.md."""
    text = (DOCS / "architecture.md").read_text()
    block = re.search(r"^```floors\n(.*?)^```", text, re.M | re.S)
    assert block, "docs/architecture.md has no ```floors block"
    rooms = {}
    for line in block.group(1).splitlines():
        number, names = re.fullmatch(r"(\d+) +\w+: +(.+)", line.strip()).groups()
        rooms.update({name: int(number) for name in names.split()})
    return rooms


def floor_of(module: str, rooms: dict[str, int]) -> int | None:
    """The floor of the longest room that is `module` or a package holding it (the room `losia_cli` is
    the package's own __init__ only, or it would hold every module)."""
    parts = module.split(".")
    names = [".".join(parts[:i]) for i in range(len(parts), 1, -1)] or [module]
    return next((rooms[name] for name in names if name in rooms), None)


def upward_imports(graph: dict[str, set[str]], rooms: dict[str, int]) -> list[str]:
    return sorted(f"{a} (floor {floor_of(a, rooms)}) -> {b} (floor {floor_of(b, rooms)})"
                  for a, targets in graph.items() for b in targets if floor_of(b, rooms) > floor_of(a, rooms))


def test_every_module_is_on_a_floor():
    rooms = floors()
    homeless = [name for name in _modules() if floor_of(name, rooms) is None]
    assert not homeless, f"modules on no floor (docs/architecture.md, section 1): {homeless}"


def test_no_module_imports_a_higher_floor():
    upward = upward_imports(import_graph(_modules()), floors())
    assert not upward, "imports up a floor:\n" + "\n".join(upward)


def test_the_floor_check_sees_an_upward_import():
    rooms = {"losia_cli.engine": 3, "losia_cli.eval": 4}
    modules = {"losia_cli.engine.loop": ast.parse("def f():\n    from losia_cli.eval.command import run_eval\n"),
               "losia_cli.eval.command": ast.parse("")}
    assert upward_imports(import_graph(modules), rooms) == [
        "losia_cli.engine.loop (floor 3) -> losia_cli.eval.command (floor 4)"]


_CITATION = re.compile(r"docs/(method|architecture)\.md,?\s*\(?(?:sections?\s+)?"
                       r"(\d+(?:\.\d+)?(?:\s*(?:-|–|,|and)\s*\d+(?:\.\d+)?)*)")


def _cited_files() -> list[Path]:
    roots = [PACKAGE, REPO / "tests", REPO / "recipes", REPO / "benchmarks", REPO / "README.md"]
    return [p for root in roots for p in ([root] if root.is_file() else sorted(root.rglob("*")))
            if p.is_file() and p.suffix in (".py", ".md", ".yaml") and "results" not in p.parts]


def test_every_doc_citation_names_a_heading():
    headings = {
        doc: set(re.findall(r"^#{1,6} +(\d+(?:\.\d+)*)\.? ", (DOCS / f"{doc}.md").read_text(), re.M))
        for doc in ("method", "architecture")
    }
    cited, broken, stale = 0, [], []
    for path in _cited_files():
        text = path.read_text()
        where = path.relative_to(REPO)
        if path.name != "test_house.py":
            stale += [f"{where}: {m}" for m in re.findall(r"method doc|architecture page", text)]
        for doc, numbers in _CITATION.findall(text):
            for number in re.findall(r"\d+(?:\.\d+)?", numbers):
                cited += 1
                if number not in headings[doc]:
                    broken.append(f"{where}: docs/{doc}.md {number}")
    assert not stale, f"citations of docs outside the repository: {stale}"
    assert not broken, f"citations naming no heading: {broken}"
    assert cited > 30  # the code does cite them: a regex that finds nothing would pass vacuously


def _calls_named(tree: ast.Module, name: str) -> bool:
    return any(isinstance(node, ast.Call) and (getattr(node.func, "attr", None) == name or
                                               getattr(node.func, "id", None) == name)
               for node in ast.walk(tree))


def test_optional_packages_are_checked_through_require():
    checking = [name for name, tree in _modules().items()
                if name != "losia_cli.extras" and _calls_named(tree, "find_spec")]
    assert not checking, f"find_spec outside losia_cli/extras.py (use extras.require / installed): {checking}"


def test_error_classes_are_imported_from_errors():
    """One family, one module: no error class is imported through another module (config, data, merge)."""
    trees = {**_modules(), **{f"tests.{p.stem}": ast.parse(p.read_text()) for p in (REPO / "tests").glob("*.py")}}
    detours = [f"{name}: from {node.module} import {alias.name}"
               for name, tree in trees.items() for node in ast.walk(tree)
               if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("losia_cli")
               and node.module != "losia_cli.errors"
               for alias in node.names if alias.name.endswith("Error") and hasattr(losia_errors, alias.name)]
    assert not detours, f"error classes imported around losia_cli/errors.py: {detours}"


def test_a_sweep_job_prints_a_mistake_as_one_line(capsys):
    """The sweep job (commands/train.py) and cli.main share commands/common.error_line."""
    from losia_cli.commands.train import SweepJob
    from losia_cli.errors import ConfigError

    def fail(error):
        def run(cfg):
            raise error
        return run

    job = SweepJob("stamp", None, debug=False)
    job.run = fail(ConfigError("train.lr: must be > 0"))
    with pytest.raises(SystemExit) as exit_:
        job(None)
    assert exit_.value.code == 2 and capsys.readouterr().err == "error: train.lr: must be > 0\n"
    job.run = fail(RuntimeError("a bug"))  # not the user's: the traceback
    with pytest.raises(RuntimeError):
        job(None)
    job = SweepJob("stamp", None, debug=True)
    job.run = fail(ConfigError("train.lr: must be > 0"))
    with pytest.raises(ConfigError):  # --debug: the traceback
        job(None)

