"""A scale model of the distributed SemCLIP loss: bytes, memory, steps and time per rank, 8 to 1024 GPUs.

    python -m benchmarks.distributed_model --world 8,64,512,1024 --local-batch 1024 --d 768 \\
        --paraphrases 1 --negations 1

For each world size and mode (docs/distributed.md) it prints, per rank and training step
(forward + backward of the loss, `local_loss=True, gather_with_grad=True`):

- bytes sent and received (equal in all three modes: every exchange is symmetric), and of those
  the bytes the busiest rank sends over the inter-node link (which sets the pace);
- peak feature memory: the other ranks' features and gradients that the distributed layer holds
  at once (beyond this rank's own inputs and their gradients, which every mode holds);
- communication rounds: exchanges that must happen one after the other (latency terms);
- compute and communication time from an α-β model of the links, their ratio, and the step time
  (gather: communication, then compute; ring and hierarchical: each ring step overlaps its
  transfer with its computation, so a step costs the larger of the two).

It models *this* implementation (semclip_kernels/distributed/): what it sends, in which dtype,
and what it holds. With `R = B·(2 + Pn + Mn)` rows per rank block (`K = B·(1 + Pn + Mn)` text
columns and `B` images), `b = R·d·s` its bytes (`s` bytes per feature element), `g = R·d·4` its
float32 gradient, `W` ranks, `n` GPUs per node, `G` ranks per hierarchical group, `N = W/G`:

    gather        NCCL ring all-gather of images and columns, reduce-scatter of their gradients
                  sent = 2·(W−1)·b, of it over InfiniBand per GPU 2·(W−1)·b/n (a node's NICs share
                  the node-crossing traffic); memory = 2·W·b; rounds = 4·(W−1)
    ring          blocks travel over W ranks (G = 1 below); the busiest rank sends it all over InfiniBand
    hierarchical  one ring per group position over N = W/G groups, all-gather in the group each step
                  ring: sent = 2·(N−1)·b + N·g; group: N·(G−1)·(2·b + g) (all-gather twice, reduce-scatter)
                  memory = 3·b + 3·g (G = 1), (2 + 3G)·b + (G + 3)·g (G > 1)
                  rounds = 2N − 1 ring exchanges + 3·N·(G−1) group ring steps

Compute: the forward evaluates `2·d·W·B·(K + Kq)` flops of logits per rank (`Kq = B·(1 + Pn)`
query columns); the backward-only entry recomputes them and runs two gradient products: 4× in
all, at `--gpu-tflops` (an assumption, stated in the output).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys

from .measure import format_bytes

MODES = ("gather", "ring", "hierarchical")
GRAD_BLOCK_BYTES = 4  # the ring's travelling gradient blocks are float32 (accumulated over many ranks)
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclasses.dataclass(frozen=True)
class Links:
    """One direction of one GPU's links: bandwidth in bytes/s, latency in seconds."""

    intra_bandwidth: float = 450e9  # H100 SXM NVLink 4: 900 GB/s bidirectional = 450 GB/s each way
    intra_latency: float = 3e-6
    inter_bandwidth: float = 50e9  # one 400 Gb/s InfiniBand NIC per GPU (DGX H100: 8 × ConnectX-7)
    inter_latency: float = 10e-6
    gpus_per_node: int = 8
    flops: float = 400e12  # achieved by the fused loss kernel: ~40 % of the H100's 989 TFLOP/s dense BF16


@dataclasses.dataclass(frozen=True)
class Config:
    world: int
    local_batch: int
    dim: int
    paraphrases: int = 1
    negations: int = 1
    feature_bytes: int = 2
    group_size: int = 8  # hierarchical: ranks per group (the GPUs of a node)

    @property
    def n_cols(self) -> int:
        return self.local_batch * (1 + self.paraphrases + self.negations)

    @property
    def n_query_cols(self) -> int:
        return self.local_batch * (1 + self.paraphrases)

    @property
    def block_rows(self) -> int:
        """R: the text columns and images of one rank: what travels or is gathered."""
        return self.n_cols + self.local_batch

    def block_bytes(self, element_bytes: int) -> int:
        return self.block_rows * self.dim * element_bytes


