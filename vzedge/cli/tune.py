"""`vzedge tune, make-data`: projector tuning on VisionZip tokens and its synthetic data."""

from __future__ import annotations

import argparse

from vzedge.cli._common import add_visionzip_args, progress_bar, visionzip_config


def _cmd_tune(args: argparse.Namespace) -> int:
    from vzedge._deps import PLOT_HINT
    from vzedge.tune import TuneConfig, tune
    from vzedge.tune.config import PLOT_FILE

    cfg = TuneConfig(
        model=args.model,
        data=args.data,
        images=args.images,
        out=args.out,
        visionzip=visionzip_config(args),
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
    with progress_bar(None) as progress:
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
    plotted = (result.out / PLOT_FILE).is_file()
    print(
        f"wrote {result.out}: projector.safetensors, tune_config.json{', loss.png' if plotted else ''} "
        f"({t['steps']} steps, final loss {t['final_loss']:.4f}{before}, {t['seconds']:.0f} s)"
    )
    if not plotted:
        print(f"{PLOT_FILE} skipped: matplotlib is not installed ({PLOT_HINT})")
    return 0


def _cmd_make_data(args: argparse.Namespace) -> int:
    from vzedge.images import ImageLimits
    from vzedge.tune import make_data

    limits = ImageLimits(max_pixels=args.max_image_pixels)
    path = make_data(
        args.out, n=args.n, split=args.split, seed=args.seed, size=args.size, variant=args.variant, limits=limits
    )
    print(f"wrote {path}: use --data {path} --images {args.out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
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
    add_visionzip_args(p)
    p.set_defaults(func=_cmd_tune)

    p = sub.add_parser("make-data", help="write synthetic LLaVA-format VQA (data.json + images/) for tune and eval")
    p.add_argument("--out", required=True, help="folder to create")
    p.add_argument("--n", type=int, default=1000, help="samples")
    p.add_argument("--split", choices=("train", "test"), default="train")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=224, help="image size in pixels")
    p.add_argument(
        "--max-image-pixels", type=int, default=4096 * 4096, help="largest --size x --size allowed (default 4096^2)"
    )
    p.add_argument(
        "--variant",
        choices=("standard", "small"),
        default="standard",
        help="small: only questions about one small region (a small shape's colour or kind, the word), "
        "what `eval --data synth-small` reads",
    )
    p.set_defaults(func=_cmd_make_data)
