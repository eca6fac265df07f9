"""The import graph of the top-level modules (imports inside functions included) runs one way."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAINING_SCRIPTS = {"train_pretrain", "train_sft", "train_lora", "train_dpo", "train_distill", "train_reward",
                    "train_grpo", "train_ppo"}
STAGES = {"trainers", "rl"}  # the loop and its stages: only they and the training scripts import the loop
ENTRY_POINTS = TRAINING_SCRIPTS | {"demo", "bench", "serve", "bench_serve", "export", "eval", "plot", "report"}


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the repository's top-level modules it imports, anywhere in its code."""
    modules = {path.stem: path for path in root.glob("*.py")}
    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
        graph[name] = imported & modules.keys() - {name}
    return graph


def test_the_graph_sees_every_kind_of_import(tmp_path):
    (tmp_path / "a.py").write_text("import os\nimport b\n\n\ndef f():\n    from c import x\n    import d.e\n")
    for name in "bcd":
        (tmp_path / f"{name}.py").write_text("from . import nothing\n")
    assert import_graph(tmp_path) == {"a": {"b", "c", "d"}, "b": set(), "c": set(), "d": set()}
    assert {"configs", "trainers"} <= import_graph()["train_sft"]


def test_no_cycles():
    graph, done, path = import_graph(), set(), []

    def visit(module):
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module):] + [module]))
        if module not in done:
            path.append(module)
            for imported in sorted(graph[module]):
                visit(imported)
            path.pop()
            done.add(module)

    for module in sorted(graph):
        visit(module)


def test_no_arrow_up_to_an_entry_point_or_to_the_trainers():
    graph = import_graph()
    for module, imported in graph.items():
        assert not imported & ENTRY_POINTS, f"{module} imports the entry point(s) {imported & ENTRY_POINTS}"
        if module not in TRAINING_SCRIPTS | STAGES:
            assert "trainers" not in imported, f"{module} imports trainers.py"
            assert "rl" not in imported, f"{module} imports rl.py"