@dataclasses.dataclass(frozen=True)
class Estimate:
    mode: str
    sent_bytes: int  # per rank per step (= received: every exchange is symmetric)
    inter_bytes: int  # of those, sent over the inter-node link by the busiest rank
    peak_feature_bytes: int
    rounds: int
    compute_seconds: float
    comm_seconds: float
    step_seconds: float

    @property
    def received_bytes(self) -> int:
        return self.sent_bytes

    @property
    def compute_to_comm(self) -> float:
        return self.compute_seconds / self.comm_seconds if self.comm_seconds else math.inf


def loss_flops(config: Config) -> float:
    """Forward + backward flops of the loss per rank: 4 passes over `B × W·K` and `Kq × W·B` logits."""
    forward = 2 * config.dim * config.world * config.local_batch * (config.n_cols + config.n_query_cols)
    return 4.0 * forward


def _seconds(n_bytes: float, messages: int, bandwidth: float, latency: float) -> float:
    return messages * latency + n_bytes / bandwidth


def _gather(config: Config, links: Links, block: int, compute: float) -> Estimate:
    world, node = config.world, links.gpus_per_node
    sent = 2 * (world - 1) * block  # all-gather forward, reduce-scatter backward
    rounds = 4 * (world - 1)  # images and columns, each way, W − 1 ring steps per collective
    if world > node:
        inter = sent // node  # one ring per channel, each crossing nodes at a different GPU's NIC
        comm = rounds * links.inter_latency + max(sent / links.intra_bandwidth, inter / links.inter_bandwidth)
    else:
        inter, comm = 0, _seconds(sent, rounds, links.intra_bandwidth, links.intra_latency)
    return Estimate("gather", sent, inter, 2 * world * block, rounds, compute, comm, compute + comm)


def _ring(config: Config, links: Links, mode: str, size: int, block: int, grad: int, compute: float) -> Estimate:
    world = config.world
    if world % size:
        raise ValueError(f"group size {size} must divide world {world}")
    n_steps = world // size
    # The slowest hop of a ring that spans nodes is the inter-node link (every hop when G is a node).
    multi_node = world > links.gpus_per_node
    bandwidth = links.inter_bandwidth if multi_node else links.intra_bandwidth
    latency = links.inter_latency if multi_node else links.intra_latency
    ring_sent = (2 * (n_steps - 1) * block + n_steps * grad) if n_steps > 1 else 0
    forward_hop = _seconds(block, 1, bandwidth, latency)
    backward_hop = _seconds(block + grad, 2, bandwidth, latency)
    home_hop = _seconds(grad, 1, bandwidth, latency) if n_steps > 1 else 0.0

    # Per step inside the group: all-gather of the held blocks (forward and backward), reduce-scatter
    # of the group block's float32 gradient (backward); none in a plain ring.
    steps = size - 1
    gather_step = _seconds(steps * block, steps, links.intra_bandwidth, links.intra_latency)
    scatter_step = _seconds(steps * grad, steps, links.intra_bandwidth, links.intra_latency)
    group_sent = n_steps * steps * (2 * block + grad)

    step_forward = compute / 4 / n_steps  # one group block's logits; its backward is 3× that
    step_backward = 3 * step_forward
    local_forward = gather_step + step_forward
    local_backward = gather_step + step_backward + scatter_step
    step_time = (
        (n_steps - 1) * (max(forward_hop, local_forward) + max(backward_hop, local_backward))
        + local_forward
        + local_backward
        + home_hop
    )
    comm = (n_steps - 1) * (forward_hop + backward_hop) + home_hop + n_steps * (2 * gather_step + scatter_step)
    peak = 3 * block + 3 * grad if size == 1 else (2 + 3 * size) * block + (size + 3) * grad
    rounds = (2 * n_steps - 1 if n_steps > 1 else 0) + 3 * n_steps * steps
    inter = ring_sent if multi_node else 0
    return Estimate(mode, ring_sent + group_sent, inter, peak, rounds, compute, comm, step_time)


