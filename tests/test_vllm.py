"""The vLLM plugin and launcher.

Plain tests (settings, version gate, command line) run everywhere. The ones that run vLLM need the separate
vLLM environment built by `scripts/vllm_cpu_env.sh VENV` and `VZEDGE_VLLM_PYTHON=VENV/bin/python`; they skip
without it. vLLM runs in a subprocess with that interpreter (it pins its own transformers); answers are
compared with `vzedge generate` run here, greedy, token for token.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shlex
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from vzedge.serve.probe import free_port, wait_healthy
from vzedge.visionzip import VisionZipConfig
from vzedge.vllm.config import (
    ARCHITECTURE,
    PluginSettings,
    hf_overrides,
    settings_from_dict,
    settings_from_hf_config,
)
from vzedge.vllm.launch import VLLMServeConfig, build_command
from vzedge.vllm.plugin import check_vllm_version

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = os.environ.get("VZEDGE_VLLM_PYTHON", "")
needs_vllm = pytest.mark.skipif(
    not (VLLM_PYTHON and Path(VLLM_PYTHON).is_file()),
    reason="no vLLM environment: build one with scripts/vllm_cpu_env.sh VENV, set VZEDGE_VLLM_PYTHON=VENV/bin/python",
)
QUESTIONS = ["What colour is the triangle?", "What shape is red?", "How many shapes are there?"]
MAX_TOKENS = 8
START_TIMEOUT_S = 300  # vLLM start on 2 shared cores: ~40 s idle
TUNED = str(ROOT / "vzedge" / "models" / "weights" / "tiny-projector-54+10")


def vllm_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default (4) is more than these tests need
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{max(0, (os.cpu_count() or 1) - 1)}")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


# --- settings, version gate, command line (no vLLM) -------------------------------------------------------


def test_overrides_round_trip():
    settings = PluginSettings(VisionZipConfig(dominant=24, contextual=4, layer=-3, merge="mean"), TUNED)
    over = hf_overrides(settings)
    assert over["architectures"] == [ARCHITECTURE]
    assert json.loads(json.dumps(over))["visionzip"] == {
        "dominant": 24,
        "contextual": 4,
        "layer": -3,
        "merge": "mean",
        "projector": TUNED,
    }

    class HFConfig:  # what vLLM builds: every --hf-overrides key becomes an attribute
        visionzip = over["visionzip"]

    assert settings_from_hf_config(HFConfig()) == settings
    assert settings_from_hf_config(object()).visionzip == VisionZipConfig()  # no key: 54 + 10


@pytest.mark.parametrize(
    ("raw", "error", "match"),
    [
        ([54, 10], TypeError, "must be an object"),
        ({"dominant": 54, "tokens": 64}, ValueError, "unknown keys \\['tokens'\\]"),
        ({"dominant": 0, "contextual": 0}, ValueError, "keep at least one token"),
        ({"merge": "max"}, ValueError, "merge='max'"),
        ({"projector": 3}, TypeError, "folder path"),
        ({"projector": "/nonexistent"}, ValueError, "no tune_config.json"),
    ],
)
def test_bad_overrides_are_refused(raw, error, match):
    with pytest.raises(error, match=match):
        settings_from_dict(raw)


@pytest.mark.parametrize("version", ["0.32.0", "0.32.0+cpu", "0.32.3.dev4"])
def test_tested_vllm_versions_pass(version):
    check_vllm_version(version)


@pytest.mark.parametrize("version", ["0.31.2", "0.33.0", "1.0.0"])
def test_untested_vllm_versions_are_refused(version):
    with pytest.raises(RuntimeError, match=r"tested with vLLM .*0\.32.*pip install"):
        check_vllm_version(version)


def _flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_command_translates_vzedge_flags():
    cfg = VLLMServeConfig(
        model="tiny",
        visionzip=VisionZipConfig(54, 10),
        port=8123,
        api_key="secret",
        max_model_len=2048,
        python="/venv/bin/python",
        vllm_args=["--tensor-parallel-size", "2", "--mm-encoder-tp-mode", "data"],
    )
    cmd = build_command(cfg)
    assert cmd[:3] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert Path(_flag(cmd, "--model")).joinpath("config.json").is_file()  # tiny -> the shipped folder
    assert _flag(cmd, "--served-model-name") == "tiny"
    assert (_flag(cmd, "--host"), _flag(cmd, "--port")) == ("127.0.0.1", "8123")
    assert _flag(cmd, "--api-key") == "secret"
    assert _flag(cmd, "--max-model-len") == "2048"
    over = json.loads(_flag(cmd, "--hf-overrides"))
    assert over["architectures"] == [ARCHITECTURE]
    assert over["visionzip"]["projector"] == str(Path(TUNED).resolve())  # auto: shipped tuned one for tiny, 54+10
    assert cmd[-4:] == ["--tensor-parallel-size", "2", "--mm-encoder-tp-mode", "data"]
    # Another budget has no shipped projector; `none` and stock never pass one.
    assert (
        "projector"
        not in json.loads(_flag(build_command(VLLMServeConfig("tiny", VisionZipConfig(24, 4))), "--hf-overrides"))[
            "visionzip"
        ]
    )
    stock = build_command(VLLMServeConfig("tiny", mode="stock"))
    assert "--hf-overrides" not in stock and "--enable-mm-embeds" not in stock
    assert "--enable-mm-embeds" in build_command(VLLMServeConfig("tiny", mode="embeds"))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(mode="fast"), "mode='fast'"),
        (dict(port=0), "not a TCP port"),
        (dict(max_model_len=0), "positive context"),
        (dict(mode="stock", projector="/x"), "needs mode='visionzip'"),
        (dict(vllm_args=["--port", "1"]), "repeat flags"),
        (dict(vllm_args=["--max-model-len=9"]), "repeat flags"),
    ],
)
def test_bad_serve_configs_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VLLMServeConfig("tiny", **kwargs)


def test_cli_prints_the_command_and_refuses_bad_input():
    from vzedge.cli import run

    assert (
        run(["serve", "--engine", "vllm", "--model", "tiny", "--print-command", "--vllm-args", "--max-num-seqs 2"]) == 0
    )
    assert run(["serve", "--engine", "vllm", "--model", "tiny-random", "--print-command"]) == 2  # no folder for vLLM
    assert run(["serve", "--engine", "vllm", "--model", "tiny", "--vllm-args", "--port 9", "--print-command"]) == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        # the built-in engine's flags have no vLLM equivalent: refused, not silently ignored
        (["--engine", "vllm", "--quant", "nf4"], "--quant apply to --engine vzedge only"),
        (["--engine", "vllm", "--image-root", "."], "--image-root apply to --engine vzedge only"),
        # and the other way round
        # (--print-command is --engine vllm's too, so these can never start a server)
        (["--vllm-mode", "stock"], "--vllm-mode, --print-command apply to --engine vllm only"),
        (["--context", "512"], "--context, --print-command apply to --engine vllm only"),
        (["--engine", "vllm", "--no-visionzip", "--vllm-mode", "visionzip"], "pick one"),
    ],
)
def test_serve_engine_flags_belong_to_their_engine(capsys, argv, message):
    from vzedge.cli import run

    assert run(["serve", "--model", "tiny", "--print-command", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_serve_engine_vllm_translates_the_budget_and_no_visionzip(capsys):
    from vzedge.cli import run

    assert run(["serve", "--engine", "vllm", "--model", "tiny", "--budget", "27+5", "--print-command"]) == 0
    visionzip = capsys.readouterr().out
    assert '"dominant":27' in visionzip and '"contextual":5' in visionzip
    assert run(["serve", "--engine", "vllm", "--model", "tiny", "--no-visionzip", "--print-command"]) == 0
    assert "dominant" not in capsys.readouterr().out  # stock vLLM LLaVA: no VisionZip settings at all


def test_serving_without_vllm_names_the_extra(monkeypatch):
    import importlib.util

    from vzedge.vllm import launch

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(ImportError, match=r"vzedge\[vllm\]"):
        launch.start_vllm(VLLMServeConfig("tiny"))


def test_stock_layout_copy_of_a_transformers5_folder(tmp_path):
    from safetensors import safe_open

    from vzedge.models.tiny import weights_dir
    from vzedge.vllm.layout import needs_conversion, stock_layout_folder, stock_name

    assert stock_name("vision_tower.encoder.layers.0.mlp.fc1.weight") == (
        "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"
    )
    assert stock_name("model.vision_tower.vision_model.embeddings.x") == "model.vision_tower.vision_model.embeddings.x"
    assert stock_name("language_model.model.embed_tokens.weight") == "language_model.model.embed_tokens.weight"
    src = weights_dir()
    assert needs_conversion(src)
    out = stock_layout_folder(src, tmp_path)
    assert out.parent == tmp_path and not needs_conversion(out)
    assert stock_layout_folder(src, tmp_path) == out  # cached
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in src.iterdir())
    with safe_open(str(src / "model.safetensors"), "pt") as a, safe_open(str(out / "model.safetensors"), "pt") as b:
        assert sorted(stock_name(k) for k in a.keys()) == sorted(b.keys())  # noqa: SIM118
        key = "vision_tower.embeddings.patch_embedding.weight"
        assert torch.equal(a.get_tensor(key), b.get_tensor(stock_name(key)))
    assert stock_layout_folder(out, tmp_path / "other") == out  # already stock: no copy


# --- vLLM itself (separate environment) -------------------------------------------------------------------


@pytest.fixture(scope="module")
def generate_answers():
    """`vzedge generate` (transformers, this environment) on the demo image: the reference answers."""
    from vzedge.api import generate

    return {q: generate("tiny", "demo", q, VisionZipConfig(), max_new_tokens=MAX_TOKENS) for q in QUESTIONS}


REFUSALS_SCRIPT = """
import json
from transformers import LlavaConfig, LlavaNextConfig, PixtralVisionConfig
from vzedge.models.tiny import tiny_config
from vzedge.visionzip import VisionZipConfig
from vzedge.vllm.config import PluginSettings
from vzedge.vllm.model import check_model_config

