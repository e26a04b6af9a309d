"""Training FLOPs per token counted by hand from a model's shapes, written out here without
pipeline/model/flops.py, so tests can check the figures the code reports against it.

    flops = hand_flops_per_token(d=128, f=512, vocab=512, seq=64, layers=(1, 2, 1), r=5, k=2)
"""

from __future__ import annotations


def hand_flops_per_token(*, d, f, vocab, seq, layers, r, k) -> int:
    """Per token, a multiply-add is 2 FLOPs, backward costs 2 x forward, and the r - k
    iterations without gradients run forward only."""
    n_prelude, n_core, n_coda = layers
    matmul_macs = 3 * d * d + d * d + d * 2 * f + f * d  # QKV, output, gate+up, down
    attention_macs = seq * d  # QK^T and PV over seq keys (2 seq d), half of it causal
    layer = 2 * (matmul_macs + attention_macs)
    adapter = 2 * (2 * d * d)  # concat(s, e) [2d] -> d
    head = 2 * d * vocab
    graded = min(k, r)
    plain = r - graded
    return 3 * ((n_prelude + n_coda) * layer + head) + (3 * graded + plain) * (
        n_core * layer + adapter
    )


def hand_flops_from_model_yaml(path, *, seq, r, k, vocab=None) -> int:
    import yaml

    m = yaml.safe_load(open(path))
    return hand_flops_per_token(
        d=m["hidden_size"],
        f=m["ffn_hidden_size"],
        vocab=vocab or m["vocab_size"],
        seq=seq,
        layers=(m["n_prelude"], m["n_core"], m["n_coda"]),
        r=r,
        k=k,
    )
