"""ImageReward (Xu et al. 2023): a BLIP image-grounded text encoder with an MLP head.

Reference: the ``image-reward`` package (``THUDM/ImageReward`` on GitHub, ``ImageReward/ImageReward.py``
and ``models/BLIP``), checkpoint ``ImageReward.pt`` + ``med_config.json`` on the hub repo
``THUDM/ImageReward``. For an image x and a prompt p:

    v      = ViT(preprocess(x))                    [N, 1 + P, Dv]   all tokens after the final norm
    h      = BERT(tokens(p), cross-attending to v)  [N, L, Dt]       "med" text encoder, L = 35
    raw    = MLP(h[:, 0])                           [N]              768 -> 1024 -> 128 -> 64 -> 16 -> 1
    reward = (raw - 0.16717362830052426) / 1.0333394966054072

Details checked against the published code:

- **Image**: ``Resize(224, bicubic)`` on the shortest side, ``CenterCrop(224)`` (torchvision rounding),
  CLIP mean/std. Done on tensors here (:mod:`flowalign.rewards.preprocess`; the float resize differs
  from PIL's uint8 resize by about one uint8 level, see there).
- **ViT**: BLIP's ``VisionTransformer`` (``vit='large'``: ViT-L/16 at 224 px, 24 blocks, width 1024),
  pre-norm blocks with LayerNorm eps 1e-6, exact GELU, qkv with bias; every token (CLS + patches) after
  the final norm is passed to the text encoder, with an all-ones attention mask.
- **Text**: ``BertTokenizer('bert-base-uncased')`` plus ``[DEC]`` as bos token and ``[ENC]`` as an
  additional special token (ids 30522 and 30523, vocab 30524); ``padding='max_length'``,
  ``truncation=True``, ``max_length=35``. The published ``score``/``inference_rank`` and the training
  code feed ``input_ids`` as tokenised: the first token stays ``[CLS]``. (BLIP's own image-text
  matching replaces it with ``[ENC]``; ImageReward does not, so neither do we.)
- **Head**: the LAION aesthetic MLP layout (``layers.0/2/4/6/7`` linear, dropout between, no
  activations: the ReLUs are commented out in the published code), applied in float32 to the text
  encoder's last hidden state at position 0.

The network is built from transformers classes: ``BlipVisionModel`` (ViT) and ``BlipTextModel`` with
``is_decoder=True`` in its config (which adds the cross-attention layers) called with
``is_decoder=False`` (bidirectional self-attention, as BLIP's ``mode='multimodal'``), without pooler.
They reproduce the published computation; the one difference is the additive mask value for padded
text tokens (BLIP: -10000, transformers: the dtype's minimum), which both underflow to a weight of
exactly 0 after the softmax. :func:`convert_imagereward_state_dict` renames the published keys.
The checkpoint does not store the ViT's head count; BLIP's ViT-B and ViT-L both use 64-wide heads, so
``heads = width // 64`` unless ``vision_num_heads`` is given.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from flowalign.rewards.aesthetic import AestheticMLP
from flowalign.rewards.backbones import load_state_dict_file
from flowalign.rewards.base import RewardModel
from flowalign.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImagePreprocess, preprocess_images

__all__ = [
    "IMAGEREWARD_HUB_REPO",
    "IMAGEREWARD_MEAN",
    "IMAGEREWARD_STD",
    "ImageRewardModel",
    "convert_imagereward_state_dict",
    "imagereward_tokenizer",
    "load_imagereward",
    "to_published_key",
]

IMAGEREWARD_HUB_REPO = "THUDM/ImageReward"
IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
MAX_LENGTH = 35
CHECKPOINT_NAMES = ("ImageReward.safetensors", "ImageReward.pt")
MED_CONFIG_NAME = "med_config.json"
DEFAULT_TOKENIZER = "bert-base-uncased"

# Published key <-> our key. Placeholders: {i}, {j} layer/fc indices, {p} weight|bias, {rest} any suffix.
# Our names are attributes of ImageRewardModel: blip.visual_encoder = BlipVisionModel,
# blip.text_encoder = BlipTextModel (same key names as BLIP's med.py BertModel), mlp = AestheticMLP.
_V, _OV = "blip.visual_encoder.", "blip.visual_encoder."
_KEY_RULES: tuple[tuple[str, str], ...] = (
    (_V + "cls_token", _OV + "embeddings.class_embedding"),
    (_V + "pos_embed", _OV + "embeddings.position_embedding"),
    (_V + "patch_embed.proj.{p}", _OV + "embeddings.patch_embedding.{p}"),
    (_V + "blocks.{i}.norm1.{p}", _OV + "encoder.layers.{i}.layer_norm1.{p}"),
    (_V + "blocks.{i}.attn.qkv.{p}", _OV + "encoder.layers.{i}.self_attn.qkv.{p}"),
    (_V + "blocks.{i}.attn.proj.{p}", _OV + "encoder.layers.{i}.self_attn.projection.{p}"),
    (_V + "blocks.{i}.norm2.{p}", _OV + "encoder.layers.{i}.layer_norm2.{p}"),
    (_V + "blocks.{i}.mlp.fc{j}.{p}", _OV + "encoder.layers.{i}.mlp.fc{j}.{p}"),
    (_V + "norm.{p}", _OV + "post_layernorm.{p}"),
    ("blip.text_encoder.{rest}", "blip.text_encoder.{rest}"),
    ("mlp.layers.{i}.{p}", "mlp.layers.{i}.{p}"),
)
# In the published checkpoint but not used by the reward: BLIP's contrastive projections and the
# text encoder's saved position-id buffer (an arange).
_UNUSED_KEYS = frozenset(
    {
        "blip.vision_proj.weight",
        "blip.vision_proj.bias",
        "blip.text_proj.weight",
        "blip.text_proj.bias",
        "blip.text_encoder.embeddings.position_ids",
    }
)
_FIELDS = {"i": r"(?P<i>\d+)", "j": r"(?P<j>\d+)", "p": r"(?P<p>weight|bias)", "rest": r"(?P<rest>.+)"}


def _compile(pattern: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", pattern)  # literal, field, literal, field, ...
    regex = "".join(re.escape(part) if k % 2 == 0 else _FIELDS[part] for k, part in enumerate(parts))
    return re.compile(regex + r"\Z")


_FORWARD = tuple((_compile(src), dst) for src, dst in _KEY_RULES)
_BACKWARD = tuple((_compile(dst), src) for src, dst in _KEY_RULES)


def _rename(key: str, rules: tuple[tuple[re.Pattern[str], str], ...]) -> str | None:
    for pattern, template in rules:
        match = pattern.match(key)
        if match:
            return template.format(**match.groupdict())
    return None


def to_published_key(key: str) -> str | None:
    """The published ``ImageReward.pt`` name of one of our parameter names (None if it has none)."""
    return _rename(key, _BACKWARD)


def convert_imagereward_state_dict(
    state_dict: dict[str, Tensor], *, source: str | Path = "state dict"
) -> dict[str, Tensor]:
    """Rename a published ImageReward state dict to :class:`ImageRewardModel`'s parameter names.

    The ViT keys change (timm layout -> ``BlipVisionModel``), the text encoder and MLP keys keep
    their names, and BLIP's unused contrastive projections and saved ``position_ids`` are dropped.

    Args:
        state_dict: ``ImageReward.pt``'s state dict (``blip.visual_encoder.*``,
            ``blip.text_encoder.*``, ``mlp.layers.*``, ...).
        source: file name for error messages.

    Raises:
        ValueError: keys outside the published layout, naming ``source`` and the first five.
    """
    converted: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        if key in _UNUSED_KEYS:
            continue
        new_key = _rename(key, _FORWARD)
        if new_key is None:
            unknown.append(key)
        else:
            converted[new_key] = value
    if unknown:
        raise ValueError(
            f"{source}: {len(unknown)} key(s) are not in the ImageReward checkpoint layout "
            f"(e.g. {sorted(unknown)[:5]}); expected blip.visual_encoder.*, blip.text_encoder.*, mlp.layers.*"
        )
    return converted


def imagereward_tokenizer(source: str | Path = DEFAULT_TOKENIZER) -> Any:
    """``BertTokenizer`` with BLIP's extra tokens: ``[DEC]`` as bos, ``[ENC]`` as additional special.

    Args:
        source: a folder holding ``vocab.txt`` (or ``tokenizer.json``), or a hub id
            (``bert-base-uncased``, as the reference uses).
    """
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(str(source))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


class ImageRewardModel(RewardModel):
    """ImageReward on a BLIP ViT + cross-attending BERT (see the module docstring for the equations).

    Args:
        blip: module with ``visual_encoder`` (``BlipVisionModel``) and ``text_encoder``
            (``BlipTextModel`` with cross-attention, no pooler).
        mlp: the reward head (input width = the text encoder's hidden size); kept in float32.
        tokenizer: the BLIP BERT tokenizer (:func:`imagereward_tokenizer`).
        image_size: the ViT's input resolution (224 for the published model).
        batch_size: images per forward pass.
        text_cache_size: prompts whose token ids are cached.
    """

    name = "imagereward"
    dimensions = ("imagereward",)
    media_kind = "image"
    differentiable = True

    def __init__(
        self,
        blip: nn.Module,
        mlp: AestheticMLP,
        tokenizer: Any,
        *,
        image_size: int = 224,
        batch_size: int = 16,
        text_cache_size: int = 1024,
    ) -> None:
        super().__init__(batch_size=batch_size, text_cache_size=text_cache_size)
        self.blip = blip
        self.mlp = mlp
        self.tokenizer = tokenizer
        self.max_length = MAX_LENGTH
        self.mean = IMAGEREWARD_MEAN
        self.std = IMAGEREWARD_STD
        self.preprocess = ImagePreprocess(
            resize_size=image_size,
            crop_size=(image_size, image_size),
            mean=OPENAI_CLIP_MEAN,
            std=OPENAI_CLIP_STD,
            resize_mode="shortest",
            interpolation="bicubic",
            crop_rounding="round",  # torchvision CenterCrop
            clamp=True,  # PIL resizes uint8 images
        )

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module signature
        out = super()._apply(fn, recurse)
        self.mlp.float()  # the reference casts the text feature to float before the MLP
        return out

    def _tokenize(self, prompts: list[str]) -> Tensor:
        enc = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return torch.stack([enc["input_ids"], enc["attention_mask"]], dim=1)  # [U, 2, L] int64

    def tokens(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Cached token ids and attention mask, each [N, 35] int64 on the model's device."""
        with torch.no_grad():
            both = self.text_cache.get(prompts, self._tokenize).to(self.device)  # [N, 2, L]
        return both[:, 0], both[:, 1]

    def raw_scores(self, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """MLP output before normalisation, [N] float32.

        Args:
            pixels: preprocessed images [N, 3, S, S] on the model's device and dtype.
            input_ids, attention_mask: [N, L] from :meth:`tokens`.
        """
        image_embeds = self.blip.visual_encoder(pixel_values=pixels).last_hidden_state  # [N, 1+P, Dv]
        image_mask = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=image_embeds.device)
        hidden = self.blip.text_encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
            is_decoder=False,
        ).last_hidden_state  # [N, L, Dt]
        return self.mlp(hidden[:, 0].float())

    def _score_images(self, images: Tensor, prompts: list[str] | None) -> dict[str, Tensor]:
        assert prompts is not None
        pixels = preprocess_images(images, self.preprocess)  # [N, 3, S, S] float32 on the media device
        pixels = pixels.to(device=self.device, dtype=self.dtype)
        input_ids, attention_mask = self.tokens(prompts)
        raw = self.raw_scores(pixels, input_ids, attention_mask)
        return {"imagereward": (raw - self.mean) / self.std}


