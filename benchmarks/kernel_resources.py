"""Registers, spills and shared memory of the fused Triton kernels, compiled ahead of time for sm_80 and sm_90.

No GPU needed: `triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` builds
the cubin, and the `cuobjdump` shipped in Triton's wheel reads its resource usage.
Every launch configuration the backend can choose is compiled: the heuristic table's
entry for each d in {256, 512, 768, 1024} and each dtype, each kernel variant
(backward with both towers trainable / image tower frozen / text towers frozen,
filtering on / off; TF32 or full float32 dots for float32 inputs). Configurations
that compile to the same kernel are compiled once.

    python -m benchmarks.kernel_resources [--json PATH] [--dims 256 512] [--arch 80 90]
        [--dtypes bfloat16 float32] [--defaults-only]

Goal: no spills (STACK = LOCAL = 0) and shared memory within each architecture's
per-block limit. The exit status is 1 if a kernel misses it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

import torch
import triton
import triton.language as tl

from semclip_kernels.triton_kernels import tl_utils
from semclip_kernels.triton_kernels.backward import backward_kernel
from semclip_kernels.triton_kernels.heuristics import KernelConfig, backward_config, forward_config
from semclip_kernels.triton_kernels.lse_forward import lse_forward_kernel

DIMS = (256, 512, 768, 1024)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ARCHS = (80, 90)
# Largest dynamic shared memory one block may use (CUDA programming guide, compute capabilities table).
SHARED_LIMIT_BYTES = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
_POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
# Backward variants: (NEED_GRAD_ROWS, NEED_GRAD_COLS) = all trainable, text frozen, image frozen.
_GRAD_VARIANTS = {"all": (True, True), "rows-only": (True, False), "cols-only": (False, True)}


@dataclass
class Resources:
    kernel: str
    variant: str
    arch: int
    dtype: str
    dims: list[int]
    block_m: int
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int
    registers: int
    stack_bytes: int
    local_bytes: int
    shared_bytes: int  # dynamic shared memory Triton requests at launch
    shared_limit_bytes: int

    @property
    def ok(self) -> bool:
        return self.stack_bytes == 0 and self.local_bytes == 0 and self.shared_bytes <= self.shared_limit_bytes


def cuobjdump_path() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def cuda_target_status() -> tuple[bool, str]:
    """Whether this Triton install can compile for CUDA and read cubins (no GPU needed)."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as error:
        return False, f"Triton has no CUDA backend: {error}"
    if not os.access(cuobjdump_path(), os.X_OK):
        return False, f"no cuobjdump at {cuobjdump_path()}"
    return True, ""


def _signature(kernel, dtype: torch.dtype, constexprs: dict[str, object]) -> tuple[dict, dict]:
    """The signature the JIT specializes for contiguous inputs with d a multiple of 16."""
    signature, attrs = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ("rows_ptr", "cols_ptr"):
            signature[name] = _POINTER_TYPES[dtype]
        elif name.endswith("locks_ptr") or name == "skipped_tiles_ptr":
            signature[name] = "*i32"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32"
        elif name == "filter_eps":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
        # Torch allocations are 16-byte aligned; d and the row strides are multiples of 16 here.
        if name.endswith("_ptr") or name in ("dim", "stride_row_m", "stride_col_n"):
            attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, attrs


def _constexprs(dtype: torch.dtype, config: KernelConfig, dot_precision: str) -> dict[str, object]:
    return dict(
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=config.block_d, GROUP_M=config.group_m,
        ACC_DTYPE=tl.float32, UPCAST_DOT=False, DOT_PRECISION=dot_precision,
        stride_row_d=1, stride_col_d=1,  # contiguous features: the JIT specializes unit strides
    )


def compile_resources(kernel, constexprs: dict, dtype: torch.dtype, config: KernelConfig, arch: int) -> dict:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, attrs = _signature(kernel, dtype, constexprs)
    compiled = triton.compile(
        ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs),
        target=GPUTarget("cuda", arch, 32),
        options=dict(num_warps=config.num_warps, num_stages=config.num_stages)
        | ({} if config.maxnreg is None else {"maxnreg": config.maxnreg}),
    )
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        dump = subprocess.run(
            [cuobjdump_path(), "--dump-resource-usage", cubin.name], capture_output=True, text=True, check=True
        ).stdout
    line = next(line for line in dump.splitlines() if "REG:" in line)
    fields = dict(item.split(":") for item in line.split() if ":" in item)
    return dict(
        registers=int(fields["REG"]),
        stack_bytes=int(fields["STACK"]),
        local_bytes=int(fields["LOCAL"]),
        shared_bytes=int(compiled.metadata.shared) + int(fields["SHARED"]),
    )


