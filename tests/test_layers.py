"""The layering rule (docs/architecture.md): every import, function-local ones included, points down.

Floors, bottom up: ``rcnn/`` (the ground) -> ``features/`` (the backbone and region features) -> ``proposals/``
(selective search; MultiBox is a GoogLeNet trunk) -> ``eval/`` (the evaluators) -> ``svm/`` (which scores its
choice of C with them). The top may import any floor: the entry point, the stage table, the detector API and
stage=detect in ``rcnn/``, and the tools that time or compare whole chains.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLOORS = ["rcnn", "features", "proposals", "eval", "svm"]
TOP = {
    "rcnn/run.py", "rcnn/stages.py", "rcnn/detector.py", "rcnn/detect.py",  # the entry, the stage table, the API
    "features/benchmark.py", "features/finetune_benchmark.py", "features/pretrain_benchmark.py", "features/gpu_benchmark.py",  # tools
    "proposals/benchmark.py", "eval/benchmark.py", "eval/chain.py", "eval/peer.py",
}  # fmt: skip


def imports(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, module) for every import in ``path``, relative ones made absolute."""
    package = path.relative_to(root).parent.parts
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                found.append((node.lineno, ".".join([*base, node.module] if node.module else base)))
            else:
                found.append((node.lineno, node.module))
    return found


# Top modules by name: none of the floors may import them, except the stage table, which a stage asks
# (lazily) for the stages it needs: the one call that goes up, by design.
TOP_MODULES = {p.removesuffix(".py").replace("/", ".") for p in TOP} - {"rcnn.stages"}


def violations(root: Path = ROOT) -> list[str]:
    bad = []
    for floor in FLOORS:
        for path in sorted((root / floor).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if rel in TOP:
                continue
            for line, module in imports(path, root):
                target = module.split(".")[0]
                if target in FLOORS and FLOORS.index(target) > FLOORS.index(floor):
                    bad.append(f"{rel}:{line} imports {module} ({target}/ is above {floor}/)")
                elif any(module == m or module.startswith(m + ".") for m in TOP_MODULES):
                    bad.append(f"{rel}:{line} imports {module} (the top)")
    return bad


def test_every_import_points_down():
    assert violations() == []


def test_the_rule_catches_an_upward_import(tmp_path):
    for floor in FLOORS:
        (tmp_path / floor).mkdir()
    (tmp_path / "rcnn" / "boxes.py").write_text("def f():\n    from svm.train import mine\n")
    (tmp_path / "svm" / "train.py").write_text(
        "from rcnn import boxes\nfrom . import box_regression\nfrom rcnn.detector import FORMAT\n"
    )
    (tmp_path / "features" / "stage.py").write_text("from proposals.stage import gt\n")
    assert violations(tmp_path) == [
        "rcnn/boxes.py:2 imports svm.train (svm/ is above rcnn/)",
        "features/stage.py:1 imports proposals.stage (proposals/ is above features/)",
        "svm/train.py:3 imports rcnn.detector (the top)",
    ]
