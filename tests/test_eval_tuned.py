"""`vzedge eval --tuned`: a `visionzip+tuned` row with the tuned projector in place, originals restored.

One short tuning run of the shipped `tiny` (8 synthetic samples, 2 steps at lr 1e-2, VisionZip 24+4 = the
28-token split eval uses for budget 64 on tiny's 256 patches) backs every test. Only one test generates for
real (6 questions through the CLI); the others replace `answer` with a stub and check what was applied.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import vzedge.eval.run as ev
from vzedge.cli import EXIT_BAD_INPUT, run
from vzedge.eval import EvalConfig, evaluate
from vzedge.visionzip import VisionZipConfig

VZ = VisionZipConfig(dominant=24, contextual=4)  # visionzip_split(scaled_budget(64, 256, True))


@pytest.fixture(scope="module")
def tuned_dir(tmp_path_factory):
    from vzedge.tune import TuneConfig, make_data, tune

    root = tmp_path_factory.mktemp("eval_tuned")
    data = make_data(root / "data", n=8, split="train", seed=0, size=224)
    cfg = TuneConfig(
        model="tiny",
        data=data,
        images=root / "data",
        out=root / "tiny-28",
        visionzip=VZ,
        max_steps=2,
        lr=1e-2,
        batch=4,
        eval_samples=0,
    )
    return tune(cfg).out


@pytest.fixture(scope="module")
def weights(tuned_dir):
    """(original, tuned) projector state dicts of `tiny`, float32 as loaded."""
    from safetensors.torch import load_file

    from vzedge.models.loading import load_model

    original = {k: v.clone() for k, v in load_model("tiny").projector.state_dict().items()}
    tuned = load_file(str(tuned_dir / "projector.safetensors"))
    assert original.keys() == tuned.keys()
    # The run moved the weights, so "tuned" and "original" below are distinguishable.
    assert max((tuned[k] - original[k]).abs().max().item() for k in original) > 1e-4
    return original, tuned


def _same(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, state[k]) for k, v in module.state_dict().items())


class Spy:
    """Stands in for `vzedge.eval.answer`: per call (= per row) records which projector weights the
    projector's forward passes ran with and which VisionZip config was applied; `real` generates."""

    def __init__(self, weights, real: bool = True, fail_on_tuned: bool = False) -> None:
        self.original, self.tuned = weights
        self.real, self.fail_on_tuned = real, fail_on_tuned
        self.calls: list[dict] = []
        self.vlm = None

    def _kind(self, module: torch.nn.Module) -> str:
        return "tuned" if _same(module, self.tuned) else "original" if _same(module, self.original) else "other"

    def __call__(self, vlm, processor, items, k, batch_size, max_new_tokens):
        from vzedge.models.llava import visionzip_encoder

        self.vlm = vlm
        projector = vlm.model.multi_modal_projector
        encoder = visionzip_encoder(vlm)
        call = {"k": k, "forward": [], "visionzip": encoder.cfg if encoder is not None else None}
        self.calls.append(call)
        if self.fail_on_tuned and self._kind(projector) == "tuned":
            raise RuntimeError("boom in the tuned row")
        if not self.real:
            return [it.answer if i % 2 else "" for i, it in enumerate(items)]
        hook = projector.register_forward_hook(lambda m, args, out: call["forward"].append(self._kind(m)))
        try:
            return REAL_ANSWER(vlm, processor, items, k, batch_size, max_new_tokens)
        finally:
            hook.remove()


REAL_ANSWER = ev.answer


def test_cli_tuned_row_swaps_projector_and_restores(tuned_dir, weights, tmp_path, monkeypatch, capsys):
    spy = Spy(weights)
    monkeypatch.setattr(ev, "answer", spy)
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    argv = ["eval", "--model", "tiny", "--n", "6", "--tokens", "576,64", "--methods", "visionzip"]
    argv += ["--tuned", str(tuned_dir), "--json", str(out), "--plot", str(png)]
    assert run(argv) == 0
    printed = capsys.readouterr().out
    assert "| visionzip+tuned 24+4 (tiny-28) | 64 | 28 |" in printed and str(tuned_dir) in printed

    r = json.loads(out.read_text())
    rows = r["rows"]
    assert [(x["method"], x["budget"], x["tokens"], x["dominant"], x["contextual"]) for x in rows] == [
        ("full", 576, 256, None, None),
        ("visionzip", 64, 28, 24, 4),
        ("visionzip+tuned", 64, 28, 24, 4),
    ]
    pw = rows[2]["projector_weights"]
    assert pw["path"] == str(tuned_dir) and pw["visionzip"] == VZ.to_dict() and pw["steps"] == 2
    assert pw["sha256"] == json.loads((tuned_dir / "tune_config.json").read_text())["projector"]["sha256"]
    assert rows[0]["projector_weights"] is None and rows[1]["projector_weights"] is None
    assert r["projector_tuning"].startswith("visionzip+tuned rows use the tuned projector of " + str(tuned_dir))
    full = rows[0]["accuracy"]["overall"]
    assert full > 0  # tiny answers some of 6 questions right at full tokens (3 of 6 when written)
    for row in rows:
        assert row["relative_to_full"] == pytest.approx(row["accuracy"]["overall"] / full, abs=1e-3)
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    # The projector ran with the tuned weights (bit for bit) in the tuned row only, with 24+4 applied.
    assert [c["k"] for c in spy.calls] == [256, 28, 28]
    kinds = [set(c["forward"]) for c in spy.calls]
    assert kinds == [{"original"}, {"original"}, {"tuned"}], kinds
    assert spy.calls[2]["visionzip"] == VZ and spy.calls[1]["visionzip"] == VisionZipConfig(24, 4)
    # ... and the model's own weights are back afterwards, bit for bit, VisionZip removed.
    from vzedge.models.llava import is_applied

    assert _same(spy.vlm.model.multi_modal_projector, weights[0]) and not is_applied(spy.vlm)


