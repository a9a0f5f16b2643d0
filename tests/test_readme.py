"""The README's Python snippets run as written, in order, in one namespace. A snippet fenced
as ```python gpu (GitHub highlights it as Python) needs a CUDA GPU: it runs where there is one."""
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_snippets_run():
    blocks = re.findall(r"```python( gpu)?\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 4 and any(gpu for gpu, _ in blocks)
    namespace: dict = {}
    for gpu, block in blocks:
        if gpu and not torch.cuda.is_available():
            continue
        exec(compile(block, str(README), "exec"), namespace)
    assert namespace["logits"].shape == (1, 1000)
    assert namespace["queries"].shape == (2, 100, 320)
