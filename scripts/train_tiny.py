"""Train the built-in `tiny` LLaVA on the synthetic VQA of `vzedge.synth`, on CPU, deterministically.

    python scripts/train_tiny.py --out vzedge/models/weights/tiny

Two stages, full visual tokens throughout (VisionZip is only applied at evaluation):

1. Vision encoder (CLIP-style ViT, CLS token). Objectives on the output of layer -2 (LLaVA's feature
   layer, where VisionZip selects): a CLS head predicts the scene (which colour-shape pairs are
   present, how many of each shape, which word), so the CLS query at that layer has to attend to
   the objects and the text, which is what makes CLS attention a meaningful VisionZip score; a dense
   head predicts each patch's shape, colour, size and word, so patch features carry the content.
2. Projector + Llama from scratch, vision frozen: teacher forcing on multi-turn conversations (up to
   6 questions about one image, so the 256 image tokens are paid once for several answers), loss on
   answer tokens (and their </s>) only. The projector's first layer starts from a data-dependent init
   that centres and whitens the frozen features (see `init_projector`): without it the LLM settled on
   the answer prior and ignored the image for the whole of a 160-step run.

The script writes the folder atomically (config, model.safetensors, tokenizer, processor) plus
training.json with the recipe, wall time and the held-out accuracy per kind at full tokens.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from vzedge import synth
from vzedge.io import atomic_dir
from vzedge.models import adapt_vision_tower
from vzedge.models.clip import CLIP_MEAN, CLIP_STD
from vzedge.models.tiny import PATCH_SIZE, PROMPT_TEMPLATE, TINY_SEED, TRAINED_IMAGE_SIZE, build_tiny

log = logging.getLogger("train_tiny")
STAGE2_OFFSET = 1_000_000  # stage 2 draws train scenes from here on: different images from stage 1


def pixels(images: list, size: int) -> torch.Tensor:
    """What the processor computes for an image already at `size` px (checked in tests/test_tiny_trained.py)."""
    x = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) for im in images])).permute(0, 3, 1, 2) / 255.0
    return (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


class VisionHeads(nn.Module):
    """Training-only heads on layer -2: CLS -> scene labels, patches -> per-patch labels. Not shipped."""

    def __init__(self, d: int) -> None:
        super().__init__()
        n_pairs = len(synth.SHAPES) * len(synth.COLOURS)
        self.n_pairs, self.n_counts = n_pairs, synth.MAX_OBJECTS + 1
        self.cls = nn.Sequential(
            nn.LayerNorm(d), nn.Linear(d, n_pairs + len(synth.SHAPES) * self.n_counts + len(synth.WORDS) + 1)
        )
        self.dense_sizes = (len(synth.SHAPES) + 2, len(synth.COLOURS) + 1, len(synth.SIZES) + 1, len(synth.WORDS) + 1)
        self.dense = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, sum(self.dense_sizes)))

    def losses(self, h: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        c = self.cls(h[:, 0])
        present, rest = c[:, : self.n_pairs], c[:, self.n_pairs :]
        counts = rest[:, : len(synth.SHAPES) * self.n_counts].reshape(-1, self.n_counts)
        word = rest[:, len(synth.SHAPES) * self.n_counts :]
        out = {
            "cls_present": F.binary_cross_entropy_with_logits(present, labels["present"]),
            "cls_counts": F.cross_entropy(counts, labels["counts"].reshape(-1)),
            "cls_word": F.cross_entropy(word, labels["word"]),
        }
        dense = self.dense(h[:, 1:]).split(self.dense_sizes, dim=-1)
        for name, logits in zip(("shape", "colour", "size", "word"), dense, strict=True):
            target = labels[f"p_{name}"].reshape(-1)
            flat = logits.reshape(-1, logits.shape[-1])
            if name == "shape":
                out["patch_shape"] = F.cross_entropy(flat, target)
            else:  # only where the attribute exists, so the ~85% background patches do not drown it
                n = (target > 0).sum().clamp(min=1)
                out[f"patch_{name}"] = F.cross_entropy(flat, target, ignore_index=0, reduction="sum") / n
        with torch.no_grad():
            out["acc_patch_shape"] = (dense[0].argmax(-1) == labels["p_shape"]).float().mean()
            fg = labels["p_shape"] > 0
            out["acc_fg_colour"] = (dense[1].argmax(-1) == labels["p_colour"])[fg].float().mean()
            txt = labels["p_word"] > 0
            out["acc_text_word"] = (dense[3].argmax(-1) == labels["p_word"])[txt].float().mean()
            out["acc_cls_word"] = (word.argmax(-1) == labels["word"]).float().mean()
            out["acc_cls_counts"] = (counts.argmax(-1) == labels["counts"].reshape(-1)).float().mean()
        return out


def layer_minus_2(tower, px: torch.Tensor) -> torch.Tensor:
    """Output of encoder layer -2 (LLaVA's feature layer); the last layer is never computed."""
    x = tower.embed(px)
    for layer in tower.layers[: tower.num_layers - 1]:
        x = layer(x, None)
    return x


def vision_batch(step: int, batch: int, seed: int, size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    scenes = [synth.make_scene(synth.scene_seed(seed, "train", step * batch + i)) for i in range(batch)]
    px = pixels([synth.render(s, size) for s in scenes], size)
    dense = [synth.patch_labels(s, size, PATCH_SIZE) for s in scenes]
    whole = [synth.scene_labels(s) for s in scenes]
    labels = {f"p_{k}": torch.from_numpy(np.stack([d[k] for d in dense])) for k in dense[0]}
    labels.update({k: torch.from_numpy(np.stack([w[k] for w in whole])) for k in whole[0]})
    return px, labels


def train_vision(vlm, args) -> dict[str, float]:
    tower = adapt_vision_tower(vlm.model.vision_tower)
    heads = VisionHeads(tower.hidden_size)
    params = [p for layer in tower.layers[: tower.num_layers - 1] for p in layer.parameters()]
    params += (
        list(vlm.model.vision_tower.vision_model.embeddings.parameters())
        if hasattr(vlm.model.vision_tower, "vision_model")
        else list(vlm.model.vision_tower.embeddings.parameters())
    )
    pre = getattr(tower.module, "pre_layrnorm", None)
    if pre is not None:
        params += list(pre.parameters())
    params += list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=args.vision_lr, weight_decay=0.01)
    t0 = time.perf_counter()
    last: dict[str, float] = {}
    for step in range(args.vision_steps):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, args.vision_steps, args.vision_lr, 20)
        px, labels = vision_batch(step, args.vision_batch, args.seed, args.image_size)
        out = heads.losses(layer_minus_2(tower, px), labels)
        loss = sum(v for k, v in out.items() if not k.startswith("acc_"))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        last = {k: round(float(v.detach()), 4) for k, v in out.items()} | {"loss": round(float(loss.detach()), 4)}
        if step % args.log_every == 0 or step == args.vision_steps - 1:
            log.info("vision %4d/%d %6.0fs %s", step, args.vision_steps, time.perf_counter() - t0, last)
    return last


