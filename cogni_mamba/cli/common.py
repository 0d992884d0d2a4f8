"""Argument helpers shared by several subcommands."""

from __future__ import annotations

import argparse

from ..config import DEFAULT_PRESET, PRESETS, Config, apply_overrides, load_config, preset


def add_command(sub, name: str, help: str, description: str | None = None,
                epilog: str | None = None) -> argparse.ArgumentParser:
    """A subcommand's parser; its epilog (usually examples) keeps the line breaks it was written with."""
    return sub.add_parser(name, help=help, description=description, epilog=epilog,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def add_source_arg(p: argparse.ArgumentParser, help: str) -> None:
    """--source SPEC, repeatable and required: what documents to read (see data/sources.py)."""
    p.add_argument("--source", action="append", required=True, metavar="SPEC", help=help)


def add_config_args(p: argparse.ArgumentParser) -> None:
    """--config / --preset / --set, resolved by `config_from_args`."""
    p.add_argument("--config", metavar="FILE", help="a config.json (default: ./config.json if present)")
    p.add_argument("--preset", choices=list(PRESETS), help=f"start from a preset (default: {DEFAULT_PRESET})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override one config field, e.g. --set train.lr=3e-4 (repeatable)")


def config_from_args(args: argparse.Namespace, *, default_file: str | None = "config.json") -> Config:
    """Preset, then config file, then --set overrides; later ones win."""
    import os

    base = preset(args.preset) if args.preset else None
    path = args.config or (default_file if default_file and not args.preset and os.path.isfile(default_file) else None)
    cfg = load_config(path, base) if path else (base or preset(DEFAULT_PRESET))
    return apply_overrides(cfg, args.overrides)
