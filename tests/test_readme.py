"""The README's worked example of adding a pass is real code: it runs."""
from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_architecture_example_runs():
    text = README.read_text()
    section = text[text.index("### Extending memsched"):]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(block, "README.md (Extending memsched)", "exec"), {"__name__": "readme_example"})
