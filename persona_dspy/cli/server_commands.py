"""The embedded model's commands: ``serve`` (the llama.cpp server in the foreground) and ``models`` (the GGUF
cache)."""

from __future__ import annotations

import argparse

from persona_dspy.cli.arguments import server_options
from persona_dspy.cli.errors import CLIError


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the embedded llama.cpp server in the foreground, for other processes or a notebook to share."""
    import signal
    import threading

    from persona_dspy.lm.local_server import LocalServer, ServerSettings
    from persona_dspy.lm.models import resolve_model

    settings = ServerSettings(resolve_model(args.model), **{"port": 8080, **server_options(args)})
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with LocalServer(settings) as server:
        props = server.props()
        print(f"serving {settings.model_path.name} at {server.api_base} ({props.get('total_slots')} slots, "
              f"{props.get('default_generation_settings', {}).get('n_ctx')} context tokens per slot)")
        print(f"use it with: --lm openai/local --api-base {server.api_base}   (Ctrl-C stops it)", flush=True)
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
    print("stopped")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """List, fetch or remove cached model files."""
    from persona_dspy.lm.models import KNOWN_MODELS, cached_models, fetch_model, models_dir, remove_model

    if args.action == "fetch":
        names = args.names or [next(iter(KNOWN_MODELS))]
        unknown = [name for name in names if name not in KNOWN_MODELS]
        if unknown:
            raise CLIError(f"unknown model {unknown[0]!r}; known: {', '.join(KNOWN_MODELS)}")
        for name in names:
            print(f"{name}: {fetch_model(KNOWN_MODELS[name])}")
    elif args.action == "remove":
        if not args.names:
            raise CLIError("name the model(s) to remove (see `persona-dspy models list`)")
        for name in args.names:
            print(f"removed {remove_model(name)}")
    else:
        cached = {model.name: model for model in cached_models(verify=args.verify)}
        print(f"model cache: {models_dir()}")
        for name, known in KNOWN_MODELS.items():
            entry = cached.pop(name, None)
            state = "not fetched" if entry is None else f"cached, {entry.size / 1e6:.0f} MB" + (
                "" if entry.verified is None else (", SHA-256 ok" if entry.verified else ", SHA-256 MISMATCH"))
            print(f"  {name}: {state} ({known.license}; {known.description})")
        for entry in cached.values():
            print(f"  {entry.path.name}: cached, {entry.size / 1e6:.0f} MB (not a known model)")
    return 0
