"""Caption and VQA metrics: BLEU and CIDEr-D by the COCO caption protocol, VQAv2 accuracy.

Written from the published algorithms, with no Java and no pycocoevalcap. Where the COCO or VQAv2
evaluation code does something the papers do not say (smoothing constants, which length the CIDEr
penalty compares, the punctuation rules of the VQA normalisation), we do what that code does and
say so at the spot, so that numbers compare with the ones papers report.

Scales: BLEU-n and VQA accuracy in [0, 1]; CIDEr-D in [0, 10] (papers print both times 100, so
BLIP-2's COCO "CIDEr 145.8" is 1.458 here).

Caption inputs are dicts keyed by image id: `candidates[id]` one generated caption (str),
`references[id]` its reference captions (list[str]). Both are tokenized with `coco_tokenize`
unless `tokenize=False` says they are already lists of space-separated tokens.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence

# ---------------------------------------------------------------------------------------------
# Tokenization (COCO caption protocol)
# ---------------------------------------------------------------------------------------------

# The COCO evaluation runs Stanford's PTBTokenizer (lowercased) and then drops the tokens that are
# punctuation. PTB splits clitics off their word ("dog's" -> "dog 's", "don't" -> "do n't") and
# keeps hyphenated words and numbers ("black-and-white", "3.5", "1,000") whole; we do the same with
# regular expressions. Known differences, all rare in captions: we drop brackets (PTB keeps them
# as "-lsb-"), and we do not split "cannot", "gonna" and the like.
_CLITIC = re.compile(r"(\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
_TOKEN = re.compile(
    r"n't\b|'(?:s|re|ve|ll|d|m)\b"  # clitics, already split off their word
    r"|\w+(?:(?:[-'&/.]|(?<=\d),(?=\d))\w+)*"  # words, compounds, numbers: t-shirt, at&t, 3.5, 1,000
    r"|\S"  # any other character on its own
)
_DROPPED = set(".,?!:;-'\"`()[]{}")  # the COCO list: . ? ! , : ; - -- ... quotes and brackets
_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'})


def coco_tokenize(text: str) -> list[str]:
    """Lowercased PTB-style tokens without punctuation: "A man's dog, running." ->
    ["a", "man", "'s", "dog", "running"]."""
    text = _CLITIC.sub(r"\1 \2", text.lower().translate(_QUOTES))
    return [tok for tok in _TOKEN.findall(text) if tok not in _DROPPED]


def _some(keys) -> str:
    keys = sorted(map(str, keys))
    return ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")


def _prepare(
    candidates: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    tokenize: bool,
) -> tuple[dict[Hashable, list[str]], dict[Hashable, list[list[str]]]]:
    """Check that both dicts cover the same ids and turn every caption into a list of tokens."""
    problems = []
    missing, extra = references.keys() - candidates.keys(), candidates.keys() - references.keys()
    if missing:
        problems.append(f"{len(missing)} image(s) have references but no candidate: {_some(missing)}")
    if extra:
        problems.append(f"{len(extra)} image(s) have a candidate but no references: {_some(extra)}")
    for key, refs in references.items():
        if isinstance(refs, str) or not refs:
            problems.append(f"references[{key!r}] must be a non-empty list of captions, got {refs!r}")
            break
    for key, cand in candidates.items():
        if not isinstance(cand, str):
            problems.append(f"candidates[{key!r}] must be one caption (str), got {type(cand).__name__}")
            break
    if not references:
        problems.append("no images to score: `references` is empty")
    if problems:
        raise ValueError("Cannot score the captions:\n  - " + "\n  - ".join(problems))
    split = coco_tokenize if tokenize else str.split
    return (
        {key: split(candidates[key]) for key in references},
        {key: [split(r) for r in refs] for key, refs in references.items()},
    )


def _ngram_counts(words: list[str], n: int) -> Counter:
    """Counts of every k-gram of `words` for k = 1..n, keyed by tuples."""
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


# ---------------------------------------------------------------------------------------------
# BLEU
# ---------------------------------------------------------------------------------------------

# The COCO implementation adds these to the clipped counts and the n-gram totals, so that a corpus
# with no 4-gram match gives a tiny BLEU-4 instead of a division by zero.
_TINY, _SMALL = 1e-15, 1e-9


def bleu(
    candidates: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    n: int = 4,
    *,
    tokenize: bool = True,
) -> list[float]:
    """Corpus BLEU-1..n (COCO caption protocol): [BLEU-1, ..., BLEU-n].

    Clipped n-gram matches and n-gram totals are summed over the corpus before dividing (not
    averaged per image). BLEU-k is the geometric mean of the precisions 1..k times the brevity
    penalty exp(1 - r/c) when c < r, where c is the total candidate length and r sums, per image,
    the reference length closest to the candidate's (the shorter one on a tie).
    """
    if n < 1:
        raise ValueError(f"`n` must be at least 1, got {n}")
    cands, refs = _prepare(candidates, references, tokenize)
    matches, totals = [0] * n, [0] * n
    cand_len = ref_len = 0
    for key, words in cands.items():
        max_ref = Counter()
        for ref in refs[key]:
            max_ref |= _ngram_counts(ref, n)  # `|` keeps the larger count: clip by the best reference
        for gram, count in _ngram_counts(words, n).items():
            matches[len(gram) - 1] += min(count, max_ref[gram])
        for k in range(n):
            totals[k] += max(0, len(words) - k)
        cand_len += len(words)
        ref_len += min((len(ref) for ref in refs[key]), key=lambda r: (abs(r - len(words)), r))

    ratio = (cand_len + _TINY) / (ref_len + _SMALL)
    brevity = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    scores, product = [], 1.0
    for k in range(n):
        product *= (matches[k] + _TINY) / (totals[k] + _SMALL)
        scores.append(product ** (1 / (k + 1)) * brevity)
    return scores


# ---------------------------------------------------------------------------------------------
# CIDEr-D
# ---------------------------------------------------------------------------------------------

_CIDER_N = 4
_CIDER_SIGMA = 6.0


def _cider_per_image(
    cands: dict[Hashable, list[str]], refs: dict[Hashable, list[list[str]]]
) -> dict[Hashable, float]:
    # Document frequency: in how many images' reference sets an n-gram occurs. The idf is computed
    # on the evaluated set itself, so CIDEr of one image depends on the rest of the corpus.
    ref_counts = {key: [_ngram_counts(r, _CIDER_N) for r in rs] for key, rs in refs.items()}
    doc_freq = Counter()
    for counts in ref_counts.values():
        doc_freq.update(set().union(*counts))
    log_images = math.log(len(refs))

    def tfidf(counts: Counter) -> tuple[list[dict], list[float], int]:
        # Raw counts times idf (no division by the caption length: the cosine normalises).
        vecs: list[dict] = [{} for _ in range(_CIDER_N)]
        for gram, count in counts.items():
            vecs[len(gram) - 1][gram] = count * (log_images - math.log(max(1.0, doc_freq[gram])))
        norms = [math.sqrt(sum(w * w for w in v.values())) for v in vecs]
        # The COCO code takes the "length" for the Gaussian penalty as the number of bigrams, that
        # is words - 1; the difference of two lengths is the same unless a caption is empty.
        length = sum(count for gram, count in counts.items() if len(gram) == 2)
        return vecs, norms, length

    scores = {}
    for key, words in cands.items():
        vec, norm, length = tfidf(_ngram_counts(words, _CIDER_N))
        total = [0.0] * _CIDER_N
        for counts in ref_counts[key]:
            vec_ref, norm_ref, length_ref = tfidf(counts)
            penalty = math.exp(-((length - length_ref) ** 2) / (2 * _CIDER_SIGMA**2))
            for k in range(_CIDER_N):
                # CIDEr-D clips the candidate's weights by the reference's, so that repeating a
                # matched n-gram does not raise the score.
                dot = sum(min(w, vec_ref[k].get(g, 0.0)) * vec_ref[k].get(g, 0.0) for g, w in vec[k].items())
                if norm[k] and norm_ref[k]:
                    dot /= norm[k] * norm_ref[k]
                total[k] += dot * penalty
        scores[key] = 10.0 * sum(total) / _CIDER_N / len(ref_counts[key])
    return scores


def cider(
    candidates: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    *,
    tokenize: bool = True,
) -> float:
    """CIDEr-D (COCO caption protocol), the mean over images; in [0, 10].

    Per image and per n = 1..4: tf-idf vectors of n-gram counts, idf = log(#images) minus
    log(document frequency over the references of the evaluated images); the candidate's weights
    clipped by each reference's; cosine similarity times exp(-(len_c - len_r)^2 / (2 * 6^2));
    averaged over the references, then over n, times 10.

    A one-image corpus scores 0 (every reference n-gram has idf log 1 = 0), as in the COCO code.
    """
    cands, refs = _prepare(candidates, references, tokenize)
    per_image = _cider_per_image(cands, refs)
    return sum(per_image.values()) / len(per_image)


def caption_scores(
    candidates: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
) -> dict[str, float]:
    """BLEU-1..4 and CIDEr-D of a set of captions, tokenized once: {"bleu_1", ..., "bleu_4", "cider"}."""
    cands, refs = _prepare(candidates, references, tokenize=True)
    joined_c = {k: " ".join(w) for k, w in cands.items()}
    joined_r = {k: [" ".join(r) for r in rs] for k, rs in refs.items()}
    scores = {f"bleu_{k + 1}": s for k, s in enumerate(bleu(joined_c, joined_r, 4, tokenize=False))}
    scores["cider"] = sum(_cider_per_image(cands, refs).values()) / len(cands)
    return scores


# ---------------------------------------------------------------------------------------------
# VQAv2 accuracy
# ---------------------------------------------------------------------------------------------

# Contracted forms; the normaliser maps each one written with one apostrophe missing ("dont",
# "hed've", "he'dve") to its full form. The list is the official VQA evaluation's table restricted
# to entries that can fire on lowercased text, and leaves out forms that are words once the
# apostrophe goes ("its", "well", "were", "shed", "hell", "id", "wed", "lets").
_CONTRACTED = """
    ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't
    haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't
    mightn't've might've mustn't must've needn't not've o'clock oughtn't shan't she'd've should've
    shouldn't shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've someone'll
    someone's something'd something'd've something'll that's there'd there'd've there're there's
    they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll what're
    what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're
    why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll
    you're you've
""".split()
_CONTRACTIONS = {
    form[:i] + form[i + 1 :]: form for form in _CONTRACTED for i, ch in enumerate(form) if ch == "'"
}
# "none" -> "0" is the official rule too ("how many ...?" "none").
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = {"a", "an", "the"}
# Removed or turned into a space (see `_strip_punctuation`); the apostrophe, ":" and "." are not here.
_VQA_PUNCT = ';/[]"{}()=+\\_-><@`,?!'
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# The official pattern means "a period not followed by a digit" (its look-behind for a digit is
# mistyped and never fires): "2.5" and ".5" keep their period, "5." and "dog." lose it.
_PERIOD = re.compile(r"\.(?!\d)")


def _strip_punctuation(text: str) -> str:
    # The official rule, per character: deleted where it touches a space ("red, white") or where the
    # answer has a digit,digit ("3,000" -> "3000"), otherwise replaced by a space ("t-shirt" -> "t shirt").
    # The test looks at the answer as given, not at the partly cleaned text.
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in _VQA_PUNCT:
        if delete_all or p + " " in text or " " + p in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out)


def normalize_answer(answer: str) -> str:
    """VQAv2 answer normalisation: punctuation, lowercase, number words to digits, articles out,
    contractions in: "Two" -> "2", "a dog." -> "dog", "yes!" -> "yes", "3,000" -> "3000",
    "2.5" -> "2.5", "dont" -> "don't", "t-shirt" -> "t shirt"."""
    text = _strip_punctuation(answer.replace("\n", " ").replace("\t", " ").strip())
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
    """VQAv2 accuracy of one answer: min(1, #matching humans / 3), averaged over the leave-one-out
    subsets of the ground-truth answers (10 subsets of 9 for VQAv2's 10 answers), after
    `normalize_answer` on both sides. With 10 answers and m of them matching this is 0.3, 0.6, 0.9
    and 1.0 for m = 1, 2, 3, >= 4.

    Differences from the official script: it normalises the ground-truth answers only when they
    disagree, and the prediction fully only then (VQAv2's stored answers are already normalised,
    so this matters only for raw predictions on unanimous questions, which the official script
    compares unnormalised); we always normalise both. Any number of answers is accepted: n >= 2 uses
    the n leave-one-out subsets as the official code does for any n; a single answer has no subset
    left, so the score is exact match after normalisation (1.0 or 0.0).
    """
    if isinstance(gt_answers, str) or not gt_answers:
        raise ValueError(f"`gt_answers` must be a non-empty list of answers, got {gt_answers!r}")
    pred = normalize_answer(prediction)
    gts = [normalize_answer(a) for a in gt_answers]
    if len(gts) == 1:
        return float(pred == gts[0])
    matches = sum(g == pred for g in gts)
    # leaving out a matching answer leaves matches - 1 matches among the others; any other, matches
    return sum(min(1.0, (matches - (g == pred)) / 3) for g in gts) / len(gts)


def vqa_score(
    predictions: Mapping[Hashable, str] | Sequence[str],
    gts: Mapping[Hashable, Sequence[str]] | Sequence[Sequence[str]],
) -> float:
    """Mean `vqa_accuracy` over questions: dicts keyed by question id, or two aligned lists."""
    if isinstance(predictions, Mapping) != isinstance(gts, Mapping):
        raise ValueError("Give `predictions` and `gts` both as dicts keyed by question id, or both as lists.")
    if isinstance(predictions, Mapping):
        missing = gts.keys() - predictions.keys()
        if missing or predictions.keys() - gts.keys():
            raise ValueError(
                f"`predictions` and `gts` must cover the same question ids; {len(missing)} question(s) "
                f"have no prediction ({_some(missing)}) and "
                f"{len(predictions.keys() - gts.keys())} prediction(s) have no ground truth."
            )
        pairs = [(predictions[k], gts[k]) for k in gts]
    else:
        if len(predictions) != len(gts):
            raise ValueError(
                f"{len(predictions)} predictions for {len(gts)} questions; give one per question."
            )
        pairs = list(zip(predictions, gts))
    if not pairs:
        raise ValueError("no questions to score: `gts` is empty")
    return sum(vqa_accuracy(p, g) for p, g in pairs) / len(pairs)
