"""`lmmrt classify`: zero-shot image classification with a CLIP checkpoint.

Like lmmrt.cli, only the standard library at module level (the parser is built for `lmmrt --help`);
torch and the model are imported when the command runs.
"""

from __future__ import annotations

import argparse

from lmmrt.cli import DTYPE_OPTION, HelpFormatter, _load_image

DEFAULT_TEMPLATE = "a photo of a {}."  # lmmrt.runtime.embed.DEFAULT_TEMPLATE, without importing torch


def _label_list(text: str) -> list[str]:
    labels = [s.strip() for s in text.split(",")]
    if not any(labels):
        raise argparse.ArgumentTypeError("no labels given; write them separated by commas, e.g. cat,dog,car")
    if not all(labels):
        raise argparse.ArgumentTypeError(f"an empty label in {text!r}; write labels separated by single commas")
    return labels


def format_table(names: list[str], labels: list[str], probs: list[list[float]]) -> str:
    """One row per image, one column per label, probabilities to 4 decimals."""
    name_w = max(len("image"), *(len(n) for n in names))
    cols = [max(len(lab), 6) for lab in labels]
    lines = ["  ".join(["image".ljust(name_w), *(lab.rjust(w) for lab, w in zip(labels, cols))])]
    for name, row in zip(names, probs):
        lines.append("  ".join([name.ljust(name_w), *(f"{p:.4f}".rjust(w) for p, w in zip(row, cols))]))
    return "\n".join(lines)


def _cmd_classify(args) -> int:
    images = [_load_image(p) for p in args.image]  # checked before the model is loaded

    import lmmrt
    from lmmrt.api import parse_device
    from lmmrt.runtime.embed import label_prompts

    label_prompts(args.labels, args.template)  # bad labels or template: an error before the load
    parse_device(args.device, option="--device")
    model = lmmrt.load(args.model, device=args.device, dtype=args.dtype, progress=not args.quiet)
    if not isinstance(model, lmmrt.ClipRuntime):
        raise ValueError(f"{args.model} is not a CLIP checkpoint: classify needs one made by `lmmrt convert clip`")
    probs = lmmrt.zero_shot(model, images, args.labels, args.template)
    print(format_table(args.image, args.labels, probs.tolist()))
    return 0


def add_classify(sub) -> None:
    """The `classify` subcommand, added to the top-level subparsers."""
    s = sub.add_parser("classify", help="zero-shot image classification with a CLIP checkpoint",
                       description="zero-shot image classification with a CLIP checkpoint: prints, for each "
                       "image, the probability of each label", formatter_class=HelpFormatter)
    s.add_argument("model", metavar="CHECKPOINT", help="lmmrt CLIP checkpoint directory (from `lmmrt convert clip`)")
    s.add_argument("--image", "-i", action="append", required=True, help="image file (repeatable)")
    s.add_argument("--labels", "-l", type=_label_list, required=True, help="labels separated by commas, e.g. cat,dog")
    s.add_argument("--template", default=DEFAULT_TEMPLATE, help="the text each label is put in; {} stands for the label")
    s.add_argument("--device", default=None, help="cuda|cuda:N|cpu (default: cuda when available)")
    s.add_argument("--dtype", **DTYPE_OPTION, help="compute in this dtype (default: as stored)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(fn=_cmd_classify)