def outcome(config, cfg=VisionZipConfig()):
    try:
        return check_model_config(config, PluginSettings(cfg))
    except ValueError as err:
        return str(err)

base = tiny_config(224)
multi = tiny_config(224)
multi.vision_feature_layer = [-2, -5]
pixtral = LlavaConfig(vision_config=PixtralVisionConfig().to_dict(), text_config=base.text_config.to_dict())
print(json.dumps({
    "ok": outcome(base),
    "next": outcome(LlavaNextConfig(text_config=base.text_config.to_dict())),
    "pixtral": outcome(pixtral),
    "multi": outcome(multi),
    "deeper": outcome(base, VisionZipConfig(layer=-1)),
    "range": outcome(base, VisionZipConfig(layer=9)),
    "budget": outcome(base, VisionZipConfig(dominant=250, contextual=10)),
}))
"""


@needs_vllm
def test_plugin_refuses_what_it_does_not_handle():
    out = subprocess.run(
        [VLLM_PYTHON, "-c", REFUSALS_SCRIPT], capture_output=True, text=True, timeout=180, env=vllm_env()
    )
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["ok"] == 2  # tiny: 4 layers, selection at -2 -> encoder layer 2
    assert "LLaVA-NeXT/OneVision anyres" in r["next"]
    assert "CLIP or SigLIP" in r["pixtral"]
    assert "multi-layer" in r["multi"]
    assert "deeper than the model's vision_feature_layer=-2" in r["deeper"]
    assert "out of range for a 4-layer" in r["range"]
    assert "use dominant + contextual <= 257" in r["budget"]


@needs_vllm
@pytest.mark.slow
def test_offline_plugin_matches_generate(generate_answers):
    cmd = [VLLM_PYTHON, str(ROOT / "tests" / "vllm_offline.py"), "--questions", json.dumps(QUESTIONS)]
    cmd += ["--projector", TUNED, "--max-tokens", str(MAX_TOKENS)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=420, env=vllm_env())
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("VZEDGE_JSON ")]
    assert out.returncode == 0 and lines, out.stderr[-4000:]
    summary = json.loads(lines[-1].removeprefix("VZEDGE_JSON "))
    assert summary["lean"] and summary["registered"]  # vzedge.vllm imports no vLLM; the entry point registers
    for r in summary["results"]:
        ref = generate_answers[r["question"]]
        assert ref["image_tokens"] == 64 and r["image_tokens"] == 64
        assert r["prompt_tokens"] == ref["prompt_tokens"]
        assert r["answer"] == ref["answer"], (r, ref)
    assert generate_answers[QUESTIONS[0]]["answer"] == "blue"  # the tuned projector is in use on both sides
    # The features the plugin computes = VisionZipEncoder + the tuned projector here, on the same pixels.
    from vzedge.encoder import VisionZipEncoder
    from vzedge.models.loading import load_model
    from vzedge.tune import load_tuned_projector

    loaded = load_model("tiny")
    load_tuned_projector(TUNED, loaded.vlm, VisionZipConfig())
    pixels = torch.tensor(summary["pixel_values"])
    with torch.no_grad():
        ref = loaded.projector(VisionZipEncoder(loaded.vision, VisionZipConfig())(pixels).tokens)
    got = torch.tensor(summary["features"])
    assert got.shape == ref.shape == (1, 64, 128)
    assert (got - ref).abs().max().item() <= 2e-5 * max(1.0, ref.abs().max().item())


def save_siglip_llava(folder: Path) -> None:
    """A random LLaVA-1.5 with a SigLIP tower (no CLS, `full` features), saved as a local folder."""
    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        SiglipImageProcessor,
        SiglipVisionConfig,
    )

    from vzedge.models.tiny import CHAT_TEMPLATE, build_tokenizer, tiny_config

    vision = SiglipVisionConfig(
        hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, image_size=224, patch_size=14
    )
    config = LlavaConfig(
        vision_config=vision.to_dict(),
        text_config=tiny_config(224).text_config.to_dict(),
        image_token_id=3,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="full",
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlavaForConditionalGeneration(config).save_pretrained(folder)
    LlavaProcessor(
        image_processor=SiglipImageProcessor(size={"height": 224, "width": 224}),
        tokenizer=build_tokenizer(),
        patch_size=14,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=0,
        chat_template=CHAT_TEMPLATE,
    ).save_pretrained(folder)


@needs_vllm
@pytest.mark.slow
def test_offline_plugin_siglip_tower(tmp_path):
    """A SigLIP tower (no CLS: the received-attention score) through the plugin = VisionZipEncoder + projector."""
    from vzedge.api import generate
    from vzedge.encoder import VisionZipEncoder
    from vzedge.models.loading import load_model

    folder = tmp_path / "siglip-llava"
    save_siglip_llava(folder)
    q = QUESTIONS[0]
    cmd = [VLLM_PYTHON, str(ROOT / "tests" / "vllm_offline.py"), "--model", str(folder), "--questions", json.dumps([q])]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=420, env=vllm_env())
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("VZEDGE_JSON ")]
    assert out.returncode == 0 and lines, out.stderr[-4000:]
    summary = json.loads(lines[-1].removeprefix("VZEDGE_JSON "))
    (r,) = summary["results"]
    ref = generate(str(folder), "demo", q, VisionZipConfig(), max_new_tokens=MAX_TOKENS, projector="none")
    assert r["image_tokens"] == ref["image_tokens"] == 64
    assert (r["prompt_tokens"], r["answer"]) == (ref["prompt_tokens"], ref["answer"])
    loaded = load_model(str(folder))
    pixels = torch.tensor(summary["pixel_values"])
    with torch.no_grad():
        want = loaded.projector(VisionZipEncoder(loaded.vision, VisionZipConfig())(pixels).tokens)
    got = torch.tensor(summary["features"])
    assert got.shape == want.shape == (1, 64, 128)
    assert (got - want).abs().max().item() <= 2e-5 * max(1.0, want.abs().max().item())


def _wait_healthy(proc: subprocess.Popen, port: int, log_path: Path) -> None:
    url = f"http://127.0.0.1:{port}/health"
    try:
        wait_healthy(proc, url, START_TIMEOUT_S, logs=lambda: log_path.read_text()[-4000:], poll_s=1.0)
    except RuntimeError as err:
        pytest.fail(str(err))


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # the CLI passes it on; vLLM shuts its engine down
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the CLI, vLLM and vLLM's children
            proc.wait(timeout=30)


def start_cli_server(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, int, Path]:
    """`vzedge serve --engine vllm ...` as a user runs it, in its own session; returns (process, port, log).
    Stock-layout copies (modes stock/embeds) go to `tmp_path`, not the user's cache."""
    port = free_port()
    log_path = tmp_path / "server.log"
    cmd = [
        sys.executable,
        "-m",
        "vzedge",
        "serve",
        "--engine",
        "vllm",
        "--port",
        str(port),
        "--vllm-python",
        VLLM_PYTHON,
    ]
    cmd += ["--context", "1024", "--dtype", "float32", *args]
    cmd += ["--vllm-args", shlex.join(["--max-num-seqs", "4", "--enforce-eager", "--seed", "0"])]
    with open(log_path, "wb") as log:
        env = {**vllm_env(), "VZEDGE_CACHE": str(tmp_path / "cache")}
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        _wait_healthy(proc, port, log_path)
    except BaseException:
        _stop(proc)
        raise
    return proc, port, log_path


