"""Moderation of prompts and images with models that ship inside their PyPI wheels (nothing is downloaded).

- Prompts: alt-profanity-check's bundled scikit-learn model scores profanity; keyword rules per category
  (``sexual``, ``sexual/minors``, ``violence``, ``self-harm``, ``hate``, ``illicit``) score 1.0 when they match.
  Both read a prompt with its disguises taken off (``text_for_scoring``): look-alike letters, accents, blanks, leet.
- Images (the source image of an edit, every generated or edited image): nudenet's bundled ONNX detector
  (``320n.onnx`` next to ``nudenet/nudenet.py``, run by onnxruntime on CPU); exposed-body labels map to ``sexual``.
  The ``null`` detector finds nothing and costs nothing: it is for capacity tests of the pipeline only, so that
  they measure the pipeline rather than nudenet; never use it where images must be moderated.

A ``Verdict`` names its stage (``PROMPT``, ``INPUT_IMAGE`` or ``OUTPUT_IMAGE``), every category score and the
categories at or above their threshold. Thresholds and rules come from a ``ModerationPolicy``, by default the
built-in one, or a JSON file (``ModerationPolicy.from_file``)::

    {"thresholds": {"violence": 0.9}, "profanity_threshold": 0.8,
     "rules": {"violence": [["gore", "massacre"]], "sexual/minors": [["child"], ["nude", "explicit"]]},
     "image_labels": {"BUTTOCKS_EXPOSED": "sexual"}}

A threshold or a category's rule given in the file replaces the default one and the rest stay (``"violence": []``
switches that rule off); ``image_labels``, when given, replaces the whole label mapping.

Both moderators block (milliseconds, not seconds): call them from an executor thread, never on the event loop.
They are thread-safe: ``InferenceSession.run`` is documented thread-safe by onnxruntime, nudenet's pre- and
post-processing keep no state between calls, and the profanity model and rules are only read.
"""

from __future__ import annotations

import functools
import re
import sys
import unicodedata
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import icu
import numpy as np
from PIL import Image
from scipy.special import expit

from pixelpipe.core.config_files import read_json_file
from pixelpipe.core.validation import normalise_text

PROMPT = "PROMPT"
INPUT_IMAGE = "INPUT_IMAGE"
OUTPUT_IMAGE = "OUTPUT_IMAGE"
IMAGE_STAGES = (INPUT_IMAGE, OUTPUT_IMAGE)
PROFANITY = "profanity"

DEFAULT_THRESHOLDS: dict[str, float] = {
    "sexual": 0.5,
    # Near zero: any signal at all rejects.
    "sexual/minors": 0.01,
    "violence": 0.5,
    "self-harm": 0.5,
    "hate": 0.5,
    "illicit": 0.5,
}
# alt-profanity-check's own predict() decides at 0.5.
DEFAULT_PROFANITY_THRESHOLD = 0.5

_SEXUAL_TERMS = ["nude", "naked", "nudity", "topless", "porn\\w*", "sex", "sexual", "explicit", "nsfw", "genitals?"]
# Each rule is a list of term groups: it matches when every group has a term in the text (an AND of ORs), so
# sexual/minors needs a minor term *and* a sexual term. Terms are regular expressions matched as whole words,
# case-insensitively. Slurs are left to policy files and the profanity model rather than listed here.
DEFAULT_RULES: dict[str, list[list[str]]] = {
    "sexual": [_SEXUAL_TERMS],
    "sexual/minors": [
        [
            "child(?:ren)?",
            "kids?",
            "minors?",
            "under-?aged?",
            "pre-?teens?",
            "toddlers?",
            "infants?",
            "schoolgirls?",
            "schoolboys?",
            "little (?:girl|boy)s?",
        ],
        [*_SEXUAL_TERMS, "erotic", "lingerie", "seductive"],
    ],
    "violence": [
        ["gore", "gory", "dismember\\w*", "decapitat\\w*", "behead\\w*", "mutilat\\w*", "massacre", "tortur\\w*"]
    ],
    "self-harm": [
        [
            "self[- ]?harm\\w*",
            "suicid\\w*",
            "kill(?:ing)? (?:myself|yourself|himself|herself|themselves)",
            "slit(?:ting)? (?:my|your|his|her|their) wrists",
        ]
    ],
    "hate": [["nazi\\w*", "swastikas?", "white (?:power|supremac\\w*)", "ethnic cleansing", "heil hitler", "kkk"]],
    "illicit": [
        [
            "cocaine",
            "heroin",
            "meth(?:amphetamine)?",
            "fentanyl",
            "bomb-?making",
            "pipe bombs?",
            "counterfeit (?:money|banknotes|currency|passports?)",
            "fake (?:ids?|passports?)",
        ]
    ],
}
# Only exposed intimate parts count: covered parts, faces, feet, belly, armpits and male chests do not.
DEFAULT_IMAGE_LABELS: dict[str, str] = {
    "FEMALE_GENITALIA_EXPOSED": "sexual",
    "MALE_GENITALIA_EXPOSED": "sexual",
    "FEMALE_BREAST_EXPOSED": "sexual",
    "ANUS_EXPOSED": "sexual",
    "BUTTOCKS_EXPOSED": "sexual",
}
_POLICY_KEYS = frozenset({"thresholds", "profanity_threshold", "rules", "image_labels"})

