"""The public API: load, generate, logits, info."""

from __future__ import annotations

from pathlib import Path

import torch

from lmmrt.kernels.backend import requested_backend
from lmmrt.models.config import ModelConfig
from lmmrt.models.flamingo import FlamingoModel
from lmmrt.models.splice import SpliceModel
from lmmrt.parallel.group import TensorParallel, check_tp
from lmmrt.runtime import generate as _gen
from lmmrt.runtime import text_output
from lmmrt.runtime.static_decode import DecodeState, check_cuda_graph
from lmmrt.runtime.tokenizer import Tokenizer, check_image_token
from lmmrt.runtime.weights import CHAT_TEMPLATE, CONFIG, TOKENIZER, load_checkpoint

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def _spell(option: str, value: str) -> str:
    """How the caller writes `value` for `option`: device='cpu' in Python, --device cpu on the command line."""
    return f"{option} {value}" if option.startswith("--") else f"{option}={value!r}"


def parse_dtype(dtype) -> torch.dtype | None:
    """A torch dtype from a dtype or its name (the error lists the names, valid in Python and on the CLI)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(_DTYPES))}") from None


class Model:
    """A loaded model: the torch module, its config, tokenizer, device, dtype and backend.

    Under tensor parallelism (`tp`, this process's rank and the group size) `module` is this rank's
    shard and `config` its per-rank config (heads and feed-forward widths divided by the group
    size, which sizes the KV and media caches); the checkpoint's own config is `global_config`."""

    def __init__(self, module: FlamingoModel | SpliceModel, config: ModelConfig, tokenizer: Tokenizer | None,
                 backend: str = "auto", path: str | None = None, cuda_graph: bool | str = "auto", *,
                 tp: TensorParallel | None = None, global_config: ModelConfig | None = None):
        self.module = module.eval().requires_grad_(False)
        self.config = config
        self.tp = tp
        self.global_config = config if global_config is None else global_config
        self.tokenizer = tokenizer
        self.path = path
        self.backend = requested_backend(backend)
        module.set_backend(self.backend)
        module.fold_gates()
        module.use_decode_weight_layout()
        self.last_stats: _gen.GenerationStats | None = None
        # Decode with a fixed-shape step replayed as a CUDA graph (where the step's ops allow it);
        # graphs (one per shape bucket) and the KV / media caches they read live in decode_state.
        self.cuda_graph = check_cuda_graph(cuda_graph)
        self.decode_state = DecodeState()

    @property
    def device(self) -> torch.device:
        return self.module.device

    @property
    def dtype(self) -> torch.dtype:
        return self.module.dtype

    def generate(self, prompts, images=None, **kw):
        return generate(self, prompts, images, **kw)

    def logits(self, prompts, images=None):
        return logits(self, prompts, images)

    def save(self, path, *, force: bool = False) -> Path:
        """Write this model as an lmmrt checkpoint directory (config, weights in the model's dtype,
        tokenizer, the chat template of the directory it was loaded from), atomically. An existing `path` is refused unless force; the directory the model
        was loaded from is never written. Reloading it gives the same logits (gates already folded
        into the weights are stored so that they are not applied twice; see the README)."""
        from lmmrt.runtime.checkpoint_writer import save_checkpoint, state_for_saving

        if self.tp is not None:
            from lmmrt.parallel import TensorParallelError

            raise TensorParallelError(f"this model is rank {self.tp.rank}'s shard of a tp={self.tp.size} model: "
                                      f"save the checkpoint it was loaded from ({self.path}) or a model loaded "
                                      f"without tp")
        template = Path(self.path) / CHAT_TEMPLATE if self.path else None
        extra = {CHAT_TEMPLATE: template.read_bytes()} if template is not None and template.is_file() else {}
        return save_checkpoint(path, self.config, state_for_saving(self.module), tokenizer=self.tokenizer,
                               sources=[self.path] if self.path else [], force=force, extra_files=extra,
                               metadata={"source": "lmmrt Model.save", "loaded_from": Path(str(self.path)).name})

    def release_caches(self) -> int:
        """Free what decoding keeps between calls: the pooled KV and media caches and the CUDA graphs
        captured over them (the next call allocates and captures again). Returns the bytes of cache
        released. Refused while a generation is still using them (a stream not read to its end)."""
        state = self.decode_state
        if state.kv.in_use:
            raise RuntimeError("release_caches: a generation of this model is still running (a stream not "
                               "read to its end or closed); finish or close it first")
        freed = state.kv.buffer.nbytes if state.kv.buffer is not None else 0
        freed += sum(t.numel() * t.element_size() for kv in state.media_kv for t in kv)
        fresh = DecodeState()
        fresh.graph_error = state.graph_error  # a capture that failed once is not retried
        self.decode_state = fresh
        return freed

    def __repr__(self):
        c = self.config
        media = (f"splice {c.connector.kind} connector" if c.media_feed == "splice"
                 else f"xattn={len(c.xattn.layers)} blocks")
        tp = "" if self.tp is None else f", tp rank {self.tp.rank} of {self.tp.size}"
        return (f"lmmrt.Model({c.family}, decoder={c.decoder.family} {c.decoder.layers}x{c.decoder.dim}, "
                f"{media}, device={self.device}, dtype={self.dtype}, backend={self.backend}{tp})")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_device(device, *, option: str = "device") -> torch.device:
    """cpu or cuda[:N], checked against this machine, with an error that says what is wrong;
    `option` names the argument in errors (e.g. "--device")."""
    if device is None:
        return torch.device(default_device())
    choices = f"{_spell(option, 'cpu')}, {_spell(option, 'cuda')} or {_spell(option, 'cuda:N')}"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}: use {choices}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but CUDA is not available on this machine "
                             f"(torch {torch.__version__}); use {_spell(option, 'cpu')}")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise ValueError(f"device {device!r} is not supported: use {choices}")
    return dev


