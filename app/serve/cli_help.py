"""`--help` that reads as written by hand: each default shown as its value, each option's environment variable.

pydantic-settings builds the parser from the settings models. Left alone, its help shows a default factory by the
function's name (`Settings.<lambda>`), `None` as `null`, types as Python spells them (`list[str]`), and no environment
variable for a subcommand's options. This source formats all of them, for every option at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import SecretStr
from pydantic.fields import FieldInfo
from pydantic_settings import CLI_SUPPRESS, BaseSettings, CliSettingsSource

T = TypeVar("T", bound=BaseSettings)

# What each option takes, as help writes it, for the types pydantic-settings names by their Python spelling.
METAVARS = {
    "int": "N",
    "float": "X",
    "str": "TEXT",
    "Path": "PATH",
    "list[str]": "A,B,...",
    "list[int]": "N,N,...",
    "list[Path]": "PATH ...",
    "list[SecretStr]": "KEY,KEY,...",
    "SecretStr": "KEY",
}


class HandWrittenHelp(CliSettingsSource[T]):
    """The CLI source of `settings_cls`, whose subcommands `commands` read their own `<env_prefix><NAME>` variables."""

    def __init__(self, settings_cls: type[T], *, commands: Sequence[type[BaseSettings]], **kwargs: Any) -> None:
        # pydantic keeps one FieldInfo a field, which the parser builder hands to `_help_format`.
        self._env_names = {
            id(info): f"{command.model_config.get('env_prefix', '')}{name}".upper()
            for command in commands
            for name, info in command.model_fields.items()
        }
        super().__init__(settings_cls, cli_hide_none_type=True, **kwargs)

    def _help_format(
        self,
        field_name: str,
        field_info: FieldInfo,
        model_default: Any,
        is_model_suppressed: bool,
        env_var_names: tuple[str, ...] = (),
    ) -> str:
        if is_model_suppressed or self._is_field_suppressed(field_info):
            return CLI_SUPPRESS
        description = field_info.description or ""
        parts = [description]
        if field_info.is_required():
            pass  # positional: its place in the usage line says it
        elif "(default" not in description:  # a description that explains its default says it better
            shown = _shown(field_info.get_default(call_default_factory=True, validated_data={}))
            if shown:
                parts.append(f"(default: {shown})")
        env_name = self._env_names.get(id(field_info))
        if env_name is not None:
            parts.append(f"[env: {env_name}]")
        return " ".join(part for part in parts if part).replace("%", "%%")  # argparse formats help with %

    def _metavar_format(self, obj: Any) -> str:
        text = super()._metavar_format(obj)
        return METAVARS.get(text, text)


def _shown(value: Any) -> str:
    """A default as a person writes it: `5`, `on`, `a,b`; empty for none (the option is then simply unset)."""
    if value is None or isinstance(value, SecretStr):
        return ""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return ",".join(_shown(item) for item in value)
    if isinstance(value, Path):
        return str(value)
    return str(value)
