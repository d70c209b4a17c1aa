"""Registers, spills, shared memory and SASS instruction counts of the fused Triton kernels, for sm_80 and sm_90.

No GPU needed: `triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` builds
the cubin; the `cuobjdump` shipped in Triton's wheel reads its resource usage and its
SASS. Every launch the backend can make is compiled from the launchers' own `Launch`
builders (`forward_launch`, `ds_panel_launch`, `gemm_launch`, `rows_launch`, `cols_launch`:
no second copy of the constexprs): the forward, the dS panel kernel (filter on / off, feature
gradients wanted or grad_τ only), the two gradient GEMMs (sparse over kept tiles / dense),
the sigmoid loss's row-block and column-block kernels (filter on / off), for
d in {256, 512, 768, 1024} and each dtype, full-float32 and TF32 dots for float32.
Configurations that compile to the same kernel are compiled once.

SASS counts per kernel: atomics (ATOM, ATOMG, ATOMS) and reductions to memory (RED,
REDG, REDAS; not REDUX, a register-only warp reduction), tensor-core instructions
(HGMMA on sm_90, HMMA on sm_80; DMMA for float64 is not swept).

    python -m benchmarks.kernel_resources [--json PATH] [--dims 256 512] [--arch 80 90]
        [--dtypes bfloat16 float32] [--defaults-only] [--candidates]

`--candidates` compiles every tuning candidate tile (config.TILE_CANDIDATES), not only the default.

Goal: no spills (STACK = LOCAL = 0), shared memory within each architecture's per-block
limit, no atomic or reduction-to-memory instruction, and tensor-core instructions in every
kernel with 16-bit or TF32 operands (full float32 dots are FMA). The exit status is 1 if a
kernel misses it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

import torch
import triton

from semclip_kernels.triton_kernels import tl_utils
from semclip_kernels.triton_kernels.backward import ds_panel_kernel, ds_panel_launch
from semclip_kernels.triton_kernels.config import (
    Launch,
    TileConfig,
    gemm_config,
    gemm_launch,
    sigmoid_tile_config,
    tile_candidates,
    tile_config,
)
from semclip_kernels.triton_kernels.grad_gemm import grad_cols_kernel, grad_rows_kernel
from semclip_kernels.triton_kernels.lse_forward import forward_launch, lse_forward_kernel
from semclip_kernels.triton_kernels.sigmoid_forward import (
    cols_launch,
    rows_launch,
    sigmoid_cols_kernel,
    sigmoid_rows_kernel,
)

DIMS = (256, 512, 768, 1024)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ARCHS = (80, 90)
# Largest dynamic shared memory one block may use (CUDA programming guide, compute capabilities table).
SHARED_LIMIT_BYTES = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
_POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
# Pointers to features or to tensors in the features' dtype; pointers to int32 tensors.
_FEATURE_POINTERS = ("rows_ptr", "cols_ptr", "panel_ptr")  # gradients are written in float32 (float64)
_INT_POINTERS = ("keep_ptr", "kept_ptr", "kept_count_ptr", "skipped_ptr")
_INT64_POINTERS = ("owner_ptr",)
# SASS opcodes counted (the mnemonic before the first dot).
_ATOMIC_OPCODES = ("ATOM", "ATOMG", "ATOMS", "RED", "REDG", "REDAS")
_TENSOR_CORE_OPCODES = ("HGMMA", "HMMA")


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
    atomics: int  # ATOM*/RED* instructions in the SASS
    tensor_core: int  # HGMMA (sm_90) / HMMA (sm_80) instructions in the SASS

    @property
    def uses_tensor_cores(self) -> bool:
        """Whether the dots should be tensor-core instructions: 16-bit operands or TF32 (not full float32)."""
        return self.dtype != "float32" or self.variant.endswith("+tf32")

    @property
    def ok(self) -> bool:
        fits = self.stack_bytes == 0 and self.local_bytes == 0 and self.shared_bytes <= self.shared_limit_bytes
        return fits and self.atomics == 0 and (self.tensor_core > 0 or not self.uses_tensor_cores)


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
        elif name in _FEATURE_POINTERS:
            signature[name] = _POINTER_TYPES[dtype]
        elif name in _INT_POINTERS:
            signature[name] = "*i32"
        elif name in _INT64_POINTERS:
            signature[name] = "*i64"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32"
        elif name in ("filter_eps", "op_scale"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
        # Torch allocations are 16-byte aligned; d, the row strides and the panel width are multiples of 16 here.
        if name.endswith("_ptr") or name in ("dim", "stride_row_m", "stride_col_n", "stride_panel"):
            attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, attrs


def sass_counts(sass: str) -> dict[str, int]:
    """Atomic / reduction-to-memory and tensor-core instruction counts of a SASS listing."""
    opcodes = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9]*)", sass)
    return dict(
        atomics=sum(op in _ATOMIC_OPCODES for op in opcodes),
        tensor_core=sum(op in _TENSOR_CORE_OPCODES for op in opcodes),
    )


def compile_resources(kernel, launch: Launch, dtype: torch.dtype, arch: int) -> dict:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # Contiguous features: the JIT specializes unit strides along d.
    constexprs = dict(launch.constexprs)
    constexprs.update({name: 1 for name in ("stride_row_d", "stride_col_d") if name in kernel.arg_names})
    signature, attrs = _signature(kernel, dtype, constexprs)
    compiled = triton.compile(
        ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs),
        target=GPUTarget("cuda", arch, 32),
        options=dict(num_warps=launch.num_warps, num_stages=launch.num_stages),
    )
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        dump = subprocess.run(
            [cuobjdump_path(), "--dump-resource-usage", cubin.name], capture_output=True, text=True, check=True
        ).stdout
        sass = subprocess.run(
            [cuobjdump_path(), "--dump-sass", cubin.name], capture_output=True, text=True, check=True
        ).stdout
    line = next(line for line in dump.splitlines() if "REG:" in line)
    fields = dict(item.split(":") for item in line.split() if ":" in item)
    return dict(
        registers=int(fields["REG"]),
        stack_bytes=int(fields["STACK"]),
        local_bytes=int(fields["LOCAL"]),
        shared_bytes=int(compiled.metadata.shared) + int(fields["SHARED"]),
        **sass_counts(sass),
    )


# dS panel variants: (name, filtering, need_panel). Default: filtering, feature gradients wanted.
_DS_VARIANTS = (("default", True, True), ("nofilter", False, True), ("scale-only", True, False))


def kernel_variants(dtype: torch.dtype, dim: int, defaults_only: bool = False, tile: TileConfig | None = None):
    """(kernel name, variant, kernel, launch, (block_m, block_n, block_d)) for every launch at (d, dtype).

    The default path (what a training step runs) is the variants named "default"; `tile`: the
    default tile unless given (a tuning candidate).
    """
    precisions = ["ieee", "tf32"] if dtype == torch.float32 and not defaults_only else ["ieee"]
    tile, gemm = tile or tile_config(dim, dtype), gemm_config(dim, dtype)
    tile_shape = (tile.block_m, tile.block_n, tile.block_d)
    sigmoid_tile = sigmoid_tile_config(dim, dtype)
    sigmoid_shape = (sigmoid_tile.block_m, sigmoid_tile.block_n, sigmoid_tile.block_d)
    for precision in precisions:
        tag = "+tf32" if precision == "tf32" else ""
        # The loss leaves two bands of positives (captions, paraphrases) out of the partitions, in every dtype.
        forward = forward_launch(tile, dtype, precision, n_excluded=2)
        yield "lse_forward", "default" + tag, lse_forward_kernel, forward, tile_shape
        for name, filtering, need_panel in _DS_VARIANTS:
            if defaults_only and name != "default":
                continue
            # 16-bit panels also store each row's rounding residual.
            launch = ds_panel_launch(tile, dtype, precision, has_row_grad=True, has_col_grad=True,
                                     need_panel=need_panel, need_grad_scale=True, filtering=filtering,
                                     n_excluded=2, row_residual=need_panel and dtype.itemsize == 2)  # fmt: skip
            yield "ds_panel", name + tag, ds_panel_kernel, launch, tile_shape
        for sparse in (True, False):
            if defaults_only and not sparse:
                continue
            name = ("default" if sparse else "dense") + tag
            launch = gemm_launch(tile, gemm, dtype, precision, SPARSE=sparse)
            for kernel_name, kernel in (("grad_rows", grad_rows_kernel), ("grad_cols", grad_cols_kernel)):
                yield kernel_name, name, kernel, launch, (tile.block_m, tile.block_n, gemm.block_out_d)
        # The sigmoid loss (docs/siglip.md): loss + grad_A + dτ/db partials per row block; grad_C per column block.
        for filtering in (True, False):
            if defaults_only and not filtering:
                continue
            name = ("default" if filtering else "nofilter") + tag
            launch = rows_launch(sigmoid_tile, dtype, precision, need_rows=True, need_scale=True, filter_=filtering)
            yield "sigmoid_rows", name, sigmoid_rows_kernel, launch, sigmoid_shape
            launch = cols_launch(sigmoid_tile, dtype, precision, filtering)
            yield "sigmoid_cols", name, sigmoid_cols_kernel, launch, sigmoid_shape


def sweep(
    dims=DIMS, dtypes=DTYPES, archs=ARCHS, defaults_only: bool = False, log=None, candidates: bool = False
) -> list[Resources]:
    """Compile every (kernel, variant, dtype, launch, arch); rows with the same kernel merge their d's.

    `candidates`: every tuning candidate tile, not only the default one.
    """
    results: dict[tuple, Resources] = {}
    for arch in archs:
        for dtype in dtypes:
            for dim in dims:
                tiles = tile_candidates(dim, dtype) if candidates else (tile_config(dim, dtype),)
                launches = (v for tile in tiles for v in kernel_variants(dtype, dim, defaults_only, tile))
                for kernel_name, variant, kernel, launch, shape in launches:
                    key = (kernel_name, variant, arch, dtype, repr(launch))
                    if key in results:
                        results[key].dims.append(dim)
                        continue
                    usage = compile_resources(kernel, launch, dtype, arch)
                    results[key] = Resources(
                        kernel_name, variant, arch, str(dtype).removeprefix("torch."), [dim], *shape,
                        launch.num_warps, launch.num_stages, shared_limit_bytes=SHARED_LIMIT_BYTES[arch],
                        **usage,
                    )  # fmt: skip
                    if log:
                        log(results[key])
    return list(results.values())


def format_row(r: Resources) -> str:
    tile = f"{r.block_m}x{r.block_n}x{r.block_d}"
    dims = ",".join(map(str, r.dims))
    return (
        f"sm_{r.arch:<3} {r.kernel:<12} {r.variant:<19} {r.dtype:<9} {dims:<16} {tile:<11} "
        f"{r.num_warps:>2}/{r.num_stages:<2}  {r.registers:>4} {r.stack_bytes:>6} {r.local_bytes:>6} "
        f"{r.shared_bytes // 1024:>5}K/{r.shared_limit_bytes // 1024}K {r.atomics:>7} {r.tensor_core:>5}  "
        f"{'ok' if r.ok else 'MISS'}"
    )


HEADER = (
    f"{'arch':<7}{'kernel':<13}{'variant':<20}{'dtype':<10}{'d':<17}{'tile':<12}"
    f"{'w/st':<6}{'regs':>4} {'stack':>6} {'local':>6} {'shared/limit':>12} {'atomics':>7} {'TC':>5}"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="PATH", help="also write the table as JSON")
    parser.add_argument("--dims", type=int, nargs="+", default=list(DIMS))
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=sorted(SHARED_LIMIT_BYTES))
    parser.add_argument("--dtypes", nargs="+", default=list(_DTYPE_NAMES), choices=list(_DTYPE_NAMES))
    parser.add_argument("--defaults-only", action="store_true", help="only the default variant of each kernel")
    parser.add_argument("--candidates", action="store_true", help="every tuning candidate tile, not only the default")
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
    print(
        f"triton {triton.__version__}; tile MxNxD (GEMMs: MxNxOUT_D), w/st = num_warps/num_stages; stack/local = "
        "spill bytes; atomics = ATOM*/RED* in the SASS; TC = HGMMA (sm_90) / HMMA (sm_80) instructions"
    )
    rows = sweep(
        args.dims, [_DTYPE_NAMES[name] for name in args.dtypes], args.arch, args.defaults_only,
        candidates=args.candidates,
        log=lambda r: print(format_row(r), file=sys.stderr, flush=True),  # progress of a long sweep
    )  # fmt: skip
    print(HEADER)
    for row in rows:
        print(format_row(row))
    misses = [r for r in rows if not r.ok]
    print(f"{len(rows)} kernels compiled; {len(misses)} with spills, atomics, no tensor cores or shared memory over")
    if args.json:
        with open(args.json, "w") as out:
            json.dump([asdict(r) | {"ok": r.ok} for r in rows], out, indent=1)
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
