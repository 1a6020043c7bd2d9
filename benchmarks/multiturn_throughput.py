"""Multi-turn rollout speed: the env's continuing caches against re-rendering and re-prefilling each turn.

Turn-level frameworks run a multi-turn episode as a loop over turns: render the conversation to
text, tokenise it, prefill the whole history into the generation engine, sample the turn, append
the reply; the reference scores the final sequence afterwards. ``MultiTurnVectorEnv`` never
re-renders or re-tokenises, and its sampler and reference caches go on across turns: a turn costs
its own tokens only. Both sides here use the same models, prompts, interaction, sampling kernel
(``IncrementalLM``), stop ids and batch; the baseline re-renders the conversation every turn
(through the chat template where the tokenizer has one), re-tokenises it and re-prefills it,
ours continues. Timed: policy tokens sampled per second (the reference's log-probs included
on both sides). The interaction answers every turn with a fixed note until ``--turns`` turns, so
both sides do the same number of turns; a turn ends at ``--turn-tokens`` tokens
(``Interaction.max_turn_tokens``; a stop string on sampled text would make turn lengths random).

    python benchmarks/multiturn_throughput.py [--turns 6] [--turn-tokens 16] [--batch 16]
        [--model DIR] [--threads 1] [--repeats 3] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from rlhf_env import Interaction, MultiTurnVectorEnv, Reply
from rlhf_env.kvcache import IncrementalLM
from rlhf_env.models import pad_token_id
from rlhf_env.policy import sample_tokens
from rlhf_env.prompts import DEFAULT_PROMPTS
from rlhf_env.rollout import collect

REPLY = " The tool says: the value is forty two, and the next step is yours."


class FixedTurns(Interaction):
    """Every turn gets ``REPLY``; the episode ends after ``turns`` turns. A turn ends at ``turn_tokens`` tokens."""

    def __init__(self, turns: int, turn_tokens: int):
        self.turns, self.max_turn_tokens = turns, turn_tokens

    def start(self, prompt):
        return {"n": 0}

    def respond(self, state, turn):
        state["n"] += 1
        return Reply(done=True) if state["n"] >= self.turns else Reply(REPLY)


def models(path: str | None, device):
    from rlhf_env.tiny import build_bpe_tokenizer, build_tiny_model

    if path:
        from rlhf_env.models import load_pretrained, local_model_dir

        ref, tok = load_pretrained(local_model_dir(path), device, torch.float32)
        policy, _ = load_pretrained(local_model_dir(path), device, torch.float32)
        return policy.eval(), ref.eval(), tok
    tok = build_bpe_tokenizer()
    ref, _ = build_tiny_model(tok, seed=0, n_layer=4, n_embd=256, n_head=4, n_positions=1024)
    policy, _ = build_tiny_model(tok, seed=1, n_layer=4, n_embd=256, n_head=4, n_positions=1024)
    return policy.eval(), ref.eval(), tok


def ours(policy, ref, tok, prompts, args) -> tuple[int, float]:
    """(policy tokens, seconds) of one batch of episodes through ``MultiTurnVectorEnv``."""
    interaction = FixedTurns(args.turns, args.turn_tokens)
    env = MultiTurnVectorEnv(
        tok,
        ref,
        lambda p, c: [0.0] * len(c),
        prompts,
        num_envs=len(prompts),
        beta=0.1,
        max_new_tokens=args.turns * (args.turn_tokens + 40),
        interaction=interaction,
        max_turns=args.turns,
        max_injection_tokens=64,
    )
    t0 = time.perf_counter()
    batch = collect(env, policy, seed=0, prompts=prompts)
    return int(batch.action_mask.sum()), time.perf_counter() - t0


@torch.no_grad()
def rerender(policy, ref, tok, prompts, args) -> tuple[int, float]:
    """(policy tokens, seconds) of the same episodes as a turn-level framework runs them: each turn
    renders the conversation (the chat template where the tokenizer has one), tokenises it and
    prefills the whole history into a fresh cache; rows stop at the same stop ids and turn length."""
    from rlhf_env.prompt_format import PromptFormat
    from rlhf_env.scoring import next_token_logprobs

    fmt = PromptFormat(tok, "auto", getattr(ref, "generation_config", None))
    stops = torch.tensor(fmt.stop_ids)
    pad, vocab = pad_token_id(tok), len(tok)
    gen = torch.Generator().manual_seed(0)
    chats = [[{"role": "user", "content": p}] for p in prompts]
    texts = list(prompts)

    def render(r: int, generation: bool) -> list[int]:
        if fmt.uses_template:
            out = tok.apply_chat_template(chats[r], add_generation_prompt=generation, tokenize=True)
            return list(out["input_ids"] if not isinstance(out, list) else out)
        return tok(texts[r])["input_ids"]

    sampled = 0
    t0 = time.perf_counter()
    for _ in range(args.turns):
        histories = [render(r, True) for r in range(len(prompts))]  # re-render and re-tokenise
        width = max(len(h) for h in histories)
        chunk = torch.full((len(prompts), width), pad, dtype=torch.long)
        for r, h in enumerate(histories):
            chunk[r, : len(h)] = torch.tensor(h)
        lm = IncrementalLM(policy, len(prompts), pad, vocab_size=vocab)  # the engine re-prefills the history
        logprobs = lm.feed(chunk, torch.tensor([len(h) for h in histories]), torch.ones(len(prompts), dtype=torch.bool))
        turn = [[] for _ in prompts]
        active = torch.ones(len(prompts), dtype=torch.bool)
        for _ in range(args.turn_tokens):
            token = sample_tokens(logprobs, gen)
            for r in active.nonzero().flatten().tolist():
                turn[r].append(int(token[r]))
            active &= ~torch.isin(token, stops)
            if not bool(active.any()):
                break
            logprobs = lm.feed(token[:, None], active.long(), torch.zeros(len(prompts), dtype=torch.bool))
        sampled += sum(len(t) for t in turn)
        for r, ids in enumerate(turn):  # the next turn's text: the decoded turn and the reply
            text = tok.decode(ids, skip_special_tokens=True)
            chats[r] += [{"role": "assistant", "content": text}, {"role": "user", "content": REPLY}]
            texts[r] += text + REPLY
    # the reference scores every final sequence once (as verl/OpenRLHF do after the rollout)
    finals = [render(r, False) for r in range(len(prompts))]
    width = max(len(f) for f in finals)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    for r, f in enumerate(finals):
        ids[r, : len(f)] = torch.tensor(f)
    attn = (torch.arange(width) < torch.tensor([len(f) for f in finals])[:, None]).long()
    next_token_logprobs(ref, ids, attn, vocab)
    return sampled, time.perf_counter() - t0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--turn-tokens", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument(
        "--model", help="a local HF causal-LM folder, .gguf file or package:NAME (default: a 4-layer tiny GPT-2)"
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", help="also write the JSON summary here")
    args = ap.parse_args(argv)
    if args.turns < 2:
        ap.error("--turns must be >= 2: one turn has nothing to re-render")
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    policy, ref, tok = models(args.model, device)
    prompts = [DEFAULT_PROMPTS[i % len(DEFAULT_PROMPTS)] for i in range(args.batch)]
    runs = {"ours": [], "rerender": []}
    for _ in range(args.repeats):  # alternate the sides so a change of load biases neither
        for name, fn in (("ours", ours), ("rerender", rerender)):
            tokens, seconds = fn(policy, ref, tok, prompts, args)
            runs[name].append(tokens / seconds)
    ours_rate, base_rate = statistics.median(runs["ours"]), statistics.median(runs["rerender"])
    summary = {
        "model": args.model or "tiny gpt2 (4 layers, width 256)",
        "params": sum(p.numel() for p in policy.parameters()),
        "turns": args.turns,
        "turn_tokens": args.turn_tokens,
        "batch": args.batch,
        "threads": args.threads,
        "ours_tokens_per_s": round(ours_rate, 1),
        "rerender_tokens_per_s": round(base_rate, 1),
        "ratio": round(ours_rate / base_rate, 3),
        "runs": {k: [round(v, 1) for v in vs] for k, vs in runs.items()},
    }
    print(
        f"{summary['model']}: {args.turns} turns x {args.turn_tokens} tokens, batch {args.batch}: "
        f"ours {ours_rate:.0f} tok/s, re-render + re-prefill {base_rate:.0f} tok/s, ratio {ours_rate / base_rate:.2f}"
    )
    print(json.dumps(summary))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
