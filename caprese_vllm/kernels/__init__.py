"""Triton kernels for the Caprese FF on GPU, one per file, each with its PyTorch reference beside it.

Weights are laid out so that the low-rank path is more rows of the same matrices (the paper's merge):
    gate_up_ext [2I + R, H]  gate rows [0, I), up rows [I, 2I), A^T rows [2I, 2I + R)
    down_t_ext  [I + R, H]   W_down^T rows [0, I) (neuron-major), B rows [I, I + R)
Every neuron's gate, up and down weights are then contiguous rows, so gathering k neurons reads
3k rows. A token walks its *virtual columns* v in [0, count_t + rank_t):
    v <  count_t   FF neuron: neuron_idx[slot_t, v] for a decode token (count_t = k); v itself for a
                   dense (prompt / recomputed) token (count_t = I)
    v >= count_t   low-rank channel j = v - count_t (rank_t = R for decode tokens, 0 for dense ones)
so one launch serves a step that mixes decode and prompt tokens.
"""
