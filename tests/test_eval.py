"""`vzedge eval`: budgets, the baseline reducers, LLaVA-format input and a self-consistent JSON."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from vzedge.cli import EXIT_BAD_INPUT, run
from vzedge.eval import (
    EvalConfig,
    llava_items,
    normalize,
    parse_tokens,
    pool_tokens,
    random_select,
    scaled_budget,
    visionzip_split,
)


def test_budgets_follow_the_paper_and_scale_to_the_grid():
    # LLaVA-1.5's grid: the paper's splits exactly.
    assert [(scaled_budget(t, 576, True), visionzip_split(scaled_budget(t, 576, True))) for t in (64, 128, 192)] == [
        (64, (54, 10)),
        (128, (108, 20)),
        (192, (162, 30)),
    ]
    # The trained tiny's 16 x 16 grid: the same fractions of the patches.
    assert [scaled_budget(t, 256, True) for t in (64, 128, 192, 576)] == [28, 57, 85, 256]
    assert [visionzip_split(k) for k in (28, 57, 85)] == [(24, 4), (48, 9), (72, 13)]
    assert scaled_budget(64, 256, False) == 64 and scaled_budget(999, 256, False) == 256


def test_pool_tokens_counts_and_plain_pooling():
    x = torch.randn(2, 256, 8)
    for k in (28, 57, 85, 64, 1):
        assert pool_tokens(x, 16, k).shape == (2, k, 8)
    # k = 8 x 8 on a 16 x 16 grid is 2 x 2 average pooling, raster order.
    expect = torch.nn.functional.avg_pool2d(x.reshape(2, 16, 16, 8).permute(0, 3, 1, 2), 2)
    expect = expect.permute(0, 2, 3, 1).reshape(2, 64, 8)
    torch.testing.assert_close(pool_tokens(x, 16, 64), expect, atol=1e-6, rtol=0)
    # Every output is an average: a constant map stays constant.
    const = torch.full((1, 256, 4), 3.5)
    torch.testing.assert_close(pool_tokens(const, 16, 57), torch.full((1, 57, 4), 3.5))


def test_random_select_keeps_cls_and_is_seeded():
    h = torch.arange(257, dtype=torch.float32).view(1, 257, 1).expand(3, 257, 2).contiguous()
    a = random_select(h, 28, True, torch.Generator().manual_seed(0))
    b = random_select(h, 28, True, torch.Generator().manual_seed(0))
    c = random_select(h, 28, True, torch.Generator().manual_seed(1))
    assert a.shape == (3, 28, 2) and torch.equal(a, b) and not torch.equal(a, c)
    pos = a[..., 0]
    assert (pos[:, 0] == 0).all()  # CLS first
    assert (pos[:, 1:].diff(dim=1) > 0).all()  # distinct patches, in sequence order
    no_cls = random_select(h[:, 1:], 28, False, torch.Generator().manual_seed(0))
    assert no_cls.shape == (3, 28, 2)


def test_normalize_and_token_parsing():
    assert normalize(" The Red. ") == "red" and normalize("a  Big circle!") == "big circle"
    assert parse_tokens("576, 64") == (576, 64)
    with pytest.raises(ValueError, match="comma-separated"):
        parse_tokens("64;32")
    with pytest.raises(ValueError, match="positive token counts"):
        EvalConfig(tokens=(0,))
    with pytest.raises(ValueError, match="methods="):
        EvalConfig(methods=("visionzip", "magic"))
    with pytest.raises(ValueError, match="pass --images DIR"):
        EvalConfig(data="x.json")


def _write(tmp_path, records) -> str:
    p = tmp_path / "d.json"
    p.write_text(json.dumps(records))
    return str(p)


@pytest.mark.parametrize(
    "records, message",
    [
        ({"id": 1}, "non-empty JSON list"),
        ([[1, 2]], "record 0 is a list"),
        ([{"id": "q1", "conversations": []}], "record 0 \\(id 'q1'\\) has no 'image'"),
        ([{"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nQ"}]}], "at least a human"),
        (
            [{"image": "a.png", "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]}],
            "from 'human' then 'gpt'",
        ),
        (
            [{"image": "a.png", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "x"}]}],
            "exactly one '<image>'",
        ),
        (
            [
                {
                    "image": "b.png",
                    "conversations": [{"from": "human", "value": "<image>Q"}, {"from": "gpt", "value": "x"}],
                }
            ],
            "does not exist",
        ),
    ],
)
def test_malformed_llava_records_are_named(tmp_path, records, message):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match=message):
        llava_items(_write(tmp_path, records), str(tmp_path))


def test_bad_json_and_missing_paths(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        llava_items(str(bad), str(tmp_path))
    with pytest.raises(ValueError, match="does not exist"):
        llava_items(str(tmp_path / "missing.json"), str(tmp_path))
    with pytest.raises(ValueError, match="is not a folder"):
        llava_items(str(bad), str(tmp_path / "nope"))


def test_cli_eval_json_is_consistent(tmp_path, capsys):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    argv = ["eval", "--model", "tiny", "--n", "12", "--tokens", "576,64", "--json", str(out), "--plot", str(png)]
    assert run(argv) == 0
    printed = capsys.readouterr().out
    assert "| visionzip 24+4 | 64 | 28 |" in printed and "chance (uniform)" in printed
    r = json.loads(out.read_text())
    assert r["questions"] == 12 and r["grid"] == 16 and r["stock_image_tokens"] == 256
    assert [(row["method"], row["tokens"]) for row in r["rows"]] == [
        ("full", 256),
        ("visionzip", 28),
        ("random", 28),
        ("pool", 28),
    ]
    assert r["projector_tuning"].startswith("untuned")
    full = r["rows"][0]["accuracy"]["overall"]
    for row in r["rows"]:
        acc = row["accuracy"]
        # Overall is the question-weighted mean of the kinds.
        weighted = sum(acc[k] * n for k, n in r["kinds"].items()) / r["questions"]
        assert acc["overall"] == pytest.approx(weighted, abs=1e-3)
        assert row["relative_to_full"] == pytest.approx(acc["overall"] / full, abs=1e-3)
    assert r["baselines"]["chance_uniform"]["overall"] == pytest.approx(
        sum(
            1 / {"colour": 6, "shape": 3, "size": 2, "count": 6, "left": 2, "word": 8}[k] * n
            for k, n in r["kinds"].items()
        )
        / 12
    )
    with Image.open(png) as im:
        assert im.format == "PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.png"]


def test_llava_format_data_gives_the_synth_numbers(tmp_path, capsys):
    """The same questions as a user's LLaVA-format file score exactly as --data synth (PNG is lossless)."""
    from vzedge import synth

    path = synth.export_llava(str(tmp_path / "d"), n=12)
    common = ["eval", "--n", "12", "--tokens", "576", "--methods", "visionzip"]
    assert run([*common, "--json", str(tmp_path / "a.json")]) == 0
    assert run([*common, "--data", path, "--images", str(tmp_path / "d"), "--json", str(tmp_path / "b.json")]) == 0
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert a["rows"][0]["accuracy"] == b["rows"][0]["accuracy"]
    assert b["kinds"] == a["kinds"] and b["baselines"] == {}


def test_cli_eval_bad_input_exits_2(tmp_path, capsys):
    assert run(["eval", "--tokens", "64,x"]) == EXIT_BAD_INPUT
    assert "comma-separated" in capsys.readouterr().err
    assert run(["eval", "--data", str(tmp_path / "none.json"), "--images", str(tmp_path)]) == EXIT_BAD_INPUT
    assert "does not exist" in capsys.readouterr().err
