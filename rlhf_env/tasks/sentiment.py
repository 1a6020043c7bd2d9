"""The ``sentiment`` task: continue a short review so that it reads positively.

The classic RLHF demo (Ziegler et al. 2019; TRL's IMDb example), shrunk to fit a
character-level tiny GPT-2 trained on a laptop CPU. Everything is generated from code:

* a small grammar of review *openings* over five subjects (food, films, books, gadgets,
  hotels), e.g. ``"The pasta at this bistro was"`` or ``"I watched this film last night and"``;
* *continuations* drawn from positive, negative, neutral and mixed clause templates. The
  same openings are used with every polarity, so the prompt never decides the sentiment:
  the base model learns to write mixed reviews and RL has to push it positive;
* the gold reward is VADER's compound score of the **completion only** (in [-1, 1]).

Text convention: openings never end with a space and every continuation starts with one,
so ``opening + continuation`` is the review. Continuations carry no EOS (the trainer adds
it) and are at most ``max_new_tokens - 1`` characters, leaving room for that EOS.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import re
from collections.abc import Sequence
from typing import NamedTuple

from rlhf_env.errors import SettingError
from rlhf_env.tasks.base import BaseModelRecipe, Task, sized_recipe

MAX_PROMPT_CHARS = 40
MAX_COMPLETION_CHARS = 31  # + EOS = the default max_new_tokens of 32
POLARITIES = ("positive", "negative", "neutral", "mixed")

# Per subject: slot vocabularies, openings that want a predicate ("... was") or a clause
# ("... and"), polarity adjectives, and neutral filler. Polarity words are all in VADER's
# lexicon so the label we meant is the label the gold reward sees.
_SUBJECTS: dict[str, dict] = {
    "food": dict(
        slots=dict(
            dish="pasta soup pizza steak curry salad bread coffee dessert burger ramen cake fish tea".split(),
            place="place cafe diner bistro restaurant".split(),
        ),
        pred=[
            "The {dish} at this {place} was",
            "The {dish} I ordered here was",
            "Our dinner at the {place} was",
            "The service at this {place} was",
        ],
        clause=["I ordered the {dish} here and", "We tried the new {place} and", "I had the {dish} for lunch and"],
        pos="delicious yummy fresh lovely perfect excellent superb wonderful".split(),
        neg="disgusting gross nasty bad awful horrible terrible disappointing".split(),
        neutral_pred=["served at noon", "about the usual size", "ten dollars on the menu", "served in a paper box"],
        neutral_clause=[
            "then we walked home",
            "it came with a drink",
            "we sat by the window",
            "we paid at the counter",
        ],
    ),
    "film": dict(
        slots=dict(
            film="film movie comedy drama western sequel musical".split(),
            part="plot acting ending soundtrack script pacing cast dialogue".split(),
        ),
        pred=["This {film} was", "The {part} of this {film} was", "The new {film} I saw was"],
        clause=[
            "I watched this {film} last night and",
            "We saw the new {film} and",
            "My friends took me to this {film} and",
        ],
        pos="brilliant hilarious funny exciting thrilling gorgeous beautiful amazing".split(),
        neg="boring dull stupid pathetic painful awful terrible lame".split(),
        neutral_pred=["about two hours long", "shown in black and white", "filmed in Canada", "in French"],
        neutral_clause=["it was two hours long", "we sat in the back row", "then we went home", "it ended at ten"],
    ),
    "book": dict(
        slots=dict(
            book="book novel memoir biography mystery".split(),
            part=["plot", "writing", "prose", "ending", "cover", "first chapter", "main character"],
        ),
        pred=["The {part} of this {book} was", "This {book} was"],
        clause=[
            "I read this {book} on holiday and",
            "My friend lent me this {book} and",
            "I finished this {book} today and",
        ],
        pos="brilliant beautiful clever charming wonderful enjoyable excellent lovely".split(),
        neg="boring dull dreadful awful bad poor pathetic miserable".split(),
        neutral_pred=[
            "about three hundred pages",
            "printed in small type",
            "written in the first person",
            "set in a small town",
        ],
        neutral_clause=[
            "it took me a week",
            "I read it on the train",
            "I took it back to the library",
            "it has ten chapters",
        ],
    ),
    "gadget": dict(
        slots=dict(
            gadget="phone laptop tablet watch headset camera speaker".split(),
            part="screen battery keyboard charger case".split(),
        ),
        pred=["The {part} on this {gadget} was", "The new {gadget} I ordered was", "This {gadget} was"],
        clause=[
            "I bought this {gadget} last week and",
            "I have used this {gadget} daily and",
            "My new {gadget} arrived today and",
        ],
        pos="impressive excellent great perfect flawless smart awesome outstanding".split(),
        neg="useless broken worthless awful bad poor disappointing weak".split(),
        neutral_pred=[
            "black with a metal frame",
            "about the size of a book",
            "shipped in a plain box",
            "made of plastic",
        ],
        neutral_clause=[
            "it came in a plain box",
            "it arrived on Tuesday",
            "I set it up at home",
            "it runs on two batteries",
        ],
    ),
    "hotel": dict(
        slots=dict(
            hotel="hotel inn resort hostel motel lodge".split(),
            part="staff breakfast pool bed view lobby service room".split(),
        ),
        pred=["The {part} at this {hotel} was", "Our room at the {hotel} was"],
        clause=[
            "We stayed at this {hotel} and",
            "We booked the {hotel} online and",
            "I spent a week at this {hotel} and",
        ],
        pos="clean comfortable friendly pleasant lovely cheerful wonderful helpful".split(),
        neg="dirty rude uncomfortable unpleasant miserable awful horrible nasty".split(),
        neutral_pred=["on the third floor", "near the train station", "next to the parking lot", "open until ten"],
        neutral_clause=["we checked in at noon", "we left on Sunday", "we took the bus there", "the room had two beds"],
    ),
}

# Intensifiers (VADER boosters) make the positive and negative ends graded, not binary.
_ADVERBS = ["", "", "really ", "very ", "so ", "quite ", "extremely ", "absolutely "]
_LOVE = ["loved", "enjoyed", "adored", "liked"]
_HATE = ["hated", "disliked", "did not enjoy", "did not like"]

# Continuation templates by opening kind and polarity; ``{pos}``/``{neg}`` are adjectives.
_TEMPLATES = {
    "pred": {
        "positive": [
            "{adv}{pos}.",
            "{adv}{pos}, I loved it.",
            "{pos} and {pos2}.",
            "{adv}{pos}!",
            "{pos}, highly recommended.",
        ],
        "negative": [
            "{adv}{neg}.",
            "{adv}{neg}, I hated it.",
            "{neg} and {neg2}.",
            "{adv}{neg}!",
            "{neg}, a waste of money.",
        ],
        "neutral": ["{neutral_pred}."],
        "mixed": ["{pos} but {adv}{neg}.", "{neg} but {adv}{pos}.", "{pos} but a little {neg}."],
    },
    "clause": {
        "positive": ["it was {adv}{pos}.", "I {love} it.", "I {love} it, {adv}{pos}.", "it was {pos} and {pos2}."],
        "negative": ["it was {adv}{neg}.", "I {hate} it.", "I hated it, {adv}{neg}.", "it was {neg} and {neg2}."],
        "neutral": ["{neutral_clause}."],
        "mixed": ["it was {pos} but {neg}.", "it was {neg} but {pos}."],
    },
}


class Review(NamedTuple):
    """One generated review: ``opening + continuation`` is the text; ``polarity`` its intended tone."""

    opening: str
    continuation: str
    polarity: str


def _kind(opening: str) -> str:
    return "clause" if opening.endswith(" and") else "pred"


def review_openings(max_chars: int = MAX_PROMPT_CHARS) -> dict[str, str]:
    """Every opening the grammar can produce, mapped to its subject, in a fixed order.

    Each template is expanded over the product of its slots; openings longer than
    ``max_chars`` are dropped. Order is insertion order, so the pool is the same every run.
    """
    pool: dict[str, str] = {}
    for subject, spec in _SUBJECTS.items():
        for template in spec["pred"] + spec["clause"]:
            names = re.findall(r"{(\w+)}", template)
            for values in itertools.product(*(spec["slots"][n] for n in names)):
                text = template.format(**dict(zip(names, values)))
                if len(text) <= max_chars:
                    pool.setdefault(text, subject)
    return pool


_POOL = review_openings()
# Part of the task config (so of the base model's cache key): editing the grammar retrains.
_GRAMMAR_DIGEST = hashlib.sha256(
    json.dumps([_SUBJECTS, _TEMPLATES, _ADVERBS, _LOVE, _HATE], sort_keys=True).encode()
).hexdigest()[:12]


def continue_review(opening: str, polarity: str, rng: random.Random, max_chars: int = MAX_COMPLETION_CHARS) -> str:
    """Draw a continuation of ``opening`` with the given polarity (leading space, no EOS).

    Redraws until the text fits in ``max_chars`` (every template has short fills, so this ends).
    """
    if opening not in _POOL:
        raise SettingError(f"{opening!r} is not an opening of the sentiment grammar")
    spec = _SUBJECTS[_POOL[opening]]
    templates = _TEMPLATES[_kind(opening)][polarity]
    for _ in range(1000):
        pos, pos2 = rng.sample(spec["pos"], 2)
        neg, neg2 = rng.sample(spec["neg"], 2)
        text = " " + rng.choice(templates).format(
            adv=rng.choice(_ADVERBS),
            pos=pos,
            pos2=pos2,
            neg=neg,
            neg2=neg2,
            love=rng.choice(_LOVE),
            hate=rng.choice(_HATE),
            neutral_pred=rng.choice(spec["neutral_pred"]),
            neutral_clause=rng.choice(spec["neutral_clause"]),
        )
        if len(text) <= max_chars:
            return text
    raise SettingError(f"no {polarity} continuation of {opening!r} fits in {max_chars} characters")


def generate_reviews(
    n: int,
    seed: int = 0,
    openings: Sequence[str] | None = None,
    mix: Sequence[float] = (0.4, 0.4, 0.12, 0.08),
    max_chars: int = MAX_COMPLETION_CHARS,
) -> list[Review]:
    """``n`` reviews, deterministic in ``seed``.

    Args:
        openings: openings to draw from (default: the whole grammar).
        mix: probabilities of (positive, negative, neutral, mixed) continuations.
        max_chars: longest continuation, in characters.
    """
    if len(mix) != len(POLARITIES):
        raise SettingError(f"mix needs one weight per polarity {POLARITIES}, got {list(mix)}")
    rng = random.Random(seed)
    openings = list(openings) if openings is not None else list(_POOL)
    reviews = []
    for _ in range(n):
        opening = rng.choice(openings)
        polarity = rng.choices(POLARITIES, weights=mix)[0]
        reviews.append(Review(opening, continue_review(opening, polarity, rng, max_chars), polarity))
    return reviews


_ANALYZER = None


def vader_reward(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """Gold reward: VADER compound score in [-1, 1] of each completion; the prompt is ignored.

    Scoring the completion alone means the policy is rewarded for what it wrote, not for an
    opening it was handed. An empty completion scores 0.0.
    """
    global _ANALYZER
    if _ANALYZER is None:  # building the analyzer reads the lexicon file: do it once, lazily
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        _ANALYZER = SentimentIntensityAnalyzer()
    return [float(_ANALYZER.polarity_scores(c)["compound"]) if c.strip() else 0.0 for c in completions]


def make_sentiment_task(
    n_train: int = 256,
    n_eval: int = 64,
    n_sft: int = 4000,
    seed: int = 0,
    max_new_tokens: int = 32,
    mix: Sequence[float] = (0.4, 0.4, 0.12, 0.08),
    recipe: BaseModelRecipe | None = None,
    model_size: str = "tiny",
) -> Task:
    """The ``sentiment`` task: write a positive continuation of a review opening.

    Train and eval prompts are disjoint openings drawn (by ``seed``) from the grammar's pool;
    the SFT corpus uses train openings only, each paired with continuations of every polarity
    (mix: positive, negative, neutral, mixed), so the base model is roughly neutral on average.
    ``model_size``: ``tiny`` (0.1M parameters, CPU) or ``gpu`` (~25M, ``rlhf_env.tasks.base.GPU_SHAPE``,
    trained at a fifth of the rate); ignored when ``recipe`` is given.
    """
    pool = list(_POOL)
    if min(n_train, n_eval, n_sft) < 1:
        raise SettingError(f"n_train, n_eval and n_sft must be positive, got {n_train}, {n_eval}, {n_sft}")
    if n_train + n_eval > len(pool):
        raise SettingError(f"n_train + n_eval = {n_train + n_eval} exceeds the {len(pool)} openings available")
    random.Random(seed).shuffle(pool)
    eval_prompts, train_prompts = pool[:n_eval], pool[n_eval : n_eval + n_train]
    reviews = generate_reviews(n_sft, seed=seed + 1, openings=train_prompts, mix=mix, max_chars=max_new_tokens - 1)
    demos = generate_reviews(
        n_sft, seed=seed + 2, openings=train_prompts, mix=(1, 0, 0, 0), max_chars=max_new_tokens - 1
    )
    # Measured (one thread, batch 32): 2x64 (115k params) runs ~65 ms/step, ~1-1.5 min for
    # 1000 steps, reaching ~0.7 nats/char: mostly legible words, some misspellings, mixed tone.
    # 3x96 at 600 steps costs the same and samples no better, so the smaller model wins.
    recipe = recipe or sized_recipe(
        BaseModelRecipe(
            n_layer=2, n_head=2, n_embd=64, n_positions=128, sft_steps=1000, batch_size=32, lr=3e-3, seed=seed
        ),
        model_size,
        lr=6e-4,
    )
    config = dict(
        n_train=n_train,
        n_eval=n_eval,
        n_sft=n_sft,
        seed=seed,
        max_new_tokens=max_new_tokens,
        mix=list(mix),
        grammar=_GRAMMAR_DIGEST,
    )
    if model_size != "tiny":  # tiny: the shipped base model's cache key stays as it was
        config["model_size"] = model_size
    return Task(
        name="sentiment",
        train_prompts=train_prompts,
        eval_prompts=eval_prompts,
        gold_reward=vader_reward,
        sft_data=[(r.opening, r.continuation) for r in reviews],
        # SFT's demonstrations: positive reviews, written apart from the base model's mixed
        # corpus (SFT on that corpus only repeats the base model's training).
        demonstrations=[(r.opening, r.continuation) for r in demos],
        max_new_tokens=max_new_tokens,
        recipe=recipe,
        config=config,
    )
