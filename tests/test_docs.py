"""Self-contained references: every file a document, a config or a docstring points at exists in the repository
(the paper is cited by its arXiv id, its theory by docs/theory.md)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEXT = ("*.md", "*.py", "*.yaml", "*.sh", "*.toml")
# A path with a directory or a markdown file name, as written in prose: docs/theory.md, klrl/cli/train.py, README.md
REFERENCE = re.compile(r"(?<![\w/.-])((?:docs|klrl|conf|sweeps|tests|benchmarks|hydra_plugins)/[\w/.-]+\.(?:md|py|yaml|sh)"
                       r"|[\w-]+\.md)(?![\w/])")
# NAME.yaml (a placeholder) and summary.md (a file a command writes) name no file of the repository
PLACEHOLDER = re.compile(r"(^|/)([A-Z]+\.\w+|summary\.md)$")


def files():
    for pattern in TEXT:
        for path in ROOT.rglob(pattern):
            parts = path.relative_to(ROOT).parts
            if parts[0] in (".venv", ".git", "outputs", "build") or ".egg-info" in str(path):
                continue
            yield path


def test_every_referenced_file_exists():
    dangling = []
    for path in files():
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for ref in REFERENCE.findall(line):
                target = ref.rstrip(".")
                if "<" in target or "*" in target or not target.strip("./") or PLACEHOLDER.search(target):
                    continue
                if not ((ROOT / target).exists() or (path.parent / target).exists()):
                    dangling.append(f"{path.relative_to(ROOT)}:{n}: {target}")
    assert not dangling, "\n".join(dangling)


def test_no_reference_to_notes_outside_the_repository():
    outside = [f"{p.relative_to(ROOT)}:{n}" for p in files()
               for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
               if re.search(r"shared/notes|paper\.md|anchors\.md", line) and p.name != "test_docs.py"]
    assert not outside, "\n".join(outside)
