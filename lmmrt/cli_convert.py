"""`lmmrt convert FORMAT`: the checkpoint converters' options and handlers, one entry of CONVERTERS each.

Only the standard library at module level, like lmmrt.cli (the parser is built for `lmmrt --help`); each
converter is imported when its command runs.
"""

from __future__ import annotations

import importlib

from lmmrt.cli_options import DTYPE_OPTION, POSITIVE_INT, TOKEN_ID, HelpFormatter, _bool, input_file

# name -> (help, function adding the arguments, handler); converters for other formats add here.
CONVERTERS: dict = {}
OUT_HELP = "output directory (lmmrt format); must not exist unless --force"
DTYPE_AS_SOURCE_HELP = "store weights in this dtype (default: as in the source)"


def _add_idefics(p):
    p.add_argument("src", help="a transformers IdeficsForVisionText2Text directory: config.json, the safetensors "
                   "weights (one file or sharded) and tokenizer.json. The tokenizer.json is copied into the output; "
                   "without one the converted model takes prompts as token ids only (the Python API), not text")
    p.add_argument("out", help=OUT_HELP)
    p.add_argument("--dtype", **DTYPE_OPTION, help=DTYPE_AS_SOURCE_HELP)
    p.add_argument("--image-token-id", type=TOKEN_ID, default=None,
                   help="id of the <image> marker, needed only without tokenizer.json "
                        "(default: IDEFICS's convention, the last additional token)")


def _cmd_convert_idefics(args) -> int:
    from lmmrt.api import parse_dtype
    from lmmrt.convert.idefics import convert_idefics

    out = convert_idefics(args.src, args.out, dtype=parse_dtype(args.dtype), image_token_id=args.image_token_id,
                          progress=not args.quiet, force=args.force)
    print(f"wrote {out}")
    return 0


CONVERTERS["idefics"] = ("convert a transformers IDEFICS checkpoint", _add_idefics, _cmd_convert_idefics)


def _add_openflamingo(p):
    p.add_argument("out", help=OUT_HELP)
    p.add_argument("--checkpoint", required=True, help="OpenFlamingo checkpoint.pt (read with weights_only=True)")
    p.add_argument("--lm", required=True, help="the base language model: a transformers directory "
                   "(MptForCausalLM, GPTNeoXForCausalLM or LlamaForCausalLM). Its tokenizer.json is copied into "
                   "the output; without one the converted model takes prompts as token ids only (the Python API)")
    p.add_argument("--vision", required=True, help="CLIP weights: an open_clip state dict (.safetensors, .bin, .pt) "
                   "or a transformers CLIPVisionModel/CLIPModel directory")
    p.add_argument("--cross-attn-every-n-layers", type=POSITIVE_INT, default=None,
                   help="OpenFlamingo's cross_attn_every_n_layers (3B: 1, 4B: 2, 9B: 4); default: inferred from "
                        "the gated blocks in the checkpoint")
    p.add_argument("--only-attend-immediate-media", type=_bool, default=True, metavar="true|false",
                   help="mask mode: true (OpenFlamingo's default) = each token sees its latest image only; "
                        "false = all preceding images")
    p.add_argument("--dtype", **DTYPE_OPTION, help="store weights in this dtype (default: the LM's dtype)")
    p.add_argument("--vision-act", default=None, choices=["quick_gelu", "gelu"],
                   help="CLIP activation (default: quick_gelu for open_clip files, as OpenAI's ViT-L/14 uses; "
                        "hidden_act for a transformers directory)")
    p.add_argument("--image-token-id", type=TOKEN_ID, default=None,
                   help="<image> id (needed only without tokenizer.json)")
    p.add_argument("--eoc-token-id", type=TOKEN_ID, default=None,
                   help="<|endofchunk|> id (needed only without tokenizer.json)")


def _cmd_convert_openflamingo(args) -> int:
    from lmmrt.api import parse_dtype
    from lmmrt.convert.openflamingo import convert_openflamingo

    out = convert_openflamingo(args.checkpoint, args.lm, args.vision, args.out,
                               cross_attn_every_n_layers=args.cross_attn_every_n_layers,
                               only_attend_immediate_media=args.only_attend_immediate_media,
                               dtype=parse_dtype(args.dtype), vision_act=args.vision_act,
                               image_token_id=args.image_token_id, eoc_token_id=args.eoc_token_id,
                               progress=not args.quiet, force=args.force)
    print(f"wrote {out}")
    return 0


CONVERTERS["openflamingo"] = ("convert an OpenFlamingo checkpoint.pt with its LM and CLIP weights",
                              _add_openflamingo, _cmd_convert_openflamingo)


def _add_clip(p):
    p.add_argument("src", help="a transformers CLIPModel directory: config.json, the weights (safetensors, one file or "
                   "sharded, or pytorch_model*.bin), tokenizer.json and preprocessor_config.json when present; or an "
                   "open_clip CLIP state dict file (.safetensors, .bin, .pt). Without a tokenizer the converted model "
                   "embeds images only")
    p.add_argument("out", help=OUT_HELP)
    p.add_argument("--tokenizer", default=None, help="a tokenizer.json to put in the output (open_clip files have "
                   "none: e.g. the one of openai/clip-vit-base-patch32); default: the source directory's")
    p.add_argument("--act", default=None, choices=["quick_gelu", "gelu"],
                   help="open_clip files only, which do not record it: the activation (default: quick_gelu, as "
                        "OpenAI's weights use)")
    p.add_argument("--dtype", **DTYPE_OPTION, help=DTYPE_AS_SOURCE_HELP)


