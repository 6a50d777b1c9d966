"""`vzedge budget`: predict (and check) peak memory on a device."""

from __future__ import annotations

import argparse


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
        vision_export=args.vision,
    )
    if args.json:
        from vzedge.io import check_writable_file

        check_writable_file(args.json, "--json")
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


def register(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument(
        "--vision",
        default=None,
        metavar="DIR",
        help="an export folder: the vision graph's dtype and size come from its manifest (means --vision-backend ort)",
    )
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
