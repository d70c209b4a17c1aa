"""The scale model's arithmetic (benchmarks/distributed_model.py) against numbers worked out by hand.

Tiny configuration: W = 4 ranks on 2 nodes of 2 GPUs, B = 2, d = 4, Pn = Mn = 1, bfloat16 (s = 2),
hierarchical groups of G = 2. Then K = B·(1 + Pn + Mn) = 6 columns, R = K + B = 8 rows per block,
b = R·d·s = 64 bytes per feature block and g = R·d·4 = 128 bytes per float32 gradient block.
"""

from __future__ import annotations

import math

import pytest

from benchmarks.distributed_model import Config, Links, estimate, loss_flops, main

TINY = Config(world=4, local_batch=2, dim=4, paraphrases=1, negations=1, feature_bytes=2, group_size=2)
# Round numbers: 1 s per 384 bytes inside a node, per 96 bytes between nodes, 1 s per message, 256 flop/s.
LINKS = Links(
    intra_bandwidth=384.0, intra_latency=1.0, inter_bandwidth=96.0, inter_latency=1.0, gpus_per_node=2, flops=256.0
)


def test_block_sizes():
    assert (TINY.n_cols, TINY.n_query_cols, TINY.block_rows) == (6, 4, 8)
    assert (TINY.block_bytes(2), TINY.block_bytes(4)) == (64, 128)
    # 4 passes (forward, the backward's recompute and two gradient products) of 2·d flops per logit
    # over B × W·K image rows and Kq × W·B query rows: 4 · 2·4 · (2·24 + 4·8) = 2560.
    assert loss_flops(TINY) == 2560


def test_gather_by_hand():
    est = estimate(TINY, "gather", LINKS)
    assert est.sent_bytes == est.received_bytes == 2 * 3 * 64  # all-gather + reduce-scatter, W − 1 blocks each
    assert est.inter_bytes == 384 // 2  # the node's 2 NICs share the node-crossing traffic
    assert est.peak_feature_bytes == 2 * 4 * 64  # W gathered blocks and their gradients
    assert est.rounds == 4 * 3
    assert est.compute_seconds == pytest.approx(2560 / 256)
    # 12 messages of 1 s; bandwidth: max(384 B / 384 B/s inside, 192 B / 96 B/s across) = 2 s.
    assert est.comm_seconds == pytest.approx(14.0)
    assert est.step_seconds == pytest.approx(24.0)  # no overlap: communication, then compute
    assert est.compute_to_comm == pytest.approx(10 / 14)


def test_ring_by_hand():
    est = estimate(TINY, "ring", LINKS)
    # Forward: 3 feature blocks; backward: 3 feature blocks and 4 float32 gradient blocks (the last comes home).
    assert est.sent_bytes == 3 * 64 + 3 * 64 + 4 * 128 == 896
    assert est.inter_bytes == 896  # the rank whose neighbour is on the other node sends all of it across
    assert est.peak_feature_bytes == 3 * 64 + 3 * 128
    assert est.rounds == 3 + 4
    # Each of the 4 blocks: forward 10/4/4 = 0.625 s of compute, backward 1.875 s. Hops across nodes:
    # forward 1 + 64/96 s, backward 2 + 192/96 = 4 s, the gradient's return home 1 + 128/96 s.
    forward_hop, backward_hop, home = 1 + 64 / 96, 4.0, 1 + 128 / 96
    assert est.comm_seconds == pytest.approx(3 * (forward_hop + backward_hop) + home)
    assert est.step_seconds == pytest.approx(3 * (max(forward_hop, 0.625) + max(backward_hop, 1.875)) + 2.5 + home)


def test_hierarchical_by_hand():
    est = estimate(TINY, "hierarchical", LINKS)
    # N = 2 groups. Ring: 1 feature block each way + 2 gradient blocks = 384 bytes across nodes.
    # Group, at each of the 2 steps: (G − 1) = 1 block all-gathered twice and 1 gradient reduce-scattered.
    assert est.inter_bytes == 64 + 64 + 2 * 128 == 384
    assert est.sent_bytes == 384 + 2 * (2 * 64 + 128) == 896
    # Two travelling blocks, the group block 3× (gathered, split, its returned gradient), its float32
    # gradient and three travelling gradient blocks.
    assert est.peak_feature_bytes == (2 + 3 * 2) * 64 + (2 + 3) * 128 == 1152
    assert est.rounds == (2 * 2 - 1) + 3 * 2 * 1
    gather_step, scatter_step = 1 + 64 / 384, 1 + 128 / 384
    forward_hop, backward_hop, home = 1 + 64 / 96, 2 + 192 / 96, 1 + 128 / 96
    step_forward, step_backward = 10 / 4 / 2, 3 * 10 / 4 / 2
    assert est.comm_seconds == pytest.approx(forward_hop + backward_hop + home + 2 * (2 * gather_step + scatter_step))
    local_forward, local_backward = gather_step + step_forward, gather_step + step_backward + scatter_step
    assert est.step_seconds == pytest.approx(
        max(forward_hop, local_forward) + max(backward_hop, local_backward) + local_forward + local_backward + home
    )


def test_one_node_and_one_group():
    """Inside one node nothing crosses InfiniBand; a single group has no ring steps at all."""
    node = Config(world=2, local_batch=2, dim=4, group_size=2)
    for mode in ("gather", "ring", "hierarchical"):
        assert estimate(node, mode, LINKS).inter_bytes == 0, mode
    single = estimate(node, "hierarchical", LINKS)
    assert single.sent_bytes == 2 * 64 + 128  # only the group's all-gathers and reduce-scatter
    assert single.rounds == 3
    assert math.isfinite(single.compute_to_comm)


def test_command_line_prints_every_mode(capsys):
    main(["--world", "8,64", "--local-batch", "1024", "--d", "768", "--paraphrases", "1", "--negations", "1"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 8 |") or line.startswith("| 64 |")]
    assert [row.split("|")[2].strip() for row in rows] == ["gather", "ring", "hierarchical"] * 2
    assert "400 TFLOP/s (assumed)" in out and "50 GB/s" in out and "450 GB/s" in out