def _cmd_convert_clip(args) -> int:
    from lmmrt.api import parse_dtype
    from lmmrt.convert.clip_model import convert_clip

    if args.tokenizer is not None:
        input_file(args.tokenizer, "tokenizer file")
    out = convert_clip(args.src, args.out, tokenizer=args.tokenizer, dtype=parse_dtype(args.dtype), act=args.act,
                       progress=not args.quiet, force=args.force)
    print(f"wrote {out}")
    return 0


CONVERTERS["clip"] = ("convert a transformers CLIP checkpoint (CLIPModel: image and text towers)", _add_clip,
                      _cmd_convert_clip)


def _src_out_converter(module: str, name: str):
    """The handler of a converter called as name(src, out, dtype=, progress=, force=) and nothing else
    (LLaVA, BLIP-2, Llama 3.2 Vision); the module is imported when the command runs, not for `lmmrt --help`."""
    def run(args) -> int:
        from lmmrt.api import parse_dtype

        convert = getattr(importlib.import_module(module), name)
        out = convert(args.src, args.out, dtype=parse_dtype(args.dtype), progress=not args.quiet, force=args.force)
        print(f"wrote {out}")
        return 0
    return run


def _register_src_out(fmt: str, description: str, src_help: str, module: str, name: str) -> None:
    """A format whose converter takes SRC OUT [--dtype] and nothing else (see _src_out_converter)."""
    def add(p):
        p.add_argument("src", help=src_help)
        p.add_argument("out", help=OUT_HELP)
        p.add_argument("--dtype", **DTYPE_OPTION, help=DTYPE_AS_SOURCE_HELP)

    CONVERTERS[fmt] = (description, add, _src_out_converter(module, name))


_register_src_out(
    "llava", "convert a transformers LLaVA-1.5 checkpoint (LlavaForConditionalGeneration)",
    "a transformers LlavaForConditionalGeneration directory (LLaVA-1.5): config.json, the weights (safetensors, one "
    "file or sharded, or pytorch_model*.bin), tokenizer.json (given an <image> token when it has none) and, when "
    "present, the chat template (kept)",
    "lmmrt.convert.llava", "convert_llava")
_register_src_out(
    "blip2", "convert a transformers BLIP-2 checkpoint with OPT (Blip2ForConditionalGeneration)",
    "a transformers Blip2ForConditionalGeneration directory with an OPT language model (Flan-T5 ones are refused): "
    "config.json, the weights (safetensors, one file or sharded, or pytorch_model*.bin), tokenizer.json (given an "
    "<image> token when it has none) and preprocessor_config.json (image mean/std) when present",
    "lmmrt.convert.blip2", "convert_blip2")
_register_src_out(
    "mllama", "convert a transformers Llama 3.2 Vision checkpoint (MllamaForConditionalGeneration)",
    "a transformers MllamaForConditionalGeneration directory (Llama 3.2 Vision, e.g. Llama-3.2-11B-Vision-Instruct): "
    "config.json, the safetensors weights (one file or sharded), tokenizer.json (its <|image|> token is the image "
    "marker) and, when present, the chat template (kept)",
    "lmmrt.convert.mllama_files", "convert_mllama")


def _add_minigpt4(p):
    p.add_argument("out", help=OUT_HELP)
    p.add_argument("--blip2", required=True, help="a transformers Blip2ForConditionalGeneration directory: its ViT "
                   "and Q-Former (any BLIP-2 LM; the LM itself is not used)")
    p.add_argument("--checkpoint", required=True, help="MiniGPT-4's .pth checkpoint (read with weights_only=True): "
                   "llama_proj.weight/bias under its 'model' key; other tensors in it are ignored")
    p.add_argument("--lm", required=True, help="the Vicuna/LLaMA directory (LlamaForCausalLM) with its "
                   "tokenizer.json (copied; prompts write each image as <ImageHere>) and chat template (kept)")
    p.add_argument("--dtype", **DTYPE_OPTION, help="store weights in this dtype (default: as in the sources)")


def _cmd_convert_minigpt4(args) -> int:
    from lmmrt.api import parse_dtype
    from lmmrt.convert.minigpt4 import convert_minigpt4

    out = convert_minigpt4(args.blip2, args.checkpoint, args.lm, args.out, dtype=parse_dtype(args.dtype),
                           progress=not args.quiet, force=args.force)
    print(f"wrote {out}")
    return 0


CONVERTERS["minigpt4"] = ("convert MiniGPT-4: BLIP-2's ViT and Q-Former, its llama_proj .pth and a Vicuna/LLaMA "
                          "directory", _add_minigpt4, _cmd_convert_minigpt4)


def add_convert(sub) -> None:
    """The `convert` command and one subcommand per entry of CONVERTERS, each with --force and --quiet."""
    s = sub.add_parser("convert", help="convert a public checkpoint into lmmrt's format",
                       description="convert a public checkpoint into lmmrt's format (a directory: config.json, "
                       "model.safetensors, tokenizer.json); `lmmrt convert FORMAT --help` for each format's options")
    csub = s.add_subparsers(dest="format", required=True, metavar="FORMAT")
    for name, (help_, add_args, fn) in CONVERTERS.items():
        c = csub.add_parser(name, help=help_, description=help_, formatter_class=HelpFormatter)
        add_args(c)
        c.add_argument("--force", action="store_true",
                       help="replace an existing output (an lmmrt checkpoint or a file); it stays intact until "
                            "the new one is complete. A source directory is never written")
        c.add_argument("--quiet", action="store_true", help="no progress bar")
        c.set_defaults(fn=fn)
