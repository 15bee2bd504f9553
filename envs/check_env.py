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
        print(f"arch list of this build: {torch.cuda.get_arch_list()}")
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
