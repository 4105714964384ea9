"""A batch's host work done ahead (`Detector.prepare`) and what the device then does with it: the same detections as
preparing on the spot, parts of a prepared batch for its halves, each phrase's best query picked on the device as
the CPU picked it, and a static cache's partial runs padded to a few fixed sizes (real tiny models throughout)."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.core.imaging import StageImage, picture_size
from pipeline.core.prepared import Prepared, StageInputs
from pipeline.core.profiles import get_profile
from pipeline.core.results import Artifacts, GroundedObject
from pipeline.core.stages.caption import Captioner
from pipeline.core.stages.ground import _phrase_tokens, _prompt, _to_pixels
from tests.conftest import decoded

# Sizes around the tiny grounder's 96-pixel canvas: smaller ones reach the stages as they are, larger ones are
# downscaled once (to pixel tensors).
IMAGES = [decoded(seed, 60 + 10 * seed, 80) for seed in range(6)] + [decoded(6, 300, 200), decoded(7, 90, 240)]


# ---------------------------------------------------------------- Prepared and StageInputs


def _shares_memory(part: torch.Tensor, whole: torch.Tensor) -> bool:
    start, end = whole.data_ptr(), whole.data_ptr() + whole.numel() * whole.element_size()
    return part.numel() == 0 or start <= part.data_ptr() < end


def test_a_part_renumbers_its_rows_and_slices_without_copying():
    data = torch.arange(4 * 3).reshape(4, 3)
    inputs = StageInputs([0, 2, 3, 5], data)  # batch positions 1 and 4 need nothing from this stage
    part = inputs.part(2, 5)
    assert part.rows == [0, 1]  # positions 2 and 3, from the part's start
    assert torch.equal(part.data, data[1:3]) and _shares_memory(part.data, data)
    part.data[0, 0] = -1
    assert data[1, 0] == -1  # a view: nothing was copied
    assert inputs.part(0, 2).rows == [0] and torch.equal(inputs.part(0, 2).data, data[:1])
    assert inputs.part(4, 6).rows == [1] and torch.equal(inputs.part(4, 6).data, data[3:])
    empty = inputs.part(1, 2)  # position 1 has no row here
    assert empty.rows == [] and empty.data.shape == (0, 3)


def test_a_part_of_a_dict_slices_every_tensor_and_of_a_list_keeps_the_same_tensors():
    ids, mask = torch.arange(10).reshape(5, 2), torch.ones(5, 2)
    part = StageInputs([0, 1, 2, 3, 4], {"ids": ids, "mask": mask}).part(3, 5)
    assert part.rows == [0, 1] and set(part.data) == {"ids", "mask"}
    assert torch.equal(part.data["ids"], ids[3:]) and _shares_memory(part.data["ids"], ids)
    assert _shares_memory(part.data["mask"], mask)
    pictures = [torch.zeros(2, 2, 3, dtype=torch.uint8) for _ in range(3)]
    listed = StageInputs([1, 2, 4], pictures).part(2, 5)
    assert listed.rows == [0, 2] and listed.data[0] is pictures[1] and listed.data[1] is pictures[2]


def test_inputs_are_handed_over_only_for_the_images_they_were_prepared_for():
    data = torch.zeros(3, 2)
    prepared = Prepared([None] * 4, {"caption": StageInputs([0, 1, 3], data)})
    assert prepared.of("caption", [0, 1, 3]) is data
    assert prepared.of("caption", [0, 1]) is None  # a stored caption spared one: the stage prepares itself
    assert prepared.of("caption", [0, 1, 2, 3]) is None
    assert prepared.of("ground", [0, 1, 3]) is None  # nothing prepared for this stage


def test_a_prepared_batchs_part_is_its_images_and_inputs_from_the_start():
    staged = [StageImage(None, pixels=torch.full((2, 2, 3), i, dtype=torch.uint8)) for i in range(4)]
    inputs = {"caption": StageInputs([0, 1, 2, 3], torch.arange(4)), "ground": StageInputs([1, 3], torch.arange(2))}
    prepared = Prepared(staged, inputs, ms_per_image=2.5)
    second = prepared.part(2, 4)
    assert second.staged == staged[2:] and second.ms_per_image == 2.5
    assert second.of("caption", [0, 1]).tolist() == [2, 3]
    assert second.of("ground", [1]).tolist() == [1]
    first = prepared.part(0, 2)
    assert first.of("ground", [1]).tolist() == [0] and first.of("ground", [0, 1]) is None


# ---------------------------------------------------------------- prepared ahead, detected later


def _summary(detections) -> list:
    return [(d.sha256, d.caption, [(o.phrase, o.box, o.score) for o in d.objects]) for d in detections]


@pytest.fixture
def prepared_by_stage(tiny_detector, monkeypatch):
    """How many images each stage prepared itself (instrumentation: the stages still prepare)."""
    counts = {"caption": 0, "ground": 0, "embed": 0}
    for stage in (tiny_detector.captioner, tiny_detector.grounder, tiny_detector.embedder):

        def counting(images, _name=stage.name, _method=stage.prepare):
            counts[_name] += len(images)
            return _method(images)

        monkeypatch.setattr(stage, "prepare", counting)
    return counts


@pytest.fixture(scope="module")
def first(tiny_detector) -> list:
    """IMAGES detected as they are: nothing stored, nothing prepared ahead."""
    return tiny_detector.detect(IMAGES)


def _known(first) -> list[Artifacts | None]:
    """What a ledger might hold of IMAGES: nothing, a caption, a caption without any noun phrase, caption and
    boxes, or features (that image then comes without pixels)."""
    return [
        None,
        Artifacts(caption=first[1].caption),
        None,
        Artifacts(caption="is on the"),  # no phrase: the grounder leaves this image out of its model call
        Artifacts(caption=first[4].caption, objects=first[4].artifacts.objects),
        first[5].artifacts,
        Artifacts(caption="a dog on a red car near a tree and a man"),
        None,
    ]


KNOWN_IMAGES = [None if index == 5 else image for index, image in enumerate(IMAGES)]  # features known: no pixels


@pytest.fixture(scope="module")
def with_known(tiny_detector, first) -> tuple[list, list]:
    """What is known of IMAGES (`_known`), and their detections with it, prepared on the spot."""
    known = _known(first)
    return known, tiny_detector.detect(KNOWN_IMAGES, known)


def test_detecting_on_prepared_inputs_gives_the_same_detections(tiny_detector, first, prepared_by_stage):
    prepared = tiny_detector.prepare(IMAGES)
    assert set(prepared.inputs) == {"caption", "ground", "embed"}
    assert all(inputs.rows == list(range(len(IMAGES))) for inputs in prepared.inputs.values())
    assert [picture_size(s.pixels) for s in prepared.staged][-2:] == [(96, 64), (36, 96)]  # downscaled once
    prepared_by_stage.update(caption=0, ground=0, embed=0)
    ahead = tiny_detector.detect(IMAGES, prepared=prepared)
    assert prepared_by_stage == {"caption": 0, "ground": 0, "embed": 0}  # nothing prepared on the model thread
    assert _summary(ahead) == _summary(first)
    assert [d.p_fake for d in ahead] == pytest.approx([d.p_fake for d in first], abs=1e-6)
    assert all(d.timings_ms["prepare"] == prepared.ms_per_image for d in ahead)


def test_with_stored_artifacts_each_stage_gets_inputs_for_its_own_images(tiny_detector, with_known, prepared_by_stage):
    known, plain = with_known
    prepared = tiny_detector.prepare(KNOWN_IMAGES, known)
    assert prepared.inputs["caption"].rows == [0, 2, 7]
    assert prepared.inputs["ground"].rows == [0, 1, 2, 3, 6, 7]
    assert prepared.inputs["embed"].rows == [0, 1, 2, 3, 4, 6, 7]
    assert prepared.staged[5] is None
    prepared_by_stage.update(caption=0, ground=0, embed=0)
    ahead = tiny_detector.detect(KNOWN_IMAGES, known, prepared)
    assert prepared_by_stage == {"caption": 0, "ground": 0, "embed": 0}
    assert _summary(ahead) == _summary(plain)
    assert [d.p_fake for d in ahead] == pytest.approx([d.p_fake for d in plain], abs=1e-6)
    assert ahead[3].objects == [] and ahead[5].timings_ms["prepare"] == 0.0
    assert [d.computed for d in ahead] == [d.computed for d in plain]


def test_inputs_prepared_for_other_images_are_not_used(tiny_detector, with_known, prepared_by_stage):
    known, plain = with_known
    # Prepared as if only image 5's features were stored: every other image for every stage.
    less = tiny_detector.prepare(KNOWN_IMAGES, [k if index == 5 else None for index, k in enumerate(known)])
    prepared_by_stage.update(caption=0, ground=0, embed=0)
    ahead = tiny_detector.detect(KNOWN_IMAGES, known, less)
    # The captioner and the grounder have fewer images to run than were prepared: each prepares its own (the
    # grounder without image 3, which has no phrase); CLIP runs exactly the images prepared, and takes them.
    assert prepared_by_stage == {"caption": 3, "ground": 5, "embed": 0}
    assert _summary(ahead) == _summary(plain)
    assert [d.p_fake for d in ahead] == pytest.approx([d.p_fake for d in plain], abs=1e-6)


def test_each_part_of_a_prepared_batch_detects_as_the_whole(tiny_detector, with_known, prepared_by_stage):
    known, whole = with_known
    prepared = tiny_detector.prepare(KNOWN_IMAGES, known)
    prepared_by_stage.update(caption=0, ground=0, embed=0)
    parts = []
    for start, end in ((0, 3), (3, 8)):  # uneven, as a batch of checks halves after the GPU ran out of memory
        parts += tiny_detector.detect(KNOWN_IMAGES[start:end], known[start:end], prepared.part(start, end))
    assert prepared_by_stage == {"caption": 0, "ground": 0, "embed": 0}
    assert _summary(parts) == _summary(whole)
    assert [d.p_fake for d in parts] == pytest.approx([d.p_fake for d in whole], abs=1e-6)


# ---------------------------------------------------------------- grounding: each phrase's best query


def _owners_reference(offsets, attention, spans) -> torch.Tensor:
    """Token t belongs to phrase p when it is attended, not empty, and within p's character span."""
    rows, tokens = len(spans), len(offsets[0])
    most = max(len(row) for row in spans)
    owners = torch.zeros(rows, most, tokens)
    for b in range(rows):
        for p, (first, last) in enumerate(spans[b]):
            for t in range(tokens):
                start, end = offsets[b][t]
                owners[b, p, t] = float(bool(attention[b][t]) and end > start and first <= start and end <= last)
    return owners


