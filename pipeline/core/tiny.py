"""The `tiny` profile: small random-initialised models of the real architectures, built offline.

Each model is created from a config with a fixed seed, saved to a directory in the same layout the real
checkpoints use (config + safetensors weights + tokenizer/processor files), and then loaded back by the
stages through the very same `from_pretrained` / open_clip code as the paper models. Their scores mean
nothing; they exist so tests, CI and `item demo` exercise the whole pipeline without downloading anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.core.open_clip_files import save_open_clip_weights

# Words the tiny tokenizers know as whole tokens. Caption-like vocabulary keeps random captions readable.
CAPTION_WORDS = tuple(
    """
    a an the of on in with and near next to at by under over front top side two three some man woman person
    people child dog cat bird horse car bus truck bicycle boat train plane street road building house tree
    grass field beach water sky cloud mountain snow table chair room wall window door bed couch plate food
    pizza cake cup bottle book phone computer ball red blue green yellow white black brown small large old
    young standing sitting riding holding walking playing looking parked flying lying is are there
    """.split()
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
GENERATOR = "item.tiny"
GENERATOR_VERSION = 1


# ---------------------------------------------------------------- tokenizers


def _byte_alphabet() -> list[str]:
    """GPT-2's reversible byte→unicode table: every byte gets a printable stand-in character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _byte_level_bpe(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE vocabulary whose merges spell each word (with its leading space) left to right."""
    specials = ["<s>", "<pad>", "</s>", "<unk>"]  # OPT's ids: bos 0, pad 1, eos 2, unk 3
    vocab = {token: index for index, token in enumerate(specials)}
    for char in _byte_alphabet():
        vocab.setdefault(char, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in words:
        pieces = ["Ġ", *word]  # "Ġ" is the stand-in for the leading space byte
        left = pieces[0]
        for right in pieces[1:]:
            merged = left + right
            if merged not in vocab:
                merges.append((left, right))
                vocab[merged] = len(vocab)
            left = merged
    return vocab, merges


def tiny_opt_tokenizer(vocab_size: int | None = None, image_token: int | None = None):
    """OPT's byte-level BPE over the caption words; padded with filler tokens to `vocab_size` if given, with
    BLIP-2's `<image>` token at `image_token`, so a full-size decoder never emits an id without a token."""
    from transformers import GPT2Tokenizer

    vocab, merges = _byte_level_bpe(CAPTION_WORDS)
    _pad(vocab, vocab_size, {image_token: "<image>"} if image_token is not None else {})
    return GPT2Tokenizer(
        vocab=vocab, merges=merges, bos_token="</s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def tiny_bert_tokenizer(vocab_size: int | None = None, extra: tuple[str, ...] = ()):
    """A WordPiece vocabulary of the caption words and letters; padded with `[unusedN]` to `vocab_size` (as BERT's
    own vocabulary is), then followed by the `extra` tokens."""
    from transformers import BertTokenizer

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "'"]
    tokens += sorted(set(CAPTION_WORDS))
    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    tokens += list(letters) + [f"##{c}" for c in letters]
    vocab = {token: index for index, token in enumerate(tokens)}
    _pad(vocab, vocab_size, {}, filler="[unused{}]")
    for token in extra:
        vocab[token] = len(vocab)
    return BertTokenizer(vocab=vocab)


def _pad(vocab: dict[str, int], size: int | None, fixed: dict[int, str], filler: str = "<filler{}>") -> None:
    """Fills `vocab` up to `size` entries, with `fixed` tokens at their ids: rarely chosen by a random decoder
    (see `prefer_whole_words`), they only make every id decodable."""
    while len(vocab) < max(size or 0, *(index + 1 for index in fixed), 0):
        index = len(vocab)
        vocab[fixed.get(index, filler.format(index))] = index


# ---------------------------------------------------------------- models


def caption_config(vocab_size: int, image_token_index: int):
    """BLIP-2 (ViT + Q-Former + OPT), two layers of width 32 each, 4 query tokens, 64-pixel input."""
    from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, OPTConfig

    vision = Blip2VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=16
    )
    qformer = Blip2QFormerConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        encoder_hidden_size=32,
        vocab_size=vocab_size,
    )
    text = OPTConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=64,
        word_embed_proj_dim=32,
        bos_token_id=2,
        eos_token_id=2,
        pad_token_id=1,
    )
    return Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=4,
        image_token_index=image_token_index,
    )


