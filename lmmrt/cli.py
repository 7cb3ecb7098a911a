"""The `lmmrt` command: info, convert, generate, demo."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _cmd_info(args) -> int:
    import json

    import lmmrt

    if args.json:
        print(json.dumps(lmmrt.info(args.backend), indent=2))
    else:
        print(lmmrt.info_text(args.backend))
    return 0


def _cmd_convert_idefics(args) -> int:
    from lmmrt.api import parse_dtype
    from lmmrt.convert.idefics import convert_idefics

    out = convert_idefics(args.src, args.out, dtype=parse_dtype(args.dtype), image_token_id=args.image_token_id,
                          progress=not args.quiet)
    print(f"wrote {out}")
    return 0


def _load_image(path: str):
    from PIL import Image

    try:
        return Image.open(path).convert("RGB")
    except FileNotFoundError:
        raise SystemExit(f"lmmrt: image file not found: {path}") from None
    except Exception as e:
        raise SystemExit(f"lmmrt: cannot read image {path}: {e}") from None


def _cmd_generate(args) -> int:
    import lmmrt
    from lmmrt.api import parse_device, parse_dtype

    # Everything that can be checked without the model is checked first: a typo must not cost a
    # full load of a 9B checkpoint.
    images = [_load_image(p) for p in args.image]
    if args.video:
        if images:
            raise ValueError("--video and --image cannot be combined; pass one or the other")
        if not Path(args.video).is_file():
            raise FileNotFoundError(f"video file not found: {args.video}")
    parse_dtype(args.dtype)
    parse_device(args.device)
    prompt = args.prompt.replace("\\n", "\n")  # a shell gives "\\n" for \n inside double quotes
    model = lmmrt.load(args.model, device=args.device, dtype=args.dtype, backend=args.backend,
                       progress=not args.quiet)
    if args.video:
        prompt, images = lmmrt.video_prompt(model, args.video, prompt, mode=args.video_mode, fps=args.fps,
                                            max_frames=args.max_frames)
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
              top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
              stop=args.stop or None, ignore_eos=args.ignore_eos)
    if args.stream:
        for piece in lmmrt.generate(model, prompt, images, stream=True, **kw):
            print(piece, end="", flush=True)
        print()
    else:
        out = lmmrt.generate(model, prompt, images, **kw)
        print(out[0].text)
    s = model.last_stats
    if s is not None and not args.quiet:
        print(f"[{s.summary()}]", file=sys.stderr)
    return 0


def _cmd_demo(args) -> int:
    from lmmrt.demo import run_demo, save_demo

    if args.save:
        print(f"wrote {save_demo(args.save)}")
        return 0
    run_demo(device=args.device, max_new_tokens=args.max_new_tokens, backend=args.backend)
    return 0


# name -> (help, function adding the arguments, handler); converters for other formats add here.
CONVERTERS: dict = {}


def _add_idefics(p):
    p.add_argument("src", help="transformers IdeficsForVisionText2Text directory (config.json + safetensors)")
    p.add_argument("out", help="output directory (lmmrt format)")
    p.add_argument("--dtype", default=None, help="store weights as float32|float16|bfloat16 (default: as in source)")
    p.add_argument("--image-token-id", type=int, default=None,
                   help="id of the <image> marker when the directory has no tokenizer.json "
                        "(default: IDEFICS's convention, the last additional token)")


CONVERTERS["idefics"] = ("convert a transformers IDEFICS checkpoint", _add_idefics, _cmd_convert_idefics)


def _bool(v: str) -> bool:
    if v.lower() in ("true", "1", "yes"):
        return True
    if v.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {v!r}")


def _add_openflamingo(p):
    p.add_argument("out", help="output directory (lmmrt format)")
    p.add_argument("--checkpoint", required=True, help="OpenFlamingo checkpoint.pt (read with weights_only=True)")
    p.add_argument("--lm", required=True, help="the base language model: a transformers directory "
                   "(MptForCausalLM, GPTNeoXForCausalLM or LlamaForCausalLM; tokenizer.json used when present)")
    p.add_argument("--vision", required=True, help="CLIP weights: an open_clip state dict (.safetensors, .bin, .pt) "
                   "or a transformers CLIPVisionModel/CLIPModel directory")
    p.add_argument("--cross-attn-every-n-layers", type=int, default=None,
                   help="OpenFlamingo's cross_attn_every_n_layers (3B: 1, 4B: 2, 9B: 4); default: inferred from "
                        "the gated blocks in the checkpoint")
    p.add_argument("--only-attend-immediate-media", type=_bool, default=True, metavar="true|false",
                   help="mask mode: true (OpenFlamingo's default) = each token sees its latest image only; "
                        "false = all preceding images")
    p.add_argument("--dtype", default=None, help="store weights as float32|float16|bfloat16 (default: the LM's dtype)")
    p.add_argument("--vision-act", default=None, choices=["quick_gelu", "gelu"],
                   help="CLIP activation (default: quick_gelu for open_clip files, as OpenAI's ViT-L/14 uses; "
                        "hidden_act for a transformers directory)")
    p.add_argument("--image-token-id", type=int, default=None, help="<image> id (only needed without tokenizer.json)")
    p.add_argument("--eoc-token-id", type=int, default=None,
                   help="<|endofchunk|> id (only needed without tokenizer.json)")


def _cmd_convert_openflamingo(args) -> int:
    from lmmrt.api import parse_dtype
    from lmmrt.convert.openflamingo import convert_openflamingo

    out = convert_openflamingo(args.checkpoint, args.lm, args.vision, args.out,
                               cross_attn_every_n_layers=args.cross_attn_every_n_layers,
                               only_attend_immediate_media=args.only_attend_immediate_media,
                               dtype=parse_dtype(args.dtype), vision_act=args.vision_act,
                               image_token_id=args.image_token_id, eoc_token_id=args.eoc_token_id,
                               progress=not args.quiet)
    print(f"wrote {out}")
    return 0


CONVERTERS["openflamingo"] = ("convert an OpenFlamingo checkpoint.pt with its LM and CLIP weights",
                              _add_openflamingo, _cmd_convert_openflamingo)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmmrt", description="lmmrt - a kernel-optimized inference runtime for "
                                "Flamingo-style multimodal models (IDEFICS, OpenFlamingo).")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    s = sub.add_parser("info", help="what was built, library versions, the GPU, which kernel each op uses")
    s.add_argument("--backend", default=None, help="torch|triton|cuda|auto (default: $LMMRT_BACKEND or auto)")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(fn=_cmd_info)

    s = sub.add_parser("convert", help="convert a public checkpoint into lmmrt's format")
    csub = s.add_subparsers(dest="format", required=True, metavar="FORMAT")
    for name, (help_, add_args, fn) in CONVERTERS.items():
        c = csub.add_parser(name, help=help_)
        add_args(c)
        c.add_argument("--quiet", action="store_true", help="no progress bar")
        c.set_defaults(fn=fn)

    s = sub.add_parser("generate", help="generate text from a prompt with interleaved images")
    s.add_argument("model", help="lmmrt checkpoint directory (from `lmmrt convert`), or a transformers IDEFICS "
                   "directory (converted in memory)")
    s.add_argument("--prompt", "-p", required=True,
                   help="prompt text; write <image> where each image goes; \\n is a newline")
    s.add_argument("--image", "-i", action="append", default=[], help="image file, once per <image> marker, in order")
    s.add_argument("--video", default=None, help="a video file (PyAV); write {video} in the prompt where it goes "
                   "(default: at the start)")
    s.add_argument("--fps", type=float, default=1.0, help="video frames sampled per second (default 1)")
    s.add_argument("--max-frames", type=int, default=8, help="at most this many video frames (default 8)")
    s.add_argument("--video-mode", choices=["frames", "clip"], default=None,
                   help="frames: one media item per frame; clip: one item of F frames (checkpoints with frame "
                        "embeddings); default: clip when supported")
    s.add_argument("--max-new-tokens", type=int, default=64)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--repetition-penalty", type=float, default=1.0)
    s.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    s.add_argument("--ignore-eos", action="store_true")
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--stream", action="store_true", help="print text as it is generated")
    s.add_argument("--device", default=None, help="cuda|cpu (default: cuda when available)")
    s.add_argument("--dtype", default=None, help="float32|float16|bfloat16 (default: as stored)")
    s.add_argument("--backend", default=None, help="torch|triton|cuda|auto")
    s.add_argument("--quiet", action="store_true", help="no progress bar and no timings on stderr")
    s.set_defaults(fn=_cmd_generate)

    s = sub.add_parser("demo", help="run the embedded random-weight model end to end (no download)")
    s.add_argument("--device", default=None, help="cuda|cpu (default: cuda when available)")
    s.add_argument("--backend", default=None, help="torch|triton|cuda|auto (default: $LMMRT_BACKEND or auto)")
    s.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    s.add_argument("--save", metavar="DIR", default=None,
                   help="write the demo model as an lmmrt checkpoint to DIR instead of running it")
    s.set_defaults(fn=_cmd_demo)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, TypeError, ImportError, OSError) as e:  # OSError: missing/existing files
        print(f"lmmrt: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
