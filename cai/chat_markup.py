"""Chat markup in the text an engine sends: turned back into a conversation and a plain answer.

OpenRLHF sends the prompt as its chat template wrote it (system turn and markers included) and the
answer decoded with its special tokens kept, so the end-of-turn token comes along. A judge that read
that text would see another model's markup inside its own question (and a local judge with the same
template would read those markers as real turn boundaries). This module reads the markup back:

- `Markup`: how one chat format opens and closes the turns of each role. `FAMILIES` are the formats of
  the common open model families, written out here: ChatML (Qwen, SmolLM, Phi-4 with `<|im_sep|>`),
  Llama 3, Gemma, Phi-3, and the `[INST]` format of Mistral and Llama 2. `Markup.from_tokenizer`
  derives the markers from a tokenizer's own chat template (rendered around sentinel texts), for the
  policy model `cai serve` is told about (`serve.policy_model`); that comes first, and the families
  are the documented fallback. A prompt in none of them is taken as the user's plain text.
- `untemplate(text)`: the conversation (system, user and assistant turns) and the text of a turn left
  open at the end (the generation prompt, or an answer being written).
- `split_query(query, prompt)`: the answer part of OpenRLHF's `query` (prompt + answer): the text after
  the prompt when the query starts with it; else matched ignoring whitespace (a sentencepiece
  tokenizer's decode moves spaces), or against the prompt's end (a prompt cut on the left to fit the
  context); else None with the reason, so that the item fails instead of judging the wrong text.
- `clean_answer(answer, markup)`: the answer up to the first end-of-turn (or new turn) marker, other
  special tokens removed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

Message = dict


def _marker(text: str | None) -> re.Pattern | None:
    """A marker as a pattern that allows any whitespace where the marker has some, and around it (a
    decode may move spaces); None for a role the format does not delimit."""
    if text is None:
        return None
    chunks = text.split()
    if not chunks:  # a marker that is only whitespace (or nothing): matches any run of it
        return re.compile(r"\s*")
    return re.compile(r"\s*" + r"\s*".join(re.escape(c) for c in chunks) + r"\s*")


@dataclass(frozen=True)
class Markup:
    """How a chat format writes turns: each role's opening and closing markers (None: not delimited),
    the begin-of-text marker, and the other special tokens that may appear in an answer."""

    name: str
    user: tuple[str, str]
    assistant: tuple[str, str]
    system: tuple[str, str] | None = None
    bos: str | None = None
    ends: tuple[str, ...] = ()  # besides the closing markers: end-of-text tokens
    specials: tuple[str, ...] = ()  # removed from any text
    _patterns: dict = field(default_factory=dict, compare=False, repr=False)

    def pattern(self, role: str, which: int) -> re.Pattern | None:
        key = (role, which)
        if key not in self._patterns:
            markers = getattr(self, role)
            self._patterns[key] = None if markers is None else _marker(markers[which])
        return self._patterns[key]

    # -- reading a templated text ------------------------------------------------------------------

    def parse(self, text: str) -> tuple[list[Message], str | None] | None:
        """(turns, the content of the turn left open at the end or None), or None when the text is not
        in this format (a user turn must open it, after an optional system turn)."""
        text = text.lstrip()
        if self.bos and text.startswith(self.bos):
            text = text[len(self.bos):]
        pos, messages = 0, []
        system = self.pattern("system", 0)
        if system is not None:
            opened = system.match(text, pos)
            if opened and text[opened.start():opened.end()].strip():
                closed = self.pattern("system", 1).search(text, opened.end())
                if closed is None:
                    return None
                messages.append({"role": "system", "content": text[opened.end():closed.start()].strip()})
                pos = closed.end()
        while True:
            opened = self.pattern("user", 0).match(text, pos)
            if opened is None or not text[opened.start():opened.end()].strip():
                rest = text[pos:]
                for end in self.ends:  # an end-of-text token after the last turn
                    rest = rest.replace(end, "")
                if rest.strip():
                    return None  # something else follows: not this format
                return (messages, None) if messages else None
            closed = self.pattern("user", 1).search(text, opened.end())
            if closed is None:
                return None
            messages.append({"role": "user", "content": self._system_inside(text[opened.end():closed.start()], messages)})
            pos = closed.end()
            answer = self.pattern("assistant", 0).match(text, pos)
            if answer is None:
                return (messages, None) if not text[pos:].strip() else None
            done = self.pattern("assistant", 1).search(text, answer.end())
            if done is None:
                return messages, text[answer.end():]
            messages.append({"role": "assistant", "content": text[answer.end():done.start()].strip()})
            pos = done.end()

    def _system_inside(self, content: str, messages: list[Message]) -> str:
        """Llama 2 writes the system prompt inside the first [INST] as <<SYS>> ... <</SYS>>."""
        content = content.strip()
        found = re.match(r"<<SYS>>\s*(.*?)\s*<</SYS>>\s*", content, re.S) if not messages else None
        if found:
            messages.append({"role": "system", "content": found.group(1)})
            content = content[found.end():]
        return content.strip()

    # -- cleaning an answer ------------------------------------------------------------------------

    def end_markers(self) -> list[str]:
        """Strings at which an answer ends: closing markers, end-of-text tokens, a new turn's opening."""
        out = [self.assistant[1], self.user[1], *self.ends, self.user[0]]
        if self.system is not None:
            out += [self.system[0]]
        return [m.strip() for m in out if m and m.strip()]

    def clean(self, answer: str) -> str:
        cut = len(answer)
        for marker in self.end_markers():
            at = answer.find(marker)
            if at != -1:
                cut = min(cut, at)
        answer = answer[:cut]
        for special in sorted({s for s in (self.bos, *self.specials) if s}, key=len, reverse=True):
            answer = answer.replace(special, "")
        return answer.strip()

    # -- from a tokenizer's own template -----------------------------------------------------------

    @classmethod
    def from_tokenizer(cls, tokenizer, name: str = "tokenizer") -> "Markup | None":
        """The markers of the tokenizer's chat template, found by rendering conversations around sentinel
        texts and comparing what surrounds them; None when the template does not show them apart."""
        u1, a1, u2, s0 = "\x01U1\x01", "\x01A1\x01", "\x01U2\x01", "\x01S0\x01"

        def render(messages, generation=True) -> str | None:
            try:
                return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
            except Exception:  # noqa: BLE001 - a template may refuse a role (Gemma's system turn)
                return None

        user, answer, again = {"role": "user", "content": u1}, {"role": "assistant", "content": a1}, {"role": "user", "content": u2}
        one, one_closed = render([user]), render([user], generation=False)
        two, three = render([user, answer], generation=False), render([user, answer, again])
        if not all(t and u1 in t for t in (one, one_closed, two, three)) or a1 not in two or a1 not in three or u2 not in three:
            return None
        # the begin-of-text token, when the template writes it once in front (not when it is a turn marker)
        bos = tokenizer.bos_token if isinstance(getattr(tokenizer, "bos_token", None), str) else None
        between_au = three.split(a1)[1].split(u2)[0]
        if not bos or not one.startswith(bos) or bos in between_au:
            bos = None
        user_close = one_closed.split(u1)[1]  # what closes a user turn when nothing follows it
        assistant_close = two.split(a1)[1]
        between_ua = two.split(u1)[1].split(a1)[0]
        if not user_close.strip() or not assistant_close.strip() or not between_ua.startswith(user_close) \
                or not between_au.startswith(assistant_close):
            return None
        assistant_open = between_ua[len(user_close):]
        user_open = between_au[len(assistant_close):]
        head = one.split(u1)[0]
        if not user_open.strip() or not head.endswith(user_open):
            return None
        system = None
        with_system = render([{"role": "system", "content": s0}, {"role": "user", "content": u1}])
        if with_system and bos and with_system.startswith(bos):
            with_system = with_system[len(bos):]
        if with_system and s0 in with_system and u1 in with_system:
            before, after = with_system.split(s0)
            middle = after.split(u1)[0]
            if before.strip() and middle.endswith(user_open) and middle[: len(middle) - len(user_open)].strip():
                system = (before, middle[: len(middle) - len(user_open)])
        specials = []
        for token in list(getattr(tokenizer, "all_special_tokens", []) or []):
            if isinstance(token, str) and token.strip():
                specials.append(token)
        for added in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values():
            if getattr(added, "special", False) and added.content.strip():
                specials.append(added.content)
        eos = tokenizer.eos_token if isinstance(getattr(tokenizer, "eos_token", None), str) else None
        markers = {m.strip() for m in (user_open, user_close, assistant_open, assistant_close)}
        return cls(name, (user_open, user_close), (assistant_open, assistant_close), system, bos,
                   ends=tuple(e for e in (eos,) if e), specials=tuple(dict.fromkeys(s for s in specials if s not in markers)))


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


