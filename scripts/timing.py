"""The timing loops the benchmarks share: rounds of CPU calls (bench_cpu.py,
bench_mlx.py) and CUDA graph replays (bench_chain.py, bench_overhead.py)."""
import time

import torch


def timed_rounds(fns, budget_s, max_rounds, before=None):
    """Each function's time (s) in every round, the functions run in turn (so
    that drift of a busy machine hits them alike), `before` (e.g. a cache
    flush) run untimed ahead of each call: as many rounds as fit in the
    budget, 5 to max_rounds. Each round reverses the order of the last: a
    call's time depends on what ran just before it (a worker thread may still
    be awake, or busy freeing the previous call's memory), so no function
    always follows the same one."""
    before = before or (lambda: None)
    for fn in fns:
        fn()
    t = time.perf_counter()
    for fn in fns:
        before()
        fn()
    once = time.perf_counter() - t
    rounds = int(min(max_rounds, max(5, budget_s / max(once, 1e-6))))
    times = [[] for _ in fns]
    order = list(zip(fns, times))
    for r in range(rounds):
        for fn, ts in (order if r % 2 == 0 else order[::-1]):
            before()
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return times


def graph_of(fn):
    """fn captured in a CUDA graph (after three warm-up calls on a side stream)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def replay_us(g, replays):
    """Mean time (us) of one replay of graph g over `replays` back to back."""
    g.replay()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(replays):
        g.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / replays * 1e6
