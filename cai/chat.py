"""The conversations that stages build, written once: every stage that feeds the policy a prompt (SL's
first answers, the SFT data, prefs' samples and dataset, the reward model's inputs, RL's rollouts, eval's
answers) builds it with `policy_input`, so an edit of `answer.jinja` reaches training and sampling alike.
"""

from __future__ import annotations

from cai.templates import Templates

ANSWER_TEMPLATE = "answer.jinja"


def conversation(prompt: str, answer: str | None = None, system_prompt: str | None = None) -> list[dict]:
    """[system], user, [assistant]: a chat conversation as transformers' chat templates and TRL take it."""
    turns = [{"role": "system", "content": system_prompt}] if system_prompt else []
    turns.append({"role": "user", "content": prompt})
    if answer is not None:
        turns.append({"role": "assistant", "content": answer})
    return turns


def policy_input(templates: Templates, prompt: str, system_prompt: str | None = None, answer: str | None = None) -> list[dict]:
    """The conversation the policy answers: [system], the user turn `answer.jinja` makes of the user's
    `prompt`, and, for training data, the `answer`."""
    return conversation(templates.render(ANSWER_TEMPLATE, prompt=prompt), answer, system_prompt)
