"""The calculator task: a tool the policy may call mid-turn, answered by the env; exact gold."""

from __future__ import annotations

import numpy as np
import pytest

from rlhf_env.errors import SettingError
from rlhf_env.tasks import get_task
from rlhf_env.tasks.calculator import Calculator, answer, exact_answer, final_answer, tool_use


def test_the_gold_reads_the_answer_outside_the_tool_segments():
    p = "123*45="
    assert answer(p) == "5535"
    assert exact_answer(
        [p] * 5, ["5535", "[calc:123*45]5535;5535", "[calc:123*54]6642;6642", "[calc:1*1]1;", "5535;"]
    ) == [
        1.0,
        1.0,
        0.0,
        0.0,  # the tool's output alone is not an answer
        0.0,  # nor is policy text that imitates one
    ]
    assert final_answer("[sum:1]err:unknown tool; 5535 ") == "5535"


def test_the_tool_answers_calls_and_every_bad_call_with_a_message():
    calc = Calculator()
    assert calc.respond({}, "[calc:123*45]").text == "5535;"
    assert calc.respond({}, "[calc: 7 - 9]").text == "-2;"
    assert calc.respond({}, "[calc:12*]").text == "err:malformed;"
    assert calc.respond({}, "x]").text == "err:malformed;"
    assert calc.respond({}, "[sum:1+2]").text == "err:unknown tool;"
    assert Calculator(tool=False).respond({}, "[calc:1*2]").text == "err:no tools;"
    assert calc.respond({}, "5535").done  # an answer (the turn ended at EOS) ends the episode


def test_tool_use_counts_calls_and_right_questions():
    prompts = ["12*34=", "12*34=", "12*34="]
    out = tool_use(prompts, ["[calc:12*34]408;408", "[calc:21*34]714;[calc:12 * 34]408;408", "400"])
    assert out == {"call_rate": pytest.approx(2 / 3), "call_accuracy": pytest.approx(2 / 3)}


def test_a_scripted_episode_through_the_tasks_env():
    """The task's env injects the tool's result after ``]`` and scores the transcript."""
    from rlhf_env import MultiTurnVectorEnv, build_char_tokenizer, build_tiny_model
    from rlhf_env.tasks.calculator import CHARS

    task = get_task("calculator", n_train=20, n_eval=5)
    assert (
        task.unkeyed == ("tool",)
        and get_task("calculator", n_train=20, n_eval=5, tool=False).cache_key() == task.cache_key()
    )
    tok = build_char_tokenizer(CHARS)
    model, _ = build_tiny_model(tok, seed=0, n_positions=64)
    prompt = task.train_prompts[0]
    a, b = prompt[:-1].split("*")
    env = MultiTurnVectorEnv(
        tok,
        model,
        task.gold_reward,
        [prompt],
        num_envs=1,
        max_new_tokens=task.max_new_tokens,
        beta=0.0,
        **task.env_options(),
    )
    env.reset(seed=0)
    product = str(int(a) * int(b))
    info = {}
    for t in tok(f"[calc:{a}*{b}]", add_special_tokens=False)["input_ids"]:
        _, _, term, trunc, info = env.step({"token": np.array([t]), "logprob": np.zeros(1, np.float32)})
    assert tok.decode(info["injected"][0]) == product + ";"
    for t in tok(product, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]:
        _, _, term, trunc, info = env.step({"token": np.array([t]), "logprob": np.zeros(1, np.float32)})
    assert term[0] and info["score"][0] == 1.0 and info["turns"][0] == 2
    assert info["completion"][0] == f"[calc:{a}*{b}]{product};{product}"


def test_bad_knobs_are_named():
    with pytest.raises(SettingError, match="digits_a and digits_b"):
        get_task("calculator", digits_a=0)
    with pytest.raises(SettingError, match="mix must be three"):
        get_task("calculator", mix="1,2")