def _resolve_files(
    path: str | Path, med_config: str | Path | None, tokenizer: str | Path | None
) -> tuple[Path, Path, str | Path]:
    """(checkpoint, med_config.json, tokenizer source) for a folder, a checkpoint file or a hub id."""
    local = Path(path)
    if local.is_dir():
        found = [local / name for name in CHECKPOINT_NAMES if (local / name).is_file()]
        if not found:
            raise FileNotFoundError(
                f"imagereward: no {' or '.join(CHECKPOINT_NAMES)} in {local} "
                f"(download ImageReward.pt and med_config.json from the hub repo {IMAGEREWARD_HUB_REPO})"
            )
        checkpoint, folder = found[0], local
    elif local.is_file():
        checkpoint, folder = local, local.parent
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)) and not str(path).startswith((".", "/")):
        from huggingface_hub import hf_hub_download

        checkpoint = Path(hf_hub_download(str(path), "ImageReward.pt"))
        if med_config is None:
            med_config = hf_hub_download(str(path), MED_CONFIG_NAME)
        return checkpoint, Path(med_config), tokenizer or DEFAULT_TOKENIZER
    else:
        raise FileNotFoundError(f"imagereward: {path} is neither a file, a folder nor a hub id")
    med = Path(med_config) if med_config is not None else folder / MED_CONFIG_NAME
    if not med.is_file():
        raise FileNotFoundError(
            f"imagereward: {med} not found (ImageReward's BERT config; it is on the hub repo "
            f"{IMAGEREWARD_HUB_REPO}, or pass med_config=)"
        )
    if tokenizer is None:
        has_vocab = (folder / "vocab.txt").is_file() or (folder / "tokenizer.json").is_file()
        tokenizer = folder if has_vocab else DEFAULT_TOKENIZER
    return checkpoint, med, tokenizer