def demo_image_url() -> str:
    from vzedge.images import load_image

    buf = io.BytesIO()
    load_image("demo").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_message(question: str, url: str) -> list[dict]:
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]
    return [{"role": "user", "content": content}]


@pytest.fixture(scope="module")
def visionzip_server(tmp_path_factory):
    if not (VLLM_PYTHON and Path(VLLM_PYTHON).is_file()):
        pytest.skip("no vLLM environment (VZEDGE_VLLM_PYTHON)")
    proc, port, log_path = start_cli_server(tmp_path_factory.mktemp("vllm"), "--model", "tiny", "--api-key", "k3y")
    yield port, log_path
    _stop(proc)


@needs_vllm
@pytest.mark.slow
def test_server_answers_like_generate_on_64_tokens(visionzip_server, generate_answers):
    import openai

    port, _ = visionzip_server
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k3y", timeout=120, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    url = demo_image_url()
    for q in QUESTIONS:
        ref = generate_answers[q]
        # add_special_tokens: the chat path leaves out BOS by default; `generate`'s processor adds it.
        r = client.chat.completions.create(
            model="tiny",
            messages=image_message(q, url),
            temperature=0,
            max_tokens=MAX_TOKENS,
            extra_body={"add_special_tokens": True},
        )
        assert r.usage.prompt_tokens == ref["prompt_tokens"]  # same text; 64 image tokens on both sides
        assert r.choices[0].message.content.strip() == ref["answer"]
    # Without BOS: one token fewer, and the image tokens are still 64 (text tokens counted by the tokenizer).
    from vzedge.models.loading import load_model
    from vzedge.models.tiny import PROMPT_TEMPLATE

    tok = load_model("tiny").processor.tokenizer
    text_tokens = len(tok(PROMPT_TEMPLATE.format(question=QUESTIONS[0]), add_special_tokens=False).input_ids) - 1
    r = client.chat.completions.create(
        model="tiny", messages=image_message(QUESTIONS[0], url), temperature=0, max_tokens=MAX_TOKENS
    )
    assert r.usage.prompt_tokens - text_tokens == 64


