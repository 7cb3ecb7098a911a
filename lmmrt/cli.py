"""The `lmmrt` command: info, convert, generate, classify, demo, build-kernels.

Only the standard library is imported here at module level: torch and the rest of lmmrt are imported
inside the command functions, so `lmmrt --help` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import stat
import sys
import warnings

_PYTHON_SHOWWARNING = warnings.showwarning
# Errors that lmmrt raises on purpose (CheckpointError is a ValueError, an existing output a
# FileExistsError, a missing optional package an ImportError): their message is the whole story.
USER_ERRORS = (ValueError, TypeError, ImportError, OSError)
EXIT_ERROR = 2  # an lmmrt error: bad input, a bad file, a missing package
EXIT_UNEXPECTED = 1  # anything else, probably a bug
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: the reader of the output went away (`| head`)
TRACEBACK_ENV = "LMMRT_TRACEBACK"
# The names lmmrt.kernels.backend.BACKENDS and lmmrt.api.parse_dtype accept, spelled out here so that the
# parser checks them without importing torch (tests/test_cli.py checks that the lists agree).
BACKEND_NAMES = ("auto", "torch", "triton", "cuda")
DTYPE_NAMES = ("float32", "fp32", "float16", "fp16", "half", "bfloat16", "bf16")


def _number(kind, rule: str, ok):
    """An argparse type: an int or a finite float for which ok(value) holds, `rule` saying what is allowed."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number {rule}, got {text}")
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value
    return parse


COUNT = _number(int, ">= 0", lambda v: v >= 0)
POSITIVE_INT = _number(int, ">= 1", lambda v: v >= 1)
TOKEN_ID = _number(int, "a token id >= 0", lambda v: v >= 0)


DTYPE_OPTION = dict(default=None, type=str.lower, choices=DTYPE_NAMES, metavar="float32|float16|bfloat16")
BACKEND_OPTION = dict(default=None, type=str.lower, choices=BACKEND_NAMES, metavar="auto|torch|triton|cuda",
                      help="which kernels the ops use; auto: the fastest available on the device "
                           "(default: $LMMRT_BACKEND, else auto)")


class Parser(argparse.ArgumentParser):
    """argparse, except that a bad command line is one `lmmrt: error:` line pointing at the help (argparse
    prints the whole usage first), like every other lmmrt error; the exit status stays 2."""

    def error(self, message):
        self.exit(EXIT_ERROR, f"lmmrt: error: {message} (see `{self.prog} --help`)\n")


def _bool(v: str) -> bool:
    if v.lower() in ("true", "1", "yes"):
        return True
    if v.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {v!r}")