FAMILIES = (
    Markup("chatml-im_sep", ("<|im_start|>user<|im_sep|>", "<|im_end|>"), ("<|im_start|>assistant<|im_sep|>", "<|im_end|>"),
           ("<|im_start|>system<|im_sep|>", "<|im_end|>"), ends=("<|endoftext|>",)),
    Markup("chatml", ("<|im_start|>user\n", "<|im_end|>\n"), ("<|im_start|>assistant\n", "<|im_end|>\n"),
           ("<|im_start|>system\n", "<|im_end|>\n"), ends=("<|endoftext|>",)),
    Markup("llama3", ("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"),
           ("<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
           ("<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>"), bos="<|begin_of_text|>",
           ends=("<|eom_id|>", "<|end_of_text|>")),
    Markup("gemma", ("<start_of_turn>user\n", "<end_of_turn>\n"), ("<start_of_turn>model\n", "<end_of_turn>\n"),
           bos="<bos>", ends=("<eos>",)),
    Markup("phi3", ("<|user|>\n", "<|end|>\n"), ("<|assistant|>\n", "<|end|>\n"), ("<|system|>\n", "<|end|>\n"),
           bos="<s>", ends=("<|endoftext|>",)),
    Markup("mistral", ("[INST]", "[/INST]"), ("", "</s>"), ("[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"), bos="<s>"),
)


@dataclass
class Untemplated:
    """A templated text read back: its turns, the turn left open at its end, the format's name."""

    messages: list[Message]
    open_turn: str | None
    markup: Markup | None


def untemplate(text: str, own: Markup | None = None) -> Untemplated:
    """The conversation in `text`, read with the tokenizer's own markup when given, else with the first
    family that reads it whole; a text in no known format is one user turn (markup None)."""
    for markup in ((own,) if own is not None else ()) + FAMILIES:
        parsed = markup.parse(text)
        if parsed is not None and any(m["role"] == "user" for m in parsed[0]):
            return Untemplated(parsed[0], parsed[1], markup)
    return Untemplated([{"role": "user", "content": text.strip()}], None, None)


def _squeezed(text: str) -> tuple[str, list[int]]:
    """`text` without whitespace, and for each kept character its index in `text`."""
    kept = [(i, c) for i, c in enumerate(text) if not c.isspace()]
    return "".join(c for _, c in kept), [i for i, _ in kept]


MIN_OVERLAP = 16  # characters (whitespace aside) a cut prompt must share with the start of its query


def split_query(query: str, prompt: str) -> tuple[str | None, str]:
    """(the answer part of `query`, how it was found) or (None, why not)."""
    if query.startswith(prompt):
        return query[len(prompt):], "prefix"
    q, q_at = _squeezed(query)
    p, _ = _squeezed(prompt)
    if p and q.startswith(p):  # the same text but for whitespace
        return (query[q_at[len(p) - 1] + 1:] if len(p) <= len(q_at) else ""), "prefix ignoring whitespace"
    # a prompt cut on the left to fit the context: the query starts with the prompt's end
    for k in range(min(len(p), len(q)), MIN_OVERLAP - 1, -1):
        if p.endswith(q[:k]):
            return query[q_at[k - 1] + 1:], "end of a prompt cut on the left"
    shared = len(_common_prefix(p, q))
    return None, (f"the query does not start with its prompt: they share {shared} of the prompt's {len(p)} "
                  "characters (whitespace aside), and the query does not start with the prompt's end either")


# End-of-turn markers of every family, for an answer whose format is unknown. "</s>" is left out: it is
# also HTML's strike-through end tag, and only an [INST]-format prompt says it is a marker.
GENERIC_ENDS = tuple(dict.fromkeys(m for f in FAMILIES for m in f.end_markers() if m not in ("</s>", "[INST]")))


def clean_answer(answer: str, markup: Markup | None) -> str:
    """The answer without its end-of-turn marker and what follows, and without special tokens; with no
    known format, cut at the first end-of-turn marker of any family."""
    if markup is not None:
        return markup.clean(answer)
    cut = min([at for at in (answer.find(m) for m in GENERIC_ENDS) if at != -1], default=len(answer))
    return answer[:cut].strip()
