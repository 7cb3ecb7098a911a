"""The `lmmrt` command: info, convert, generate, classify, serve, demo, build-kernels.

Only the standard library is imported here at module level: torch and the rest of lmmrt are imported
inside the command functions, so `lmmrt --help` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import warnings

from lmmrt.cli_convert import CONVERTERS as CONVERTERS
from lmmrt.cli_convert import add_convert

# the shared options, also importable from here (lmmrt.cli_generate, lmmrt.cli_clip and tests do)
from lmmrt.cli_options import BACKEND_NAMES as BACKEND_NAMES
from lmmrt.cli_options import BACKEND_OPTION as BACKEND_OPTION
from lmmrt.cli_options import COUNT as COUNT
from lmmrt.cli_options import CUDA_GRAPH_OPTION as CUDA_GRAPH_OPTION
from lmmrt.cli_options import DTYPE_NAMES as DTYPE_NAMES
from lmmrt.cli_options import DTYPE_OPTION as DTYPE_OPTION
from lmmrt.cli_options import POSITIVE_INT as POSITIVE_INT
from lmmrt.cli_options import HelpFormatter as HelpFormatter
from lmmrt.cli_options import _number as _number
from lmmrt.cli_options import input_file as input_file

_PYTHON_SHOWWARNING = warnings.showwarning
# Errors that lmmrt raises on purpose (CheckpointError is a ValueError, an existing output a
# FileExistsError, a missing optional package an ImportError): their message is the whole story.
USER_ERRORS = (ValueError, TypeError, ImportError, OSError)
EXIT_ERROR = 2  # an lmmrt error: bad input, a bad file, a missing package
EXIT_UNEXPECTED = 1  # anything else, probably a bug
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: the reader of the output went away (`| head`)
TRACEBACK_ENV = "LMMRT_TRACEBACK"


class Parser(argparse.ArgumentParser):
    """argparse, except that a bad command line is one `lmmrt: error:` line pointing at the help (argparse
    prints the whole usage first), like every other lmmrt error; the exit status stays 2."""

    def error(self, message):
        self.exit(EXIT_ERROR, f"lmmrt: error: {message} (see `{self.prog} --help`)\n")


class CommandParser(Parser):
    """A subcommand's parser (`lmmrt serve`, `lmmrt convert mllama`): refuses an option it does not know
    itself, so the error points at its own help. argparse leaves them to the top-level parser, whose help
    (`lmmrt --help`) does not list them."""

    def parse_known_args(self, args=None, namespace=None):
        parsed, unknown = super().parse_known_args(args, namespace)
        if unknown:
            self.error(f"unrecognized arguments: {' '.join(unknown)}")
        return parsed, unknown


def _cmd_info(args) -> int:
    import json

    import lmmrt

    if args.checkpoint is not None:
        from lmmrt.checkpoint_info import checkpoint_info, checkpoint_info_text

        print(json.dumps(checkpoint_info(args.checkpoint), indent=2) if args.json
              else checkpoint_info_text(args.checkpoint))
    elif args.json:
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
    run_demo(device=args.device, max_new_tokens=args.max_new_tokens, backend=args.backend, cuda_graph=args.cuda_graph)
    return 0


def installed_version() -> str:
    """lmmrt's version as installed (the package metadata pip wrote), without importing torch; the source's
    own __version__ when lmmrt runs from a checkout that was never installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lmmrt")
    except PackageNotFoundError:
        import lmmrt

        return lmmrt.__version__


class _PrintVersion(argparse.Action):
    """--version: looks the version up only when asked (the metadata lookup costs ~20 ms, which every
    other command would pay if the parser were built with the string)."""

    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"lmmrt {installed_version()}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="lmmrt", description="lmmrt - a kernel-optimized inference runtime for multimodal models: "
               "Flamingo-style (IDEFICS, OpenFlamingo, Llama 3.2 Vision / Mllama), splice models (LLaVA-1.5, BLIP-2 with OPT, MiniGPT-4) and "
               "CLIP. `lmmrt convert --help` lists the checkpoint formats it reads.",
                                epilog=f"Errors are one line; set {TRACEBACK_ENV}=1 to see the traceback of an "
                                "unexpected one.")
    p.add_argument("--version", action=_PrintVersion, help="print lmmrt's version and exit")
    # not required: a bare `lmmrt` prints this help (main), where argparse would say only that COMMAND is missing
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=CommandParser)

    s = sub.add_parser("info", help="what was built, library versions, the GPU, which kernel each op uses; or "
                       "what a checkpoint is (its family, its image marker)",
                       description="print what was built (the CUDA extension, the NVRTC kernels), the versions of "
                       "python, torch and triton, the GPU, and which implementation each op uses; with CHECKPOINT, "
                       "what that checkpoint is instead: its family, the image marker its prompts use, its language "
                       "model's size, whether it has a tokenizer and a chat template (no weights are read)",
                       formatter_class=HelpFormatter)
    s.add_argument("checkpoint", nargs="?", default=None, metavar="CHECKPOINT",
                   help="a checkpoint directory to describe (an lmmrt checkpoint or a transformers IDEFICS directory)")
    s.add_argument("--backend", **BACKEND_OPTION)
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(fn=_cmd_info)

    add_convert(sub)

    from lmmrt.cli_clip import add_classify  # imported here: these read this module's options
    from lmmrt.cli_generate import add_generate
    from lmmrt.cli_serve import add_serve

    add_generate(sub)
    add_classify(sub)
    add_serve(sub)

    s = sub.add_parser("demo", help="run the embedded random-weight model end to end (no download)",
                       description="run the embedded demo model - a small IDEFICS-style model with random weights "
                       "and a character-level tokenizer, built in code - end to end on two images made in code; its "
                       "text is meaningless. --save writes it as a checkpoint for the other commands",
                       formatter_class=HelpFormatter)
    s.add_argument("--device", default=None, help="cuda|cuda:N|cpu (default: cuda when available)")
    s.add_argument("--backend", **BACKEND_OPTION)
    s.add_argument("--cuda-graph", **CUDA_GRAPH_OPTION)
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


# The library writes an argument both ways, "pass force=True (--force)", "tp=2 (--tp 2)": the command line
# shows only its own spelling.
_BOTH_SPELLINGS = re.compile(r"\b[a-z_]+=\S+ \((--[a-z][a-z-]*(?: [^\s()]+)?)\)")


def cli_wording(e: BaseException) -> str:
    """An lmmrt error's message, with the Python API's keywords said as the options."""
    text = _BOTH_SPELLINGS.sub(r"\1", str(e) or type(e).__name__)
    if isinstance(e, FileExistsError):
        text = text.replace("even with force", "even with --force")
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
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.cmd is None:  # a bare `lmmrt`: the help, with argparse's status for a missing argument
            parser.print_help()
            return EXIT_ERROR
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