def load(path, device=None, dtype=None, *, backend: str | None = None, progress: bool = False,
         cuda_graph: bool | str = "auto", tp: int = 1) -> Model:
    """Load an lmmrt checkpoint directory (made by `lmmrt convert`), or a transformers IDEFICS
    directory, which is then converted in memory at every load (convert once to skip that).
    A CLIP checkpoint (`lmmrt convert clip`) loads as a ClipRuntime, for lmmrt.embed and
    lmmrt.zero_shot (backend and cuda_graph do not apply to it).

    device: "cuda", "cpu", ... (default: cuda when available); dtype: torch dtype or name
    (default: the dtype stored in the file); backend: torch | triton | cuda | auto
    (default: $LMMRT_BACKEND, else auto); cuda_graph: "auto" (default) decodes on CUDA with a
    fixed-shape step captured as a CUDA graph once per batch size and cache-length bucket (when
    every op of the step runs a kernel; eager elsewhere, and after a failed capture, with one
    warning); True forces the fixed-shape step, False the eager step.

    tp: split the language model over this many processes (tensor parallelism, docs/tensor-parallel.md):
    run one process per rank (`torchrun --nproc-per-node N`), each calling load, then generate / logits
    with the same arguments; each rank reads only its slices of an lmmrt checkpoint, on CUDA GPU <local
    rank> (NCCL), on the CPU with gloo. When any rank fails to load, every rank raises that error."""
    device = parse_device(device)
    backend = requested_backend(backend)
    check_cuda_graph(cuda_graph)  # every argument checked before any weight is read
    if check_tp(tp) > 1:
        return _load_tensor_parallel(path, device, parse_dtype(dtype), backend=backend, progress=progress,
                                     cuda_graph=cuda_graph, tp=tp)
    from lmmrt.runtime.embed import is_clip_checkpoint, load_clip

    if is_clip_checkpoint(path):  # embeddings only: see lmmrt.embed / lmmrt.zero_shot
        return load_clip(path, device=device, dtype=parse_dtype(dtype), progress=progress)
    tok_path = Path(path) / TOKENIZER
    # first, so that a broken tokenizer.json is reported before gigabytes of weights are read;
    # a dangling link is broken, not absent
    tok = Tokenizer.from_file(tok_path) if tok_path.exists() or tok_path.is_symlink() else None
    cfg, module = load_checkpoint(path, device=device, dtype=parse_dtype(dtype), progress=progress)
    if tok is not None:
        check_image_token(tok, cfg, tokenizer_path=tok_path, config_path=Path(path) / CONFIG)
    return Model(module, cfg, tok, backend=backend, path=str(path), cuda_graph=cuda_graph)