def estimate(config: Config, mode: str, links: Links) -> Estimate:
    """What one rank sends, holds and waits for in one step of `mode` (see the module docstring)."""
    block, grad = config.block_bytes(config.feature_bytes), config.block_bytes(GRAD_BLOCK_BYTES)
    compute = loss_flops(config) / links.flops
    if mode == "gather":
        return _gather(config, links, block, compute)
    if mode == "ring":
        return _ring(config, links, mode, 1, block, grad, compute)
    if mode == "hierarchical":
        return _ring(config, links, mode, config.group_size, block, grad, compute)
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _milliseconds(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def table(configs: list[Config], links: Links) -> str:
    """A Markdown table: one row per world size and mode."""
    header = (
        "| GPUs | mode | sent = received / rank | inter-node, busiest rank | peak feature memory | rounds | "
        "compute ms | comm ms | compute/comm | step ms |"
    )
    lines = [header, "|" + "|".join([" --- "] * 10) + "|"]
    for config in configs:
        for mode in MODES:
            if mode == "hierarchical" and config.world % config.group_size:
                continue
            est = estimate(config, mode, links)
            ratio = "∞" if math.isinf(est.compute_to_comm) else f"{est.compute_to_comm:.2f}"
            lines.append(
                f"| {config.world} | {mode} | {format_bytes(est.sent_bytes)} | {format_bytes(est.inter_bytes)} | "
                f"{format_bytes(est.peak_feature_bytes)} | {est.rounds} | {_milliseconds(est.compute_seconds)} | "
                f"{_milliseconds(est.comm_seconds)} | {ratio} | {_milliseconds(est.step_seconds)} |"
            )
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    defaults = Links()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", default="8,64,512,1024", help="comma-separated world sizes (GPUs)")
    parser.add_argument("--local-batch", type=int, default=1024, help="B: images per rank")
    parser.add_argument("--d", type=int, default=768, help="feature dimension")
    parser.add_argument("--paraphrases", type=int, default=1, help="Pn per image")
    parser.add_argument("--negations", type=int, default=1, help="Mn per image")
    parser.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bfloat16", help="feature dtype")
    parser.add_argument("--gpus-per-node", type=int, default=defaults.gpus_per_node)
    parser.add_argument("--group-size", type=int, default=None, help="hierarchical groups (default: --gpus-per-node)")
    intra_help = "GB/s per GPU and direction inside a node (default: H100 NVLink 4)"
    inter_help = "GB/s per GPU and direction between nodes (default: a 400 Gb/s InfiniBand NIC)"
    parser.add_argument("--intra-bandwidth", type=float, default=defaults.intra_bandwidth / 1e9, help=intra_help)
    parser.add_argument("--intra-latency-us", type=float, default=defaults.intra_latency * 1e6)
    parser.add_argument("--inter-bandwidth", type=float, default=defaults.inter_bandwidth / 1e9, help=inter_help)
    parser.add_argument("--inter-latency-us", type=float, default=defaults.inter_latency * 1e6)
    parser.add_argument(
        "--gpu-tflops",
        type=float,
        default=defaults.flops / 1e12,
        help="achieved TFLOP/s of the loss kernel (default 400: ~40%% of an H100's dense BF16 peak)",
    )
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    links = Links(
        args.intra_bandwidth * 1e9,
        args.intra_latency_us * 1e-6,
        args.inter_bandwidth * 1e9,
        args.inter_latency_us * 1e-6,
        args.gpus_per_node,
        args.gpu_tflops * 1e12,
    )
    group_size = args.group_size or args.gpus_per_node
    configs = [
        Config(int(w), args.local_batch, args.d, args.paraphrases, args.negations, DTYPE_BYTES[args.dtype], group_size)
        for w in args.world.split(",")
    ]
    print(
        f"SemCLIP loss per rank and step (forward + backward): local batch {args.local_batch}, d {args.d}, "
        f"{args.paraphrases} paraphrase(s), {args.negations} negation(s), {args.dtype} features; "
        f"{args.gpus_per_node} GPUs per node, hierarchical groups of {group_size}"
    )
    print(
        f"links: intra-node {args.intra_bandwidth:g} GB/s, {args.intra_latency_us:g} µs; inter-node "
        f"{args.inter_bandwidth:g} GB/s, {args.inter_latency_us:g} µs (per GPU and direction); "
        f"compute {args.gpu_tflops:g} TFLOP/s (assumed)"
    )
    print(table(configs, links))


if __name__ == "__main__":
    main(sys.argv[1:])
