"""Every command in README.md and docs/ runs as written: each `python -m rcnn.run ...` line parses into a valid
configuration (its keys, values and presets), each `python -m <module>` names a module that exists, and every
relative link points at a file of the repository. Placeholders (`...`, `<stage>`, `[key=value ...]`) are
skipped: they are templates, not commands."""

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from rcnn.config import load_config

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def commands(page: Path) -> list[str]:
    """The command lines of ``page``'s bash blocks (continuation lines joined, comments cut)."""
    out, fence, pending = [], False, ""
    for line in page.read_text().splitlines():
        if line.strip().startswith("```"):
            fence = line.strip() == "```bash" if not fence else False
            continue
        if not fence:
            continue
        line = pending + re.sub(r"\s+#\s.*$", "", line.strip())
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        out += [part.strip() for part in re.split(r"&&|;", line) if part.strip()]
    return out


def rcnn_runs() -> list[tuple[str, list[str]]]:
    found = []
    for page in PAGES:
        for cmd in commands(page):
            m = re.search(r"(?:python|torchrun.*?) -m rcnn\.run(.*)$", cmd)
            if not m or "..." in cmd or "<" in cmd or "[key=value" in cmd or "$" in cmd:
                continue
            args = [a for a in shlex.split(m.group(1)) if a not in ("&",)]
            found.append((f"{page.name}: {cmd}", args))
    return found


RUNS = rcnn_runs()


def test_the_docs_have_commands_to_check():
    assert len(RUNS) >= 20  # the extraction itself works (a broken parser would silently check nothing)


@pytest.mark.parametrize("where,args", RUNS, ids=[w[:90] for w, _ in RUNS])
def test_every_rcnn_run_command_parses(where, args):
    if "--help" in args:
        return  # --help takes anything after it
    load_config(args)  # a bad key, value or preset raises ConfigError naming it


def test_the_fast_commands_run(capsys):
    """The commands that take seconds run as written: every `--help` form and the shipped backbone's check."""
    from rcnn.run import main

    helps = [args for _, args in RUNS if "--help" in args]
    assert helps
    for args in helps:
        assert main(args) == 0
        assert capsys.readouterr().out.startswith("usage: python -m rcnn.run")
    from features import shipped
    from features.backbone import SHIPPED_PATH

    if SHIPPED_PATH.is_file():
        assert shipped.main(["--check"]) == 0


def test_every_module_named_exists():
    missing = []
    for page in PAGES:
        for cmd in commands(page):
            for module in re.findall(r"-m ([a-z_][\w.]*)", cmd):
                if module.split(".")[0] in ("pip", "pytest", "venv"):
                    continue
                if importlib.util.find_spec(module) is None:
                    missing.append(f"{page.name}: {module}")
    assert missing == []


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert broken == []
