"""Write a split of the synthetic VQA as LLaVA-format data (data.json + images/), e.g. to try
`vzedge eval --data OUT/data.json --images OUT` or to train on it elsewhere.

    python scripts/make_synth.py --out /tmp/synth-test --split test --n 300
"""

from __future__ import annotations

import argparse

from vzedge import synth


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder to create (must not exist)")
    ap.add_argument("--split", choices=synth.SPLITS, default="test")
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=synth.DEFAULT_SIZE, help="image size in pixels")
    args = ap.parse_args()
    print(f"wrote {synth.export_llava(args.out, args.split, args.n, args.seed, args.size)}")


if __name__ == "__main__":
    main()