@st.composite
def tokenised_prompts(draw):
    """Rows of (disjoint phrase spans, token offsets, attention), as a tokenizer gives them, in any shape."""
    rows, tokens = draw(st.integers(1, 3)), draw(st.integers(1, 12))
    spans, offsets, attention = [], [], []
    for _ in range(rows):
        cuts = sorted(draw(st.lists(st.integers(0, 30), min_size=2, max_size=9, unique=True)))
        spans.append([(cuts[i], cuts[i + 1]) for i in range(0, len(cuts) - 1, 2)])
        starts = draw(st.lists(st.integers(0, 32), min_size=tokens, max_size=tokens))
        lengths = draw(st.lists(st.integers(0, 6), min_size=tokens, max_size=tokens))
        offsets.append([(start, start + length) for start, length in zip(starts, lengths, strict=True)])
        attention.append(draw(st.lists(st.integers(0, 1), min_size=tokens, max_size=tokens)))
    return spans, offsets, attention


@settings(max_examples=300, deadline=None)
@given(tokenised_prompts())
def test_phrase_tokens_are_the_tokens_within_each_phrases_span(prompt):
    spans, offsets, attention = prompt
    owners = _phrase_tokens(torch.tensor(offsets), torch.tensor(attention), spans)
    assert owners.dtype == torch.float32
    assert torch.equal(owners, _owners_reference(offsets, attention, spans))


