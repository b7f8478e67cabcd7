"""The README tells a CPU-only user why the install is large and how to get the CPU-only wheels (#25, point 7)."""

from __future__ import annotations

import re
from pathlib import Path

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
CPU_INDEX = "--index-url https://download.pytorch.org/whl/cpu"


def set_up_section() -> str:
    found = re.search(r"^## Set up\n(.*?)^## ", README, re.S | re.M)
    assert found, "README.md has no Set up section"
    return found.group(1)


def test_set_up_names_the_install_size_and_the_cpu_wheel_index_and_keeps_the_pinned_default() -> None:
    section = set_up_section()
    assert "5.6" in section and "GB" in section and "CUDA" in section
    commands = [line for line in section.splitlines() if CPU_INDEX in line]
    assert len(commands) == 1, "one command installs torch from the CPU index"
    assert "-c constraints.txt" in commands[0] and "torch torchvision" in commands[0]  # the pinned versions
    for tag in ("ci:install", "ci:test"):
        block = re.search(rf"<!-- {tag} -->\n```bash\n(.*?)```", README, re.S)
        assert block and "pip install -c constraints.txt -e " in block.group(1) and "index-url" not in block.group(1)