# Look-alikes, read as the ASCII the rules and the profanity model know, by Unicode's confusables (UTS #39, ICU's
# data through PyICU). A prompt is read (``skeleton``) after NFKC and the removal of characters that render as
# nothing (``normalise_text``): compatibility forms decomposed (NFKD) and combining marks dropped (accents,
# strike-through), braille blanks dropped, each look-alike read as the ASCII it is confusable with, case folded.
# ASCII itself is never folded: UTS #39 pairs "m" with "rn", "I" and "1" with "l", "0" with "O", so "pomegranate"
# would read as a porn word; digits read as letters only in the leet reading below. Only for scoring: the prompt
# renders as it was normalised.
_BLANKS = {ord("\u2800"): None}  # braille pattern blank: drawn as a space, yet neither whitespace nor a format char
# Drawn like a Latin letter, yet neither decomposed by NFKD nor mapped to ASCII by UTS #39 (ᴍ is confusable with
# turned w, ᴛ only with Cyrillic т): read as the letter their name gives.
_NAMED_LATIN = re.compile(r"(?:LATIN LETTER SMALL CAPITAL|NEGATIVE (?:CIRCLED|SQUARED) LATIN CAPITAL LETTER) ([A-Z])")
_UNASSIGNED = frozenset({"Cn", "Co", "Cs"})  # unassigned, private use and surrogate code points: nothing to read


def _without_marks(text: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.category(c).startswith("M"))


@functools.cache
def _lookalikes() -> dict[int, str | None]:
    """The ``str.translate`` table from every non-ASCII character that reads as ASCII to that ASCII; built on first
    use (under a second: ICU is asked once per code point).

    A prototype shared by several ASCII characters is read as the one of the character's own kind: Cyrillic capital
    I (U+0406) as I, not as the l that UTS #39 gives every vertical stroke; Bengali digit zero as 0, not O.
    """
    checker = icu.SpoofChecker()  # getSkeleton's first argument, a skeleton type, is no longer read by ICU
    ascii_of_kind: dict[tuple[str, str], str] = {}
    for character in map(chr, range(0x20, 0x7F)):
        ascii_of_kind.setdefault((checker.getSkeleton(0, character), unicodedata.category(character)), character)
    table: dict[int, str | None] = dict(_BLANKS)
    for code in range(0x80, sys.maxunicode + 1):
        character = chr(code)
        kind = unicodedata.category(character)
        if kind in _UNASSIGNED:
            continue
        if named := _NAMED_LATIN.fullmatch(unicodedata.name(character, "")):
            table[code] = named[1].lower()
            continue
        prototype = _without_marks(checker.getSkeleton(0, character))
        if prototype.isascii() and prototype not in ("", character):  # "": a combining mark, dropped before this
            table[code] = ascii_of_kind.get((prototype, kind), prototype)
    return table


def skeleton(text: str) -> str:
    """``text`` with its disguises taken off: normalised (``normalise_text``), compatibility forms decomposed,
    combining marks and blanks dropped, look-alikes read as ASCII (``_lookalikes``), case folded."""
    text = normalise_text(text)
    if not text.isascii():  # nothing to decompose, drop or read: the common case stays cheap
        # NFC puts back together what NFKD split into letters rather than marks: Hangul syllables.
        text = unicodedata.normalize("NFC", _without_marks(text).translate(_lookalikes()))
    return text.casefold()


# Leet: digits and symbols read as the letters they stand for inside a word that has a letter ("c0c41n3", "b!tch"),
# never in numbers ("4090", "1.5"); a symbol only before a word character, so "wow!" keeps its "!".
_LEET = str.maketrans("0134578@$!", "oieastbasi")
# Only the words that hold one are matched: a prompt's other words cost no call.
_LEET_WORD = re.compile(r"(?<![\w@$!])(?=[\w@$!]*?(?:[0134578]|[@$!]\w))[\w@$!]*\w")
# Three or more single letters or digits, the same separator between each ("m e t h", "p.o.r.n"): the word they
# spell. The same one, so that an article before the word stays a word ("a n-a-z-i", not "anazi").
_SPELLED_OUT = re.compile(r"(?<![^\W_])[^\W_]([ ._*-])[^\W_](?:\1[^\W_])+(?![^\W_])")
_SPELLING_SEPARATORS = re.compile(r"[ ._*-]")