def kernel_variants(dtype: torch.dtype, dim: int, defaults_only: bool = False):
    """(kernel name, variant, kernel, constexprs, config) for every launch the backend can make at (d, dtype)."""
    precisions = ["ieee", "tf32"] if dtype == torch.float32 and not defaults_only else ["ieee"]
    for precision in precisions:
        tag = "" if precision == "ieee" or dtype != torch.float32 else "+tf32"
        config = forward_config(dim, dtype)
        yield "lse_forward", "default" + tag, lse_forward_kernel, _constexprs(dtype, config, precision), config
        config = backward_config(dim, dtype)
        for variant, (need_rows, need_cols) in _GRAD_VARIANTS.items():
            for filtering in (True, False):
                if defaults_only and (variant != "all" or not filtering):
                    continue
                constexprs = _constexprs(dtype, config, precision)
                constexprs.update(
                    HAS_ROW_GRAD=True, HAS_COL_GRAD=True, NEED_GRAD_ROWS=need_rows, NEED_GRAD_COLS=need_cols,
                    NEED_GRAD_SCALE=True, FILTER=filtering,
                )
                name = f"{variant}{'' if filtering else '+nofilter'}{tag}"
                yield "backward", name, backward_kernel, constexprs, config


def sweep(
    dims=DIMS, dtypes=DTYPES, archs=ARCHS, defaults_only: bool = False, log=None
) -> list[Resources]:
    """Compile every (kernel, variant, dtype, config, arch); rows with the same kernel merge their d's."""
    results: dict[tuple, Resources] = {}
    for arch in archs:
        for dtype in dtypes:
            for dim in dims:
                for kernel_name, variant, kernel, constexprs, config in kernel_variants(dtype, dim, defaults_only):
                    key = (kernel_name, variant, arch, dtype, config)
                    if key in results:
                        results[key].dims.append(dim)
                        continue
                    usage = compile_resources(kernel, constexprs, dtype, config, arch)
                    results[key] = Resources(
                        kernel_name, variant, arch, str(dtype).removeprefix("torch."), [dim],
                        config.block_m, config.block_n, config.block_d, config.num_warps, config.num_stages,
                        shared_limit_bytes=SHARED_LIMIT_BYTES[arch], **usage,
                    )  # fmt: skip
                    if log:
                        log(results[key])
    return list(results.values())


def format_row(r: Resources) -> str:
    tile = f"{r.block_m}x{r.block_n}x{r.block_d}"
    dims = ",".join(map(str, r.dims))
    return (
        f"sm_{r.arch:<3} {r.kernel:<12} {r.variant:<23} {r.dtype:<9} {dims:<16} {tile:<11} "
        f"{r.num_warps:>2}/{r.num_stages:<2}  {r.registers:>4} {r.stack_bytes:>6} {r.local_bytes:>6} "
        f"{r.shared_bytes // 1024:>5}K/{r.shared_limit_bytes // 1024}K  {'ok' if r.ok else 'MISS'}"
    )


HEADER = (
    f"{'arch':<7}{'kernel':<13}{'variant':<24}{'dtype':<10}{'d':<17}{'tile MxNxD':<12}"
    f"{'w/st':<6}{'regs':>4} {'stack':>6} {'local':>6} {'shared/limit':>12}"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="PATH", help="also write the table as JSON")
    parser.add_argument("--dims", type=int, nargs="+", default=list(DIMS))
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=sorted(SHARED_LIMIT_BYTES))
    parser.add_argument("--dtypes", nargs="+", default=list(_DTYPE_NAMES), choices=list(_DTYPE_NAMES))
    parser.add_argument("--defaults-only", action="store_true", help="only the default variant of each kernel")
    args = parser.parse_args(argv)
    if tl_utils.INTERPRETED:
        # Kernels defined under TRITON_INTERPRET=1 are interpreter objects and cannot be compiled:
        # run this script again in a child process without it.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cmd = [sys.executable, "-m", "benchmarks.kernel_resources", *(sys.argv[1:] if argv is None else argv)]
        return subprocess.run(cmd, env=env).returncode
    ok, reason = cuda_target_status()
    if not ok:
        print(f"cannot compile for CUDA here: {reason}", file=sys.stderr)
        return 2
    print(f"triton {triton.__version__}; tile MxNxD, w/st = num_warps/num_stages; stack/local = spill bytes")
    rows = sweep(
        args.dims, [_DTYPE_NAMES[name] for name in args.dtypes], args.arch, args.defaults_only,
        log=lambda r: print(f"compiled {r.kernel} {r.variant} {r.dtype} sm_{r.arch}", file=sys.stderr, flush=True),
    )  # fmt: skip
    print(HEADER)
    for row in rows:
        print(format_row(row))
    misses = [r for r in rows if not r.ok]
    print(f"{len(rows)} kernels compiled; {len(misses)} with spills or over the shared-memory limit")
    if args.json:
        with open(args.json, "w") as out:
            json.dump([asdict(r) | {"ok": r.ok} for r in rows], out, indent=1)
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