def _build_blip(
    state: dict[str, Tensor],
    med: dict[str, Any],
    tokenizer: Any,
    *,
    vision_num_heads: int | None,
    source: Path,
) -> tuple[nn.Module, int]:
    """BlipVisionModel + BlipTextModel sized from the checkpoint's shapes and med_config.json.

    Returns:
        The module holding ``visual_encoder`` and ``text_encoder``, and the ViT's input size.
    """
    from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    def need(key: str) -> Tensor:
        if key not in state:
            raise ValueError(f"{source}: missing key {key!r} (not an ImageReward checkpoint?)")
        return state[key]

    width = int(need(_V + "cls_token").shape[-1])
    patch = int(need(_V + "patch_embed.proj.weight").shape[-1])
    num_positions = int(need(_V + "pos_embed").shape[1])
    grid = math.isqrt(num_positions - 1)
    if grid * grid != num_positions - 1:
        raise ValueError(f"{source}: {_V}pos_embed has {num_positions} positions, not 1 + a square grid")
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(re.escape(_V) + r"blocks\.(\d+)\.", k)))
    heads = vision_num_heads or max(1, width // 64)
    vision = BlipVisionConfig(
        hidden_size=width,
        intermediate_size=int(need(_V + "blocks.0.mlp.fc1.weight").shape[0]),
        num_hidden_layers=depth,
        num_attention_heads=heads,
        image_size=grid * patch,
        patch_size=patch,
        hidden_act="gelu",
        layer_norm_eps=1e-6,  # BLIP's VisionTransformer: partial(nn.LayerNorm, eps=1e-6)
    )
    if not med.get("add_cross_attention", False):
        raise ValueError(f"{source}: med_config.json must have add_cross_attention=true (ImageReward's BERT)")
    try:
        text = BlipTextConfig(
            vocab_size=int(med["vocab_size"]),
            hidden_size=int(med["hidden_size"]),
            encoder_hidden_size=width,  # BLIP overrides med_config's encoder_width with the ViT width
            intermediate_size=int(med["intermediate_size"]),
            num_hidden_layers=int(med["num_hidden_layers"]),
            num_attention_heads=int(med["num_attention_heads"]),
            max_position_embeddings=int(med["max_position_embeddings"]),
            hidden_act=med.get("hidden_act", "gelu"),
            layer_norm_eps=float(med.get("layer_norm_eps", 1e-12)),
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            pad_token_id=int(med.get("pad_token_id", 0)),
            # generation-only ids, taken from the tokenizer ([DEC], [SEP]) so they fit the vocabulary
            bos_token_id=tokenizer.bos_token_id,
            sep_token_id=tokenizer.sep_token_id,
            eos_token_id=tokenizer.sep_token_id,
            is_decoder=True,  # builds the cross-attention layers; forward passes is_decoder=False
        )
    except KeyError as err:
        raise ValueError(f"med_config.json: missing key {err.args[0]!r}") from None
    blip = nn.Module()
    blip.visual_encoder = BlipVisionModel(vision)
    blip.text_encoder = BlipTextModel(text, add_pooling_layer=False)
    return blip, grid * patch


def _load_strict(model: nn.Module, converted: dict[str, Tensor], *, source: Path) -> None:
    """Load every parameter, or name (in the published layout) the missing and misshapen keys."""
    own = model.state_dict()
    for key in own:  # a persistent position-id buffer (older transformers) is not in the checkpoint
        if key.endswith("embeddings.position_ids") and key not in converted:
            converted[key] = own[key]
    missing = [to_published_key(k) or k for k in own if k not in converted]
    unexpected = [to_published_key(k) or k for k in converted if k not in own]
    shapes = [
        f"{to_published_key(k) or k}: expected {tuple(own[k].shape)}, got {tuple(v.shape)}"
        for k, v in converted.items()
        if k in own and own[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s) (e.g. {missing[:5]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) (e.g. {unexpected[:5]})")
    if shapes:
        problems.append(f"{len(shapes)} key(s) with another shape (e.g. {shapes[:5]})")
    if problems:
        raise ValueError(f"{source}: weights do not fit the ImageReward model: " + "; ".join(problems))
    model.load_state_dict(converted, strict=True, assign=True)


def load_imagereward(
    path: str | Path = IMAGEREWARD_HUB_REPO,
    *,
    med_config: str | Path | None = None,
    tokenizer: str | Path | None = None,
    vision_num_heads: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 16,
) -> ImageRewardModel:
    """Load ImageReward from its published files.

    Args:
        path: a folder holding ``ImageReward.pt`` (or an ``ImageReward.safetensors`` conversion with
            the same keys) and ``med_config.json``; the checkpoint file itself (``med_config.json``
            next to it); or a hub id (default ``THUDM/ImageReward``, downloaded with huggingface_hub).
        med_config: ``med_config.json`` elsewhere than next to the checkpoint.
        tokenizer: BERT tokenizer folder or hub id; default the checkpoint's folder when it holds
            ``vocab.txt``/``tokenizer.json``, else ``bert-base-uncased``.
        vision_num_heads: ViT attention heads (not stored in the checkpoint); default width // 64.
        device, dtype, batch_size: where, in what precision and how many images per pass.

    Raises:
        FileNotFoundError: no checkpoint or ``med_config.json`` (names the path looked at).
        ValueError: keys outside the published layout, missing keys or other shapes (names the file
            and the first offending published keys), or a tokenizer larger than the vocabulary.
    """
    checkpoint, med_path, tokenizer_source = _resolve_files(path, med_config, tokenizer)
    state = load_state_dict_file(checkpoint)
    try:
        med = json.loads(med_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{med_path}: not valid JSON ({err})") from None
    converted = convert_imagereward_state_dict(state, source=checkpoint)
    tok = imagereward_tokenizer(tokenizer_source)
    if len(tok) > int(med.get("vocab_size", 0)):
        raise ValueError(
            f"imagereward: tokenizer {tokenizer_source} has {len(tok)} tokens (with [DEC], [ENC]) but "
            f"{med_path} has vocab_size {med.get('vocab_size')}"
        )
    from accelerate import init_empty_weights

    # Parameters on the meta device (no random init of ~450M weights); the checkpoint is assigned.
    with init_empty_weights(include_buffers=False):
        blip, image_size = _build_blip(state, med, tok, vision_num_heads=vision_num_heads, source=checkpoint)
        mlp = AestheticMLP(blip.text_encoder.config.hidden_size)
    model = ImageRewardModel(blip, mlp, tok, image_size=image_size, batch_size=batch_size)
    _load_strict(
        model, {k: v.float() if v.is_floating_point() else v for k, v in converted.items()}, source=checkpoint
    )
    model.to(device=device, dtype=dtype)
    return model.eval().requires_grad_(False)