def conversation(tokenizer, n_image: int, qa: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 except answers and their </s>) of a multi-turn conversation."""
    ids: list[int] = []
    labels: list[int] = []
    for turn, (q, a) in enumerate(qa):
        if turn == 0:
            prompt = tokenizer(PROMPT_TEMPLATE.format(question=q).replace("<image>", "<image>" * n_image)).input_ids
        else:
            prompt = tokenizer(f"USER: {q} ASSISTANT:", add_special_tokens=False).input_ids
        answer = [*tokenizer(f" {a}", add_special_tokens=False).input_ids, tokenizer.eos_token_id]
        ids += prompt + answer
        labels += [-100] * len(prompt) + answer
    return ids, labels


def llm_batch(step: int, args, tokenizer, n_image: int):
    rng = random.Random(args.seed * 7919 + step)
    images, seqs = [], []
    for i in range(args.llm_batch):
        index = STAGE2_OFFSET + args.data_offset + step * args.llm_batch + i
        scene, qa = synth.scene_questions("train", index, args.seed)
        kinds = list(qa)
        rng.shuffle(kinds)
        turns = [qa[k] for k in kinds[: args.turns]]
        # A caption turn at a random place among the questions; no draw at rate 0, so the default recipe's
        # data order is the one the shipped weights were trained on.
        if args.caption_rate > 0 and rng.random() < args.caption_rate:
            turns.insert(rng.randint(0, len(turns)), (synth.CAPTION_QUESTION, synth.caption(scene)))
        images.append(synth.render(scene, args.image_size))
        seqs.append(conversation(tokenizer, n_image, turns))
    width = max(len(s[0]) for s in seqs)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([s[0] + [pad] * (width - len(s[0])) for s in seqs])
    labels = torch.tensor([s[1] + [-100] * (width - len(s[1])) for s in seqs])
    mask = torch.tensor([[1] * len(s[0]) + [0] * (width - len(s[0])) for s in seqs])
    return input_ids, mask, labels, pixels(images, args.image_size)


@torch.no_grad()
def init_projector(vlm, args) -> None:
    """Data-dependent init: centre and whiten the frozen features going into the projector.

    Layer -2 features share a large common component (its norm is ~2.5x the per-patch part), so at a
    random init every image token looks alike to the LLM and it learns the answer prior long before it
    learns to look. Folding the features' mean and per-channel scale into linear_1 (LSUV-style) makes
    patches distinguishable from step 0; the architecture is unchanged.
    """
    px, _ = vision_batch(10_000, 32, args.seed + 1, args.image_size)
    tower = adapt_vision_tower(vlm.model.vision_tower)
    feats = layer_minus_2(tower, px)[:, 1:].reshape(-1, tower.hidden_size)
    mean, std = feats.mean(0), feats.std(0).clamp(min=1e-3)
    lin = vlm.model.multi_modal_projector.linear_1
    lin.weight.div_(std)  # W (x - m) / s = (W / s) x - (W / s) m
    lin.bias.copy_(-(lin.weight @ mean))
    log.info("projector init: feature mean norm %.2f, per-channel std %.2f", float(mean.norm()), float(std.mean()))


def train_llm(vlm, processor, args, init: bool = True) -> dict[str, float]:
    for p in vlm.model.vision_tower.parameters():
        p.requires_grad_(False)
    if init:
        init_projector(vlm, args)
    params = [p for n, p in vlm.named_parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}], lr=args.llm_lr
    )
    n_image = (args.image_size // PATCH_SIZE) ** 2
    t0 = time.perf_counter()
    last: dict[str, float] = {}
    ema = None
    vlm.train()
    vlm.model.vision_tower.eval()
    for step in range(args.llm_steps):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, args.llm_steps, args.llm_lr, 30)
        input_ids, mask, labels, px = llm_batch(step, args, processor.tokenizer, n_image)
        out = vlm(input_ids=input_ids, attention_mask=mask, pixel_values=px, labels=labels)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            pred = out.logits[:, :-1].argmax(-1)
            tgt = labels[:, 1:]
            tok_acc = float((pred == tgt)[tgt != -100].float().mean())
            # Answers are " word</s>": the token after the space is the one that needs the image; the rest
            # of the word mostly follows from it.
            start = (tgt != -100) & (labels[:, :-1] == -100)
            first = torch.zeros_like(start)
            first[:, 1:] = start[:, :-1]
            first_acc = float((pred == tgt)[first].float().mean())
        ema = first_acc if ema is None else 0.9 * ema + 0.1 * first_acc
        last = {
            "loss": round(float(out.loss.detach()), 4),
            "answer_token_acc": round(tok_acc, 4),
            "first_letter_acc": round(first_acc, 4),
            "ema_first_letter_acc": round(ema, 4),
        }
        if step % args.log_every == 0 or step == args.llm_steps - 1:
            log.info("llm    %4d/%d %6.0fs %s", step, args.llm_steps, time.perf_counter() - t0, last)
    vlm.eval()
    return last


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="vzedge/models/weights/tiny")
    ap.add_argument("--seed", type=int, default=0, help="data seed (train split); weights start from TINY_SEED")
    ap.add_argument("--image-size", type=int, default=TRAINED_IMAGE_SIZE)
    ap.add_argument("--vision-steps", type=int, default=1000)
    ap.add_argument("--vision-batch", type=int, default=16)
    ap.add_argument("--vision-lr", type=float, default=3e-3)
    ap.add_argument("--llm-steps", type=int, default=1100)
    ap.add_argument("--llm-batch", type=int, default=16)
    ap.add_argument("--llm-lr", type=float, default=3e-3)
    ap.add_argument("--turns", type=int, default=6, help="questions per image in one training conversation")
    ap.add_argument(
        "--caption-rate",
        type=float,
        default=0.0,
        help="share of stage-2 conversations with a caption turn (tried at 0.5: no gain, see the README)",
    )
    ap.add_argument("--vision-from", default=None, help="take the stage-1 vision tower from a folder (skips stage 1)")
    ap.add_argument("--eval-n", type=int, default=300, help="held-out test questions for the final accuracy")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--force", action="store_true", help="replace an existing --out folder")
    ap.add_argument("--resume", default=None, help="continue stage 2 from a folder this script wrote (skips stage 1)")
    ap.add_argument("--data-offset", type=int, default=0, help="start stage-2 scenes here (use new scenes on resume)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    # Deterministic kernels on CPU: same seed, same machine type -> same weights.
    torch.use_deterministic_algorithms(True)

    t0, cpu0 = time.perf_counter(), time.process_time()
    previous = None
    if args.resume:
        # Continue stage 2 of a saved run (its vision tower stays as trained there).
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        vlm = LlavaForConditionalGeneration.from_pretrained(args.resume, local_files_only=True)
        processor = AutoProcessor.from_pretrained(args.resume, local_files_only=True)
        previous = json.loads((Path(args.resume) / "training.json").read_text())
        vision_last = previous["final_train_metrics"]["vision"]
        args.image_size = vlm.config.vision_config.image_size
    elif args.vision_from:
        # Recipe experiments: a previous run's stage-1 tower, a fresh projector and LLM.
        from transformers import LlavaForConditionalGeneration

        vlm, processor = build_tiny(TINY_SEED, image_size=args.image_size)
        donor = LlavaForConditionalGeneration.from_pretrained(args.vision_from, local_files_only=True)
        vlm.model.vision_tower.load_state_dict(donor.model.vision_tower.state_dict())
        previous_vision = json.loads((Path(args.vision_from) / "training.json").read_text())
        vision_last = {"from": args.vision_from, **previous_vision["final_train_metrics"]["vision"]}
    else:
        vlm, processor = build_tiny(TINY_SEED, image_size=args.image_size)
        vision_last = train_vision(vlm, args)
    t_vision = time.perf_counter() - t0
    llm_last = train_llm(vlm, processor, args, init=previous is None)
    t_train, cpu_train = time.perf_counter() - t0, time.process_time() - cpu0
    log.info("trained in %.0f s (vision %.0f s)", t_train, t_vision)

    from vzedge.eval import evaluate_full_tokens

    acc = evaluate_full_tokens(vlm, processor, synth.samples("test", args.eval_n, seed=args.seed))
    log.info("held-out accuracy at full tokens: %s", acc)
    record = {
        "recipe": {k: v for k, v in vars(args).items() if k not in ("out", "force", "log_every")},
        "init_seed": TINY_SEED,
        # Wall time on a shared machine overstates the cost; CPU seconds (all threads) are the compute.
        "seconds": {"vision": round(t_vision, 1), "total": round(t_train, 1), "cpu": round(cpu_train, 1)},
        "torch": torch.__version__,
        "threads": args.threads,
        "final_train_metrics": {"vision": vision_last, "llm": llm_last},
        "test_accuracy_full_tokens": acc,
    }
    if previous is not None:
        record["resumed_from"] = previous
        record["seconds"]["total_with_resumed"] = round(t_train + previous["seconds"]["total"], 1)
    out = Path(args.out)
    with atomic_dir(out, replace=args.force) as tmp:
        vlm.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    log.info("wrote %s", out)


if __name__ == "__main__":
    main()
