"""The options the benchmarks share: --shapes / --ms (which (K, N) weights and
how many rows of x to time) and --settings (environments to time side by side)."""
import os


def add_shape_args(ap, example):
    """--shapes (e.g. `example`, K x N, comma-separated) and --ms (rows of x)."""
    ap.add_argument("--shapes", default=None, help=f"e.g. {example} (K x N)")
    ap.add_argument("--ms", default=None, help="e.g. 1,16 (rows of x)")


def chosen_shapes(args, shapes, ms):
    """(shapes, ms): those the options name, else the defaults given."""
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if args.ms:
        ms = [int(m) for m in args.ms.split(",")]
    return shapes, ms


def parse_settings(text):
    """'name:VAR=v,VAR2=w;other:' -> [(name, {VAR: v, VAR2: w}), (other, {})]."""
    settings = []
    for item in text.split(";"):
        name, _, assignments = item.partition(":")
        env = dict(a.split("=", 1) for a in assignments.split(",") if a)
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
