"""Evaluation metrics against published and hand-computed values, and retrieval scoring on a tiny
stage-1 model against direct calls of its encoders and heads.

Where a value comes from:
- BLEU: modified n-gram precisions printed in Papineni et al. 2002 (section 2.1, Example 1 and
  Example 2), combined by hand into BLEU-1/2 with the brevity penalty; small cases worked by hand.
- CIDEr-D: closed forms worked by hand below from the formula (2-image corpora, where every idf
  is log 2 or 0).
- VQA: the 0.3 / 0.6 / 0.9 / 1.0 ladder that min(1, m/3) averaged over the 10 leave-one-out
  subsets gives, worked by hand; the normalisation examples follow the official rules.
- Recall: counted by hand on a small score matrix.
"""

import math
import random

import pytest
import torch

from qformer import QFormerConfig, Stage1Model
from qformer.eval import (
    bleu,
    caption_scores,
    cider,
    coco_tokenize,
    normalize_answer,
    recall_at_k,
    retrieval_scores,
    vqa_accuracy,
    vqa_score,
    zero_shot_classification,
)

# ------------------------------------------------------------------------------ tokenization


@pytest.mark.parametrize(
    "text, tokens",
    [
        ("A man's dog, running.", ["a", "man", "'s", "dog", "running"]),
        ("Don't stop!", ["do", "n't", "stop"]),
        ("3.5 inches, 1,000 dogs", ["3.5", "inches", "1,000", "dogs"]),
        ("A black-and-white photo (old)...", ["a", "black-and-white", "photo", "old"]),
        (
            '"Hello" -- the dogs\' owner; at 5 o\'clock?',
            ["hello", "the", "dogs", "owner", "at", "5", "o'clock"],
        ),
    ],
)
def test_coco_tokenize(text, tokens):
    assert coco_tokenize(text) == tokens


# ------------------------------------------------------------------------------ BLEU

# Papineni et al. 2002, section 2.1, Example 1.
PAPINENI_REFS = [
    "It is a guide to action that ensures that the military will forever heed Party commands.",
    (
        "It is the guiding principle which guarantees the military forces always being under the "
        "command of the Party."
    ),
    "It is the practical guide for the army always to heed the directions of the party.",
]
PAPINENI_CAND1 = (
    "It is a guide to action which ensures that the military always obeys the commands of the party."
)
PAPINENI_CAND2 = "It is to insure the troops forever hearing the activity guidebook that party direct."


def test_bleu_perfect_candidate_is_one():
    refs = {1: ["a man rides a horse on the beach"] * 3, 2: ["two dogs play in the park"] * 2}
    cands = {1: "A man rides a horse on the beach.", 2: "two dogs play in the park"}
    assert bleu(cands, refs) == pytest.approx([1.0] * 4, abs=1e-6)


def test_bleu_papineni_example_2_modified_unigram_precision():
    # published: modified unigram precision 2/7; the closest reference has 7 words, so no penalty
    refs = {0: ["The cat is on the mat.", "There is a cat on the mat."]}
    b1, b2 = bleu({0: "the the the the the the the"}, refs, n=2)
    assert b1 == pytest.approx(2 / 7, rel=1e-6)
    # bigram "the the" is in neither reference: BLEU-2 = sqrt(2/7 * (0 + 1e-15) / (6 + 1e-9))
    assert b2 == pytest.approx(math.sqrt(2 / 7 * 1e-15 / 6), rel=1e-6)


def test_bleu_papineni_example_1_published_precisions():
    refs = {0: PAPINENI_REFS}
    # published: candidate 1 has modified precisions p1 = 17/18, p2 = 10/17; it has 18 words and
    # so does reference 2: no brevity penalty
    b1, b2 = bleu({0: PAPINENI_CAND1}, refs, n=2)
    assert b1 == pytest.approx(17 / 18, rel=1e-6)
    assert b2 == pytest.approx(math.sqrt(17 / 18 * 10 / 17), rel=1e-6)
    # published: candidate 2 has p1 = 8/14, p2 = 1/13; 14 words, closest reference 16 words
    bp = math.exp(1 - 16 / 14)
    b1, b2 = bleu({0: PAPINENI_CAND2}, refs, n=2)
    assert b1 == pytest.approx(8 / 14 * bp, rel=1e-6)
    assert b2 == pytest.approx(math.sqrt(8 / 14 * 1 / 13) * bp, rel=1e-6)
    # as a corpus the counts add up before dividing: p1 = 25/32, p2 = 11/30, c = 32, r = 18 + 16
    corpus = {"c1": PAPINENI_CAND1, "c2": PAPINENI_CAND2}
    b1, b2 = bleu(corpus, {"c1": PAPINENI_REFS, "c2": PAPINENI_REFS}, n=2)
    bp = math.exp(1 - 34 / 32)
    assert b1 == pytest.approx(25 / 32 * bp, rel=1e-6)
    assert b2 == pytest.approx(math.sqrt(25 / 32 * 11 / 30) * bp, rel=1e-6)