@needs_vllm
@pytest.mark.slow
def test_server_refuses_bad_requests(visionzip_server):
    import openai

    port, _ = visionzip_server
    base = f"http://127.0.0.1:{port}/v1"
    client = openai.OpenAI(base_url=base, api_key="k3y", timeout=60, max_retries=0)
    text = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).chat.completions.create(
            model="tiny", messages=text, max_tokens=2
        )
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="llava", messages=text, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="image"):
        client.chat.completions.create(
            model="tiny", messages=image_message("x", "data:image/png;base64,AAAA"), max_tokens=2
        )
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.chat.completions.create(model="tiny", messages=image_message("x" * 2000, demo_image_url()), max_tokens=2)
    # The server is still healthy afterwards.
    r = client.chat.completions.create(model="tiny", messages=text, max_tokens=2, temperature=0)
    assert r.usage.completion_tokens >= 1


@needs_vllm
@pytest.mark.slow
def test_server_answers_concurrent_requests(visionzip_server, generate_answers):
    import openai

    port, _ = visionzip_server
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k3y", timeout=180, max_retries=0)
    url = demo_image_url()
    n = 8

    def ask(i: int):
        q = QUESTIONS[i % len(QUESTIONS)]
        r = client.chat.completions.create(
            model="tiny",
            messages=image_message(q, url),
            temperature=0,
            max_tokens=MAX_TOKENS,
            extra_body={"add_special_tokens": True},
        )
        return q, r.choices[0].message.content.strip(), r.usage.prompt_tokens

    with ThreadPoolExecutor(max_workers=n) as pool:
        results = list(pool.map(ask, range(n), timeout=240))
    assert len(results) == n
    for q, answer, prompt_tokens in results:
        assert answer == generate_answers[q]["answer"]
        assert prompt_tokens == generate_answers[q]["prompt_tokens"]


