"""The repository is self-contained: every repo path that a file cites exists, and nothing cites
a design brief kept outside the repository."""
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# A path into one of the repo's own folders, as prose or a comment cites it.
CITED_PATH = re.compile(
    r"(?<![\w./-])(?:docs|benchmarks|tests|spatialformer_kernels|spatialformer|csrc|\.ci)/[\w./-]*[\w-]\.(?:md|py|json|cpp|h|sh)\b"
)


def _tracked_text_files():
    try:
        listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    for name in listed.splitlines():
        path = ROOT / name
        if path.suffix in (".py", ".md", ".cpp", ".h", ".ini", ".cfg", ".toml", ".txt", "") and path.is_file():
            yield name, path.read_text(encoding="utf-8", errors="replace")


def test_every_cited_repo_path_exists():
    missing = []
    for name, text in _tracked_text_files():
        for match in CITED_PATH.finditer(text):
            cited = match.group(0)
            # paths relative to the citing file's folder count too (e.g. csrc/ inside the package)
            if not (ROOT / cited).exists() and not (ROOT / name).parent.joinpath(cited).exists():
                missing.append(f"{name}: {cited}")
    assert not missing, "\n".join(missing)


def test_no_file_cites_a_brief_outside_the_repo():
    offending = [
        f"{name}:{number}: {line.strip()}"
        for name, text in _tracked_text_files()
        for number, line in enumerate(text.splitlines(), 1)
        if re.search(r"(?<!docs/)\bDESIGN\.md|\.\./shared\b|\bSTYLE\.md", line)
    ]
    assert not offending, "\n".join(offending)
    assert (ROOT / "docs" / "design.md").is_file()
