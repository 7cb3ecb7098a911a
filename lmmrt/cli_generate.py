"""`lmmrt generate`: text from a prompt with interleaved images or a video.

Like lmmrt.cli, only the standard library at module level (the parser is built for `lmmrt --help`);
torch and the model are imported when the command runs. Everything that can be checked without the
model (files, PyAV, the prompt's image markers against the -i files) is checked before it loads.
"""

from __future__ import annotations

import os
import sys

from lmmrt.cli import (
    BACKEND_OPTION,
    COUNT,
    DTYPE_OPTION,
    POSITIVE_INT,
    HelpFormatter,
    _load_image,
    _number,
    input_file,
)
from lmmrt.cli_options import CUDA_GRAPH_OPTION, TP_OPTION


def stored_media_options(model_dir: str) -> tuple[str, int] | None:
    """(image marker, perceiver max_frames) from a checkpoint's config.json, read as plain JSON (no torch, no
    weights), so that prompt and video options are checked before the load; None when config.json is not
    readable as a known config (lmmrt.load then says what is wrong with it)."""
    import json

    try:
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict):
        return None
    if "format_version" in cfg:  # lmmrt's own config (lmmrt.models.config.ModelConfig)
        per = cfg.get("perceiver")
        max_frames = per.get("max_frames", 0) if isinstance(per, dict) else 0
        return str(cfg.get("image_token") or "<image>"), max_frames if isinstance(max_frames, int) else 0
    if cfg.get("model_type") == "idefics":  # a transformers IDEFICS directory, converted at load
        return "<image>", 0
    return None


def check_media_options(args, prompt: str) -> None:
    """The -i / --video / --video-mode options against the prompt and the stored config, before the load."""
    if args.video:
        try:
            import av  # noqa: F401
        except ImportError:
            raise ImportError("--video needs PyAV to read video files, and it is not installed: pip install av "
                              "(in the venv `make demo` made: make install EXTRAS=video)") from None
    stored = stored_media_options(args.model)
    if stored is None:
        return
    marker, max_frames = stored
    if args.video:
        if args.video_mode == "clip" and max_frames == 0:
            raise ValueError("--video-mode clip needs a checkpoint with frame embeddings (perceiver max_frames > 0); "
                             f"{args.model} has none: use --video-mode frames (each frame its own image)")
        return
    n = prompt.count(marker)
    if n != len(args.image):
        raise ValueError(f"the prompt has {n} {marker} marker(s) but {len(args.image)} image(s) were given: "
                         f"pass one -i per {marker}, in order")


def video_cli_wording(message: str) -> str:
    """lmmrt.video_prompt's message with its keyword arguments said as the options of `lmmrt generate`."""
    for api, cli_option in (("mode='clip'", "--video-mode clip"), ("mode='frames'", "--video-mode frames"),
                            ("(fps=, max_frames=, chunk_frames=)", "(--fps, --max-frames)")):
        message = message.replace(api, cli_option)
    return message


def finish_note(model, args, result=None) -> str:
    """Why generation ended and after how many tokens, for the stderr summary (an empty output says why).
    With --stream there is no result: a stop is told from the count (a stop token drawn as the very last
    allowed token reads as the length limit)."""
    if result is not None:
        n, reason = len(result.token_ids), result.finish_reason
    else:
        n = model.last_stats.new_tokens
        reason = "length" if n >= args.max_new_tokens else "stop"
    count = f"{n} token{'s' if n != 1 else ''}"
    if reason == "length":
        return f"length: {count} (--max-new-tokens {args.max_new_tokens})"
    cfg = model.config
    stop_ids = set() if args.ignore_eos else {cfg.eos_token_id, *cfg.stop_token_ids} - {None}
    if result is not None:
        by_token = bool(result.token_ids) and result.token_ids[-1] in stop_ids
        what = "end-of-sequence" if by_token else "a --stop string"
    else:
        what = "end-of-sequence or a --stop string" if args.stop else "end-of-sequence"
    return f"stop: {what} after {count}"


