"""`--help` that shows every option's default once (the CLI and `npu-dit generate`)."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" unless the help text already says its default or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or any(action.default is none for none in (None, False, argparse.SUPPRESS)):
            return text
        return super()._get_help_string(action)


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """`--help` shows every option's default, also for options without a help text (argparse's
    ArgumentDefaultsHelpFormatter only extends existing help texts)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                show_defaults(sub)
        elif (action.help is None and action.option_strings and action.default not in (None, argparse.SUPPRESS)
              and not isinstance(action.default, bool)):
            action.help = "default: %(default)s"
