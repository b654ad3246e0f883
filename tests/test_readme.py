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


# --------------------------------------------------------------------------- "Reproduce the paper"


def _section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


def _number(text: str) -> float:
    return float(text.replace(" ", "").replace(",", ""))


def test_reproduce_the_paper_commands_form_one_pipeline_per_data_set():
    """The section's commands parse, build valid configs, and chain: ImageNet MAE weights -> ABMG + MRUS
    pre-training -> fine-tuning from that run's checkpoint -> evaluation of the fine-tuned best checkpoint,
    once for RAF-DB and once for AffectNet."""
    from amgsn.engine.finetune import FinetuneConfig
    from amgsn.engine.pretrain import PretrainConfig

    section = _section("Reproduce the paper")
    for figure in ("89.34 %", "62.83 %", "0.0746", "0.0484"):
        assert figure in section, figure
    parser = _build_parser()
    runs: dict[str, dict] = {}
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip()
            if not line.startswith("amgsn "):
                continue
            args = parser.parse_args(shlex.split(line)[1:])
            fields = vars(args)
            if args.command == "pretrain":
                cfg = PretrainConfig(**{k: v for k, v in fields.items() if k in PretrainConfig.__dataclass_fields__})
                cfg.validate()
                assert cfg.init == "timm:vit_base_patch16_224.mae" and cfg.mask_mode == "abmg_mrus"
                assert (cfg.img_size, cfg.patch_size) == (224, 16)
                runs[cfg.dataset] = {"pretrain": cfg}
            elif args.command == "finetune":
                values = {k: v for k, v in fields.items() if k in FinetuneConfig.__dataclass_fields__}
                cfg = FinetuneConfig(**values)
                cfg.validate()
                assert cfg.init == f"{runs[cfg.dataset]['pretrain'].out}/checkpoint-last.pth"
                assert cfg.lambda_center > 0 and cfg.lambda_supcon > 0
                runs[cfg.dataset]["finetune"] = cfg
            else:
                assert args.command == "evaluate"
                ft = runs[args.dataset]["finetune"]
                assert args.checkpoint == f"{ft.out}/checkpoint-best.pth" and args.num_classes == ft.num_classes
                runs[args.dataset]["evaluate"] = args
    assert sorted(runs) == ["affectnet", "rafdb"]
    assert all(set(r) == {"pretrain", "finetune", "evaluate"} for r in runs.values())
    assert runs["rafdb"]["evaluate"].split == "test" and runs["affectnet"]["evaluate"].num_classes == 7


def test_reproduce_the_paper_wall_times_follow_the_measured_throughput():
    """The quoted images/s is bench-step's fused ViT-B/16 number in benchmarks/RESULTS.md, and every
    per-epoch estimate in the table is (images / rate) within rounding."""
    section = _section("Reproduce the paper")
    results = (README.parent / "benchmarks" / "RESULTS.md").read_text()
    quoted = _number(re.search(r"\*\*([\d ]+) images/s\*\* for the fused", section).group(1))
    measured = re.search(r"\| fused \(abmg_mrus[^|]*\| [\d.]+ \| \*\*([\d ]+)\*\* \|", results)
    assert measured and _number(measured.group(1)) == quoted
    rows = re.findall(r"^\| (pre-training|fine-tuning) \(~?([\d ]+) (?:images|samples)/s\) \|(.*)$", section, re.M)
    assert [r[0] for r in rows] == ["pre-training", "fine-tuning"]
    assert _number(rows[0][1]) == quoted
    checked = 0
    for _, rate, cells in rows:
        for count, value, unit in re.findall(r"([\d ]+) (?:images|samples): ~(\d+) (s|min) / epoch", cells):
            seconds = _number(count) / _number(rate)
            stated = float(value) * (60 if unit == "min" else 1)
            assert abs(stated - seconds) <= 0.25 * seconds + 1, (count, rate, value, unit)
            checked += 1
    assert checked == 4
