"""Tiny random VLMs of every supported family, built from each family's transformers config.

No download: the config is `AutoConfig.for_model(model_type, ...)` with small sizes,
the weights come from `AutoModelForImageTextToText.from_config`, the tokenizer is a
word-level `tokenizers` tokenizer holding the family's special tokens, and the image
processor is the family's own (PIL backend) at 16 x 16 pixels. The folders carry the
same tensor names and files as real checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

IMAGE = 16  # pixels a side
PATCH = 4
WORDS = ["a", "red", "blue", "square", "circle", "on", "the", "left", "right", "describe", "image", "."]
BASE_SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]


@dataclass(frozen=True)
class Family:
    model_type: str
    config: dict[str, Any]  # AutoConfig.for_model kwargs; "{tok}" strings become token ids
    tokens: dict[str, str]  # tokenizer attribute -> special token (extra_special_tokens)
    processor: Callable[[Any], Any] | None  # tokenizer -> processor; None where it cannot be built here
    prompt: str  # text with the family's image placeholder (for the processor), or already expanded (without one)
    extra_tokens: tuple[str, ...] = ()
    # Where transformers cannot build the processor in this environment (its video processor needs
    # torchvision, SmolVLM's needs num2words): the family's image processor alone, and `prompt` holds
    # the image tokens as the processor would have expanded them.
    image_processor: Callable[[], Any] | None = None
    why_no_processor: str = ""


def _text(model_type: str, **extra: Any) -> dict[str, Any]:
    return {"model_type": model_type, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8, "max_position_embeddings": 256,
            **extra}


def _vision(model_type: str | None = None, **extra: Any) -> dict[str, Any]:
    out = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
           "image_size": IMAGE, "patch_size": PATCH, **extra}
    return {"model_type": model_type, **out} if model_type else out


def _llava_processor(tok: Any) -> Any:
    from transformers import CLIPImageProcessorPil, LlavaProcessor
    return LlavaProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": IMAGE}, crop_size=IMAGE),
                          tokenizer=tok, patch_size=PATCH, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1)


def _llava_next_processor(tok: Any) -> Any:
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": IMAGE}, crop_size=IMAGE,
                                    image_grid_pinpoints=[[IMAGE, IMAGE]])
    return LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=PATCH,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)


def _qwen_image_processor() -> Any:
    from transformers import Qwen2VLImageProcessorPil
    return Qwen2VLImageProcessorPil(patch_size=PATCH, merge_size=2, temporal_patch_size=2,
                                    min_pixels=IMAGE * IMAGE, max_pixels=IMAGE * IMAGE)


def _got_ocr2_image_processor() -> Any:
    from transformers import GotOcr2ImageProcessorPil
    return GotOcr2ImageProcessorPil(size={"height": IMAGE, "width": IMAGE}, crop_to_patches=False)


def _onevision_image_processor() -> Any:
    from transformers import LlavaOnevisionImageProcessorPil
    return LlavaOnevisionImageProcessorPil(size={"height": IMAGE, "width": IMAGE},
                                           image_grid_pinpoints=[[IMAGE, IMAGE]])


def _idefics3_image_processor(ip_name: str) -> Callable[[], Any]:
    def build() -> Any:
        import transformers
        return getattr(transformers, ip_name)(size={"longest_edge": IMAGE}, max_image_size={"longest_edge": IMAGE},
                                              do_image_splitting=False)
    return build


def _pixtral_image_processor() -> Any:
    from transformers import PixtralImageProcessorPil
    return PixtralImageProcessorPil(size={"longest_edge": IMAGE}, patch_size=PATCH)


def _gemma3_processor(tok: Any) -> Any:
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor
    return Gemma3Processor(image_processor=Gemma3ImageProcessorPil(size={"height": IMAGE, "width": IMAGE}),
                           tokenizer=tok, image_seq_length=4)


def _paligemma_processor(tok: Any) -> Any:
    from transformers import PaliGemmaProcessor, SiglipImageProcessorPil
    ip = SiglipImageProcessorPil(size={"height": IMAGE, "width": IMAGE})
    ip.image_seq_length = (IMAGE // PATCH) ** 2
    return PaliGemmaProcessor(image_processor=ip, tokenizer=tok)


def _idefics3_processor(tok: Any) -> Any:
    from transformers import Idefics3Processor
    return Idefics3Processor(image_processor=_idefics3_image_processor("Idefics3ImageProcessorPil")(), tokenizer=tok,
                             image_seq_len=4)


def _mllama_processor(tok: Any) -> Any:
    from transformers import MllamaImageProcessorPil, MllamaProcessor
    ip = MllamaImageProcessorPil(size={"height": IMAGE, "width": IMAGE}, max_image_tiles=2)
    return MllamaProcessor(image_processor=ip, tokenizer=tok)


def _aya_processor(tok: Any) -> Any:
    from transformers import AyaVisionProcessor
    ip = _got_ocr2_image_processor()
    return AyaVisionProcessor(image_processor=ip, tokenizer=tok, patch_size=PATCH, img_size=IMAGE, downsample_factor=2)


QWEN_TOKENS = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
               "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}
QWEN_IDS = {"image_token_id": "{<|image_pad|>}", "video_token_id": "{<|video_pad|>}",
            "vision_start_token_id": "{<|vision_start|>}", "vision_end_token_id": "{<|vision_end|>}"}
# 16 x 16 pixels in 4-pixel patches, merged 2 x 2: four image tokens
QWEN_PROMPT = "<|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|> describe the image ."
NO_VIDEO = "its processor needs a video processor, which needs torchvision (not installed)"
MROPE = {"rope_type": "default", "mrope_section": [1, 1, 2]}

FAMILIES: dict[str, Family] = {f.model_type: f for f in [
    Family("llava", {"text_config": _text("llama"), "vision_config": _vision("clip_vision_model"),
                     "image_token_index": "{<image>}", "image_seq_length": 16},
           {"image_token": "<image>"}, _llava_processor, "<image> describe the image ."),
    Family("llava_next", {"text_config": _text("llama"), "vision_config": _vision("clip_vision_model"),
                          "image_token_index": "{<image>}", "image_grid_pinpoints": [[IMAGE, IMAGE]]},
           {"image_token": "<image>"}, _llava_next_processor, "<image> describe the image ."),
    Family("llava_onevision", {"text_config": _text("qwen2"), "vision_config": _vision("siglip_vision_model"),
                               "image_token_index": "{<image>}", "video_token_index": "{<video>}",
                               "image_grid_pinpoints": [[IMAGE, IMAGE]], "vision_aspect_ratio": "anyres_max_1"},
           {"image_token": "<image>", "video_token": "<video>"}, None, "describe the image .",
           image_processor=_onevision_image_processor,
           why_no_processor=NO_VIDEO + "; its anyres token layout is not rebuilt here, so it generates from text"),
    Family("vipllava", {"text_config": _text("llama"),
                        "vision_config": _vision("clip_vision_model", num_hidden_layers=4),
                        "image_token_index": "{<image>}", "vision_feature_layers": [-2, -1]},
           {"image_token": "<image>"}, _llava_processor, "<image> describe the image ."),
    Family("qwen2_vl", {"text_config": _text("qwen2_vl_text", rope_parameters=MROPE),
                        "vision_config": {"embed_dim": 16, "depth": 2, "num_heads": 2, "hidden_size": 16,
                                          "mlp_ratio": 2,
                                          "patch_size": PATCH, "spatial_merge_size": 2, "temporal_patch_size": 2},
                        **QWEN_IDS}, QWEN_TOKENS, None, QWEN_PROMPT,
           image_processor=_qwen_image_processor, why_no_processor=NO_VIDEO),
    Family("qwen2_5_vl", {"text_config": _text("qwen2_5_vl_text", rope_parameters=MROPE),
                          "vision_config": {"hidden_size": 16, "depth": 2, "num_heads": 2, "out_hidden_size": 16,
                                            "intermediate_size": 32, "patch_size": PATCH, "spatial_merge_size": 2,
                                            "temporal_patch_size": 2, "window_size": 16, "fullatt_block_indexes": [1]},
                          **QWEN_IDS}, QWEN_TOKENS, None, QWEN_PROMPT,
           image_processor=_qwen_image_processor, why_no_processor=NO_VIDEO),
    Family("qwen3_vl", {"text_config": _text("qwen3_vl_text", rope_parameters={**MROPE, "mrope_interleaved": True}),
                        "vision_config": {"hidden_size": 16, "depth": 2, "num_heads": 2, "out_hidden_size": 16,
                                          "intermediate_size": 32, "patch_size": PATCH, "spatial_merge_size": 2,
                                          "temporal_patch_size": 2, "num_position_embeddings": 16,
                                          "deepstack_visual_indexes": [1]},
                        **QWEN_IDS}, QWEN_TOKENS, None, QWEN_PROMPT,
           image_processor=_qwen_image_processor, why_no_processor=NO_VIDEO),
    Family("internvl", {"text_config": _text("qwen2"),
                        "vision_config": _vision(image_size=[IMAGE, IMAGE], patch_size=[PATCH, PATCH]),
                        "image_token_id": "{<IMG_CONTEXT>}", "downsample_ratio": 0.5},
           {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>"}, None, "<img>" + "<IMG_CONTEXT>" * 4 + "</img> describe the image .",
           image_processor=_got_ocr2_image_processor, why_no_processor=NO_VIDEO),
    Family("gemma3", {"text_config": _text("gemma3_text", sliding_window=8),
                      "vision_config": _vision("siglip_vision_model"),
                      "mm_tokens_per_image": 4, "image_token_index": "{<image_soft_token>}",
                      "boi_token_index": "{<start_of_image>}", "eoi_token_index": "{<end_of_image>}"},
           {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"},
           _gemma3_processor, "<start_of_image> describe the image ."),
    Family("paligemma",
           {"text_config": _text("gemma"), "vision_config": _vision("siglip_vision_model", projection_dim=16),
                         "image_token_index": "{<image>}", "projection_dim": 16, "hidden_size": 16},
           {"image_token": "<image>"}, _paligemma_processor, "<image> describe the image ."),
    Family("idefics3", {"text_config": _text("llama"), "vision_config": _vision(), "image_token_id": "{<image>}",
                        "scale_factor": 2},
           {"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
            "global_image_token": "<global-img>",
            "end_of_utterance_token": "<end_of_utterance>"},
           _idefics3_processor, "<image> describe the image ."),
    Family("smolvlm", {"text_config": _text("llama"), "vision_config": _vision(), "image_token_id": "{<image>}",
                       "scale_factor": 2},
           {"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
            "global_image_token": "<global-img>",
            "end_of_utterance_token": "<end_of_utterance>"},
           None,
           "<fake_token_around_image><global-img>" + "<image>" * 4 + "<fake_token_around_image> describe the image .",
           image_processor=_idefics3_image_processor("SmolVLMImageProcessorPil"),
           why_no_processor=NO_VIDEO + " and num2words"),
    Family("mistral3", {"text_config": _text("mistral"),
                        "vision_config": {"model_type": "pixtral", "hidden_size": 16, "intermediate_size": 32,
                                          "num_hidden_layers": 2, "num_attention_heads": 2, "head_dim": 8,
                                          "image_size": IMAGE, "patch_size": PATCH},
                        "image_token_index": "{[IMG]}", "spatial_merge_size": 2},
           {"image_token": "[IMG]", "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]"},
           None, "[IMG][IMG][IMG_BREAK][IMG][IMG][IMG_END] describe the image .",
           image_processor=_pixtral_image_processor,
           why_no_processor="PixtralProcessor needs torchvision (not installed)"),
    Family("mllama", {"text_config": _text("mllama_text_model", cross_attention_layers=[1], pad_token_id="{<pad>}",
                                           bos_token_id="{<s>}", eos_token_id="{</s>}"),
                      "vision_config": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                                        "num_global_layers": 1, "attention_heads": 2, "image_size": IMAGE,
                                        "patch_size": PATCH, "intermediate_layers_indices": [0], "max_num_tiles": 2,
                                        "vision_output_dim": 32, "supported_aspect_ratios": [[1, 1], [1, 2], [2, 1]]},
                      "image_token_index": "{<|image|>}"},
           {"image_token": "<|image|>"}, _mllama_processor, "<|image|> describe the image .",
           extra_tokens=("<|begin_of_text|>", "<|python_tag|>")),
    Family("aya_vision", {"text_config": _text("cohere2"), "vision_config": _vision("siglip_vision_model"),
                          "image_token_index": "{<|IMG_PATCH|>}", "downsample_factor": 2},
           {"image_token": "<|IMG_PATCH|>"}, _aya_processor, "<image> describe the image .",
           extra_tokens=("<image>", "<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_LINE_BREAK|>", "TILE", "TILE_GLOBAL")),
]}


def build_tokenizer(family: Family) -> Any:
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    special = list(dict.fromkeys([*BASE_SPECIAL, *family.tokens.values(), *family.extra_tokens]))
    vocab = {t: i for i, t in enumerate(special + WORDS)}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", additional_special_tokens=special[len(BASE_SPECIAL):],
                                   extra_special_tokens=dict(family.tokens), model_max_length=512)


def _resolve(value: Any, tok: Any) -> Any:
    if isinstance(value, str) and value.startswith("{") and value.endswith("}"):
        return tok.convert_tokens_to_ids(value[1:-1])
    if isinstance(value, dict):
        return {k: _resolve(v, tok) for k, v in value.items()}
    return value


def build_config(family: Family, tok: Any) -> Any:
    from transformers import AutoConfig

    kwargs = _resolve(family.config, tok)
    kwargs["text_config"] = {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id,
                             "eos_token_id": tok.eos_token_id, **kwargs["text_config"]}
    return AutoConfig.for_model(family.model_type, **kwargs)


@dataclass
class Built:
    family: Family
    base: Path
    experts: list[Path] = field(default_factory=list)


def perturbed(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Every floating tensor moved by a seeded amount (so a dropped or unassigned tensor shows)."""
    g = torch.Generator().manual_seed(seed)
    return {k: (v + 0.01 * torch.randn(v.shape, generator=g, dtype=v.dtype)) if v.is_floating_point() else v.clone()
            for k, v in state.items()}


def build_family(family: Family, root: Path, n_experts: int = 2) -> Built:
    """Base and `n_experts` experts (every tensor perturbed) of `family`, saved with save_pretrained."""
    from transformers import AutoModelForImageTextToText

    tok = build_tokenizer(family)
    processor = family.processor(tok) if family.processor else family.image_processor()
    config = build_config(family, tok)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForImageTextToText.from_config(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    built = Built(family, root / "base")
    for i, folder in enumerate([built.base, *[root / f"expert_{k + 1}" for k in range(n_experts)]]):
        model.load_state_dict(base_state if i == 0 else perturbed(base_state, i), strict=True)
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        if family.processor is None:
            tok.save_pretrained(folder)
        if i:
            built.experts.append(folder)
    return built