def _load_tensor_parallel(path, device: torch.device, dtype: torch.dtype | None, *, backend: str, progress: bool,
                          cuda_graph: bool | str, tp: int) -> Model:
    """This rank's shard (lmmrt.parallel), or, when any rank failed, that failure raised on every rank."""
    from lmmrt.parallel import agree_on_load, checkpoint_identity, join_group, leave_group, load_shard

    group, device = join_group(tp, device)
    model = error = identity = None
    try:
        tok_path = Path(path) / TOKENIZER
        tok = Tokenizer.from_file(tok_path) if tok_path.exists() or tok_path.is_symlink() else None
        cfg, rank_cfg, module = load_shard(path, group, device=device, dtype=dtype, progress=progress)
        if tok is not None:
            check_image_token(tok, cfg, tokenizer_path=tok_path, config_path=Path(path) / CONFIG)
        model = Model(module, rank_cfg, tok, backend=backend, path=str(path), cuda_graph=cuda_graph, tp=group,
                      global_config=cfg)
        identity = checkpoint_identity(path, dtype)
    except Exception as e:
        error = e
    try:
        agree_on_load(group, error, identity)
    except Exception:
        leave_group(group)  # every rank raises here: no model holds this reference
        raise
    return model


def generate(model: Model, prompts, images=None, *, max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, stop=None,
             stop_token_ids=None, ignore_eos: bool = False, seed: int | None = None, stream: bool = False):
    """Generate text for one or more prompts.

    prompts: a string, a list of strings, or a list of token-id lists; media markers (the model's
    image token, e.g. "<image>") stand where the media sit. images: for one prompt a list of media
    items, else one list per prompt; a media item is a PIL image, a uint8 (H, W, 3) array or tensor,
    a float (3, H, W) tensor of already-normalized pixels, or a video clip (lmmrt.video); Llama 3.2
    Vision (mllama, marker "<|image|>") takes PIL images and uint8 arrays of any size, which it tiles
    as transformers' MllamaImageProcessor does (docs/mllama.md).
    temperature 0 is greedy; sampling is reproducible with `seed`. Generation stops at the end-of-
    sequence token (unless ignore_eos), at any of stop_token_ids or the model's default stop tokens,
    or at a stop string (str or list of str; the text is cut before it).

    Returns a list of results with .text, .token_ids (new tokens only) and .finish_reason
    ("stop" | "length"); with stream=True an iterator of text pieces (str for one prompt,
    (prompt index, str) for several). Timings of the last call are in model.last_stats.
    """
    _check_generative(model)
    if model.tp is not None:
        from lmmrt.parallel import agree_on_inputs, broadcast_seed

        agree_on_inputs(model.tp, "generate", prompts=prompts, images=images, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                        stop=stop, stop_token_ids=stop_token_ids, ignore_eos=ignore_eos, seed=seed, stream=stream)
        if temperature > 0:
            seed = broadcast_seed(model.tp, seed)  # every rank must draw the same tokens
    return text_output.generate(model, prompts, images, stream=stream, max_new_tokens=max_new_tokens,
                         temperature=temperature, top_k=top_k, top_p=top_p,
                         repetition_penalty=repetition_penalty, stop=stop, stop_token_ids=stop_token_ids,
                         ignore_eos=ignore_eos, seed=seed)


def logits(model: Model, prompts, images=None) -> list[torch.Tensor]:
    """Prompt logits: one float32 tensor (prompt_len, vocab) per prompt, on the CPU, one row per
    position the LM ran. For a splice model (LLaVA, BLIP-2, MiniGPT-4) that includes the image
    feature positions: each image marker counts as the connector's feature count
    (model.config.media_tokens) of positions, as in the reference's expanded input_ids."""
    _check_generative(model)
    if model.tp is not None:
        from lmmrt.parallel import agree_on_inputs

        agree_on_inputs(model.tp, "logits", prompts=prompts, images=images)
    return _gen.prompt_logits(model, prompts, images)


def _check_generative(model) -> None:
    from lmmrt.runtime.embed import ClipRuntime, raise_not_generative

    if isinstance(model, ClipRuntime):
        raise_not_generative(model)