def _if_a_word(reading: Callable[[str], str]) -> Callable[[re.Match[str]], str]:
    """``reading`` of a match that has a letter; digits alone are a number ("3.5.1", "1 2 3"), not a word."""
    return lambda match: reading(match[0]) if any(c.isalpha() for c in match[0]) else match[0]


_JOIN_SPELLED_OUT = _if_a_word(lambda letters: _SPELLING_SEPARATORS.sub("", letters))
_READ_LEET = _if_a_word(lambda word: word.translate(_LEET))


def text_for_scoring(text: str) -> str:
    """``text`` as the prompt checks read it: its ``skeleton``, with spelled-out and leet words read as words."""
    return _LEET_WORD.sub(_READ_LEET, _SPELLED_OUT.sub(_JOIN_SPELLED_OUT, skeleton(text)))


class PolicyError(ValueError):
    """A moderation policy that is malformed; the message names the offending key."""


def _check_score(value: object, key: str) -> float:
    # bool is an int subclass: `true` in a JSON file is a mistake, not 1.0.
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise PolicyError(f"{key} must be a number between 0 and 1, got {value!r}")
    return float(value)


def _compile_rule(groups: object, key: str) -> list[re.Pattern[str]]:
    if not isinstance(groups, list) or not all(isinstance(g, list) and g for g in groups):
        raise PolicyError(f"{key} must be a list of non-empty lists of terms, got {groups!r}")
    compiled = []
    for i, group in enumerate(groups):
        for j, term in enumerate(group):
            if not isinstance(term, str) or not term.strip():
                raise PolicyError(f"{key}[{i}][{j}] must be a non-empty string, got {term!r}")
            try:
                re.compile(term)
            except re.error as exc:
                raise PolicyError(f"{key}[{i}][{j}] is not a valid regular expression: {term!r} ({exc})") from None
        compiled.append(re.compile(r"\b(?:" + "|".join(f"(?:{t})" for t in group) + r")\b", re.IGNORECASE))
    return compiled


