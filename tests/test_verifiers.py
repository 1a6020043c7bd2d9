"""Verifiers (final number, boxed, math_verify, exact answer), the field contract, reasoning_gym and arithmetic_chat."""

from __future__ import annotations

import pytest

from rlhf_env.errors import RewardError, SettingError
from rlhf_env.tasks import task_from_spec
from rlhf_env.tasks.fields import FieldReward, bind_fields, reads_fields
from rlhf_env.tasks.verifiers import answer_tag, boxed, exact_answer, final_number, last_boxed, last_number, math_verify


@pytest.mark.parametrize(
    "text, number",
    [
        ("The answer is 1,234.", 1234.0),
        ("It costs $1,000,000 in total", 1e6),
        ("x = 3.50", 3.5),
        ("-$5, then $-7", -7.0),
        ("first 12 then 7.", 7.0),
        ("version v2 is 9", 9.0),  # "v2": a digit inside a word is not a number
        ("no digits here", None),
        ("1,2", 2.0),  # a comma before fewer than three digits is punctuation
    ],
)
def test_last_number(text, number):
    assert last_number(text) == number


def test_final_number_compares_numerically_with_the_answer():
    reward = final_number()
    completions = ["The answer is 1,234.", "1233", "It is 0.50", "#### 72", "none"]
    answers = [1234, "1,234", "0.5", "Natalia sold 48/2 = 24 clips ... #### 72", 5]
    assert reward(["q"] * 5, completions, answers) == [1.0, 0.0, 1.0, 1.0, 0.0]


def test_boxed_keeps_nested_braces():
    assert last_boxed(r"first \boxed{1} then \boxed{\frac{1}{2}} done") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed{a{b}c") is None  # never closed
    assert last_boxed("no box") is None
    reward = boxed()
    completions = [r"so \boxed{\frac{1}{2}}", r"\boxed{ 1,234 }", r"\boxed{12}", "12"]
    assert reward(["q"] * 4, completions, [r"\frac{1}{2}", 1234, 13, 12]) == [1.0, 1.0, 0.0, 0.0]


def test_math_verify_finds_equivalent_answers():
    reward = math_verify()
    completions = [r"so \boxed{\frac{1}{2}}", r"\boxed{0.3}", r"The answer is $\frac{2}{4}$", "no answer"]
    assert reward(["q"] * 4, completions, ["0.5"] * 4) == [1.0, 0.0, 1.0, 0.0]


def test_math_verify_absent_is_a_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "math_verify", None)  # import math_verify raises ImportError
    with pytest.raises(ImportError, match=r"math-verify package: pip install 'rlhf_env\[reasoning\]'"):
        math_verify()


def test_exact_answer_and_answer_tag():
    assert exact_answer()(["q", "q"], [" 42\n", "42."], ["42", 42]) == [1.0, 0.0]
    assert answer_tag("think <answer>1</answer> no, <answer> 2 </answer>") == "2"
    assert answer_tag("<answer>unclosed") is None


def test_the_field_contract_is_read_from_the_signature():
    def plain(prompts, completions):
        return [0.0] * len(prompts)

    def reads(prompts, completions, answer, hint=None):
        return [0.0] * len(prompts)

    def everything(prompts, completions, **fields):
        return [float(len(fields))] * len(prompts)

    assert reads_fields(plain) == ((), (), False)
    assert reads_fields(reads) == (("answer",), ("hint",), False)
    assert reads_fields(everything) == ((), (), True)
    fields = {"1+1": {"answer": "2", "source": "x"}, "2+2": {"answer": "4", "source": "y"}}
    assert bind_fields(plain, fields, "t") is plain  # existing rewards are used as they are
    bound = bind_fields(everything, fields, "t")
    assert isinstance(bound, FieldReward) and bound(["1+1"], ["2"]) == [2.0]  # answer and source

    def echo(prompts, completions, answer):
        return [float(a) for a in answer]

    assert bind_fields(echo, fields, "t")(["2+2", "1+1"], ["", ""]) == [4.0, 2.0]  # each row's own answer
    with pytest.raises(RewardError, match="prompt '3\\+3' is not one of task 't'"):
        bind_fields(echo, fields, "t")(["3+3"], [""])
    with pytest.raises(
        SettingError, match="reads the field\\(s\\) answer of each prompt, but task 'arithmetic' has no"
    ):
        bind_fields(echo, None, "arithmetic")

    def wants(prompts, completions, solution):
        return [0.0]

    with pytest.raises(
        SettingError, match="reads the field\\(s\\) solution, which task 't' does not have; its fields: answer, source"
    ):
        bind_fields(wants, fields, "t")


def test_reasoning_gym_gold_is_the_datasets_own_score():
    task = task_from_spec("reasoning_gym:basic_arithmetic,size=20,eval_size=10")
    assert len(task.train_prompts) == 20 and not set(task.train_prompts) & set(task.eval_prompts)
    assert all(p.endswith("inside <answer></answer> tags.") for p in task.train_prompts)
    prompts = task.train_prompts[:3]
    answers = [task.fields[p]["answer"] for p in prompts]
    completions = [f"Working... <answer>{answers[0]}</answer>", f"<answer>{int(answers[1]) + 1}</answer>", answers[2]]
    gold = task.gold_reward(prompts, completions)
    assert gold[0] == 1.0 and gold[1] < 1.0 and gold[2] == 0.0  # no answer tag: no answer
    assert task.config == {"dataset": "basic_arithmetic", "size": 20, "seed": 0, "eval_size": 10, "max_new_tokens": 256}
    again = task_from_spec("reasoning_gym:basic_arithmetic,size=20,eval_size=10")
    assert again.train_prompts == task.train_prompts  # deterministic


def test_reasoning_gym_knobs_are_the_datasets_config():
    task = task_from_spec("reasoning_gym:basic_arithmetic,size=5,eval_size=5,max_digits=1,max_terms=2")
    assert task.config["max_digits"] == 1 and task.config["max_terms"] == 2
    with pytest.raises(SettingError, match=r"unknown dataset 'basic_arithmetc'; did you mean basic_arithmetic"):
        task_from_spec("reasoning_gym:basic_arithmetc")
    with pytest.raises(SettingError, match=r"unknown knobs \['maxx_digits'\]; known: \['allow_negation'"):
        task_from_spec("reasoning_gym:basic_arithmetic,maxx_digits=2")
    with pytest.raises(SettingError, match="reasoning_gym size: expected an integer, got 'x'"):
        task_from_spec("reasoning_gym:basic_arithmetic,size=x")


def test_arithmetic_chat_prompts_and_gold():
    task = task_from_spec("arithmetic_chat:digits=1,operators=+*,n_train=40,n_eval=10,seed=3")
    assert len(task.train_prompts) == 40 and len(task.eval_prompts) == 10
    assert not set(task.train_prompts) & set(task.eval_prompts)
    p = "What is 7 * 8? Reply with just the number."
    fields = {**task.fields, p: {"answer": "56"}}  # a prompt of the task's form, answered by hand
    gold = bind_fields(final_number(), fields, "arithmetic_chat")
    assert gold([p, p, p], ["56", "The answer is 56.", "54"]) == [1.0, 1.0, 0.0]
    first = task.train_prompts[0]
    a, op, b = first.removeprefix("What is ").split("?")[0].split()
    right = str(int(a) + int(b) if op == "+" else int(a) * int(b))
    assert task.gold_reward([first, first], [right, right + "1"]) == [1.0, 0.0]
    assert task.max_new_tokens == 24
