"""Prompt templates: jinja2 files in prompts/, overridable file by file from `cfg.templates`.

StrictUndefined: a template that names a variable the stage does not pass fails with a line that
names the template and the variable, instead of rendering an empty string into a prompt.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import jinja2

from cai.errors import CaiError

# cai/prompts links to the checkout's prompts/, so an installed wheel carries the same files.
SHIPPED_PROMPTS = Path(__file__).resolve().parent / "prompts"


def _environment(loader: jinja2.BaseLoader) -> jinja2.Environment:
    return jinja2.Environment(
        loader=loader,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=False,
        autoescape=False,
    )


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
