"""OpenFlamingo checkpoint.pt + its base LM directory + its CLIP vision weights -> lmmrt checkpoint.

OpenFlamingo's checkpoint.pt holds only what its training changed (flamingo.md §6): the perceiver,
the gated cross-attention blocks and the LM input embedding (whose rows for the added
`<|endofchunk|>`, `<image>`, maybe `<PAD>` tokens were trained). The frozen LM and CLIP come from
their own files. Nothing in checkpoint.pt says how often a block is placed
(`cross_attn_every_n_layers`) or which mask mode was trained: both are options, n inferred from
the block indices when not given.

Accepted checkpoint forms: a plain state dict or `{"model_state_dict": ...}` (training
checkpoints), `module.` prefixes (DDP), blocks under `lang_encoder.<layers>.{i}.gated_cross_attn_layer.`
or the alias `lang_encoder.gated_cross_attn_layers.{i}.`, and unfiltered state dicts whose frozen
LM / vision copies (`decoder_layer`, `old_decoder_blocks`, `vision_encoder`) are skipped. Only
torch.load(..., weights_only=True) is ever used.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch

from lmmrt.convert.clip import open_vision, vision_config, vision_weight_map
from lmmrt.convert.common import SourceWeights, convert_state, read_source_json, torch_load_weights_only
from lmmrt.convert.hf_lm import LMSpec, lm_spec, read_hf_config
from lmmrt.models.config import ModelConfig, PerceiverConfig, XAttnConfig
from lmmrt.runtime.checkpoint_writer import check_output_path, save_checkpoint
from lmmrt.runtime.safetensors_file import why_missing
from lmmrt.runtime.weights import CheckpointError

EOC_TOKEN, IMAGE_TOKEN, PAD_TOKEN = "<|endofchunk|>", "<image>", "<PAD>"
# open_flamingo's Flamingo builds PerceiverResampler(dim=vis_dim) and GatedCrossAttentionBlock(dim, dim_visual)
# with their defaults: 8 heads each (the head width is read from the tensor shapes).
OF_HEADS = 8
PERCEIVER_PARTS = {  # lmmrt PerceiverLayer name -> OpenFlamingo name under perceiver.layers.{i}.
    "norm_media.weight": "0.norm_media.weight", "norm_media.bias": "0.norm_media.bias",
    "norm_latents.weight": "0.norm_latents.weight", "norm_latents.bias": "0.norm_latents.bias",
    "wq.weight": "0.to_q.weight", "wkv.weight": "0.to_kv.weight", "wo.weight": "0.to_out.weight",
    "mlp_norm.weight": "1.0.weight", "mlp_norm.bias": "1.0.bias", "fc1.weight": "1.1.weight", "fc2.weight": "1.3.weight",
}
XATTN_PARTS = {  # lmmrt GatedCrossAttention name -> OpenFlamingo GatedCrossAttentionBlock name
    "attn_gate": "attn_gate", "ff_gate": "ff_gate",
    "attn_norm.weight": "attn.norm.weight", "attn_norm.bias": "attn.norm.bias",
    "wq.weight": "attn.to_q.weight", "wkv.weight": "attn.to_kv.weight", "wo.weight": "attn.to_out.weight",
    "ff_norm.weight": "ff.0.weight", "ff_norm.bias": "ff.0.bias", "ff_w1.weight": "ff.1.weight",
    "ff_w2.weight": "ff.3.weight",
}


def _note(msg: str) -> None:
    print(f"lmmrt convert openflamingo: {msg}", file=sys.stderr)


# --- reading checkpoint.pt -----------------------------------------------------------------------
def read_openflamingo_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """checkpoint.pt -> flat state dict (wrapper and `module.` prefixes removed), weights_only."""
    path = Path(path)
    reason = why_missing(path)
    if reason is not None:
        raise FileNotFoundError(f"no OpenFlamingo checkpoint: {reason}")
    if path.suffix == ".safetensors":
        w = SourceWeights()
        w.add_safetensors(path)  # a truncated or corrupted file is named, not a raw SafetensorError
        sd = {k: w.get(k) for k in w.keys()}
    else:
        sd = torch_load_weights_only(path)  # a truncated file and a pickled object are told apart
    if isinstance(sd, dict) and isinstance(sd.get("model_state_dict"), dict):
        sd = sd["model_state_dict"]
    elif isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path} does not hold a state dict (got {type(sd).__name__})")
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue
        while k.startswith("module."):
            k = k[len("module."):]
        out[k] = v
    if not out:
        raise CheckpointError(f"{path} holds no tensors")
    # as for a .safetensors file: an integer (e.g. quantized) tensor is refused, naming it, not cast to float
    w = SourceWeights.from_state_dict(out, str(path))
    return {k: w.get(k) for k in w.keys()}


class _Sources:
    """One namespace over the three inputs for convert_state: `checkpoint:<key>`, `lm:<key>`,
    `vision:<key>`, plus `zeros:<lmmrt name>` for tensors the source format does not have."""

    def __init__(self, ckpt: dict, lm: SourceWeights, vision: SourceWeights, zeros: dict[str, tuple]):
        self.parts = {"checkpoint": ckpt, "lm": lm, "vision": vision}
        self.zeros = zeros

    def keys(self):
        out = [f"{ns}:{k}" for ns, src in self.parts.items() for k in src.keys()]
        return out + [f"zeros:{k}" for k in self.zeros]

    def _split(self, k):
        ns, _, name = k.partition(":")
        return ns, name

    def __contains__(self, k):
        ns, name = self._split(k)
        if ns == "zeros":
            return name in self.zeros
        return ns in self.parts and name in self.parts[ns]

    def get(self, k) -> torch.Tensor:
        ns, name = self._split(k)
        if ns == "zeros":
            return torch.zeros(self.zeros[name])
        src = self.parts[ns]
        return src[name] if isinstance(src, dict) else src.get(name)

    def shape(self, k) -> tuple:
        ns, name = self._split(k)
        if ns == "zeros":
            return tuple(self.zeros[name])
        src = self.parts[ns]
        return tuple(src[name].shape) if isinstance(src, dict) else src.shape(name)


def _classify(ckpt: dict, spec: LMSpec, lm_keys: set[str]):
    """Sort the checkpoint's keys: gated blocks {(layer, part): key}, the rest by role."""
    lp = re.escape("lang_encoder." + spec.layers_attr + ".")
    r_block = re.compile(lp + r"(\d+)\.gated_cross_attn_layer\.(.+)$")
    r_alias = re.compile(r"lang_encoder\.gated_cross_attn_layers\.(\d+)\.(.+)$")
    r_frozen = re.compile(lp + r"(\d+)\.decoder_layer\.(.+)$")
    r_old = re.compile(r"lang_encoder\.old_decoder_blocks\.(\d+)\.(.+)$")
    blocks, alias, skipped = {}, {}, []
    embed = head = None
    heads = {"lang_encoder." + a for a in spec.head_aliases}
    for k in ckpt:
        if m := r_block.match(k):
            blocks[(int(m.group(1)), m.group(2))] = k
        elif m := r_alias.match(k):
            alias[(int(m.group(1)), m.group(2))] = k
        elif (m := r_frozen.match(k) or r_old.match(k)) and f"{spec.layers_attr}.{m.group(1)}.{m.group(2)}" in lm_keys:
            skipped.append(k)  # a frozen copy of an LM weight (unfiltered state dict): the LM dir has it
        elif k == "lang_encoder." + spec.embed_key:
            embed = k
        elif k in heads:
            head = k
        elif k.startswith("lang_encoder.") and k[len("lang_encoder."):] in lm_keys:
            skipped.append(k)
        elif k.startswith("vision_encoder."):
            skipped.append(k)  # frozen CLIP copy: the vision weights come from --vision
    for key, k in alias.items():
        if key in blocks:
            skipped.append(k)  # the same module under its second name
        else:
            blocks[key] = k
    return blocks, embed, head, skipped


