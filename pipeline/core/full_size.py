"""The published architectures at their real sizes, with random weights: measurable without any download.

`paper-random` and `small-random` use these. Each model is built from the config below (every number says where
it comes from), given a tokenizer built offline (tiny.py's, padded to the real vocabulary size), saved in the
layout of the real checkpoint and loaded back by the stages through the same `from_pretrained` / open_clip code
as a downloaded model. The compute per image is the real model's; the scores mean nothing.

Sources: the `config.json` of each model on the Hugging Face hub as transformers' conversion scripts write it
(`convert_blip_2_original_to_pytorch.py`, `convert_grounding_dino_to_hf.py`), and open_clip's built-in
architecture JSON (`open_clip/model_configs/*.json`). `PUBLISHED_PARAMETERS` holds the sizes the hub's model pages
list (they count stored tensors, tied copies included); `tests/unit/core/test_full_size.py` checks the builds
against them within 1%.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.core.open_clip_files import write_open_clip_config
from pipeline.core.tiny import (
    CLIP_MEAN,
    CLIP_STD,
    prefer_whole_words,
    tiny_bert_tokenizer,
    tiny_opt_tokenizer,
)

GENERATOR = "item.full-size"
GENERATOR_VERSION = 1

# Stored tensors on the hub's model pages (safetensors), tied copies included; open_clip's
# `docs/model_profile.csv` for CLIP.
PUBLISHED_PARAMETERS = {
    "blip2-opt-2.7b-random": 3.87e9,  # Salesforce/blip2-opt-2.7b
    "blip-image-captioning-base-random": 247e6,  # Salesforce/blip-image-captioning-base
    "grounding-dino-base-random": 233e6,  # IDEA-Research/grounding-dino-base
    "grounding-dino-tiny-random": 172e6,  # IDEA-Research/grounding-dino-tiny
    "clip-vit-l-14-random": 427.62e6,  # open_clip ViT-L-14
    "clip-vit-b-16-random": 149.62e6,  # open_clip ViT-B-16
}

OPT_VOCAB = 50304  # blip2-opt-2.7b's text_config: OPT's 50272 rounded up to a multiple of 64
OPT_IMAGE_TOKEN = 50265  # blip2-opt-2.7b's image_token_index: the first id after OPT's own tokens
BERT_VOCAB = 30522  # bert-base-uncased, the text encoder of Grounding DINO and the base of BLIP's decoder
BLIP_VOCAB = 30524  # BLIP adds [DEC] (its decoder's bos, id 30522) and [ENC]


# ---------------------------------------------------------------- configs


def blip2_opt_config():
    """BLIP-2 with EVA ViT-g/14 (39 of its 40 layers, as BLIP-2 uses it), the Q-Former and OPT-2.7B."""
    from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, OPTConfig

    vision = Blip2VisionConfig(
        hidden_size=1408,  # EVA ViT-g/14
        intermediate_size=6144,
        num_hidden_layers=39,  # BLIP-2 drops the last layer and reads the second-to-last features
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
        qkv_bias=True,
        layer_norm_eps=1e-6,
    )
    qformer = Blip2QFormerConfig(  # BERT-base, cross-attention every other layer into the ViT's width
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        cross_attention_frequency=2,
        encoder_hidden_size=1408,
    )
    text = OPTConfig(  # facebook/opt-2.7b
        vocab_size=OPT_VOCAB,
        hidden_size=2560,
        ffn_dim=10240,
        num_hidden_layers=32,
        num_attention_heads=32,
        max_position_embeddings=2048,
        word_embed_proj_dim=2560,
        bos_token_id=2,
        eos_token_id=2,  # blip2-opt-2.7b stops at "\n" (50118); our offline tokenizer has only </s>
        pad_token_id=1,
    )
    return Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=32,
        image_token_index=OPT_IMAGE_TOKEN,
    )


def blip_base_config(bos: int = BERT_VOCAB, eos: int = 102, pad: int = 0):
    """BLIP base captioning: ViT-B/16 at 384 px and a BERT-base decoder with cross-attention."""
    from transformers import BlipConfig, BlipTextConfig, BlipVisionConfig

    vision = BlipVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              image_size=384, patch_size=16)  # fmt: skip
    text = BlipTextConfig(vocab_size=BLIP_VOCAB, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                          num_attention_heads=12, bos_token_id=bos, eos_token_id=eos, sep_token_id=eos,
                          pad_token_id=pad)  # fmt: skip
    return BlipConfig(text_config=text.to_dict(), vision_config=vision.to_dict())


def grounding_dino_config(size: str):
    """Grounding DINO with a Swin-B (window 12, 384 px pretraining) or Swin-T (window 7) backbone and BERT-base."""
    from transformers import BertConfig, GroundingDinoConfig, SwinConfig

    swin = {
        "base": {"embed_dim": 128, "depths": [2, 2, 18, 2], "num_heads": [4, 8, 16, 32], "window_size": 12,
                 "image_size": 384},
        "tiny": {"embed_dim": 96, "depths": [2, 2, 6, 2], "num_heads": [3, 6, 12, 24], "window_size": 7,
                 "image_size": 224},
    }[size]  # fmt: skip
    backbone = SwinConfig(**swin, out_indices=[2, 3, 4])
    text = BertConfig(vocab_size=BERT_VOCAB)  # bert-base-uncased: 12 layers, width 768
    return GroundingDinoConfig(  # 6 + 6 layers of width 256, 900 queries, 4 levels × 4 points, 256 text tokens
        backbone_config=backbone.to_dict(),
        text_config=text.to_dict(),
        d_model=256,
        encoder_layers=6,
        decoder_layers=6,
        num_queries=900,
        max_text_len=256,
    )


def clip_config(architecture: str) -> dict:
    """open_clip's own JSON for a built-in architecture (ViT-L-14-quickgelu, ViT-B-16-quickgelu)."""
    import open_clip

    config = open_clip.get_model_config(architecture)
    if config is None:
        raise ValueError(f"open_clip has no built-in architecture {architecture!r}.")
    return config


