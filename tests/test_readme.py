"""The README's command-line walk-through works when followed in order, as printed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def command_line_example() -> list[str]:
    text = README.read_text()
    section = text[text.index("## Command line") :]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block is not None, "the section opens with a sh block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_the_command_line_example_runs_in_order(tmp_path: Path) -> None:
    lines = [
        line for line in command_line_example() if line.split("#")[0].strip() != "tracker demo"
    ]
    assert len(lines) > 10
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKER_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    script = "set -euo pipefail\n" + "\n".join(lines) + "\n"
    done = subprocess.run(
        ["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "verify: 0 differences" in done.stdout
    assert (tmp_path / ".tracker" / "log").is_dir() and (tmp_path / "copy" / "log").is_dir()