def _infer_every_n(layers: list[int], n_layers: int, given: int | None, where: str) -> int:
    present = sorted(set(layers))
    if not present:
        raise CheckpointError(f"{where} has no gated cross-attention blocks (keys lang_encoder.<layers>.N."
                              f"gated_cross_attn_layer.* or lang_encoder.gated_cross_attn_layers.N.*)")
    if given is not None:
        if given < 1:
            raise ValueError(f"--cross-attn-every-n-layers must be >= 1, got {given}")
        want = [i for i in range(n_layers) if (i + 1) % given == 0]
        if present != want:
            raise CheckpointError(
                f"{where} does not match --cross-attn-every-n-layers {given}: it has gated blocks before decoder "
                f"layers {present}, n={given} places them before {want}\n"
                f"  missing keys: blocks {sorted(set(want) - set(present))} (lang_encoder.<layers>.N."
                f"gated_cross_attn_layer.*)\n  unexpected keys: blocks {sorted(set(present) - set(want))}")
        return given
    n = present[0] + 1
    if present != [i for i in range(n_layers) if (i + 1) % n == 0]:
        raise CheckpointError(f"{where}: gated blocks before decoder layers {present} do not follow OpenFlamingo's "
                              f"placement ((i + 1) % n == 0) for any n; pass --cross-attn-every-n-layers")
    _note(f"cross_attn_every_n_layers = {n}, inferred from the {len(present)} gated blocks of the "
          f"{n_layers}-layer LM (pass --cross-attn-every-n-layers to set it)")
    return n