def _cmd_generate(args) -> int:
    # Everything that can be checked without the model is checked first.
    if args.video and args.image:
        raise ValueError("--video and --image cannot be combined; pass one or the other")
    if args.video:
        input_file(args.video, "video file")
    prompt = args.prompt.replace("\\n", "\n")  # a shell gives "\\n" for \n inside double quotes
    images = [_load_image(p) for p in args.image]
    from lmmrt.runtime.embed import is_clip_checkpoint, not_generative

    if is_clip_checkpoint(args.model):  # its config says so: refused before its weights are read
        raise TypeError(not_generative(args.model))
    check_media_options(args, prompt)

    import lmmrt
    from lmmrt.api import parse_device

    parse_device(args.device, option="--device")
    model = lmmrt.load(args.model, device=args.device, dtype=args.dtype, backend=args.backend,
                       progress=not args.quiet, cuda_graph=args.cuda_graph, tp=args.tp)
    # under tensor parallelism every rank generates the same text: rank 0 alone prints it (a CLIP
    # checkpoint loads as a ClipRuntime, without `tp`: lmmrt.generate then refuses it by name)
    tp = getattr(model, "tp", None)
    shown = tp is None or tp.rank == 0
    if args.video:
        try:
            prompt, images = lmmrt.video_prompt(model, args.video, prompt, mode=args.video_mode, fps=args.fps,
                                                max_frames=args.max_frames)
        except ValueError as e:
            raise ValueError(video_cli_wording(str(e))) from None
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
              top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
              stop=args.stop or None, ignore_eos=args.ignore_eos)
    result = None
    if args.stream:
        for piece in lmmrt.generate(model, prompt, images, stream=True, **kw):
            if shown:
                print(piece, end="", flush=True)
        if shown:
            print()
    else:
        result = lmmrt.generate(model, prompt, images, **kw)[0]
        if shown:
            print(result.text)
    s = model.last_stats
    if s is not None and not args.quiet and shown:
        print(f"[{finish_note(model, args, result)}; {s.summary()}]", file=sys.stderr)
    if tp is not None:
        from lmmrt.parallel import leave_group

        leave_group(tp)
    return 0


def _add_generate(s):
    s.add_argument("model", metavar="CHECKPOINT", help="lmmrt checkpoint directory (from `lmmrt convert`), or a "
                   "transformers IDEFICS directory (converted in memory)")
    s.add_argument("--prompt", "-p", required=True,
                   help="prompt text; write the checkpoint's image marker where each image goes (<image> for "
                        "IDEFICS, OpenFlamingo, LLaVA and BLIP-2, <|image|> for Llama 3.2 Vision, <ImageHere> for "
                        "MiniGPT-4; `lmmrt info CHECKPOINT` shows it); \\n is a newline")
    s.add_argument("--image", "-i", action="append", default=[],
                   help="image file, once per image marker in the prompt, in order")
    s.add_argument("--video", default=None, help="a video file (PyAV); write {video} in the prompt where it goes "
                   "(default: at the start)")
    s.add_argument("--fps", type=_number(float, "> 0", lambda v: v > 0), default=1.0,
                   help="video frames sampled per second")
    s.add_argument("--max-frames", type=POSITIVE_INT, default=8, help="at most this many video frames")
    s.add_argument("--video-mode", choices=["frames", "clip"], default=None,
                   help="frames: one media item per frame; clip: one item of F frames (checkpoints with frame "
                        "embeddings); default: clip when supported")
    g = s.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=COUNT, default=64,
                   help="generate at most this many tokens (fewer when an end-of-sequence token or a --stop "
                        "string ends the text)")
    g.add_argument("--temperature", type=_number(float, ">= 0", lambda v: v >= 0), default=0.0,
                   help="divide the scores by this before sampling; 0 = greedy (always the most likely token)")
    g.add_argument("--top-k", type=COUNT, default=0,
                   help="sample only among the k most likely tokens; 0 = no limit (sampling only: --temperature > 0)")
    g.add_argument("--top-p", type=_number(float, "in (0, 1]", lambda v: 0 < v <= 1), default=1.0,
                   help="nucleus sampling: sample only among the most likely tokens whose probabilities add up to "
                        "p; 1 = no limit (sampling only: --temperature > 0)")
    g.add_argument("--repetition-penalty", type=_number(float, "> 0", lambda v: v > 0), default=1.0,
                   help="make tokens already in the prompt or the output less likely (> 1) or more likely (< 1), "
                        "as in CTRL and transformers; 1 = off")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when the output contains TEXT, which is cut off (repeatable)")
    g.add_argument("--ignore-eos", action="store_true",
                   help="do not stop at the end-of-sequence token (nor the checkpoint's stop tokens)")
    g.add_argument("--seed", type=_number(int, "in [0, 2**63)", lambda v: 0 <= v < 2**63), default=None,
                   help="seed for sampling, for a reproducible output (default: a different draw every run)")
    g.add_argument("--stream", action="store_true", help="print text as it is generated")
    r = s.add_argument_group("runtime")
    r.add_argument("--device", default=None, help="cuda|cuda:N|cpu (default: cuda when available)")
    r.add_argument("--dtype", **DTYPE_OPTION, help="compute in this dtype (default: as stored)")
    r.add_argument("--backend", **BACKEND_OPTION)
    r.add_argument("--cuda-graph", **CUDA_GRAPH_OPTION)
    r.add_argument("--tp", **TP_OPTION)
    r.add_argument("--quiet", action="store_true", help="no progress bar and no timings on stderr")


def add_generate(sub) -> None:
    """The `generate` subcommand, added to the top-level subparsers."""
    s = sub.add_parser("generate", help="generate text from a prompt with interleaved images",
                       description="generate text from a prompt with interleaved images or a video",
                       formatter_class=HelpFormatter)
    _add_generate(s)
    s.set_defaults(fn=_cmd_generate)