def _token_phrases(offsets, attention, spans) -> list[int]:
    """The CPU rule before the device pick (git 46f0f92~1, pipeline/core/stages/ground.py): each token's phrase."""
    owners = []
    for (start, end), attended in zip(offsets.tolist(), attention.tolist(), strict=True):
        owner = -1
        if attended and end > start:
            owner = next((i for i, (s, e) in enumerate(spans) if s <= start and end <= e), -1)
        owners.append(owner)
    return owners


def _pick(grounder, probabilities, boxes, token_phrase, phrases, image) -> list[GroundedObject]:
    """The CPU rule before the device pick (git 46f0f92~1, `Grounder._pick`): for each phrase the query with the
    highest probability over its tokens, kept if that reaches box_threshold; the best max_objects by score."""
    width, height = picture_size(image)
    found = []
    for index, phrase in enumerate(phrases):
        tokens = [t for t, p in enumerate(token_phrase) if p == index and t < probabilities.shape[-1]]
        if not tokens:
            continue
        per_query = probabilities[:, tokens].max(dim=1).values
        best = int(per_query.argmax())
        score = float(per_query[best])
        box = _to_pixels(boxes[best].tolist(), max(width, height), width, height)
        if score >= grounder.params["box_threshold"] and box is not None:
            found.append(GroundedObject(phrase, box, score))
    found.sort(key=lambda obj: obj.score, reverse=True)
    return found[: grounder.params["max_objects"]]


