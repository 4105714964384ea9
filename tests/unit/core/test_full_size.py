"""Full-size random models: the published architectures, shape for shape, built without a download."""

import pytest

from pipeline.core import full_size
from pipeline.core.profiles import get_profile
from pipeline.core.tiny import tiny_bert_tokenizer, tiny_opt_tokenizer


@pytest.mark.parametrize("name", sorted(full_size.BUILDERS))
def test_the_architecture_has_the_published_parameter_count(name):
    counted = full_size.describe(name)  # built on the meta device: shapes only, no memory
    assert counted["stored"] == pytest.approx(counted["published"], rel=0.01), counted
    assert counted["parameters"] <= counted["stored"]  # tied copies (decoder embeddings) counted once


def test_paper_random_has_the_papers_shapes():
    config = full_size.model_on_meta("blip2-opt-2.7b-random").config
    vision, text = config.vision_config, config.text_config
    assert (vision.num_hidden_layers, vision.hidden_size, vision.image_size, vision.patch_size) == (39, 1408, 224, 14)
    assert (text.num_hidden_layers, text.hidden_size, text.num_attention_heads, text.ffn_dim) == (32, 2560, 32, 10240)
    assert config.num_query_tokens == 32
    swin = full_size.model_on_meta("grounding-dino-base-random").config.backbone_config
    assert (swin.embed_dim, list(swin.depths), swin.window_size) == (128, [2, 2, 18, 2], 12)


@pytest.mark.parametrize("profile", ["paper-random", "small-random"])
def test_random_profiles_are_generated_and_marked_meaningless(profile):
    chosen = get_profile(profile)
    assert chosen.meaningless_scores
    assert all(spec.generated and spec.name in full_size.BUILDERS for spec in chosen.specs.values())
    # Shape-faithful work per image: the paper's grounding canvas and CLIP settings, fixed-length captions.
    assert chosen.ground.params["canvas"] == get_profile("paper").ground.params["canvas"]
    caption = chosen.caption.params
    assert (
        caption["min_new_tokens"] == caption["max_new_tokens"] == get_profile("paper").caption.params["max_new_tokens"]
    )


def test_padded_tokenizers_decode_every_id_of_the_full_size_vocabularies():
    opt = tiny_opt_tokenizer(vocab_size=full_size.OPT_VOCAB, image_token=full_size.OPT_IMAGE_TOKEN)
    assert len(opt) == full_size.OPT_VOCAB and opt.convert_tokens_to_ids("<image>") == full_size.OPT_IMAGE_TOKEN
    assert opt.decode([full_size.OPT_VOCAB - 1, opt.convert_tokens_to_ids("Ġdog")]).endswith(" dog")
    bert = tiny_bert_tokenizer(vocab_size=full_size.BERT_VOCAB, extra=("[DEC]", "[ENC]"))
    assert len(bert) == full_size.BLIP_VOCAB and bert.convert_tokens_to_ids("[DEC]") == full_size.BERT_VOCAB
    assert bert.decode([full_size.BERT_VOCAB - 1]) == f"[unused{full_size.BERT_VOCAB - 1}]"
    # The tiny profile's own tokenizers are unchanged by the padding (their models' revisions stay the same).
    assert len(tiny_opt_tokenizer()) < 1000 and len(tiny_bert_tokenizer()) < 1000
