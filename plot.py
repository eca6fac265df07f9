"""Draw training curves: loss, learning rate, tokens/s, gradient norm and each stage's own metrics.

    python plot.py checkpoint/pretrain                        # -> checkpoint/pretrain/curves.png
    python plot.py checkpoint/pretrain runs/lr1e-3 --out compare.png --x tokens

Several runs are overlaid (a colour per run). Each training stage writes its own curves.png when it
finishes; this redraws them, or compares runs.
"""

import argparse
import sys

from plots import draw_runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (checkpoints) with a metrics.jsonl")
    parser.add_argument("--out", default="", help="the PNG to write (default: RUN_DIR/curves.png for one run, "
                                                  "curves.png for several)")
    parser.add_argument("--x", choices=("steps", "tokens"), default="steps",
                        help="horizontal axis: optimizer steps or tokens seen (default: steps)")
    args = parser.parse_args(argv)
    out = args.out or (f"{args.runs[0]}/curves.png" if len(args.runs) == 1 else "curves.png")
    try:
        print(f"wrote {draw_runs(args.runs, out, args.x)}")
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