WORDS = ("dog", "red car", "tree", "man", "old wooden table", "window", "small white boat", "lamp", "bird", "road")


def test_the_device_pick_is_the_cpu_rule_on_the_same_model_outputs(tiny_detector, monkeypatch):
    grounder = tiny_detector.grounder
    grounder.load()
    model, outputs = grounder.model, []

    def recording(**inputs):  # the real model; its outputs kept for the reference
        result = model(**inputs)
        outputs.append(result)
        return result

    monkeypatch.setattr(grounder, "model", recording)
    images = [IMAGES[0].image, IMAGES[2].image, IMAGES[3].image, IMAGES[6].image]
    phrases = [
        ["dog", "red car", "tree", "man"],
        [],  # no phrases: left out of the model call
        list(WORDS[3:]),  # many phrases, within the model's 64 text tokens
        ["small white boat", "lamp"],
    ]
    found = grounder.ground(images, phrases)
    assert len(outputs) == 1 and found[1] == []
    rows = [0, 2, 3]
    prompts = [_prompt(phrases[i]) for i in rows]
    text = grounder.processor.tokenizer(
        [prompt for prompt, _ in prompts], padding=True, return_offsets_mapping=True, return_tensors="pt"
    )
    probabilities = outputs[0].logits.float().sigmoid()
    expected = []
    for row, index in enumerate(rows):
        owners = _token_phrases(text["offset_mapping"][row], text["attention_mask"][row], prompts[row][1])
        boxes = outputs[0].pred_boxes[row].float()
        expected.append(_pick(grounder, probabilities[row], boxes, owners, phrases[index], images[index]))
    assert sum(map(len, expected)) >= 4  # the reference found objects: there was something to pick
    for objects, reference in zip([found[i] for i in rows], expected, strict=True):
        assert [(o.phrase, o.box) for o in objects] == [(o.phrase, o.box) for o in reference]
        assert [o.score for o in objects] == pytest.approx([o.score for o in reference], abs=1e-6)


