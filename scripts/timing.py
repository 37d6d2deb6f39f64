"""The timing loop the CPU benchmarks share (bench_cpu.py, bench_mlx.py)."""
import time


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