# ---------------------------------------------------------------- builders


def blip2_processor():
    from transformers import Blip2Processor, BlipImageProcessor

    tokenizer = tiny_opt_tokenizer(vocab_size=OPT_VOCAB, image_token=OPT_IMAGE_TOKEN)
    image_processor = BlipImageProcessor(
        size={"height": 224, "width": 224}, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD)
    )
    return Blip2Processor(image_processor, tokenizer, num_query_tokens=32)


def grounding_dino_processor():
    from transformers import GroundingDinoImageProcessor, GroundingDinoProcessor

    return GroundingDinoProcessor(GroundingDinoImageProcessor(), tiny_bert_tokenizer(vocab_size=BERT_VOCAB))


def build_blip2(directory: Path, seed: int) -> None:
    from transformers import Blip2ForConditionalGeneration

    processor = blip2_processor()
    _save(Blip2ForConditionalGeneration, blip2_opt_config(), processor, directory, seed, processor.tokenizer)


def build_blip_base(directory: Path, seed: int) -> None:
    from transformers import BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    tokenizer = tiny_bert_tokenizer(vocab_size=BERT_VOCAB, extra=("[DEC]", "[ENC]"))
    tokenizer.bos_token = "[DEC]"  # BLIP's decoder starts every caption with it
    image_processor = BlipImageProcessor(
        size={"height": 384, "width": 384}, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD)
    )
    processor = BlipProcessor(image_processor, tokenizer)
    config = blip_base_config(bos=tokenizer.bos_token_id, eos=tokenizer.sep_token_id, pad=tokenizer.pad_token_id)
    _save(BlipForConditionalGeneration, config, processor, directory, seed, tokenizer)


