"""Time of one engine step from the model and the hardware: a roofline with fixed overheads.

step = overhead + per-sequence overhead + max(compute, memory) + tensor-parallel all-reduces.
compute counts 2*params FLOPs per token plus attention (QK^T and AV over the context);
memory counts the weights once per step plus the KV cache the batch reads.
"""

from __future__ import annotations

from pools.sim.presets import Preset


class StepTimeModel:
    """Prices a batch given its token count, attention work and KV read volume."""

    __slots__ = (
        "_attn_flops_per_pair",
        "_comm_fixed",
        "_comm_per_token",
        "_flops_per_token",
        "_inv_bw",
        "_inv_flops",
        "_kv_bytes_per_token",
        "_per_seq",
        "_step",
        "_weight_bytes",
    )

    def __init__(self, preset: Preset) -> None:
        m, hw, eff = preset.model, preset.hardware, preset.efficiency
        tp = max(1, hw.tensor_parallel)
        self._flops_per_token = 2.0 * m.params_b * 1e9 / tp
        # QK^T and AV: 2 matmuls x 2 FLOPs per multiply-add, per layer, per (query, key) pair
        self._attn_flops_per_pair = 4.0 * m.layers * m.heads * m.head_dim / tp
        self._weight_bytes = m.weight_bytes / tp
        self._kv_bytes_per_token = m.kv_bytes_per_token / tp
        self._inv_flops = 1.0 / (hw.peak_flops * eff.mfu)
        self._inv_bw = 1.0 / (hw.mem_bw * eff.mbu)
        self._step = eff.step_overhead_s
        self._per_seq = eff.per_seq_overhead_s
        if tp > 1:
            # two all-reduces per layer (attention out, MLP out); ring moves 2(tp-1)/tp of the data
            self._comm_fixed = 2 * m.layers * hw.allreduce_latency_s
            bw = hw.link_bw if hw.link_bw > 0 else float("inf")
            self._comm_per_token = 2 * m.layers * m.hidden * m.dtype_bytes * 2 * (tp - 1) / tp / bw
        else:
            self._comm_fixed = 0.0
            self._comm_per_token = 0.0

    def step_time(self, num_tokens: int, num_seqs: int, attn_pairs: float, kv_read_tokens: int) -> float:
        """Seconds for a step computing `num_tokens` new tokens of `num_seqs` sequences.

        attn_pairs: sum over sequences of new_tokens * (context_before + new_tokens / 2);
        kv_read_tokens: sum over sequences of the tokens whose K/V the step reads.
        """
        if num_tokens <= 0:
            return 0.0
        compute = (
            self._flops_per_token * num_tokens + self._attn_flops_per_pair * attn_pairs
        ) * self._inv_flops
        memory = (self._weight_bytes + self._kv_bytes_per_token * kv_read_tokens) * self._inv_bw
        return (
            self._step
            + self._per_seq * num_seqs
            + (compute if compute > memory else memory)
            + self._comm_fixed
            + self._comm_per_token * num_tokens
        )
