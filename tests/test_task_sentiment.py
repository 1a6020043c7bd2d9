"""The sentiment task: VADER gold reward, the review grammar, and the Task it builds."""

from __future__ import annotations

import random
import statistics
import string

import pytest

from rlhf_env.tasks.base import Task
from rlhf_env.tasks.sentiment import (
    MAX_COMPLETION_CHARS,
    MAX_PROMPT_CHARS,
    continue_review,
    generate_reviews,
    make_sentiment_task,
    review_openings,
    vader_reward,
)

PRINTABLE = set(string.printable) - set("\t\n\r\x0b\x0c")


@pytest.fixture(scope="module")
def task() -> Task:
    return make_sentiment_task()


# -- gold reward ----------------------------------------------------------------------


def test_vader_reward_signs_on_known_sentences():
    pos, neg, neutral, empty = vader_reward(
        ["", "", "", ""],
        [
            "This was a wonderful, delightful meal.",
            "It was a horrible, disgusting mess.",
            "The box is on the table.",
            "",
        ],
    )
    assert pos > 0.5
    assert neg < -0.5
    assert neutral == 0.0
    assert empty == 0.0
    assert all(isinstance(x, float) for x in (pos, neg, neutral, empty))


def test_vader_reward_scores_the_completion_not_the_prompt():
    completion = " it was on the table."
    glowing, awful = vader_reward(
        ["What a wonderful, delightful place", "A horrible, disgusting place"], [completion, completion]
    )
    assert glowing == awful == 0.0
    # and the same completion after a neutral prompt keeps its own sign
    assert vader_reward(["A horrible, disgusting place"], [" it was wonderful."])[0] > 0.5


# -- the grammar ----------------------------------------------------------------------


def test_generator_is_deterministic_in_seed_and_varies_across_seeds():
    a, b = generate_reviews(200, seed=7), generate_reviews(200, seed=7)
    assert a == b
    c = generate_reviews(200, seed=8)
    assert a != c
    # variety within one draw: many distinct openings and continuations, every polarity
    assert len({r.opening for r in a}) > 100
    assert len({r.continuation for r in a}) > 100
    assert {r.polarity for r in a} == {"positive", "negative", "neutral", "mixed"}


def test_polarity_labels_agree_with_vader():
    reviews = generate_reviews(1000, seed=3)
    scores = vader_reward([r.opening for r in reviews], [r.continuation for r in reviews])
    by = {p: [s for r, s in zip(reviews, scores) if r.polarity == p] for p in ("positive", "negative", "neutral")}
    assert min(by["positive"]) > 0.3
    assert max(by["negative"]) < -0.2
    assert set(by["neutral"]) == {0.0}


def test_same_openings_carry_every_polarity():
    reviews = generate_reviews(2000, seed=0)
    polarities: dict[str, set[str]] = {}
    for r in reviews:
        polarities.setdefault(r.opening, set()).add(r.polarity)
    both = [o for o, ps in polarities.items() if {"positive", "negative"} <= ps]
    assert len(both) > 0.5 * len(polarities)


def test_text_is_printable_ascii_and_short_with_space_convention():
    openings = review_openings()
    assert len(openings) > 300
    assert set(openings.values()) == {"food", "film", "book", "gadget", "hotel"}
    for o in openings:
        assert 0 < len(o) <= MAX_PROMPT_CHARS and set(o) <= PRINTABLE and not o.endswith(" ")
    for r in generate_reviews(500, seed=1):
        c = r.continuation
        assert 1 < len(c) <= MAX_COMPLETION_CHARS and set(c) <= PRINTABLE
        assert c.startswith(" ") and not c.startswith("  ") and "<eos>" not in c


def test_continue_review_rejects_unknown_openings_and_impossible_lengths():
    rng = random.Random(0)
    with pytest.raises(ValueError, match="not an opening"):
        continue_review("Once upon a time", "positive", rng)
    with pytest.raises(ValueError, match="fits in"):
        continue_review("This film was", "neutral", rng, max_chars=3)


# -- the task -------------------------------------------------------------------------


def test_task_prompts_disjoint_nonempty_and_sized(task):
    assert isinstance(task, Task) and task.name == "sentiment"
    assert len(task.train_prompts) == 256 and len(task.eval_prompts) == 64
    assert len(set(task.train_prompts)) == len(task.train_prompts)
    assert not set(task.train_prompts) & set(task.eval_prompts)
    # the SFT corpus only uses train openings: eval openings are unseen by the base model
    assert {p for p, _ in task.sft_data} <= set(task.train_prompts)
    assert task.gold_reward is vader_reward


def test_sft_corpus_has_mixed_sentiment(task):
    assert len(task.sft_data) == 4000
    scores = vader_reward([p for p, _ in task.sft_data], [c for _, c in task.sft_data])
    n = len(scores)
    assert abs(statistics.mean(scores)) < 0.1
    assert sum(s > 0.3 for s in scores) / n > 0.3
    assert sum(s < -0.3 for s in scores) / n > 0.3
    assert sum(s == 0.0 for s in scores) / n > 0.05  # some neutral text too


def test_demonstrations_are_positive_train_prompt_reviews_apart_from_the_corpus(task):
    """SFT's demonstrations show what the gold rewards; the base model's corpus stays mixed."""
    demos = task.demonstrations
    assert len(demos) == 4000 and {p for p, _ in demos} <= set(task.train_prompts)
    scores = vader_reward([p for p, _ in demos], [c for _, c in demos])
    assert statistics.mean(scores) > 0.5 and sum(s > 0 for s in scores) / len(scores) > 0.95
    assert not set(demos) <= set(task.sft_data)  # written apart, not a filter of the corpus


def test_sft_text_fits_the_model(task):
    for p, c in task.sft_data + task.demonstrations:
        assert set(p + c) <= PRINTABLE
        assert len(c) < task.max_new_tokens  # room left for the EOS the trainer appends
    longest = MAX_PROMPT_CHARS + task.max_new_tokens + 1  # + BOS
    assert longest <= task.recipe.n_positions


def test_task_seed_changes_split_and_cache_key_but_is_reproducible():
    a, b, c = make_sentiment_task(seed=0), make_sentiment_task(seed=0), make_sentiment_task(seed=1)
    assert a.train_prompts == b.train_prompts and a.sft_data == b.sft_data
    assert a.cache_key() == b.cache_key()
    assert a.eval_prompts != c.eval_prompts and a.sft_data != c.sft_data
    assert a.cache_key() != c.cache_key()


def test_task_rejects_bad_sizes():
    with pytest.raises(ValueError, match="exceeds"):
        make_sentiment_task(n_train=10_000)
    with pytest.raises(ValueError, match="must be positive"):
        make_sentiment_task(n_train=0)
    with pytest.raises(ValueError, match="one weight per polarity"):
        make_sentiment_task(mix=(1.0, 1.0))
