"""python -m pearlmoe.train --preset tiny-target|tiny-draft: train a preset and export it (by
default into the package's embedded/ directory, which is what the `pearlmoe` command loads)."""

import argparse
import json
import sys
from pathlib import Path

import torch

from .presets import EMBEDDED, PRESETS, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pearlmoe.train", description=__doc__)
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--out", type=Path, help=f"export directory (default {EMBEDDED}/PRESET)")
    parser.add_argument(
        "--work", type=Path, help="checkpoint directory (default build/train/PRESET)"
    )
    parser.add_argument("--steps", type=int, help="override the preset's step count")
    parser.add_argument("--teacher", type=Path, help="the draft's teacher (default: embedded)")
    parser.add_argument("--resume", action="store_true", help="continue from --work's checkpoint")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    try:
        report = run(args.preset, args.out, args.work, args.steps, args.device, args.resume,
                     args.teacher)  # fmt: skip
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in report.items() if k != "train"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