def test_bleu_closest_reference_length_takes_the_shorter_on_a_tie():
    # 3 words, references of 4 and 2 words are equally close: the 2-word one counts, c > r, no penalty
    scores = bleu({0: "a dog runs"}, {0: ["a dog runs fast", "the dog"]}, n=2)
    assert scores == pytest.approx([1.0, 1.0], abs=1e-6)


def test_bleu_brevity_penalty_and_smoothing_by_hand():
    # c = 2, r = 4: penalty exp(1 - 4/2) = 1/e; p1 = 2/2, p2 = 1/1, and no 3- or 4-grams at all:
    # p3 = p4 = (0 + 1e-15) / (0 + 1e-9) = 1e-6
    scores = bleu({0: "a dog"}, {0: ["a dog runs fast"]})
    e = math.exp(-1)
    assert scores == pytest.approx([e, e, (1e-6) ** (1 / 3) * e, (1e-12) ** (1 / 4) * e], rel=1e-6)


def test_bleu_clips_by_the_best_reference_per_ngram():
    # "a" twice in the candidate, at most once in each reference: 1 clipped match; "dog" matches
    scores = bleu({0: "a a dog"}, {0: ["a dog", "the dog"]}, n=1)
    # c = 3, closest r = 2: no penalty; p1 = 2/3
    assert scores[0] == pytest.approx(2 / 3, rel=1e-6)


def test_caption_inputs_are_checked():
    with pytest.raises(ValueError, match="no candidate"):
        bleu({1: "a dog"}, {1: ["a dog"], 2: ["a cat"]})
    with pytest.raises(ValueError, match="non-empty list"):
        cider({1: "a dog"}, {1: "a dog"})


# ------------------------------------------------------------------------------ CIDEr-D
# In a 2-image corpus the idf of an n-gram is log 2 - log(max(1, df)): L = log 2 for an n-gram in
# the references of one image only (or of none), 0 for one in both. Every cosine below is then a
# cosine of 0/L vectors, worked out by hand.


def test_cider_hand_value_two_images():
    refs = {"A": ["a dog runs", "a dog sleeps"], "B": ["a cat sits"]}
    cands = {"A": "a dog runs", "B": "a big cat"}
    # "a" is in both images' references: weight 0. Image A against "a dog runs": cosine 1 for
    # n = 1, 2, 3; no 4-grams, so 0 for n = 4 -> 3. Against "a dog sleeps": unigrams {dog, runs}
    # vs {dog, sleeps} -> 1/2; bigrams {a dog, dog runs} vs {a dog, dog sleeps} -> 1/2; trigrams 0
    # -> 1. Same lengths, no penalty. A = 10 * (3 + 1) / 4 / 2 refs = 5.
    # Image B: unigrams {big, cat} vs {cat, sits} -> 1/2; nothing else shared: B = 10 * 0.5 / 4 = 1.25.
    assert cider(cands, refs) == pytest.approx((5.0 + 1.25) / 2, rel=1e-9)


def test_cider_hand_value_with_length_penalty():
    refs = {"A": ["a dog runs", "a dog sleeps"], "B": ["a cat sits"]}
    cands = {"A": "a dog runs", "B": "a big cat sits here"}
    # B: unigrams {big, cat, sits, here} (norm 2L) vs {cat, sits} (norm L*sqrt2): 2L^2 / (2 sqrt2 L^2)
    # = 1/sqrt2; bigrams {a big, big cat, cat sits, sits here} vs {a cat, cat sits}: 1/(2 sqrt2);
    # no shared 3-gram; no reference 4-gram. Lengths (bigram counts) 4 and 2: exp(-2^2 / (2 * 36)).
    b = 10 / 4 * (1 / math.sqrt(2) + 1 / (2 * math.sqrt(2))) * math.exp(-4 / 72)
    assert cider(cands, refs) == pytest.approx((5.0 + b) / 2, rel=1e-9)


