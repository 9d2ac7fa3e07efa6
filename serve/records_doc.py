"""The JSON Schema blocks of docs/formats.md, generated from the record models of :mod:`serve.records_schema`.

``python -m serve.records_doc [docs/formats.md]`` regenerates them; tests/test_records_schema.py fails when
the page and the models differ.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from serve.records_schema import DOCUMENTED


def schemas() -> dict[str, dict[str, Any]]:
    """The JSON Schema of every documented record (what docs/formats.md shows).

    Returns:
        ``{model name: JSON Schema}``.
    """
    return {name: m.model_json_schema() for name, m in DOCUMENTED.items()}


#: a schema block of docs/formats.md: the marker naming the model, then its JSON Schema
DOC_BLOCK = re.compile(r"(<!-- schema: (\w+) [^>]*-->\n```json\n)(.*?)(\n```)", re.S)


def render_doc(text: str) -> str:
    """``text`` (docs/formats.md) with every schema block replaced by its model's schema, as generated now.

    Args:
        text: the page.

    Returns:
        The page with its blocks regenerated (the rest unchanged).
    """
    current = schemas()
    return DOC_BLOCK.sub(lambda m: m.group(1) + json.dumps(current[m.group(2)], indent=2) + m.group(4), text)


if __name__ == "__main__":  # python -m serve.records_doc [docs/formats.md]: regenerate the page's schema blocks
    page = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/formats.md")
    page.write_text(render_doc(page.read_text(encoding="utf-8")), encoding="utf-8")
    print(f"regenerated the schema blocks of {page}")