def input_file(path: str, what: str) -> str:
    """`path` if it is a readable regular file, else an error saying what it is instead (checked before
    any model is loaded: a typo must not cost the load of a 9B checkpoint)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise FileNotFoundError(f"{what} {path} is a broken symlink (to {os.readlink(path)}, "
                                    "which does not exist)") from None
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OSError(f"{what} {path} is a symlink loop: following it never reaches a file") from None
        raise OSError(f"cannot access {what} {path}: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(f"{what} {path} is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):  # a FIFO or a device would block or never end
        raise OSError(f"{what} {path} is not a regular file")
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise OSError(f"cannot read {what} {path}: {e.strerror}") from None
    return path


def _cmd_info(args) -> int:
    import json

    import lmmrt

    if args.json:
        print(json.dumps(lmmrt.info(args.backend), indent=2))
    else:
        print(lmmrt.info_text(args.backend))
    return 0


def _cmd_build_kernels(args) -> int:
    from lmmrt.kernels.cuda_jit import nvrtc_build

    supported = nvrtc_build.supported_archs()
    bad = [a for a in args.arch if a not in supported]
    if bad:
        raise ValueError(f"--arch {' '.join(map(str, bad))}: this NVRTC compiles for {' '.join(map(str, supported))}")
    cache_dir = args.cache_dir or nvrtc_build.default_cache_dir()
    nvrtc_build.make_cache_dir(cache_dir)  # storing the kernels is the point: an unusable directory fails first
    print(f"NVRTC {'.'.join(map(str, nvrtc_build.nvrtc_version()))}, cache {cache_dir}; registers and spills "
          "from ptxas -v (NVRTC -Xptxas=-v log)")
    for r in nvrtc_build.build_all(args.arch, cache_dir=cache_dir):
        how = "cached" if r.cached else f"compiled in {r.seconds:.1f} s"
        print(f"sm_{r.arch} {r.group}: cubin {len(r.cubin)} bytes, {len(r.entries)} kernels ({how})")
        for key, entry in r.entries.items():
            res = r.resources.get(entry)
            stats = (f"{res['registers']:3d} registers, spills {res['spill_stores']}/{res['spill_loads']} bytes "
                     f"(stores/loads), smem {res['smem']} bytes") if res else "no ptxas report"
            print(f"  {key:36s} {stats}")
    return 0


def _cmd_convert_idefics(args) -> int:
    from lmmrt.api import parse_dtype
    from lmmrt.convert.idefics import convert_idefics

    out = convert_idefics(args.src, args.out, dtype=parse_dtype(args.dtype), image_token_id=args.image_token_id,
                          progress=not args.quiet, force=args.force)
    print(f"wrote {out}")
    return 0


def _load_image(path: str):
    from PIL import Image

    input_file(path, "image file")
    try:
        with Image.open(path) as im:
            im.load()
            image = im.copy()  # unconverted: the library makes it RGB as the checkpoint's family does (alpha)
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, DecompressionBombError, ...)
        raise ValueError(f"cannot read image {path}: {e}") from None
    from lmmrt.runtime.processor import check_pil_mode

    check_pil_mode(image, f"image {path}")  # e.g. 16-bit: refused as the API refuses it, before the load
    return image


def _cmd_demo(args) -> int:
    from lmmrt.api import parse_device
    from lmmrt.demo import run_demo, save_demo

    if args.save:
        from lmmrt.runtime.checkpoint_writer import check_output_path

        check_output_path(args.save, force=args.force)  # an existing DIR is refused before any work is shown
        print(f"building the demo model and writing it to {args.save} ...", flush=True)
        print(f"wrote {save_demo(args.save, force=args.force)}")
        return 0
    parse_device(args.device, option="--device")
    run_demo(device=args.device, max_new_tokens=args.max_new_tokens, backend=args.backend)
    return 0


# name -> (help, function adding the arguments, handler); converters for other formats add here.
CONVERTERS: dict = {}


def _add_idefics(p):
    p.add_argument("src", help="a transformers IdeficsForVisionText2Text directory: config.json, the safetensors "
                   "weights (one file or sharded) and tokenizer.json. The tokenizer.json is copied into the output; "
                   "without one the converted model takes prompts as token ids only (the Python API), not text")
    p.add_argument("out", help="output directory (lmmrt format); must not exist unless --force")
    p.add_argument("--dtype", **DTYPE_OPTION, help="store weights in this dtype (default: as in the source)")
    p.add_argument("--image-token-id", type=TOKEN_ID, default=None,
                   help="id of the <image> marker, needed only without tokenizer.json "
                        "(default: IDEFICS's convention, the last additional token)")


CONVERTERS["idefics"] = ("convert a transformers IDEFICS checkpoint", _add_idefics, _cmd_convert_idefics)


def _add_openflamingo(p):
    p.add_argument("out", help="output directory (lmmrt format); must not exist unless --force")
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
    p.add_argument("out", help="output directory (lmmrt format); must not exist unless --force")
    p.add_argument("--tokenizer", default=None, help="a tokenizer.json to put in the output (open_clip files have "
                   "none: e.g. the one of openai/clip-vit-base-patch32); default: the source directory's")
    p.add_argument("--act", default=None, choices=["quick_gelu", "gelu"],
                   help="open_clip files only, which do not record it: the activation (default: quick_gelu, as "
                        "OpenAI's weights use)")
    p.add_argument("--dtype", **DTYPE_OPTION, help="store weights in this dtype (default: as in the source)")


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


def _add_llava(p):
    p.add_argument("src", help="a transformers LlavaForConditionalGeneration directory (LLaVA-1.5): config.json, "
                   "the weights (safetensors, one file or sharded, or pytorch_model*.bin), tokenizer.json (given an "
                   "<image> token when it has none) and, when present, the chat template (kept)")
    p.add_argument("out", help="output directory (lmmrt format); must not exist unless --force")
    p.add_argument("--dtype", **DTYPE_OPTION, help="store weights in this dtype (default: as in the source)")


def _cmd_convert_llava(args) -> int:
    from lmmrt.api import parse_dtype
    from lmmrt.convert.llava import convert_llava

    out = convert_llava(args.src, args.out, dtype=parse_dtype(args.dtype), progress=not args.quiet, force=args.force)
    print(f"wrote {out}")
    return 0


CONVERTERS["llava"] = ("convert a transformers LLaVA-1.5 checkpoint (LlavaForConditionalGeneration)", _add_llava,
                       _cmd_convert_llava)


def _add_blip2(p):
    p.add_argument("src", help="a transformers Blip2ForConditionalGeneration directory with an OPT language model "
                   "(Flan-T5 ones are refused): config.json, the weights (safetensors, one file or sharded, or "
                   "pytorch_model*.bin), tokenizer.json (given an <image> token when it has none) and "
                   "preprocessor_config.json (image mean/std) when present")
    p.add_argument("out", help="output directory (lmmrt format); must not exist unless --force")
    p.add_argument("--dtype", **DTYPE_OPTION, help="store weights in this dtype (default: as in the source)")


def _cmd_convert_blip2(args) -> int:
    from lmmrt.api import parse_dtype
    from lmmrt.convert.blip2 import convert_blip2

    out = convert_blip2(args.src, args.out, dtype=parse_dtype(args.dtype), progress=not args.quiet, force=args.force)
    print(f"wrote {out}")
    return 0


CONVERTERS["blip2"] = ("convert a transformers BLIP-2 checkpoint with OPT (Blip2ForConditionalGeneration)",
                       _add_blip2, _cmd_convert_blip2)


def _add_minigpt4(p):
    p.add_argument("out", help="output directory (lmmrt format); must not exist unless --force")
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


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to an option's help, except where there is no default worth printing (None,
    False, an empty list: the help says in words what happens) or the help already gives it."""

    def _get_help_string(self, action):
        d = action.default
        if d is None or d is False or d == [] or d is argparse.SUPPRESS or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="lmmrt", description="lmmrt - a kernel-optimized inference runtime for multimodal models: "
               "Flamingo-style (IDEFICS, OpenFlamingo), splice models (LLaVA-1.5, BLIP-2 with OPT, MiniGPT-4) and "
               "CLIP. `lmmrt convert --help` lists the checkpoint formats it reads.",
                                epilog=f"Errors are one line; set {TRACEBACK_ENV}=1 to see the traceback of an "
                                "unexpected one.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    s = sub.add_parser("info", help="what was built, library versions, the GPU, which kernel each op uses",
                       description="print what was built (the CUDA extension, the NVRTC kernels), the versions of "
                       "python, torch and triton, the GPU, and which implementation each op uses",
                       formatter_class=HelpFormatter)
    s.add_argument("--backend", **BACKEND_OPTION)
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(fn=_cmd_info)

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

    from lmmrt.cli_clip import add_classify  # imported here: these read this module's options
    from lmmrt.cli_generate import add_generate

    add_generate(sub)
    add_classify(sub)

    s = sub.add_parser("demo", help="run the embedded random-weight model end to end (no download)",
                       description="run the embedded demo model - a small IDEFICS-style model with random weights "
                       "and a character-level tokenizer, built in code - end to end on two images made in code; its "
                       "text is meaningless. --save writes it as a checkpoint for the other commands",
                       formatter_class=HelpFormatter)
    s.add_argument("--device", default=None, help="cuda|cuda:N|cpu (default: cuda when available)")
    s.add_argument("--backend", **BACKEND_OPTION)
    s.add_argument("--max-new-tokens", type=COUNT, default=32, help="tokens to generate")
    s.add_argument("--save", metavar="DIR", default=None,
                   help="write the demo model as an lmmrt checkpoint to DIR instead of running it")
    s.add_argument("--force", action="store_true", help="with --save: replace an existing DIR")
    s.set_defaults(fn=_cmd_demo)

    s = sub.add_parser("build-kernels", help="compile the CUDA kernels with NVRTC into the kernel cache (no GPU "
                       "needed), reporting cubin sizes, registers and spills",
                       description="compile lmmrt's CUDA kernels with NVRTC (through CuPy: pip install "
                       "\"lmmrt[cupy]\" first) into the kernel cache, for a machine without nvcc; no GPU needed. "
                       "Prints each cubin's size and each kernel's registers, spills and shared memory",
                       formatter_class=HelpFormatter)
    s.add_argument("--arch", type=POSITIVE_INT, nargs="+", default=[80, 90], metavar="SM",
                   help="compute capabilities to compile for, e.g. 80 90")
    s.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="kernel cache to fill (default: $LMMRT_KERNEL_CACHE, else ~/.cache/lmmrt/kernels)")
    s.set_defaults(fn=_cmd_build_kernels)
    return p