def test_cider_clips_repeated_ngrams():
    refs = {"A": ["a dog runs"], "B": ["a cat sits"]}
    cands = {"A": "dog dog", "B": "a cat sits"}
    # A: unigram weights {dog: 2L} vs {dog: L, runs: L}; the candidate's 2L is clipped to L:
    # L * L / (2L * sqrt2 L) = 1/(2 sqrt2) (1/sqrt2 without clipping); no shared bigram; lengths 1
    # and 2: exp(-1/72). B is its reference: 1, 1, 1 and no 4-grams: 10 * 3/4.
    a = 10 / 4 * (1 / (2 * math.sqrt(2))) * math.exp(-1 / 72)
    assert cider(cands, refs) == pytest.approx((a + 7.5) / 2, rel=1e-9)


def test_cider_identical_captions_over_distinct_images():
    # Every caption is its image's references: every cosine is 1 where the order has n-grams, so
    # 10 per image with 4+ words, 10 * 3/4 with 3 words.
    long = {1: "a dog runs on grass", 2: "two cats sleep on a bed", 3: "the red bus drives by"}
    assert cider(long, {k: [v, v] for k, v in long.items()}) == pytest.approx(10.0, rel=1e-9)
    short = {1: "dog runs fast", 2: "cats sleep inside", 3: "red bus drives"}
    assert cider(short, {k: [v] for k, v in short.items()}) == pytest.approx(7.5, rel=1e-9)


def test_cider_zero_when_nothing_shared_and_for_a_single_image():
    refs = {1: ["a dog runs on grass"], 2: ["two cats sleep on a bed"]}
    assert cider({1: "purple elephants fly", 2: "green frogs jump high"}, refs) == 0.0
    # one image: every reference n-gram has idf log(1) - log(1) = 0
    assert cider({1: "a dog runs on grass"}, {1: ["a dog runs on grass"]}) == 0.0


def test_cider_and_bleu_do_not_depend_on_image_order():
    rng = random.Random(0)
    words = ["a", "the", "dog", "cat", "man", "woman", "red", "blue", "runs", "sits", "on", "in", "park"]
    refs = {i: [" ".join(rng.choices(words, k=rng.randint(4, 9))) for _ in range(3)] for i in range(8)}
    cands = {i: " ".join(rng.choices(words, k=rng.randint(3, 9))) for i in range(8)}
    keys = list(refs)
    rng.shuffle(keys)
    refs2, cands2 = {k: refs[k] for k in keys}, {k: cands[k] for k in keys}
    assert cider(cands2, refs2) == pytest.approx(cider(cands, refs), rel=1e-12)
    assert bleu(cands2, refs2) == pytest.approx(bleu(cands, refs), rel=1e-12)
    both = caption_scores(cands, refs)
    assert both["cider"] == pytest.approx(cider(cands, refs), rel=1e-12)
    assert [both[f"bleu_{k}"] for k in range(1, 5)] == pytest.approx(bleu(cands, refs), rel=1e-12)


# ------------------------------------------------------------------------------ VQA


@pytest.mark.parametrize(
    "answer, normalized",
    [
        ("Two", "2"),
        ("a dog.", "dog"),
        ("yes!", "yes"),
        ("3,000", "3000"),  # a comma between digits: all punctuation is deleted, not spaced
        ("2.5", "2.5"),  # a period followed by a digit stays
        ("dont", "don't"),
        ("The Cat", "cat"),
        ("t-shirt", "t shirt"),  # punctuation not touching a space becomes a space
        ("red, white", "red white"),  # punctuation touching a space is deleted
        ("None", "0"),
        ("hed've", "he'd've"),
        ("  ten\n", "10"),
    ],
)
def test_vqa_normalization(answer, normalized):
    assert normalize_answer(answer) == normalized