def _tokenizer(lm_dir: Path):
    """The LM's tokenizer.json with OpenFlamingo's special tokens added as its factory does:
    <|endofchunk|>, <image>, then <PAD> when the tokenizer has no pad token."""
    path = lm_dir / "tokenizer.json"
    if not path.exists():
        return None, {}
    from tokenizers import AddedToken, Tokenizer

    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception naming no file
        raise CheckpointError(f"{path} is not a valid tokenizer.json: {e}") from None
    special = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        p = lm_dir / name
        if p.exists():
            d = read_source_json(p)
            for role in ("pad_token", "eos_token", "bos_token"):
                v = d.get(role)
                v = v.get("content") if isinstance(v, dict) else v
                if v and role not in special:
                    special[role] = v
    new = [EOC_TOKEN, IMAGE_TOKEN] + ([] if special.get("pad_token") else [PAD_TOKEN])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in new])
    ids = {t: tok.token_to_id(t) for t in new}
    ids.update({role: tok.token_to_id(v) for role, v in special.items()})
    ids["pad_token"] = ids.get(PAD_TOKEN, ids.get("pad_token"))
    return tok, ids


def convert_openflamingo(checkpoint: str | Path, lm_dir: str | Path, vision: str | Path, out_dir: str | Path, *,
                         cross_attn_every_n_layers: int | None = None, only_attend_immediate_media: bool = True,
                         dtype: torch.dtype | None = None, vision_act: str | None = None,
                         image_token_id: int | None = None, eoc_token_id: int | None = None,
                         progress: bool = True, force: bool = False) -> Path:
    """Convert an OpenFlamingo checkpoint (with its base LM and CLIP weights) into an lmmrt
    checkpoint at `out_dir` (refused if it exists, unless force; never over or inside a source)."""
    sources = [checkpoint, lm_dir, vision]
    check_output_path(out_dir, sources=sources, force=force)
    ckpt_path, lm_dir = Path(checkpoint), Path(lm_dir)
    hf = read_hf_config(lm_dir)
    lm = SourceWeights.open(lm_dir)
    spec = lm_spec(hf, str(lm_dir / "config.json"), shape=lm.shape_or_none)
    lm_keys = set(lm.keys())
    vsrc = open_vision(vision)
    vcfg = vision_config(vsrc, vision_act)
    ckpt = read_openflamingo_checkpoint(ckpt_path)
    blocks, embed_key, head_key, skipped = _classify(ckpt, spec, lm_keys)
    if skipped:
        _note(f"skipping {len(skipped)} frozen LM/vision tensors found in {ckpt_path.name} "
              f"(taken from the LM directory and --vision instead)")
    dcfg = spec.cfg

    # --- vocabulary and special tokens --------------------------------------------------------
    tok, tok_ids = _tokenizer(lm_dir)
    lm_rows = lm.shape(spec.embed_key)[0]
    if embed_key is not None:
        vocab = ckpt[embed_key].shape[0]
        if tok is not None and tok.get_vocab_size(with_added_tokens=True) != vocab:
            raise CheckpointError(
                f"{ckpt_path.name}: the embedding has {vocab} rows but the LM's tokenizer with OpenFlamingo's special "
                f"tokens has {tok.get_vocab_size(with_added_tokens=True)}: is {lm_dir} the LM this checkpoint was "
                f"trained on?")
    elif tok is not None:
        vocab = tok.get_vocab_size(with_added_tokens=True)
        if vocab > lm_rows:
            raise CheckpointError(f"{ckpt_path.name} has no trained input embedding (lang_encoder.{spec.embed_key}) "
                                  f"and the LM has only {lm_rows} rows, fewer than the {vocab} tokens: the rows of "
                                  f"OpenFlamingo's added tokens are unknown")
        _note(f"{ckpt_path.name} has no input embedding: using the LM's first {vocab} rows")
    else:
        raise CheckpointError(f"{ckpt_path.name} has no input embedding and {lm_dir} has no tokenizer.json: "
                              f"the vocabulary size is unknown")
    image_id = image_token_id if image_token_id is not None else tok_ids.get(IMAGE_TOKEN)
    eoc_id = eoc_token_id if eoc_token_id is not None else tok_ids.get(EOC_TOKEN)
    if image_id is None or eoc_id is None:
        raise ValueError(f"{lm_dir} has no tokenizer.json: give --image-token-id and --eoc-token-id (OpenFlamingo "
                         f"adds <|endofchunk|>, <image> and, without a pad token, <PAD> after the base vocabulary)")
    for name, tid in (("<image>", image_id), ("<|endofchunk|>", eoc_id)):
        if not 0 <= tid < vocab:
            raise ValueError(f"{name} token id {tid} is outside the vocabulary of {vocab}")
    dcfg.vocab_size = vocab
    eos = spec.eos_token_id if spec.eos_token_id is not None else tok_ids.get("eos_token")
    pad = tok_ids.get("pad_token", spec.pad_token_id)

    # --- perceiver and gated blocks, from the shapes ------------------------------------------
    def shape(k):
        if k not in ckpt:
            raise CheckpointError(f"{ckpt_path.name}: missing key {k!r} (first keys: {sorted(ckpt)[:6]})")
        return tuple(ckpt[k].shape)

    n_lat, vdim = shape("perceiver.latents")
    if vdim != vcfg.width:
        raise CheckpointError(f"{ckpt_path.name}: perceiver width {vdim} but the vision encoder at {vision} has width "
                              f"{vcfg.width}")
    depth = 1 + max((int(m.group(1)) for k in ckpt if (m := re.match(r"perceiver\.layers\.(\d+)\.", k))), default=-1)
    p_inner = shape("perceiver.layers.0.0.to_q.weight")[0]
    pcfg = PerceiverConfig(
        dim=vdim, depth=depth, heads=OF_HEADS, head_dim=p_inner // OF_HEADS, n_latents=n_lat,
        mlp_dim=shape("perceiver.layers.0.1.1.weight")[0], mlp_act="gelu",
        max_frames=ckpt["perceiver.frame_embs"].shape[0] if "perceiver.frame_embs" in ckpt else 0,
        max_media_time=ckpt["perceiver.media_time_embs"].shape[0] if "perceiver.media_time_embs" in ckpt else 0)
    n = _infer_every_n([i for i, _ in blocks], dcfg.layers, cross_attn_every_n_layers, ckpt_path.name)
    xlayers = [i for i in range(dcfg.layers) if (i + 1) % n == 0]
    if not xlayers:
        raise ValueError(f"cross_attn_every_n_layers={n} places no block in a {dcfg.layers}-layer LM")
    first = min(i for i, _ in blocks)

    def bkey(i, part):  # the checkpoint key of a block part (missing ones get the canonical name)
        return blocks.get((i, part), f"lang_encoder.{spec.layers_attr}.{i}.gated_cross_attn_layer.{part}")

    x_inner = shape(bkey(first, "attn.to_q.weight"))[0]
    xcfg = XAttnConfig(
        style="openflamingo", layers=xlayers, heads=OF_HEADS, head_dim=x_inner // OF_HEADS,
        media_dim=shape(bkey(first, "attn.to_kv.weight"))[1], ffn_dim=shape(bkey(first, "ff.1.weight"))[0],
        norm_eps=1e-5, gate_type="float", mask_mode="immediate" if only_attend_immediate_media else "cumulative")
    cfg = ModelConfig(
        vision=vcfg, perceiver=pcfg, decoder=dcfg, xattn=xcfg, family="openflamingo", image_token_id=image_id,
        bos_token_id=spec.bos_token_id, eos_token_id=eos, pad_token_id=pad, end_of_chunk_token_id=eoc_id,
        reset_media_after_eos=False, stop_token_ids=[eoc_id], image_prompt_template="{image}",
        image_token=IMAGE_TOKEN)

    # --- the weight map ---------------------------------------------------------------------------
    wmap: dict[str, list[str]] = {}
    transforms = dict(spec.transforms)
    ignored: list[str] = [f"checkpoint:{k}" for k in skipped]
    vmap, vtf, vignored = vision_weight_map(vsrc, vcfg)
    wmap.update({k: [f"vision:{s}" for s in v] for k, v in vmap.items()})
    transforms.update(vtf)
    ignored += [f"vision:{k}" for k in vignored]
    wmap.update({k: [f"lm:{s}" for s in v] for k, v in spec.wmap.items()})
    zeros = {k: shp for k, shp in spec.zero_fill.items()}
    for k in zeros:
        wmap[k] = [f"zeros:{k}"]

    if embed_key is not None:
        wmap["decoder.embed.weight"] = [f"checkpoint:{embed_key}"]
        ignored.append(f"lm:{spec.embed_key}")
    else:
        transforms["decoder.embed.weight"] = lambda t, v=vocab: t[:v]
    lm_head = next((h for h in ((spec.head_key,) + spec.head_aliases) if h and h in lm_keys), None)
    if dcfg.tie_embeddings:
        if head_key is not None:
            ignored.append(f"checkpoint:{head_key}")  # tied: the same matrix as the embedding
        if lm_head is not None:
            ignored.append(f"lm:{lm_head}")
    else:
        if lm_head is None:
            raise CheckpointError(f"{lm_dir}: no output head ({' or '.join(spec.head_aliases)}) in an untied LM")
        if head_key is not None:
            wmap["decoder.lm_head.weight"] = [f"checkpoint:{head_key}"]
            ignored.append(f"lm:{lm_head}")
        else:
            wmap["decoder.lm_head.weight"] = [f"lm:{lm_head}"]
            head_rows = lm.shape(lm_head)[0]
            if head_rows < vocab:
                _note(f"{ckpt_path.name} has no output head: rows {head_rows}..{vocab - 1} (OpenFlamingo's added "
                      f"tokens, randomly initialized in training and not saved) are set to the mean of the LM's rows")
            transforms["decoder.lm_head.weight"] = lambda t, v=vocab: (
                t[:v] if t.shape[0] >= v else torch.cat([t, t.float().mean(0, keepdim=True).to(t.dtype)
                                                         .expand(v - t.shape[0], -1)]))

    wmap["perceiver.latents"] = ["checkpoint:perceiver.latents"]
    for s in ("weight", "bias"):
        wmap[f"perceiver.norm.{s}"] = [f"checkpoint:perceiver.norm.{s}"]
    if pcfg.max_frames:
        wmap["perceiver.frame_embs"] = ["checkpoint:perceiver.frame_embs"]
    if pcfg.max_media_time:
        wmap["perceiver.media_time_embs"] = ["checkpoint:perceiver.media_time_embs"]
    for i in range(depth):
        for ours, theirs in PERCEIVER_PARTS.items():
            wmap[f"perceiver.layers.{i}.{ours}"] = [f"checkpoint:perceiver.layers.{i}.{theirs}"]
    for j, i in enumerate(xlayers):
        for ours, theirs in XATTN_PARTS.items():
            wmap[f"xattn.{j}.{ours}"] = [f"checkpoint:{bkey(i, theirs)}"]

    src = _Sources(ckpt, lm, vsrc.weights, zeros)
    if dtype is None:
        dtype = lm.get(spec.embed_key).dtype
    state = convert_state(src, wmap, cfg, ignored_prefixes=tuple(ignored), dtype=dtype, progress=progress,
                          transforms=transforms)
    return save_checkpoint(out_dir, cfg, state, tokenizer=tok, sources=sources, force=force, metadata={
        "source": "openflamingo", "checkpoint": ckpt_path.name, "lm": lm_dir.name, "vision": Path(vision).name,
        "cross_attn_every_n_layers": n})
