"""The options the benchmarks share: --shapes / --ms (which (K, N) weights and
how many rows of x to time) and --settings (environments to time side by side)."""
import os


def add_shape_args(ap, example):
    """--shapes (e.g. `example`, K x N, comma-separated) and --ms (rows of x)."""
    ap.add_argument("--shapes", default=None, help=f"e.g. {example} (K x N)")
    ap.add_argument("--ms", default=None, help="e.g. 1,16 (rows of x)")


def parse_shapes(text):
    """'8192x28672,4096x4096' -> [(8192, 28672), (4096, 4096)] (K x N)."""
    return [tuple(int(v) for v in s.split("x")) for s in text.split(",")]


def chosen_shapes(args, shapes, ms):
    """(shapes, ms): those the options name, else the defaults given."""
    if args.shapes:
        shapes = parse_shapes(args.shapes)
    if args.ms:
        ms = [int(m) for m in args.ms.split(",")]
    return shapes, ms


def parse_settings(text):
    """'name:VAR=v,-VAR2;other:' -> [(name, {VAR: v, VAR2: None}), (other, {})]:
    VAR=v sets a variable, -VAR unsets it (with_env's None), so that a setting
    means the same whatever the shell it runs from has set."""
    settings = []
    for item in text.split(";"):
        name, _, assignments = item.partition(":")
        env = {}
        for a in filter(None, assignments.split(",")):
            if a.startswith("-") and "=" not in a:
                env[a[1:]] = None
            elif "=" in a:
                var, _, value = a.partition("=")
                env[var] = value
            else:
                raise SystemExit(f"--settings: {a!r} in {name!r} is neither VAR=value nor -VAR")
        settings.append((name, env))
    return settings


def with_env(env, fn):
    """fn() with the environment variables in env set (None: unset), then
    the environment as it was."""
    saved = {k: os.environ.get(k) for k in env}
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        return fn()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
