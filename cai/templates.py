"""Prompt templates: jinja2 files in prompts/, overridable file by file from `cfg.templates`.

StrictUndefined: a template that names a variable the stage does not pass fails with a line that
names the template and the variable, instead of rendering an empty string into a prompt.

Two filters present text the judge reads: `inert` (chat markup in it made plain text) and `quoted` (an
answer under judgement, inert and quoted line by line), so that an answer cannot end its turn, speak
as the question or pass itself off as another option.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import jinja2

from cai.errors import CaiError

# cai/prompts links to the checkout's prompts/, so an installed wheel carries the same files.
SHIPPED_PROMPTS = Path(__file__).resolve().parent / "prompts"


# Chat markup of the common model families, which a tokenizer reads as control tokens when it meets them
# in text: ChatML and Qwen (<|im_end|>), Llama 3 (<|eot_id|>, <|start_header_id|>), Phi (<|end|>), GPT-OSS
# (<|message|>), DeepSeek (<｜User｜>), Llama 2 / Mistral ([INST], <<SYS>>, </s>), Gemma (<end_of_turn>) and
# reasoning tags (<think>).
CHAT_MARKUP = re.compile(
    r"<\|[^<>|\n]{1,40}\|>|<\uff5c[^<>\uff5c\n]{1,40}\uff5c>|</?(?:s|think|bos|eos|pad|unk|start_of_turn|end_of_turn)>"
    r"|\[/?INST\]|<</?SYS>>",
    re.I,
)
_INERT = str.maketrans({"<": "\u2039", ">": "\u203a", "[": "(", "]": ")"})


def inert(text: str) -> str:
    """`text` with every piece of chat markup made plain text: its brackets swapped for look-alikes
    ("<|im_end|>" -> "‹|im_end|›"), so that no tokenizer reads an end of turn or a new turn in it."""
    return CHAT_MARKUP.sub(lambda m: m.group(0).translate(_INERT), str(text))


def quoted(text: str) -> str:
    """An answer as the judge's templates show it: chat markup made inert and every line opened with
    "> ", so that nothing in it can close its block, start a line of the question or pose as another
    option — the labels the templates write stand outside the quote, where no answer can put text."""
    return "\n".join("> " + line if line else ">" for line in inert(text).split("\n"))


def _environment(loader: jinja2.BaseLoader) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=loader,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=False,
        autoescape=False,
    )
    env.filters.update(quoted=quoted, inert=inert)
    return env


class Templates:
    def __init__(self, override_dir: str | Path | None = None):
        self.dirs = []
        if override_dir is not None:
            override = Path(override_dir).expanduser()
            if not override.is_dir():
                raise CaiError(f"templates: folder {override} does not exist")
            self.dirs.append(override)
        self.dirs.append(SHIPPED_PROMPTS)
        self.env = _environment(jinja2.FileSystemLoader([str(d) for d in self.dirs]))

    def path_of(self, name: str) -> Path:
        for folder in self.dirs:
            if (folder / name).is_file():
                return folder / name
        raise CaiError(f"template {name} not found in {', '.join(str(d) for d in self.dirs)}")

    def render(self, name: str, **variables) -> str:
        try:
            template = self.env.get_template(name)
            return template.render(**variables).strip()
        except jinja2.TemplateNotFound:
            raise CaiError(f"template {name} not found in {', '.join(str(d) for d in self.dirs)}") from None
        except jinja2.TemplateSyntaxError as err:
            raise CaiError(f"{err.filename or name}: line {err.lineno}: template syntax error: {err.message}") from None
        except jinja2.UndefinedError as err:
            given = ", ".join(sorted(variables)) or "none"
            where = self.path_of(name) if self.dirs else name
            raise CaiError(f"{where}: {err.message} (variables given: {given})") from None

    def source(self, name: str) -> str:
        """The text of template `name` as this folder resolves it, to be kept beside an artifact."""
        return self.path_of(name).read_text()

    @staticmethod
    def from_sources(sources: dict[str, str]) -> "Templates":
        """Templates from texts kept beside an artifact (e.g. the answer template in rm/scoring.json)."""
        templates = Templates.__new__(Templates)
        templates.dirs = []
        templates.env = _environment(jinja2.DictLoader(sources))
        return templates

    def fingerprint(self, names: list[str]) -> str:
        """Hash of the templates a stage uses, so editing one reruns that stage."""
        digest = hashlib.sha256()
        for name in sorted(names):
            digest.update(name.encode())
            digest.update(self.path_of(name).read_bytes())
        return digest.hexdigest()[:16]