@dataclass(frozen=True)
class ModerationPolicy:
    """Thresholds (a category is rejected when its score is at or above its threshold), rules and label mapping."""

    thresholds: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_THRESHOLDS))
    profanity_threshold: float = DEFAULT_PROFANITY_THRESHOLD
    rules: Mapping[str, list[list[str]]] = field(default_factory=lambda: {k: list(v) for k, v in DEFAULT_RULES.items()})
    image_labels: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_IMAGE_LABELS))

    def __post_init__(self) -> None:
        for category, threshold in self.thresholds.items():
            _check_score(threshold, f"thresholds[{category!r}]")
        _check_score(self.profanity_threshold, "profanity_threshold")
        for category, groups in self.rules.items():
            self._check_category(category, f"rules[{category!r}]")
            _compile_rule(groups, f"rules[{category!r}]")
        for label, category in self.image_labels.items():
            if not isinstance(category, str):
                raise PolicyError(f"image_labels[{label!r}] must be a category name, got {category!r}")
            self._check_category(category, f"image_labels[{label!r}]")

    def _check_category(self, category: str, key: str) -> None:
        # A category without a threshold could never reject: almost certainly a typo.
        if category not in self.thresholds:
            raise PolicyError(f"{key}: category {category!r} has no threshold (known: {sorted(self.thresholds)})")

    def compiled_rules(self) -> dict[str, list[re.Pattern[str]]]:
        """One case-insensitive whole-word pattern per term group, per category."""
        return {category: _compile_rule(groups, f"rules[{category!r}]") for category, groups in self.rules.items()}

    @classmethod
    def from_mapping(cls, data: object) -> ModerationPolicy:
        """The default policy with the keys given in ``data`` (a parsed JSON object) replacing the defaults."""
        if not isinstance(data, dict):
            raise PolicyError(f"the policy must be a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - _POLICY_KEYS)
        if unknown:
            raise PolicyError(f"unknown key(s) {unknown}; expected some of {sorted(_POLICY_KEYS)}")
        merged: dict[str, Any] = {}
        for key, defaults in (("thresholds", DEFAULT_THRESHOLDS), ("rules", DEFAULT_RULES), ("image_labels", None)):
            if key not in data:
                continue
            if not isinstance(data[key], dict):
                raise PolicyError(f"{key} must be a JSON object, got {data[key]!r}")
            # image_labels replaces the mapping wholesale, so a label can be switched off by leaving it out.
            merged[key] = data[key] if defaults is None else {**defaults, **data[key]}
        if "profanity_threshold" in data:
            merged["profanity_threshold"] = data["profanity_threshold"]
        return cls(**merged)

    @classmethod
    def from_file(cls, path: str | Path | None) -> ModerationPolicy:
        """The policy in the JSON file at ``path``; the default policy when ``path`` is None or empty."""
        if not path:
            return cls()
        data = read_json_file(path, "moderation policy", PolicyError)
        try:
            return cls.from_mapping(data)
        except PolicyError as exc:
            raise PolicyError(f"{path}: {exc}") from None


@dataclass(frozen=True)
class Verdict:
    """The outcome of one check: ``allowed`` is False when ``rejected_categories`` is not empty."""

    stage: str
    allowed: bool
    scores: dict[str, float]
    rejected_categories: list[str]


def _verdict(stage: str, scores: dict[str, float], thresholds: Mapping[str, float]) -> Verdict:
    rejected = [category for category, score in scores.items() if score >= thresholds[category]]
    return Verdict(stage=stage, allowed=not rejected, scores=scores, rejected_categories=rejected)


class ProfanityScorer:
    """alt-profanity-check's shipped model, scored the way its ``predict_prob`` does: TF-IDF features (l2-normalised
    counts of the vectoriser's tokens, times their idf), then the mean of its sigmoid-calibrated linear SVMs'
    probabilities. Here the features are built straight from the vectoriser's own analyser and vocabulary, and the
    SVMs are scored for the whole batch at once: scikit-learn's transform and predict_proba spent milliseconds a
    call on input checks, whatever the batch size."""

    def __init__(self) -> None:
        # Imported here: importing profanity_check unpickles its model (about a second).
        from profanity_check import profanity_check as shipped

        model, vectorizer = shipped.model, shipped.vectorizer
        classifiers = model.calibrated_classifiers_
        if model.method != "sigmoid" or list(model.classes_) != [0, 1] or vectorizer.norm != "l2":
            raise TypeError(f"expected a binary sigmoid-calibrated model on l2-normalised TF-IDF, got {model!r}")
        self._analyse = vectorizer.build_analyzer()  # lower-casing, tokens, stop words: as the vectoriser does
        self._vocabulary: dict[str, int] = vectorizer.vocabulary_
        self._idf = vectorizer.idf_
        self._weights = np.column_stack([c.estimator.coef_[0] for c in classifiers])  # features x classifiers
        self._intercepts = np.array([c.estimator.intercept_[0] for c in classifiers])
        self._slopes = np.array([c.calibrators[0].a_ for c in classifiers])
        self._offsets = np.array([c.calibrators[0].b_ for c in classifiers])

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """The probability that each text is profane."""
        decisions = self._decisions(texts) + self._intercepts
        probabilities = expit(-(self._slopes * decisions + self._offsets))
        return probabilities.sum(axis=1) / len(self._intercepts)

    def _decisions(self, texts: Sequence[str]) -> np.ndarray:
        """Each text's TF-IDF features times the SVMs' weights (texts x classifiers), summed row by row with numpy:
        building and checking a sparse matrix made a take of 2 prompts cost 72 us rather than 30."""
        columns: list[int] = []
        counts: list[int] = []
        rows: list[int] = []
        for row, text in enumerate(texts):
            found = Counter(self._vocabulary[t] for t in self._analyse(text) if t in self._vocabulary)
            columns += found
            counts += found.values()
            rows += [row] * len(found)
        values = np.array(counts, dtype=np.float64) * self._idf[columns]
        norms = np.sqrt(np.bincount(rows, weights=values * values, minlength=len(texts)))
        values /= norms[rows]  # a text without a known token has no values, so no zero norm is divided by
        decisions = np.zeros((len(texts), self._weights.shape[1]))
        np.add.at(decisions, rows, values[:, None] * self._weights[columns])
        return decisions


class PromptModerator:
    """Scores prompts for profanity (alt-profanity-check's shipped model) and for the policy's category rules."""

    def __init__(self, policy: ModerationPolicy | None = None) -> None:
        self.policy = policy or ModerationPolicy()
        self._predict_prob = ProfanityScorer()
        self._rules = self.policy.compiled_rules()
        self._thresholds = {**self.policy.thresholds, PROFANITY: self.policy.profanity_threshold}

    def check(self, prompt: str, negative_prompt: str | None = None) -> Verdict:
        """The ``PROMPT`` verdict on one prompt and its optional negative prompt."""
        return self.check_many([prompt], [negative_prompt])[0]

    def check_many(self, prompts: Sequence[str], negative_prompts: Sequence[str | None] | None = None) -> list[Verdict]:
        """One verdict per prompt, with one call of the profanity model for the whole batch.

        A negative prompt is scored for profanity only: listing what to keep out ("nude, gore") is its purpose,
        so category rules would reject exactly the requests that steer away from that content.
        """
        negatives = list(negative_prompts) if negative_prompts is not None else [None] * len(prompts)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(negatives)} negative prompts")
        prompts = [text_for_scoring(prompt) for prompt in prompts]
        negatives = [None if negative is None else text_for_scoring(negative) for negative in negatives]
        texts = [*prompts, *(n for n in negatives if n)]
        probs = [float(p) for p in self._predict_prob(texts)] if texts else []
        negative_probs = iter(probs[len(prompts) :])
        verdicts = []
        for prompt, negative, prob in zip(prompts, negatives, probs, strict=False):
            profanity = max(prob, next(negative_probs)) if negative else prob
            scores = {PROFANITY: profanity}
            for category, patterns in self._rules.items():
                # An empty rule is a switched-off category, not one that matches everything.
                scores[category] = 1.0 if patterns and all(p.search(prompt) for p in patterns) else 0.0
            verdicts.append(_verdict(PROMPT, scores, self._thresholds))
        return verdicts


