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


# --------------------------------------------------------------------------- "Drop into MAE / timm"


def _drop_in_snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", _section("Drop into MAE / timm"), flags=re.S)


def test_drop_in_snippets_are_short():
    snippets = _drop_in_snippets()
    assert len(snippets) == 3
    assert len(snippets[0].splitlines()) <= 15  # the replacement of random_masking in models_mae.py


def test_drop_in_mae_snippet(seed):
    """The README's replacement of MAE's random_masking, patched into an MAE built from timm blocks
    (tests/mae_model.py, MAE's algorithm written out): the random one gives MAE's loss and gradients for
    the same noise; the attention-guided one trains — the loss falls, gradients reach patch_embed and
    mask_token — and removes what the last block's CLS attends to most."""
    import torch
    from mae_model import TinyMAE, mae_random_masking, twin

    from amgsn import ops
    from amgsn.models import cls_query_keys

    space = {"torch": torch}  # models_mae.py imports torch
    exec(compile(_drop_in_snippets()[0], str(README), "exec"), space)
    torch.manual_seed(seed)
    mae = TinyMAE()
    imgs = torch.randn(4, 3, 32, 32)
    losses = []
    for method in (space["random_masking"], lambda self, x, r: mae_random_masking(x, r)):
        torch.manual_seed(seed + 1)
        loss = twin(mae, random_masking=method)(imgs, 0.75)[0]
        losses.append((loss, torch.autograd.grad(loss, list(mae.parameters()))))
    assert torch.equal(losses[0][0], losses[1][0])
    assert all(torch.equal(a, b) for a, b in zip(losses[0][1], losses[1][1]))

    model = twin(mae, random_masking=space["attention_masking"])
    opt = torch.optim.AdamW(mae.parameters(), lr=3e-3)
    first = None
    for _ in range(8):
        loss, _, mask = model(imgs, 0.75)
        opt.zero_grad()
        loss.backward()
        assert mae.patch_embed.proj.weight.grad.abs().sum() > 0 and mae.mask_token.grad.abs().sum() > 0
        opt.step()
        first = loss.item() if first is None else first
    assert loss.item() < first and mask.sum(1).tolist() == [12.0] * 4
    # the removed patches are the op's own selection of the last block's CLS attention on the whole image
    with torch.no_grad():
        x = mae.patch_embed(imgs) + mae.pos_embed[:, 1:]
        t = torch.cat([(mae.cls_token + mae.pos_embed[:, :1]).expand(4, -1, -1), x], 1)
        for blk in mae.blocks[:-1]:
            t = blk(t)
        scores = ops.cls_attention_scores(*cls_query_keys(mae.blocks[-1], t))
        _, mask, _ = model.forward_encoder(imgs, 0.75)
    assert torch.equal(mask.bool(), ops.abmg_select(scores, 0.75).mask)


def test_drop_in_timm_vit_snippet():
    import torch

    from amgsn import ops

    space: dict = {}
    exec(compile(_drop_in_snippets()[1], str(README), "exec"), space)
    x_masked, mask, ids_restore = space["x_masked"], space["mask"], space["ids_restore"]
    assert x_masked.shape == (4, 4, 192) and mask.sum(1).tolist() == [12.0] * 4
    sel = ops.abmg_select(ops.cls_attention_scores(space["q_cls"], space["k"]), 0.75)
    assert torch.equal(mask.bool(), sel.mask)
    patches = space["patches"]
    assert torch.equal(x_masked, ops.gather_visible(patches, *sel).view(4, 4, 192))
    index = ids_restore[..., None].expand(-1, -1, 192)
    restored = torch.gather(torch.cat([x_masked, torch.zeros(4, 12, 192)], 1), 1, index)
    assert torch.equal(restored[~sel.mask], patches[~sel.mask])


def test_drop_in_per_image_ratio_snippet():
    import torch

    from amgsn.ops import reference

    space: dict = {}
    exec(compile(_drop_in_snippets()[2], str(README), "exec"), space)
    sel, out, packed, full = space["sel"], space["out"], space["packed"], space["full"]
    torch.testing.assert_close(out, packed, atol=1e-5, rtol=1e-5)
    assert torch.equal(full, reference.scatter_visible(out, sel.ids_keep, sel.cu_seqlens, torch.zeros(192), 196))
    counts = (~sel.mask).sum(1)
    assert counts.tolist() == reference.num_keep_from_ratio(space["ratios"], 8, 196).tolist()
