"""The README's Python example runs as written, and its shell commands exist in the CLI."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from amgsn.cli import _build_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def test_python_example_runs():
    blocks = _blocks("python")
    assert blocks, "README has no python example"
    for code in blocks:
        exec(compile(code, str(README), "exec"), {})


def _amgsn_commands() -> list[list[str]]:
    commands = []
    for block in _blocks("bash"):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split("#", 1)[0].strip()
            if " -m amgsn " in f" {line} ":
                line = "amgsn " + line.split(" -m amgsn ", 1)[1]
            if line.startswith("amgsn "):
                commands.append(shlex.split(line)[1:])
    return commands


@pytest.mark.parametrize("argv", _amgsn_commands(), ids=lambda a: a[0])
def test_readme_commands_parse(argv):
    # `...` stands for "the rest as above" in the torchrun lines: parse the sub-command alone then
    parser = _build_parser()
    if "..." in argv or any(a.startswith("$") for a in argv):
        argv = argv[:1] + ["--help"]
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(argv)
        assert exit_info.value.code == 0
        return
    args = parser.parse_args(argv)
    assert callable(args.func)
