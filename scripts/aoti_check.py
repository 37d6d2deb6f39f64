"""AOTInductor packages on this machine, each stage reported: a plain float16
model (nn.Linear, SiLU) and tests/test_cuda_export.py's model of MPQ layers,
each exported with dynamic batch and sequence, compiled into a package,
loaded and run, in a process of its own (each stage printed as it is
reached, so that a crash or a run cut short shows how far it came, and the
other still runs). Tells a failure of AOTInductor itself on this torch from
one that only packages holding mpq ops have.

    python scripts/aoti_check.py [--device cuda|cpu]
"""
import argparse
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))

ONE = r"""
import faulthandler, sys, torch
faulthandler.enable()
which, device, out_dir = sys.argv[1:4]
sys.path.insert(0, sys.argv[4])
if which == "plain":
    model = torch.nn.Sequential(torch.nn.Linear(512, 768), torch.nn.SiLU(),
                                torch.nn.Linear(768, 512)).to(device, torch.float16).eval()
else:
    import mpq_ops  # noqa: F401 - the op registrations
    from test_cuda_export import make_model
    model = make_model(device)
x = torch.randn(2, 5, 512, device=device, dtype=torch.float16)
batch, seq = torch.export.Dim("batch", max=1024), torch.export.Dim("seq", max=4096)
ep = torch.export.export(model, (x,), dynamic_shapes=({0: batch, 1: seq},), strict=False)
print(which, "exported", flush=True)
path = torch._inductor.aoti_compile_and_package(ep, package_path=f"{out_dir}/{which}.pt2")
print(which, "compiled", flush=True)
runner = torch._inductor.aoti_load_package(path)
print(which, "loaded", flush=True)
with torch.no_grad():
    for M in (1, 8, 33):
        x = torch.randn(2, M, 512, device=device, dtype=torch.float16)
        err = (runner(x).float() - model(x).float()).abs().max().item()
        print(which, f"ran M = {M}: largest difference from eager {err:.2e}", flush=True)
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    args = ap.parse_args()
    tests = os.path.join(HERE, "..", "tests")
    with tempfile.TemporaryDirectory() as out_dir:
        for which in ("plain", "mpq"):
            # (its stages print as they are reached, so a run cut short still shows them)
            proc = subprocess.run([sys.executable, "-c", ONE, which, args.device, out_dir, tests],
                                  stderr=subprocess.PIPE, text=True)
            print(which, "ok" if proc.returncode == 0 else f"exit status {proc.returncode}",
                  flush=True)
            if proc.returncode != 0:
                print("  " + "\n  ".join(proc.stderr.strip().splitlines()[-12:]), flush=True)


if __name__ == "__main__":
    main()