def verdict_from_detections(detections: Sequence[Mapping[str, Any]], stage: str, policy: ModerationPolicy) -> Verdict:
    """The verdict on one image from nudenet's detections (``{"class": label, "score": float, "box": [...]}``).

    A category's score is the highest score among detections whose label maps to it; 0.0 when there are none.
    """
    scores = dict.fromkeys(policy.image_labels.values(), 0.0)
    for detection in detections:
        category = policy.image_labels.get(detection["class"])
        if category is not None:
            scores[category] = max(scores[category], float(detection["score"]))
    return _verdict(stage, scores, policy.thresholds)


def _to_bgr(image: Image.Image) -> np.ndarray:
    # nudenet's path input is cv2.imread's BGR array; passing the same layout keeps its colour handling as tested.
    return np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])


Detections = list[dict[str, Any]]  # nudenet's form: {"class": label, "score": float, "box": [...]} per find


class NudeNetDetector:
    """nudenet's shipped ONNX detector, loaded once, on construction."""

    def __init__(self) -> None:
        # Imported here: nudenet imports OpenCV and onnxruntime, which prompt-only workers do not need.
        from nudenet import NudeDetector

        # No model_path: nudenet 3.4.2 then opens the 320n.onnx in its own package directory; it has no
        # download code at all.
        self._detector = NudeDetector()

    def detect(self, images: Sequence[Image.Image], batch_size: int) -> list[Detections]:
        # Every image is resized to the detector's 320x320 input, so any sizes batch together.
        return self._detector.detect_batch([_to_bgr(image) for image in images], batch_size=batch_size)


class NullDetector:
    """Finds nothing and costs nothing. For capacity tests only: it lets them measure the pipeline, not nudenet."""

    def detect(self, images: Sequence[Image.Image], batch_size: int) -> list[Detections]:
        return [[] for _ in images]


IMAGE_DETECTORS = {"nudenet": NudeNetDetector, "null": NullDetector}


class ImageModerator:
    """Scores images with the named detector (``IMAGE_DETECTORS``: nudenet's by default)."""

    def __init__(self, policy: ModerationPolicy | None = None, batch_size: int = 8, detector: str = "nudenet") -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if detector not in IMAGE_DETECTORS:
            raise ValueError(f"unknown image detector {detector!r}; choose from {', '.join(IMAGE_DETECTORS)}")
        self.policy = policy or ModerationPolicy()
        self.batch_size = batch_size
        self._detector = IMAGE_DETECTORS[detector]()

    def check(self, images: Sequence[Image.Image], stage: str) -> list[Verdict]:
        """One verdict per image, in order; ``stage`` is ``INPUT_IMAGE`` or ``OUTPUT_IMAGE``."""
        if stage not in IMAGE_STAGES:
            raise ValueError(f"stage must be one of {IMAGE_STAGES}, got {stage!r}")
        if not images:
            return []
        detections = self._detector.detect(images, self.batch_size)
        return [verdict_from_detections(found, stage, self.policy) for found in detections]