def build_grounding_dino(size: str):
    def build(directory: Path, seed: int) -> None:
        from transformers import GroundingDinoForObjectDetection

        processor = grounding_dino_processor()
        _save(GroundingDinoForObjectDetection, grounding_dino_config(size), processor, directory, seed)

    return build


def build_clip(architecture: str):
    def build(directory: Path, seed: int) -> None:
        import open_clip
        from safetensors.torch import save_file

        torch.manual_seed(seed)
        model = open_clip.CLIP(**clip_config(architecture)).eval()
        directory.mkdir(parents=True, exist_ok=True)
        save_file(
            {name: t.contiguous() for name, t in model.state_dict().items()}, directory / "open_clip_model.safetensors"
        )
        write_open_clip_config(directory, architecture, "openai")  # OpenAI's preprocessing: 224 px, its mean/std

    return build


def _save(model_class, config, processor, directory: Path, seed: int, tokenizer=None) -> None:
    torch.manual_seed(seed)
    model = model_class(config).eval()
    if tokenizer is not None:
        prefer_whole_words(model, tokenizer)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)


def build_host_files(stage: str):
    """A simulated model's folder (the `sim` profile): the paper model's processor, tokenizer and config, which the
    host work needs, and no weights (pipeline.core.stages.simulated)."""

    def build(directory: Path, seed: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        if stage == "caption":
            blip2_processor().save_pretrained(directory)
            blip2_opt_config().save_pretrained(directory)
        elif stage == "ground":
            grounding_dino_processor().save_pretrained(directory)
            grounding_dino_config("base").save_pretrained(directory)
        else:
            write_open_clip_config(directory, "ViT-L-14-quickgelu", "openai")

    return build


SIMULATED_BUILDERS = {
    "sim-blip2-opt-2.7b": build_host_files("caption"),
    "sim-grounding-dino-base": build_host_files("ground"),
    "sim-clip-vit-l-14": build_host_files("embed"),
}
GROUNDING_SIZES = {"grounding-dino-base-random": "base", "grounding-dino-tiny-random": "tiny"}
CLIP_ARCHITECTURES = {"clip-vit-l-14-random": "ViT-L-14-quickgelu", "clip-vit-b-16-random": "ViT-B-16-quickgelu"}
BUILDERS = {
    "blip2-opt-2.7b-random": build_blip2,
    "blip-image-captioning-base-random": build_blip_base,
    **{name: build_grounding_dino(size) for name, size in GROUNDING_SIZES.items()},
    **{name: build_clip(architecture) for name, architecture in CLIP_ARCHITECTURES.items()},
}


def build(name: str, directory: Path, seed: int) -> None:
    """Writes the full-size random model `name` (or a simulated model's files), generated from `seed`, into the
    (empty) folder `directory`."""
    (BUILDERS | SIMULATED_BUILDERS)[name](Path(directory), seed)


def model_on_meta(name: str):
    """The model `name` built on the meta device: its exact parameter shapes, no memory, no weights."""
    import open_clip
    from transformers import (
        Blip2ForConditionalGeneration,
        BlipForConditionalGeneration,
        GroundingDinoForObjectDetection,
    )

    with torch.device("meta"):
        if name in CLIP_ARCHITECTURES:
            return open_clip.CLIP(**clip_config(CLIP_ARCHITECTURES[name]))
        if name == "blip2-opt-2.7b-random":
            return Blip2ForConditionalGeneration(blip2_opt_config())
        if name == "blip-image-captioning-base-random":
            return BlipForConditionalGeneration(blip_base_config())
        return GroundingDinoForObjectDetection(grounding_dino_config(GROUNDING_SIZES[name]))


def describe(name: str) -> dict:
    """Parameters of `name` (unique, and stored tensors as the hub counts them) beside the published size."""
    model = model_on_meta(name)
    return {
        "model": name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "stored": sum(t.numel() for t in model.state_dict().values()),
        "published": PUBLISHED_PARAMETERS[name],
    }
