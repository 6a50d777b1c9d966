"""`vzedge` command line: each verb builds a config and calls one library function."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

EXIT_BAD_INPUT = 2


def _add_visionzip_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dominant", type=int, default=54, help="tokens kept by attention (CLS included)")
    p.add_argument("--contextual", type=int, default=10, help="tokens merged from the rest (0: none)")
    p.add_argument("--layer", type=int, default=-2, help="encoder layer to select at (default -2)")
    p.add_argument("--merge", choices=("reference", "mean"), default="reference")


def _visionzip_config(args: argparse.Namespace):
    from vzedge.visionzip import VisionZipConfig

    return VisionZipConfig(dominant=args.dominant, contextual=args.contextual, layer=args.layer, merge=args.merge)


def _cmd_info(args: argparse.Namespace) -> int:
    from vzedge.api import info

    report = info(args.model, _visionzip_config(args))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    enc, tok = report["encoder"], report["visual_tokens"]
    print(f"model       {report['model']}")
    print(
        f"encoder     {enc['family']} {enc['image_size']}px patch {enc['patch_size']} -> {enc['grid']}x{enc['grid']}"
        f"{' + CLS' if enc['has_cls'] else ''} = {enc['sequence_tokens']} tokens, {enc['layers']} layers, "
        f"d={enc['hidden_size']}"
    )
    print(
        f"tokens      stock {tok['stock']} -> VisionZip {tok['visionzip']} "
        f"(dominant {tok['dominant']} + contextual {tok['contextual']})"
    )
    ef = report["encoder_flops"]
    print(
        f"encoder     {ef['stock'] / 1e9:,.2f} GFLOPs -> {ef['visionzip'] / 1e9:,.2f} "
        f"({enc['layers_computed_with_visionzip']} of {enc['layers']} layers computed), x{ef['ratio']:.2f}"
    )
    if "llm_prefill_flops_visual" in report:
        lf = report["llm_prefill_flops_visual"]
        print(
            f"LLM prefill {lf['stock'] / 1e9:,.2f} GFLOPs -> {lf['visionzip'] / 1e9:,.2f} for the visual tokens, "
            f"x{lf['ratio']:.1f}   (formula T(4nd^2 + 2n^2d + 2ndm))"
        )
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from vzedge.api import show

    summary = show(args.model, args.image, args.out, _visionzip_config(args))
    print(
        f"wrote {summary['out']}: {summary['kept_tokens']} dominant + {summary['contextual_tokens']} contextual "
        f"tokens on a {summary['grid']}x{summary['grid']} grid; kept patches hold "
        f"{100 * summary['attention_share_of_kept_patches']:.1f}% of the attention"
    )
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from vzedge.api import generate

    cfg = None if args.no_visionzip else _visionzip_config(args)
    result = generate(
        args.model, args.image, args.prompt, cfg, max_new_tokens=args.max_new_tokens, projector=args.projector
    )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"{result['image_tokens']} image tokens, {result['prompt_tokens']} prompt tokens, "
            f"{result['new_tokens']} new tokens in {result['seconds']:.2f} s"
        )
        if result["projector"]:
            print(f"projector: tuned, {result['projector']}")
        print(f"answer: {result['answer']}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from vzedge.export import ExportConfig, ParityError, export_vision

    cfg = ExportConfig(
        model=args.model,
        out=args.out,
        visionzip=_visionzip_config(args),
        projector=args.projector is not False,
        projector_weights=args.projector if isinstance(args.projector, str) else None,
        dtype=args.dtype,
        opset=args.opset,
        max_batch=args.max_batch,
        trt=args.trt,
        trt_workspace_mib=args.trt_workspace_mib,
        force=args.force,
        revision=args.revision,
    )
    try:
        result = export_vision(cfg)
    except ParityError as err:
        print(f"vzedge export: {err}; nothing was written to {cfg.out}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result.manifest, indent=2))
        return 0
    m = result.manifest
    graph, tokens = m["graph"], m["graph"]["outputs"][0]
    print(f"wrote {result.out}: {graph['file']} {graph['dtype']} opset {graph['opset']}, tokens {tokens['shape']}")
    slim = m["slim"]
    if slim.get("before"):
        print(
            f"onnxslim    {slim['before']['nodes']} -> {slim['after']['nodes']} nodes, "
            f"{slim['before']['bytes'] / 1e6:.1f} -> {slim['after']['bytes'] / 1e6:.1f} MB"
        )
    for r in m["parity"]["results"]:
        print(
            f"parity      {r['inputs']} (batch {r['batch']}): max|diff| {r['max_abs_diff']:.2e}, "
            f"cosine min {r['min_cosine']:.6f}, kept agreement {r['index_agreement']:.4f}"
        )
    op = m["opcheck"]
    print(
        f"tensorrt    op check {'ok' if op['ok'] else 'FAILED: ' + '; '.join(op['problems'])} "
        f"(parsers: {', '.join(op['tensorrt_versions']) or 'none'})"
    )
    if trt := m["tensorrt"]:
        print(f"tensorrt    engine {trt['engine']} ({trt['tensorrt_version']}, {trt['gpu']})")
    return 0


def _add_runtime_args(p: argparse.ArgumentParser, source_default: str) -> None:
    p.add_argument("--model", default="tiny", help="'tiny', a local folder, or a hub id (the LLM)")
    p.add_argument("--vision", default=None, help="export folder (manifest.json); default: PyTorch VisionZip")
    p.add_argument(
        "--vision-backend", default="auto", choices=("auto", "torch", "ort", "ort-cpu", "ort-cuda", "ort-trt", "trt")
    )
    p.add_argument("--quant", default="none", help="LLM quantization: none, int8, nf4, fp4, awq")
    p.add_argument("--projector", default=None, metavar="TUNED_DIR", help="a `vzedge tune` output folder")
    p.add_argument("--all-tokens", action="store_true", help="no VisionZip: all image tokens (baseline)")
    p.add_argument("--source", default=source_default, help="image, folder, video, camera:K, synthetic[:N], demo")
    p.add_argument("--frames", type=int, default=None, help="stop after this many frames")
    p.add_argument("--clip", type=int, default=1, help="frames per question (video): each compressed on its own")
    p.add_argument("--layout", choices=("reference", "newline"), default="reference", help="anyres crop arrangement")
    p.add_argument("--prompt", default="What is in the image?")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--json", dest="json_out", default=None, help="write the full report as JSON to this file")
    p.add_argument("--plot", default=None, help="write per-stage latency and memory over time to this PNG")
    _add_visionzip_args(p)


def _run_config(args: argparse.Namespace, **extra):
    from vzedge.runtime.config import RunConfig

    return RunConfig(
        model=args.model,
        vision=args.vision,
        vision_backend=args.vision_backend,
        visionzip=None if args.all_tokens else _visionzip_config(args),
        quant=args.quant,
        projector=args.projector,
        source=args.source,
        frames=args.frames,
        clip=args.clip,
        layout=args.layout,
        prompt=args.prompt,
        max_new_tokens=args.max_new_tokens,
        device=args.device,
        **extra,
    )


def _write_reports(args: argparse.Namespace, report: dict) -> None:
    from vzedge.runtime.report import markdown, plot, write_report_json

    print(markdown(report))
    if args.json_out:
        write_report_json(args.json_out, report)
        print(f"wrote {args.json_out}")
    if args.plot:
        plot(args.plot, report)
        print(f"wrote {args.plot}")


def _progress(total: int | None):
    """A rich progress bar on a terminal (frames processed / dropped); a no-op without rich or a TTY."""
    import contextlib

    if not sys.stderr.isatty():
        return contextlib.nullcontext(None)
    try:
        from rich.progress import Progress
    except ImportError:
        return contextlib.nullcontext(None)
    return Progress(transient=True)


def _cmd_run(args: argparse.Namespace) -> int:
    from vzedge.runtime.api import run as run_loop

    cfg = _run_config(
        args, policy=args.policy, pipelined=not args.sequential, on_error=args.on_error, queue_size=args.queue_size
    )
    with _progress(cfg.frames) as progress:
        on_frame = None
        if progress is not None:
            task = progress.add_task("frames", total=cfg.frames)

            def on_frame(rec):
                progress.update(task, advance=1, description=f"frame {rec.index} {rec.status}")

        report = run_loop(cfg, on_frame=on_frame)
    _write_reports(args, report)
    last = next((f for f in reversed(report["frames"]) if f["answer"] is not None), None)
    if last is not None:
        print(f"last answer (frame {last['index']}): {last['answer']}")
    if report.get("stopped_by_error"):
        print(f"vzedge run: stopped: {report['stopped_by_error']}", file=sys.stderr)
        return 1
    return 130 if report["interrupted"] else 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from vzedge.runtime.api import chat, load_session

    cfg = _run_config(args)
    questions = list(args.question or [])
    session = load_session(cfg)
    if not questions:  # interactive: one question per line until EOF or an empty line
        print(f"chat about {cfg.source} ({session.vision.num_tokens} image tokens); empty line to quit")
        for line in sys.stdin:
            if not line.strip():
                break
            turn = chat(cfg, [line.strip()], session)["turns"][0]
            print(f"> {turn['answer']}   ({turn['ttft_ms']:.0f} ms to first token)")
        return 0
    result = chat(cfg, questions, session)
    for turn in result["turns"]:
        print(f"Q: {turn['question']}\nA: {turn['answer']}   (TTFT {turn['ttft_ms']:.1f} ms)")
    print(
        f"image: {result['image_tokens']} tokens, vision {result['vision_ms']:.1f} ms, "
        f"prefix prefill {result['image_prefill_ms']:.1f} ms once for {len(result['turns'])} questions"
    )
    if args.json_out:
        from vzedge.io import write_json

        write_json(args.json_out, result)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from vzedge.runtime.api import bench
    from vzedge.runtime.report import markdown

    cfg = _run_config(args, policy="all")
    result = bench(cfg)
    for mode in ("sequential", "pipelined"):
        print(f"## {mode}")
        print(markdown(result[mode]))
    print(json.dumps(result["comparison"], indent=2))
    if args.json_out:
        from vzedge.io import write_json

        write_json(args.json_out, result)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from vzedge.eval import EvalConfig, evaluate, markdown_table, parse_tokens, plot
    from vzedge.io import write_json

    cfg = EvalConfig(
        model=args.model,
        data=args.data,
        images=args.images,
        tokens=parse_tokens(args.tokens),
        scale=not args.no_scale,
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        n=args.n,
        seed=args.seed,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        tuned=tuple(args.tuned or ()),
    )
    result = evaluate(cfg)
    if args.json:
        write_json(args.json, result)
    if args.plot:
        plot(result, args.plot)
    print(
        f"{result['model']} on {result['data']}: {result['questions']} questions, {result['grid']}x{result['grid']} "
        f"grid ({result['stock_image_tokens']} image tokens), {result['seconds']:.0f} s; {result['projector_tuning']}"
    )
    print(markdown_table(result))
    for path in (args.json, args.plot):
        if path:
            print(f"wrote {path}")
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    from vzedge.quant import QuantConfig, QuantKernelError
    from vzedge.quant_awq import CalibConfig, QuantCheckError, quantize
    from vzedge.quant_report import summary_rows

    qcfg = QuantConfig(
        method=args.method,
        compute_dtype=args.compute_dtype,
        double_quant=args.double_quant,
        group_size=args.group_size,
        skip_modules=tuple(args.skip_modules),
    )
    calib = CalibConfig(samples=args.calib, seq_len=args.calib_len, data=args.calib_data)
    try:
        report = quantize(args.model, qcfg, out=args.out, calib=calib, device=args.device, force=args.force)
    except (MemoryError, QuantKernelError, QuantCheckError) as err:
        print(f"vzedge quantize: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    if args.out:
        print(f"wrote {args.out}: AWQ {qcfg.bits}-bit g{qcfg.group_size} checkpoint (+ quant_report.json)")
    for label, value in summary_rows(report):
        print(f"{label:<11} {value}")
    return 0


def _cmd_budget(args: argparse.Namespace) -> int:
    from vzedge.budget import BudgetConfig, budget, load_devices
    from vzedge.budget.report import estimate_table, validation_table

    if args.list_devices:
        for ident, d in sorted(load_devices(args.devices).items()):
            print(f"{ident:<20} {d.memory_gib:>5g} GiB {'unified ' if d.unified else 'discrete'} {d.name}")
        return 0
    cfg = BudgetConfig(
        model=args.model,
        quant=args.quant,
        double_quant=args.double_quant,
        group_size=args.group_size,
        tokens=args.tokens,
        context=args.context,
        prompt_tokens=args.prompt_tokens,
        batch=args.batch,
        crops=args.crops,
        dtype=args.dtype,
        vision_backend=args.vision_backend,
        attention=args.attention,
        trt_workspace_mib=args.trt_workspace_mib,
        device=args.device,
        devices_file=args.devices,
        headroom_gib=args.headroom,
    )
    if args.validate:
        if args.fit is not None:
            raise ValueError("--fit and --validate are separate questions; pass one of them")
        from vzedge.runtime.validate import validate  # the run goes through the runtime's backends

        checked = validate(cfg, new_tokens=args.new_tokens)
        result = {"kind": "validate", "ok": checked["within_tolerance"], **checked}
    else:
        result = budget(cfg, fit=args.fit)
    if args.json:
        from vzedge.io import write_json

        write_json(args.json, result)
    if result["kind"] == "estimate":
        print(estimate_table(result["estimate"]))
    elif result["kind"] == "validate":
        print(validation_table(result))
    else:
        target, value = result["target"], result[result["target"]]
        if value is None:
            print(f"nothing fits: no {target} fits {cfg.device} with {cfg.headroom_gib} GiB kept free")
        elif target == "quant":
            print(f"lightest quantization that fits: {value}")
        else:
            split = ""
            if target == "tokens":
                split = f" ({result['dominant']} dominant + {result['contextual']} contextual)"
            print(f"largest {target} that fits: {value}{split}")
        if value is not None:
            print(estimate_table(result["estimate"]))
    return 0 if result["ok"] else 1


def _cmd_tune(args: argparse.Namespace) -> int:
    from vzedge.tune import TuneConfig, tune

    cfg = TuneConfig(
        model=args.model,
        data=args.data,
        images=args.images,
        out=args.out,
        visionzip=_visionzip_config(args),
        epochs=args.epochs,
        max_steps=args.max_steps,
        lr=args.lr,
        batch=args.batch,
        grad_accum=args.grad_accum,
        seed=args.seed,
        max_length=args.max_length,
        quant=args.quant,
        device=args.device,
        on_missing_image=args.missing_images,
        save_every=args.save_every,
        resume=args.resume,
        force=args.force,
        revision=args.revision,
    )
    with _progress(None) as progress:
        on_step = None
        if progress is not None:
            task = progress.add_task("tuning", total=None)

            def on_step(s):
                progress.update(task, completed=s.step, total=s.total, description=f"step {s.step} loss {s.loss:.4f}")
        else:

            def on_step(s):
                if s.step == 1 or s.step == s.total or s.step % max(1, s.total // 20) == 0:
                    print(f"step {s.step}/{s.total}  epoch {s.epoch}  loss {s.loss:.4f}  lr {s.lr:.2e}", flush=True)

        result = tune(cfg, on_step=on_step)
    t = result.config["training"]
    before = "" if t["loss_before"] is None else f"; held-in loss {t['loss_before']:.4f} -> {t['loss_after']:.4f}"
    print(
        f"wrote {result.out}: projector.safetensors, tune_config.json, loss.png ({t['steps']} steps, "
        f"final loss {t['final_loss']:.4f}{before}, {t['seconds']:.0f} s)"
    )
    return 0


def _cmd_make_data(args: argparse.Namespace) -> int:
    from vzedge.tune_data import make_data

    path = make_data(args.out, n=args.n, split=args.split, seed=args.seed, size=args.size)
    print(f"wrote {path}: use --data {path} --images {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vzedge",
        description="VisionZip for vision-language models on edge devices. "
        "Every command works offline with --model tiny (the built-in model).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("info", help="encoder, token counts and FLOPs with and without VisionZip")
    p.add_argument("--model", default="tiny", help="'tiny', a local folder, or a hub id")
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_visionzip_args(p)
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("show", help="draw the attention heat map and the kept tokens of an image")
    p.add_argument("--model", default="tiny")
    p.add_argument("--image", default="demo", help="image file, or 'demo' for the built-in scene")
    p.add_argument("--out", required=True, help="PNG to write")
    _add_visionzip_args(p)
    p.set_defaults(func=_cmd_show)

    p = sub.add_parser("generate", help="answer a prompt about an image on VisionZip tokens")
    p.add_argument("--model", default="tiny")
    p.add_argument("--image", default="demo")
    p.add_argument("--prompt", default="What is in the image?")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--no-visionzip", action="store_true", help="use all image tokens (baseline)")
    p.add_argument(
        "--projector",
        default="auto",
        metavar="auto|none|TUNED_DIR",
        help="projector for the VisionZip tokens: a `vzedge tune` folder; auto (default) = the one shipped for "
        "--model tiny at 54+10, else the model's own; none = the model's own",
    )
    p.add_argument("--json", action="store_true")
    _add_visionzip_args(p)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("export", help="export the vision encoder with VisionZip as one ONNX graph (+ TensorRT)")
    p.add_argument("--model", default="tiny", help="'tiny', a local folder, or a hub id")
    p.add_argument("--out", required=True, help="folder to write model.onnx and manifest.json to")
    p.add_argument(
        "--projector",
        nargs="?",
        const=True,
        default=False,
        metavar="TUNED_DIR",
        help="include the LLaVA projector (tokens in the LLM width); with a `vzedge tune` folder, its tuned weights",
    )
    p.add_argument(
        "--dtype",
        choices=("fp32", "fp16", "int8"),
        default="fp32",
        help="fp32 (default); fp16 (GPU, TensorRT); int8: ViT linear weights int8, for ONNX Runtime on CPU",
    )
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (17 for TensorRT 8.6; default 18)")
    p.add_argument("--max-batch", type=int, default=8, help="largest batch the graph accepts (default 8)")
    p.add_argument("--trt", action="store_true", help="also build a TensorRT engine (needs vzedge[trt] and a GPU)")
    p.add_argument("--trt-workspace-mib", type=int, default=None, help="TensorRT workspace limit (default 1024)")
    p.add_argument("--revision", default=None, help="hub revision to load")
    p.add_argument("--force", action="store_true", help="replace a folder holding another export or leftovers")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    _add_visionzip_args(p)
    p.set_defaults(func=_cmd_export)
    p = sub.add_parser("run", help="the perception loop: frames -> vision graph -> LLM, with latency/memory reports")
    _add_runtime_args(p, source_default="demo")
    p.add_argument("--policy", choices=("latest", "all"), default="latest", help="latest drops stale frames")
    p.add_argument("--queue-size", type=int, default=1)
    p.add_argument("--sequential", action="store_true", help="one frame at a time (no stage overlap)")
    p.add_argument("--on-error", choices=("stop", "continue"), default="stop")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("chat", help="several questions about one image; its tokens and KV prefix are computed once")
    _add_runtime_args(p, source_default="demo")
    p.add_argument("--question", action="append", help="a question (repeatable); none: read them from stdin")
    p.set_defaults(func=_cmd_chat)

    p = sub.add_parser("bench", help="the loop on synthetic frames, sequential vs pipelined, same reports")
    _add_runtime_args(p, source_default="synthetic")
    p.set_defaults(func=_cmd_bench)
    p = sub.add_parser("eval", help="accuracy vs visual-token budget: VisionZip, random selection and pooling")
    p.add_argument("--model", default="tiny", help="a LLaVA model: 'tiny', a local folder, or a hub id")
    p.add_argument("--data", default="synth", help="'synth' (held-out synthetic VQA) or a LLaVA-format JSON file")
    p.add_argument("--images", default=None, help="folder of the JSON file's images")
    p.add_argument("--tokens", default="576,192,128,64", help="budgets in LLaVA-1.5 tokens (576 = all), scaled")
    p.add_argument("--no-scale", action="store_true", help="use --tokens as literal counts on the model's grid")
    p.add_argument("--methods", default="visionzip,random,pool", help="token reducers to compare")
    p.add_argument("--n", type=int, default=300, help="questions (synth: balanced kinds; JSON: first N, 0 = all)")
    p.add_argument("--seed", type=int, default=0, help="synth test split and random-selection seed")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=10)
    p.add_argument(
        "--tuned",
        nargs="+",
        default=None,
        metavar="DIR",
        help="`vzedge tune` output folders: each adds a visionzip+tuned row at the token count it was tuned for",
    )
    p.add_argument("--json", default=None, metavar="FILE", help="write the results as JSON")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="plot accuracy vs tokens (needs matplotlib)")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("quantize", help="quantize the LLM (AWQ checkpoint with --out) and report what it cost")
    p.add_argument("--model", default="tiny", help="'tiny', a local folder, or a hub id")
    p.add_argument("--method", required=True, help="none, bnb-int8, bnb-nf4, bnb-fp4 or awq")
    p.add_argument("--out", default=None, help="folder for the AWQ checkpoint (awq only)")
    p.add_argument("--calib", type=int, default=128, help="AWQ calibration samples (default 128)")
    p.add_argument("--calib-len", type=int, default=256, help="tokens per calibration sample (default 256)")
    p.add_argument("--calib-data", default="synthetic", help="UTF-8 text file to calibrate on, or 'synthetic'")
    p.add_argument("--group-size", type=int, default=128, help="AWQ group size: 32, 64 or 128")
    p.add_argument("--compute-dtype", default="auto", help="auto (fp32 on CPU, fp16 on CUDA), fp32, fp16, bf16")
    p.add_argument("--double-quant", action="store_true", help="bnb 4-bit: quantize the absmax too")
    p.add_argument("--skip-modules", nargs="*", default=["lm_head"], help="modules kept unquantized")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--force", action="store_true", help="replace an existing --out folder")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_quantize)

    p = sub.add_parser("budget", help="predict peak memory on a device (exit 0 fits, 1 does not, 2 bad input)")
    p.add_argument("--model", default="tiny", help="'tiny', a folder, a shipped config (llava-1.5-7b, ...) or hub id")
    p.add_argument("--quant", default="none", help="none, int8, nf4, fp4, awq (or bnb-int8/bnb-nf4/bnb-fp4)")
    p.add_argument("--double-quant", action="store_true", help="bnb 4-bit: quantized absmax")
    p.add_argument("--group-size", type=int, default=128, help="AWQ group size (default 128)")
    p.add_argument("--tokens", type=int, default=64, help="visual tokens per image after VisionZip (576: stock)")
    p.add_argument("--context", type=int, default=2048, help="longest sequence: image + prompt + answer tokens")
    p.add_argument("--prompt-tokens", type=int, default=64, help="text tokens prefilled with the image")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--crops", type=int, default=None, help="crops per image (default: 1, LLaVA-NeXT's largest grid)")
    p.add_argument("--dtype", default="auto", help="auto (fp16 on GPUs, fp32 on the host CPU), fp32, fp16, bf16")
    p.add_argument("--vision-backend", default="torch", choices=("torch", "ort", "trt"))
    p.add_argument("--attention", default="sdpa", choices=("sdpa", "eager"))
    p.add_argument("--trt-workspace-mib", type=int, default=1024)
    p.add_argument("--device", default="orin-nano-8gb", help="a device profile id, or 'host' (this machine)")
    p.add_argument("--devices", default=None, help="TOML file of [[device]] profiles added to the built-in ones")
    p.add_argument("--headroom", type=float, default=0.0, help="GiB that must stay free for 'fits'")
    p.add_argument("--fit", default=None, choices=("tokens", "context", "quant"), help="search the largest that fits")
    p.add_argument("--validate", action="store_true", help="run it here and print predicted vs measured")
    p.add_argument("--new-tokens", type=int, default=8, help="decode steps of the --validate run")
    p.add_argument("--list-devices", action="store_true", help="list the device profiles and exit")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the result as JSON to FILE")
    p.set_defaults(func=_cmd_budget)

    p = sub.add_parser("tune", help="fine-tune only the projector on VisionZip tokens (LLaVA-format data)")
    p.add_argument("--model", default="tiny", help="a LLaVA-1.5 model: 'tiny', a local folder, or a hub id")
    p.add_argument("--data", required=True, help="LLaVA-format conversations JSON (`vzedge make-data` writes one)")
    p.add_argument("--images", required=True, help="folder the records' 'image' paths are relative to")
    p.add_argument("--out", required=True, help="folder for projector.safetensors, tune_config.json, loss.png")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--lr", type=float, default=2e-5, help="peak learning rate (tiny models: ~1e-3)")
    p.add_argument("--batch", type=int, default=4, help="samples per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-length", type=int, default=2048, help="longest tokenized conversation kept")
    p.add_argument("--quant", default="none", help="load the LLM quantized: none, int8, nf4, fp4")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--missing-images", choices=("error", "skip"), default="error", help="records with no image")
    p.add_argument("--save-every", type=int, default=50, help="optimizer steps between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--force", action="store_true", help="replace another run in --out")
    p.add_argument("--revision", default=None, help="hub revision to load")
    _add_visionzip_args(p)
    p.set_defaults(func=_cmd_tune)

    p = sub.add_parser("make-data", help="write synthetic LLaVA-format VQA (data.json + images/) for tune and eval")
    p.add_argument("--out", required=True, help="folder to create")
    p.add_argument("--n", type=int, default=1000, help="samples")
    p.add_argument("--split", choices=("train", "test"), default="train")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=224, help="image size in pixels")
    p.set_defaults(func=_cmd_make_data)
    return parser


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args))
    except (ValueError, TypeError, FileExistsError, ImportError) as err:
        print(f"vzedge {args.command}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run(argv))
