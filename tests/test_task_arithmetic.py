"""The arithmetic task: gold rewards on right, wrong and malformed answers; its prompts."""

from __future__ import annotations

import pytest

from rlhf_env.tasks.arithmetic import answer, exact_match, make_arithmetic_task, partial_credit


def test_answer_parses_each_operator():
    assert [answer(p) for p in ["37+48=", "5-12=", "7*8=", " 3 + 4 ="]] == ["85", "-7", "56", "7"]
    with pytest.raises(ValueError, match="not an arithmetic prompt: 'hello'"):
        answer("hello")


def test_exact_match_on_right_wrong_and_malformed_answers():
    prompts = ["37+48="] * 7
    completions = ["85", " 85 ", "84", "58", "85abc", "", "eighty-five"]
    assert exact_match(prompts, completions) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_partial_credit_counts_digits_from_the_units():
    prompts = ["37+48=", "37+48=", "37+48=", "37+48=", "90+15=", "5-12=", "5-12=", "37+48="]
    completions = ["85", "75", "84", "185", "105", "7", "-7", "8x"]
    assert partial_credit(prompts, completions) == [1.0, 0.5, 0.5, 2 / 3, 1.0, 0.5, 1.0, 0.0]


def test_task_prompts_are_disjoint_and_sft_answers_are_right():
    task = make_arithmetic_task(digits=2, operators="+-", n_train=300, n_eval=50, seed=3)
    assert len(task.train_prompts) == 300 and len(task.eval_prompts) == 50
    assert not set(task.train_prompts) & set(task.eval_prompts)
    assert {p[-1] for p in task.train_prompts} == {"="} and any("-" in p for p in task.train_prompts)
    assert all(exact_match([p], [c]) == [1.0] for p, c in task.sft_data)
    again = make_arithmetic_task(digits=2, operators="+-", n_train=300, n_eval=50, seed=3)
    assert again.eval_prompts == task.eval_prompts and again.cache_key() == task.cache_key()
    assert make_arithmetic_task(n_train=300, n_eval=50, seed=4).cache_key() != task.cache_key()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"digits": 0}, "digits must be >= 1"),
        ({"operators": "/"}, "subset of"),
        ({"digits": 1, "n_train": 500}, "only 100 distinct problems"),
    ],
)
def test_impossible_knobs_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_arithmetic_task(**kwargs)