@pytest.mark.parametrize("m, acc", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_ladder(m, acc):
    # m of 10 humans said it: the m subsets without one of them have m - 1 matches, the others m;
    # e.g. m = 3: (3 * min(1, 2/3) + 7 * 1) / 10 = 0.9
    assert vqa_accuracy("2", ["2"] * m + ["3"] * (10 - m)) == pytest.approx(acc)


def test_vqa_accuracy_normalizes_and_handles_few_answers():
    assert vqa_accuracy("Two.", ["two", "2", "2"] + ["3"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("Yes!", ["yes"]) == 1.0  # one answer: exact match after normalisation
    assert vqa_accuracy("no", ["yes"]) == 0.0
    with pytest.raises(ValueError):
        vqa_accuracy("yes", [])
    preds = {1: "yes", 2: "two", 3: "cat"}
    gts = {1: ["yes"] * 10, 2: ["2"] * 2 + ["3"] * 8, 3: ["dog"] * 10}
    assert vqa_score(preds, gts) == pytest.approx((1.0 + 0.6 + 0.0) / 3)
    assert vqa_score(list(preds.values()), list(gts.values())) == pytest.approx((1.0 + 0.6 + 0.0) / 3)


# ------------------------------------------------------------------------------ recall@k

# 3 images with 2 captions each: image i <-> texts 2i, 2i+1
SCORES = torch.tensor(
    [
        [0.9, 0.1, 0.8, 0.2, 0.3, 0.4],
        [0.7, 0.6, 0.5, 0.1, 0.2, 0.3],
        [0.1, 0.2, 0.3, 0.4, 0.05, 0.0],
    ]
)
IMAGE_TO_TEXTS = [[0, 1], [2, 3], [4, 5]]


def test_recall_by_hand():
    r = recall_at_k(SCORES, IMAGE_TO_TEXTS, ks=(1, 2, 3))
    # i2t, negatives ahead of the best positive: image 0: 0; image 1: 2 (0.7, 0.6 > 0.5); image 2: 4
    assert (r["i2t_r1"], r["i2t_r2"], r["i2t_r3"]) == pytest.approx((1 / 3, 1 / 3, 2 / 3))
    # t2i, per column: t0: 0; t1: 2; t2: 1; t3: 2; t4: 2; t5: 2
    assert (r["t2i_r1"], r["t2i_r2"], r["t2i_r3"]) == pytest.approx((1 / 6, 2 / 6, 1.0))
    assert r["r_mean"] == pytest.approx((1 / 3 + 1 / 3 + 2 / 3 + 1 / 6 + 2 / 6 + 1) / 6)


def test_recall_ties_count_against_the_positive():
    r = recall_at_k(torch.zeros(3, 6), IMAGE_TO_TEXTS, ks=(1, 5))
    assert r["i2t_r1"] == 0.0 and r["t2i_r1"] == 0.0
    assert r["i2t_r5"] == 1.0  # 4 negatives per image, all tied: rank 4 < 5


def test_recall_same_scene_hit_matrix_replaces_the_mapping():
    hits = torch.zeros(3, 6, dtype=torch.bool)
    for i, texts in enumerate(IMAGE_TO_TEXTS):
        hits[i, texts] = True
    hits[2, 3] = True  # text 3 also fits image 2 (same scene)
    r = recall_at_k(SCORES, text_hits=hits, ks=(1, 2, 3))
    # image 2 now finds text 3 (0.4) first; text 3 finds image 2 (0.4) first
    assert r["i2t_r1"] == pytest.approx(2 / 3) and r["t2i_r1"] == pytest.approx(2 / 6)
    assert recall_at_k(SCORES, IMAGE_TO_TEXTS, text_hits=hits, ks=(1, 2, 3)) == r


def test_recall_separate_t2i_scores_and_bad_inputs():
    r = recall_at_k(SCORES, IMAGE_TO_TEXTS, scores_t2i=torch.eye(3).repeat_interleave(2, dim=1), ks=(1,))
    assert r["i2t_r1"] == pytest.approx(1 / 3) and r["t2i_r1"] == 1.0
    with pytest.raises(ValueError, match="no positive image"):
        recall_at_k(SCORES, [[0, 1], [2, 3], [4]])
    with pytest.raises(ValueError, match="one list of positive"):
        recall_at_k(SCORES, [[0, 1], [2, 3]])


# ------------------------------------------------------------------------------ retrieval scores

CFG = QFormerConfig.from_name("tiny")  # with dropout: retrieval must switch it off


def retrieval_data(num_images=5, num_texts=7, n=6, t=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(num_images, n, CFG.vision_width, generator=g)
    ids = torch.randint(1, CFG.vocab_size - 1, (num_texts, t), generator=g)
    mask = torch.ones(num_texts, t, dtype=torch.long)
    mask[1, t - 2 :] = 0
    mask[-1, t - 3 :] = 0
    return image, ids.masked_fill(mask == 0, CFG.pad_token_id), mask


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Stage1Model(CFG)


def direct_itc(model, image, ids, mask):
    return model.itc_scores(model.encode_image(image)[1], model.encode_text(ids, mask)[1])


@pytest.mark.parametrize("fusion", ["logit", "lavis"])
def test_retrieval_scores_match_direct_calls(model, fusion):
    image, ids, mask = retrieval_data()
    model.train()
    out = retrieval_scores(model, image, ids, mask, k_test=3, batch_size=4, fusion=fusion)
    assert model.training  # put back as it came
    model.eval()
    # ITC enters as its logit (cosine / temperature, what ITC's softmax reads) or LAVIS's cosine
    itc_scale = 1 / model.temp.item() if fusion == "logit" else 1.0
    assert model.temp.item() < 0.5  # so that the two fusions differ by a factor of 2 or more
    with torch.no_grad():
        itc = direct_itc(model, image, ids, mask)
        torch.testing.assert_close(out["itc"], itc, rtol=1e-5, atol=1e-6)
        for key, dim in (("itm_i2t", 1), ("itm_t2i", 0)):
            scores = out[key]
            finite = torch.isfinite(scores)
            assert (scores[~finite] == float("-inf")).all()
            assert (finite.sum(dim=dim) == 3).all()  # k_test candidates per image / per text
            expected = torch.zeros_like(finite).scatter_(dim, itc.topk(3, dim=dim).indices, True)
            assert torch.equal(finite, expected)  # the candidates are the ITC top k
            for i, j in finite.nonzero().tolist():
                itm = model.itm_logits(image[i : i + 1], ids[j : j + 1], mask[j : j + 1])[0, 1]
                torch.testing.assert_close(scores[i, j], itm + itc[i, j] * itc_scale, rtol=1e-5, atol=1e-5)
    # the chunking does not change anything
    again = retrieval_scores(model, image, ids, mask, k_test=3, batch_size=64, fusion=fusion)
    for key in out:
        torch.testing.assert_close(again[key], out[key], rtol=1e-5, atol=1e-5)


def test_retrieval_fusion_refuses_unknown_names_and_models_without_a_temperature(model):
    image, ids, mask = retrieval_data()
    with pytest.raises(ValueError, match="`fusion` must be 'logit'.*got 'sum'"):
        retrieval_scores(model, image, ids, mask, fusion="sum")
    with torch.no_grad():
        saved = model.temp.item()
        model.temp.fill_(0.0)
        try:
            with pytest.raises(ValueError, match=r"temp is 0.0; use fusion='lavis'"):
                retrieval_scores(model, image, ids, mask)
            # LAVIS's sum needs no temperature
            out = retrieval_scores(model, image, ids, mask, k_test=2, fusion="lavis")
            assert torch.isfinite(out["itm_i2t"]).sum() == 2 * image.shape[0]
        finally:
            model.temp.fill_(saved)


def test_retrieval_k_test_at_least_all_rescores_every_pair(model):
    image, ids, mask = retrieval_data()
    out = retrieval_scores(model, image, ids, mask, k_test=100, batch_size=8)
    assert torch.isfinite(out["itm_i2t"]).all() and torch.equal(out["itm_i2t"], out["itm_t2i"])
    r = recall_at_k(out["itm_i2t"], [[0], [1], [2], [3], [4, 5, 6]], scores_t2i=out["itm_t2i"])
    assert set(r) == {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "r_mean"}
    assert r["i2t_r10"] == 1.0  # 7 texts: every positive is within the top 10


def test_zero_shot_classification_is_argmax_itc(model):
    image, ids, mask = retrieval_data(num_images=6, num_texts=3, seed=1)
    pred = zero_shot_classification(model, image, ids, mask, batch_size=4)
    model.eval()
    with torch.no_grad():
        assert torch.equal(pred, direct_itc(model, image, ids, mask).argmax(dim=1))


def test_caption_exact_match_by_object_count(tmp_path):
    from qformer.evaluate import caption_exact_match
    from qformer.world.shapes import generate_world, load_split

    generate_world(tmp_path, level="full", n_train=0, n_test=60, n_compositional=0, seed=4)
    records = load_split(tmp_path, "test")
    counts = [len(r["scene"]) for r in records]
    assert set(counts) == {1, 2, 3}
    # a reference states its scene exactly; a one-object caption cannot state a two-object scene
    captions = [r["caption"][0] if n != 2 else "a small red circle in the centre" for r, n in zip(records, counts)]
    result = caption_exact_match(captions, records)
    assert result["exact_match_by_objects"] == {"1": 1.0, "2": 0.0, "3": 1.0}
    assert result["exact_match"] == pytest.approx(sum(n != 2 for n in counts) / len(counts))
    with pytest.raises(ValueError, match="one caption per record"):
        caption_exact_match(captions[:-1], records)