def _synthetic(grounder, monkeypatch, rows: int, queries: int, length: int, seed: int):
    """The grounder's model replaced by its outputs alone (logits and boxes of the real shapes, made up): the pick's
    arithmetic, at text lengths the tiny model cannot have. Logits are whole numbers, so equal maxima are common."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randint(-3, 4, (rows, queries, length), generator=generator).float()
    boxes = torch.rand(rows, queries, 4, generator=generator)
    monkeypatch.setattr(grounder, "model", lambda **inputs: SimpleNamespace(logits=logits, pred_boxes=boxes))
    return logits.sigmoid(), boxes


@pytest.mark.parametrize(("length", "seed"), [(6, 0), (12, 1), (12, 2), (80, 3)])
def test_the_device_pick_is_the_cpu_rule_with_ties_and_cut_text(tiny_detector, monkeypatch, length, seed):
    grounder = tiny_detector.grounder
    grounder.load()
    phrases = [["dog", "red car", "old wooden table", "man"], ["small white boat"], list(WORDS[:6])]
    probabilities, boxes = _synthetic(grounder, monkeypatch, len(phrases), 30, length, seed)
    prompts = [_prompt(row) for row in phrases]
    text = grounder.processor.tokenizer(
        [prompt for prompt, _ in prompts], padding=True, return_offsets_mapping=True, return_tensors="pt"
    )
    offsets = text.pop("offset_mapping")
    owners = _phrase_tokens(offsets, text["attention_mask"], [spans for _, spans in prompts])
    pixels = torch.zeros((len(phrases), 96, 96, 3), dtype=torch.uint8)
    scores, picked, found = grounder._best_boxes(pixels, dict(text), owners)
    assert scores.shape == found.shape == (3, 6) and picked.shape == (3, 6, 4)
    kept = cut = 0
    for row, row_phrases in enumerate(phrases):
        token_phrase = _token_phrases(offsets[row], text["attention_mask"][row], prompts[row][1])
        for index in range(len(row_phrases)):
            tokens = [t for t, p in enumerate(token_phrase) if p == index and t < length]
            assert bool(found[row, index]) == bool(tokens)
            if tokens:
                per_query = probabilities[row][:, tokens].max(dim=1).values
                best = int(per_query.argmax())  # the first of equal maxima
                assert float(scores[row, index]) == float(per_query[best])
                assert torch.equal(picked[row, index], boxes[row, best])
                kept += 1
            else:
                cut += 1
        assert not found[row, len(row_phrases) :].any()  # padding phrases own no token
    assert kept > 0
    assert (cut > 0) == (length < offsets.shape[1])  # a text shorter than the prompt's tokens cut phrases off


def test_phrases_past_the_models_text_length_are_grounded_on_what_fits(tiny_detector):
    caption = (
        "a big old rusty red wooden farm tractor with huge black rubber wheels next to a tall green metal street "
        "lamp post beside a small white wooden fishing boat with blue painted stripes"
    )
    detection = tiny_detector.detect([IMAGES[0]], [Artifacts(caption=caption)])[0]
    assert 0.0 <= detection.p_fake <= 1.0


# ---------------------------------------------------------------- captioning: a static cache's buckets


def _captioner(tiny_store, **params) -> Captioner:
    spec = get_profile("tiny").caption
    spec = replace(spec, params={**spec.params, **params})
    return Captioner(tiny_store.locate(spec), torch.device("cpu"))


def test_a_static_cache_pads_a_partial_run_to_the_next_power_of_two(tiny_store):
    captioner = _captioner(tiny_store, static_cache=True, batch_size=8)
    pixels = torch.arange(8).view(8, 1, 1, 1).expand(8, 4, 4, 3).to(torch.uint8)
    for rows, bucket in ((1, 1), (2, 2), (3, 4), (5, 8), (7, 8), (8, 8)):
        padded = captioner._bucketed(pixels[:rows])
        assert padded.shape == (bucket, 4, 4, 3)
        assert torch.equal(padded[:rows], pixels[:rows])
        assert all(torch.equal(copy, pixels[rows - 1]) for copy in padded[rows:])  # copies of the last
    assert captioner._bucketed(pixels[:0]).shape[0] == 0
    capped = _captioner(tiny_store, static_cache=True, batch_size=6)
    assert capped._bucketed(pixels[:5]).shape[0] == 6  # never past the batch size
    plain = _captioner(tiny_store, batch_size=8)
    assert all(plain._bucketed(pixels[:rows]) is not None and plain._bucketed(pixels[:rows]).shape[0] == rows
               for rows in (1, 3, 5, 8))  # fmt: skip
    assert captioner.version == plain.version  # a runtime setting: the same artifacts


def test_a_padded_partial_run_captions_as_an_unpadded_one(tiny_store, monkeypatch):
    static = _captioner(tiny_store, static_cache=True, batch_size=8)
    plain = _captioner(tiny_store, batch_size=8)
    pictures = [image.image for image in IMAGES[:5]]
    generated = []
    generate = Captioner._generate_ids

    def recording(self, pixels):
        generated.append(len(pixels))
        return generate(self, pixels)

    monkeypatch.setattr(Captioner, "_generate_ids", recording)
    with_cache = static.caption(pictures)
    without = plain.caption(pictures)
    assert generated == [8, 5]  # the static cache's run was padded to 8; the copies' captions were dropped
    assert len(with_cache) == 5 and with_cache == without