def cli_wording(e: BaseException) -> str:
    """An lmmrt error's message, with the Python API's keyword for an existing output said as the option."""
    text = str(e) or type(e).__name__
    if isinstance(e, FileExistsError):
        text = text.replace("pass force=True (--force)", "pass --force").replace("even with force", "even with --force")
    return text


def describe_error(e: BaseException) -> str:
    """One line for an exception that is not one of lmmrt's own: its type, and what the library said."""
    if type(e).__name__ == "SafetensorError":  # safetensors' one class for unreadable and unwritable files
        return f"safetensors: {e}"
    return f"{type(e).__name__}: {e} (unexpected; set {TRACEBACK_ENV}=1 to see where)"


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """lmmrt's own warnings as one `lmmrt: warning:` line, not Python's `file:line: UserWarning:` and the
    source line; other libraries' warnings as Python shows them."""
    if os.path.abspath(filename).startswith(os.path.dirname(os.path.abspath(__file__)) + os.sep):
        print(f"lmmrt: warning: {message}", file=sys.stderr if file is None else file)
    else:
        _PYTHON_SHOWWARNING(message, category, filename, lineno, file, line)


def main(argv=None) -> int:
    """Run the command; every error is one `lmmrt: error:` line on stderr and an exit status, never a traceback
    (unless $LMMRT_TRACEBACK is set)."""
    show_traceback = os.environ.get(TRACEBACK_ENV, "") not in ("", "0")
    try:
        args = build_parser().parse_args(argv)
        with warnings.catch_warnings():  # restores showwarning afterwards (tests call main repeatedly)
            warnings.showwarning = _show_warning
            status = args.fn(args)
        sys.stdout.flush()  # here, so that a closed pipe is reported below, not at interpreter exit
        return status
    except KeyboardInterrupt:
        print("\nlmmrt: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # nothing more to say: the reader left
        sys.stdout = open(os.devnull, "w")  # so the interpreter's final flush does not fail again
        return EXIT_BROKEN_PIPE
    except USER_ERRORS as e:
        if show_traceback:
            raise
        print(f"lmmrt: error: {cli_wording(e)}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:
        if show_traceback:
            raise
        print(f"lmmrt: error: {describe_error(e)}", file=sys.stderr)
        return EXIT_UNEXPECTED


if __name__ == "__main__":
    raise SystemExit(main())