def build_caption_model(directory: Path, seed: int) -> None:
    from transformers import Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor

    tokenizer = tiny_opt_tokenizer()
    image_processor = BlipImageProcessor(
        size={"height": 64, "width": 64}, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD)
    )
    processor = Blip2Processor(image_processor, tokenizer, num_query_tokens=4)  # adds the <image> token
    config = caption_config(len(tokenizer), tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    prefer_whole_words(model, tokenizer)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)


def prefer_whole_words(model, tokenizer) -> None:
    """Shrink the output embeddings of every token but the caption words so a random decoder picks whole words.

    Only cosmetic: it keeps random captions readable (and so gives the grounder phrases).
    """
    vocab = tokenizer.get_vocab()
    spelled = [f"Ġ{word}" if f"Ġ{word}" in vocab else word for word in CAPTION_WORDS]  # byte-level BPE or WordPiece
    whole_words = {vocab[token] for token in spelled if token in vocab}
    end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    with torch.no_grad():
        head = model.get_output_embeddings() or model.text_decoder.get_output_embeddings()  # BLIP: its decoder's
        embeddings = head.weight
        keep = torch.zeros(embeddings.shape[0], dtype=torch.bool)
        keep[sorted(whole_words)] = True
        keep[end] = True
        embeddings[~keep] *= 0.05
        embeddings[end] *= 0.3  # rarely end before a few words are out


def ground_config(vocab_size: int):
    """Grounding DINO (Swin + BERT + deformable transformer), one or two layers each, 16 queries."""
    from transformers import BertConfig, GroundingDinoConfig, SwinConfig

    backbone = SwinConfig(
        image_size=96,
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 2, 2],
        window_size=4,
        out_features=["stage2", "stage3", "stage4"],
    )
    text = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return GroundingDinoConfig(
        backbone_config=backbone.to_dict(),
        text_config=text.to_dict(),
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_queries=16,
        encoder_n_points=2,
        decoder_n_points=2,
        max_text_len=64,
    )


def build_ground_model(directory: Path, seed: int) -> None:
    from transformers import GroundingDinoForObjectDetection, GroundingDinoImageProcessor, GroundingDinoProcessor

    tokenizer = tiny_bert_tokenizer()
    image_processor = GroundingDinoImageProcessor(size={"shortest_edge": 96, "longest_edge": 96})
    processor = GroundingDinoProcessor(image_processor, tokenizer)
    torch.manual_seed(seed)
    GroundingDinoForObjectDetection(ground_config(len(tokenizer))).eval().save_pretrained(directory)
    processor.save_pretrained(directory)


# An open_clip ViT with quick-GELU, like OpenAI's ViT-L/14, at width 32 and 64-pixel input.
EMBED_MODEL_CFG = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def build_embed_model(directory: Path, seed: int) -> None:
    import open_clip

    preprocess_cfg = {"image_size": 64, "mean": list(CLIP_MEAN), "std": list(CLIP_STD)}
    torch.manual_seed(seed)
    save_open_clip_weights(open_clip.CLIP(**EMBED_MODEL_CFG).eval(), directory)
    config = {"model_cfg": EMBED_MODEL_CFG, "preprocess_cfg": preprocess_cfg}
    (directory / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")


BUILDERS = {
    "tiny-blip2": build_caption_model,
    "tiny-blip2-alt": build_caption_model,  # same architecture, another seed: a second captioner for ablations
    "tiny-grounding-dino": build_ground_model,
    "tiny-clip-quickgelu": build_embed_model,
    "tiny-clip-quickgelu-alt": build_embed_model,
}


def build(name: str, directory: Path, seed: int) -> None:
    """Writes the tiny model `name`, generated from `seed`, into the (empty) folder `directory`.

    The model store stages the folder and writes its manifest: see `ModelStore.generate`.
    """
    BUILDERS[name](Path(directory), seed)
