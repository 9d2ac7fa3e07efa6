"""The package's layering (docs/architecture.md), checked on the source rather than trusted.

- import-linter's contracts of pyproject.toml hold: the inference core (imaging, inference,
  outputs) imports no S3, jobs, router, API or cluster code, and the subpackages form layers
  without cycles.
- A function-level import is the exception, kept only for a heavy dependency that most callers
  never need, and says so with a ``# lazy: <reason>`` comment, so the import graph stays visible
  at the top of each module.
"""

from __future__ import annotations

import ast
import io
import os
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVE = ROOT / "serve"


def test_import_linter_contracts_are_kept():
    """``lint-imports`` with pyproject.toml's contracts, as CI runs it through ``make test``."""
    # --no-cache: a test writes nothing into the checkout; UTF-8 whatever the locale (the report draws boxes)
    proc = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                           "sys.argv = ['lint-imports', '--no-cache']; lint_imports_command()"],
                          cwd=ROOT, capture_output=True, encoding="utf-8", errors="replace", timeout=300,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def _lazy_comment_lines(source: str) -> dict[int, str]:
    """{line number: reason} of every ``# lazy: reason`` comment."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and tok.string.startswith("# lazy:"):
            out[tok.start[0]] = tok.string.removeprefix("# lazy:").strip()
    return out


def unmarked_function_imports(path: Path, root: Path = ROOT) -> list[str]:
    """The function-level imports of ``path`` that no ``# lazy: <reason>`` comment covers.

    A comment covers an import on its own lines, or on a line above it with only imports and
    comments of the same block in between (one comment for a run of imports).

    Args:
        path: A Python source file.
        root: What the paths in the answer are relative to.

    Returns:
        ``"path:line: statement"`` for each unmarked import.
    """
    source = path.read_text()
    lines = source.splitlines()
    marks = _lazy_comment_lines(source)
    tree = ast.parse(source)
    import_lines: set[int] = set()
    found: list[ast.stmt] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                import_lines.update(range(child.lineno, child.end_lineno + 1))
                if in_function:
                    found.append(child)
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    bad = []
    for node in found:
        covered = any(marks.get(n) for n in range(node.lineno, node.end_lineno + 1))
        n = node.lineno - 1
        while not covered and n >= 1:
            text = lines[n - 1].strip()
            if marks.get(n):
                covered = True
            elif not (n in import_lines or text.startswith("#")):
                break
            n -= 1
        if not covered:
            bad.append(f"{path.relative_to(root)}:{node.lineno}: {ast.unparse(node)}")
    return bad


def test_function_level_imports_are_only_the_marked_lazy_ones():
    bad = [b for path in sorted(SERVE.rglob("*.py")) for b in unmarked_function_imports(path)]
    assert not bad, ("imports inside functions hide the layering: move them to the top of the module, or, for a "
                     "heavy dependency most callers never need, mark them '# lazy: <reason>':\n" + "\n".join(bad))


@pytest.mark.parametrize("body, bad", [
    ("def f():\n    import json\n", True),
    ("def f():\n    import torch  # lazy: heavy\n", False),
    ("def f():\n    # lazy: heavy\n    import torch\n    from torch import nn\n\n    return nn\n", False),
    ("def f():\n    # lazy: heavy\n    import torch\n    x = 1\n    import json\n", True),
    ("def f():\n    # lazy:\n    import torch\n", True),
    ("import json\n\n\ndef f():\n    return json\n", False),
])
def test_the_lazy_import_check_tells_marked_from_unmarked(tmp_path, body, bad):
    f = tmp_path / "m.py"
    f.write_text(body)
    assert bool(unmarked_function_imports(f, tmp_path)) is bad



#: the most lines a module of serve/ may hold: one concept per module (docs/architecture.md); aim for ~400
MAX_MODULE_LINES = 450


def test_no_module_is_over_the_line_cap():
    """A module that grows past the cap mixes concerns: split it by concern, as serve/router/ and serve/api/ are."""
    long = {str(p.relative_to(ROOT)): n for p in sorted(SERVE.rglob("*.py"))
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines, split them by concern: {long}"
