"""Chat templates: a conversation rendered to the prompt text a chat model was trained on.

The template is the model's own Jinja template, bundled from `chat_template.jinja` or the
`chat_template` field of `tokenizer_config.json` (a string, or a list of named templates of
which "default" serves). It renders as transformers' `apply_chat_template` renders it: a
sandboxed environment with `trim_blocks` and `lstrip_blocks`, loop controls, `raise_exception`,
`strftime_now`, a `tojson` that keeps non-ASCII text, and the tokenizer's special tokens
(`bos_token`, `eos_token`, ...) as variables. jinja2 is imported only when a chat is rendered.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from .errors import LlmcError

TEMPLATE_FILE = "chat_template.jinja"
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


class Template:
    def __init__(self, source: str, special_tokens: dict[str, str], where: str):
        try:
            import jinja2
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise LlmcError("chat needs the jinja2 library (pip install jinja2)") from None

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = tojson
        env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
        self.where, self.special_tokens = where, special_tokens
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise LlmcError(f"{where}: the chat template does not compile: {e}") from None

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        import jinja2

        _check_messages(messages)
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        **self.special_tokens)
        except jinja2.TemplateError as e:
            raise LlmcError(f"{self.where}: the chat template does not render: {e}") from None
        except Exception as e:  # a template's own expression failing (e.g. an index on a missing field)
            raise LlmcError(f"{self.where}: the chat template does not render: {type(e).__name__}: {e}") from None


def _check_messages(messages) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise LlmcError("messages: a non-empty list of {'role': ..., 'content': ...} is needed")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise LlmcError(f"messages[{i}]: must be a dict with a string 'role' and a string 'content', not {m!r}")


def load(folder: Path) -> Template | None:
    """The chat template among an artifact's bundled model files, or None."""
    config_path = folder / "tokenizer_config.json"
    config = {}
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LlmcError(f"{config_path}: not readable JSON ({e})") from None
    special = {name: _token_text(config.get(name)) for name in SPECIAL_TOKENS if config.get(name) is not None}
    if (folder / TEMPLATE_FILE).is_file():
        return Template((folder / TEMPLATE_FILE).read_text(), special, str(folder / TEMPLATE_FILE))
    source = config.get("chat_template")
    if isinstance(source, list):  # named templates: [{"name": ..., "template": ...}]
        source = next((t.get("template") for t in source if isinstance(t, dict) and t.get("name") == "default"), None)
    if source is None:
        return None
    if not isinstance(source, str):
        raise LlmcError(f"{config_path}: chat_template is {type(source).__name__}, not a template string")
    return Template(source, special, f"{config_path}: chat_template")


def _token_text(token) -> str:
    """A special token as tokenizer_config.json writes it: its text, or {"content": text, ...}."""
    return token.get("content", "") if isinstance(token, dict) else str(token)