def test_weights_restored_when_the_tuned_row_fails(tuned_dir, weights, monkeypatch):
    from vzedge.models.llava import is_applied

    spy = Spy(weights, real=False, fail_on_tuned=True)
    monkeypatch.setattr(ev, "answer", spy)
    cfg = EvalConfig(model="tiny", n=6, tokens=(576, 64), methods=("visionzip",), tuned=(str(tuned_dir),))
    with pytest.raises(RuntimeError, match="boom in the tuned row"):
        evaluate(cfg)
    assert len(spy.calls) == 3  # it failed in the tuned row, with the tuned weights in place
    assert _same(spy.vlm.model.multi_modal_projector, weights[0]) and not is_applied(spy.vlm)


def test_folder_split_is_used_when_it_differs(tuned_dir, weights, tmp_path, monkeypatch):
    # Same 28 tokens as eval's 24+4 at budget 64, other split: the row runs (and records) the folder's 20+8.
    folder = tmp_path / "tiny-20-8"
    shutil.copytree(tuned_dir, folder)
    config = json.loads((folder / "tune_config.json").read_text())
    config["visionzip"].update(dominant=20, contextual=8)
    (folder / "tune_config.json").write_text(json.dumps(config))
    spy = Spy(weights, real=False)
    monkeypatch.setattr(ev, "answer", spy)
    r = evaluate(EvalConfig(model="tiny", n=6, tokens=(576, 64), methods=("visionzip",), tuned=(str(folder),)))
    tuned_row = r["rows"][2]
    assert (tuned_row["method"], tuned_row["tokens"], tuned_row["dominant"], tuned_row["contextual"]) == (
        "visionzip+tuned",
        28,
        20,
        8,
    )
    assert tuned_row["projector_weights"]["visionzip"]["dominant"] == 20
    assert spy.calls[2]["visionzip"] == VisionZipConfig(20, 8)
    assert (r["rows"][1]["dominant"], r["rows"][1]["contextual"]) == (24, 4)
    # The stub answers every second question right: 3 of 6 in each row, so relative_to_full is exactly 1.
    assert [row["accuracy"]["overall"] for row in r["rows"]] == [0.5, 0.5, 0.5]
    assert [row["relative_to_full"] for row in r["rows"]] == [1.0, 1.0, 1.0]


def test_bad_tuned_folders_name_the_fix(tuned_dir, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"--tuned '.*nope' does not exist; pass the --out folder of a `vzedge tune`"):
        EvalConfig(tuned=(str(tmp_path / "nope"),))
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match=r"is not a `vzedge tune` output \(no tune_config.json or projector"):
        EvalConfig(tuned=(str(tmp_path / "plain"),))
    with pytest.raises(TypeError, match="sequence of folders"):
        EvalConfig(tuned=str(tuned_dir))
    # Tuned for 28 tokens; budget 128 scales to 57 on tiny: say which counts run and how to add 28.
    with pytest.raises(
        ValueError,
        match=r"tuned for 28 VisionZip tokens \(24\+4\) but eval runs VisionZip at \[57\] tokens.*"
        r"add its budget: --tokens 576,128,63 \(LLaVA-1.5 budgets 62-64 scale to 28\) or "
        r"--no-scale --tokens 256,57,28",
    ):
        evaluate(EvalConfig(model="tiny", tokens=(576, 128), n=6, tuned=(str(tuned_dir),)))
    with pytest.raises(ValueError, match=r"at \[64\] tokens .*literally.*budget: --no-scale --tokens 256,64,28"):
        evaluate(EvalConfig(model="tiny", tokens=(256, 64), scale=False, n=6, tuned=(str(tuned_dir),)))
    # Another base model (tiny-random): refused by its weight fingerprint, before any row runs.
    with pytest.raises(ValueError, match=r"tuned on base model 'builtin:tiny'.*load the base model it was tuned on"):
        evaluate(EvalConfig(model="tiny-random", tokens=(576, 64), n=6, tuned=(str(tuned_dir),)))
    assert run(["eval", "--tuned", str(tmp_path / "plain")]) == EXIT_BAD_INPUT
    assert "not a `vzedge tune` output" in capsys.readouterr().err