# --- edge-to-server split: stock vLLM with --enable-mm-embeds ---------------------------------------------


@pytest.fixture(scope="module")
def embeds_server(tmp_path_factory):
    if not (VLLM_PYTHON and Path(VLLM_PYTHON).is_file()):
        pytest.skip("no vLLM environment (VZEDGE_VLLM_PYTHON)")
    folder = tmp_path_factory.mktemp("vllm-embeds")
    proc, port, log_path = start_cli_server(folder, "--model", "tiny", "--vllm-mode", "embeds")
    yield port, log_path
    _stop(proc)


@needs_vllm
@pytest.mark.slow
def test_edge_split_answers_like_generate(embeds_server, generate_answers, tmp_path):
    port, log_path = embeds_server
    folder = log_path.parent
    q = QUESTIONS[0]
    report_path = tmp_path / "remote.json"
    cmd = [sys.executable, "-m", "vzedge", "run", "--model", "tiny", "--remote", f"http://127.0.0.1:{port}"]
    cmd += ["--projector", TUNED, "--source", "demo", "--frames", "2", "--prompt", q]
    cmd += ["--max-new-tokens", str(MAX_TOKENS), "--wire-dtype", "float32", "--json", str(report_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(report_path.read_text())
    ref = generate_answers[q]
    assert report["summary"]["frames"]["processed"] == 2
    assert [f["answer"] for f in report["frames"]] == [ref["answer"]] * 2
    remote = report["remote"]
    assert remote["server_prompt_tokens"] == ref["prompt_tokens"]  # 64 image tokens on the server
    assert remote["embeds_bytes_per_image"] == 64 * 128 * 4 + 128  # 64 x LLM width 128, fp32, .npy header
    assert any((folder / "cache" / "vllm-layout").iterdir())  # stock vLLM got the converted copy of tiny
    # The server refuses image tokens of the wrong width with the reason.
    from vzedge.runtime.remote import RemoteError, RemoteLLM

    with pytest.raises(RemoteError, match="400"):
        RemoteLLM(f"http://127.0.0.1:{port}", "tiny", timeout_s=60).answer(torch.zeros(64, 96), q, 2)
