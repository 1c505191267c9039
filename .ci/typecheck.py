"""Run mypy on the streamvqa packages as they install.

``[tool.setuptools] package-dir`` in pyproject.toml installs the root folders as sub-packages
of one namespace (``streamvqa.operators`` is ``operators/``, ...), and the editable install
reaches them through an import hook that mypy cannot follow. So this script first links that
layout as plain folders under ``build/mypy-layout`` (``[tool.mypy] mypy_path`` points there):

    build/mypy-layout/streamvqa/             a folder: one link per entry of streamvqa/
    build/mypy-layout/streamvqa/operators -> operators/   (and pipelines, schemas, infra)

then runs mypy (``[tool.mypy]`` names the packages; arguments pass through, and a path under
a mapped folder is given as its place in the layout), and prints mypy's report with the
layout's paths written back as the repository's (``operators/io/records.py:12: error: ...``).

The layout is checked on every run against package-dir and the folders' entries (and linked
again when they changed), so new modules and new mappings need nothing here. Usage: ``.venv/bin/python .ci/typecheck.py [mypy arguments]`` (``make lint``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYOUT = Path("build") / "mypy-layout"


def package_dirs(root: Path) -> dict[str, Path]:
    """package name -> its folder (relative to root), from [tool.setuptools] package-dir."""
    with open(root / "pyproject.toml", "rb") as f:
        mapping = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    return {name: Path(folder) for name, folder in mapping.items()}


def build_layout(root: Path, layout: Path, mapping: dict[str, Path]) -> dict[Path, Path]:
    """Link the layout; returns layout path -> repository path, one per mapped package."""
    links: dict[Path, Path] = {}  # layout path of each package -> its folder
    wanted: dict[Path, Path] = {}  # each symlink of the layout -> what it points at
    # A package with a mapped sub-package becomes a real folder of links to its own entries,
    # the sub-package's link beside them; any other package is one link to its folder.
    for name in sorted(mapping):
        place, folder = layout.joinpath(*name.split(".")), mapping[name]
        links[place] = folder
        children = {other[len(name) + 1 :].split(".")[0] for other in mapping if other.startswith(name + ".")}
        if not children:
            wanted[place] = folder
            continue
        for entry in sorted((root / folder).iterdir()):
            if entry.name != "__pycache__" and entry.name not in children:
                wanted[place / entry.name] = folder / entry.name
    target = root / layout
    if target.is_dir() and _links_under(target, root) == wanted:
        return links  # as it was: leave it (another run may be reading it)
    if target.exists():
        shutil.rmtree(target)
    for link, source in wanted.items():
        (root / link).parent.mkdir(parents=True, exist_ok=True)
        (root / link).symlink_to(os.path.relpath(root / source, (root / link).parent))
    return links


def _links_under(folder: Path, root: Path) -> dict[Path, Path]:
    """The symlinks under ``folder`` (not followed) -> their targets, relative to root."""
    found: dict[Path, Path] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if path.is_symlink():
                target = Path(os.path.normpath(path.parent / os.readlink(path)))
                found[path.relative_to(root)] = target.relative_to(root)
    return found


def to_layout(arg: str, links: dict[Path, Path]) -> str:
    """A path argument under a mapped folder -> the same file in the layout (relative to the
    repository root, where mypy runs); another path -> absolute."""
    if arg.startswith("-") or not os.path.exists(arg):
        return arg
    path = Path(arg).resolve()
    rel = Path(os.path.relpath(path, ROOT))
    for place, folder in sorted(links.items(), key=lambda kv: -len(kv[1].parts)):
        if rel == folder or folder in rel.parents:
            return str(place / rel.relative_to(folder))
    return str(path)


def from_layout(line: str, links: dict[Path, Path]) -> str:
    """mypy's report line with a layout path written back as the repository path."""
    for place, folder in sorted(links.items(), key=lambda kv: -len(kv[0].parts)):
        prefix = f"{place}/"
        if line.startswith(prefix):
            return f"{folder}/{line[len(prefix) :]}"
    return line


def main(argv: list[str]) -> int:
    links = build_layout(ROOT, LAYOUT, package_dirs(ROOT))
    args = [to_layout(a, links) for a in argv]
    os.chdir(ROOT)  # mypy_path, the cache and the report's paths are relative to it
    cmd = [sys.executable, "-m", "mypy", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(from_layout(line, links))
        sys.stdout.flush()
    return proc.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
