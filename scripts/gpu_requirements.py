"""The requirements of a GPU-only install: pyproject's dependencies without the in-process model
(`[tool.llm-gateway] in-process-model`). `pip install llm-gateway` serves the embedded default; a
GPU-only image installs the project with --no-deps and then these:

    python scripts/gpu_requirements.py > requirements-gpu.txt
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower()


def gpu_requirements(pyproject: Path = PYPROJECT) -> list[str]:
    data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    left_out = {n.lower() for n in data["tool"]["llm-gateway"]["in-process-model"]}
    return [r for r in data["project"]["dependencies"] if _name(r) not in left_out]


if __name__ == "__main__":
    sys.stdout.write("".join(f"{r}\n" for r in gpu_requirements()))
