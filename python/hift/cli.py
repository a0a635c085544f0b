"""`hift demo` (fine-tune MiniLM on Shakespeare genres), `hift plan` and `hift train`."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="hift", description="Hierarchical full-parameter fine-tuning.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="fine-tune all-MiniLM-L6-v2 to tell Shakespeare's comedies, "
                                     "tragedies and histories apart (options: hift demo --help)",
                        add_help=False)
    commands.add_parser("plan", help="predict the peak device memory of a hift run (and of full AdamW "
                                     "and LOMO) from a model config, and hift's host RAM, disk and PCIe "
                                     "traffic per state format and store (options: hift plan --help)",
                        add_help=False)
    commands.add_parser("train", help="fine-tune a model directory on a JSON-lines file or a datasets "
                                      "dataset: text, prompt/completion, chat messages or labelled text "
                                      "(options: hift train --help)",
                        add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        from hift.demo.run import main as demo_main

        return demo_main(rest) or 0
    if args.command == "plan":
        from hift.plan.run import main as plan_main

        return plan_main(rest) or 0
    if args.command == "train":
        from hift.train.run import main as train_main

        return train_main(rest)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
