"""Stage 0: check the environment - Python, PyTorch, CUDA, the device - and run one op on it.

What you learn here: what `torch.cuda.is_available()` and the compute capability tell you (an
RTX 5090 is (12, 0), Blackwell; a build without sm_120 kernels fails right here, not an hour into
training), and that a result computed on the GPU should match the CPU's.

Run:    python envs/check_env.py [--device auto|cpu|cuda] [--require-cuda]
Writes: nothing; exits 0 when the check passes (no CUDA is fine unless --require-cuda).
"""
import argparse
import platform
import sys
import time

# the wheel that carries kernels for a capability's major version (pip's index of PyTorch builds)
FIX_FOR_MAJOR = {12: "pip install torch==2.9.1 --index-url https://download.pytorch.org/whl/cu128"
                     " (CUDA 12.8+ wheels carry sm_120; `conda env create -f envs/mtml.yaml`)",
                 10: "pip install torch==2.9.1 --index-url https://download.pytorch.org/whl/cu128"}
FIX_OTHER = ("pip install torch --index-url https://download.pytorch.org/whl/cu128 (or cu126: "
             "a wheel whose torch.cuda.get_arch_list() names sm_{sm})")


def arch_problem(capability, arch_list):
    """One line saying why this build cannot run on a device of `capability`, or None.
    A cubin for sm_XY runs on devices X.Y' with Y' >= Y (same major); a compute_XY (PTX) entry
    is compiled at start-up for any newer device (slow first start, but it runs)."""
    major, minor = capability
    sm = f"{major}{minor}"
    cubins = [a for a in arch_list if a.startswith("sm_")]
    if any(a[3:-1] == str(major) and int(a[-1]) <= minor for a in cubins if a[3:].isdigit()):
        return None
    ptx = [int(a[8:]) for a in arch_list if a.startswith("compute_") and a[8:].isdigit()]
    if any(v <= major * 10 + minor for v in ptx):
        return None
    fix = FIX_FOR_MAJOR.get(major, FIX_OTHER.format(sm=sm))
    return (f"this torch build has no kernels for sm_{sm} (capability {capability}; its arch "
            f"list is {', '.join(arch_list) or 'empty'}): every CUDA op would fail. Fix: {fix}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda")
    p.add_argument("--require-cuda", action="store_true", help="exit 1 when CUDA is unavailable")
    p.add_argument("--size", type=int, default=1024, help="matmul size for the device check")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    print(f"python  {platform.python_version()} ({sys.executable})")
    try:
        import torch
    except ImportError:
        print("torch   NOT INSTALLED: run `make venv` or `conda env create -f envs/mtml.yaml`")
        return 1
    print(f"torch   {torch.__version__} (built for CUDA {torch.version.cuda or 'none: CPU build'})")
    cuda = torch.cuda.is_available()
    print(f"torch.cuda.is_available() = {cuda}")
    if cuda:
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            print(f"cuda:{i}  {torch.cuda.get_device_name(i)}, capability {cap}, "
                  f"{torch.cuda.get_device_properties(i).total_memory / 2**30:.1f} GiB")
        arch_list = torch.cuda.get_arch_list()
        print(f"arch list of this build: {arch_list}")
        for i in range(torch.cuda.device_count()):
            problem = arch_problem(torch.cuda.get_device_capability(i), arch_list)
            if problem:
                print(f"error: cuda:{i}: {problem}")
                return 1
    else:
        print("no CUDA device: everything in this project runs on the CPU "
              f"({torch.get_num_threads()} threads); a GPU only makes it faster")
        if args.require_cuda:
            print("error: --require-cuda given but CUDA is not available")
            return 1
    device = torch.device("cuda" if args.device == "auto" and cuda else
                          "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda" and not cuda:
        print("error: --device cuda but CUDA is not available")
        return 1

    # One matmul on the chosen device, checked against float64 on the CPU.
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(args.size, args.size, generator=gen)
    b = torch.randn(args.size, args.size, generator=gen)
    reference = (a.double() @ b.double()).float()
    a_dev, b_dev = a.to(device), b.to(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # compare full fp32, not TF32
    (a_dev @ b_dev)  # warm-up (CUDA context, kernels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    c = a_dev @ b_dev
    if device.type == "cuda":
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) * 1e3
    err = (c.cpu() - reference).abs().max().item() / reference.abs().max().item()
    ok = err < 1e-4
    print(f"matmul {args.size}x{args.size} on {device}: {ms:.2f} ms, "
          f"{2 * args.size ** 3 / ms / 1e6:.1f} GFLOP/s, max rel. error vs CPU float64 {err:.1e} "
          f"-> {'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
