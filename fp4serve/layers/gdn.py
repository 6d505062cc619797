"""Gated DeltaNet (Qwen3.5/3.6 linear-attention layers): causal conv window, delta rule, gated norm.

Per value head h the layer keeps a dk x dv state S and, per token (docs/reference.md section 4):
    S' = exp(g) S;  u = beta (v - S'^T k);  S = S' + k u^T;  o = S^T q
`recurrent_gated_delta_rule` is that loop, token by token; `chunk_gated_delta_rule` computes the same
thing 64 tokens at a time with a triangular solve (the prefill form). Both follow transformers'
torch_recurrent_gated_delta_rule / torch_chunk_gated_delta_rule step for step, so fp32 results agree
with the oracle to rounding (tests/unit/test_gdn.py checks them against those functions).

Each sequence carries two tensors in its state slot between steps: the last (kernel - 1) conv
inputs and the fp32 recurrent state, so a sequence may be processed in any split (chunked prefill,
then one-token decodes) with the same result.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fp4serve.forward_batch import ForwardBatch, VerifiedStates
from fp4serve.kernels.triton_support import use_triton
from fp4serve.layers.cache_spec import StateSpec
from fp4serve.layers.linear import Linear


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum x^2 + eps) over the last dim, as transformers and flash-linear-attention do."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def _expand_heads(q: torch.Tensor, k: torch.Tensor, num_v_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped heads: value head h reads q/k head h // (Hv / Hk), i.e. each q/k head repeated in place."""
    rep = num_v_heads // q.shape[2]
    if rep == 1:
        return q, k
    return q.repeat_interleave(rep, dim=2), k.repeat_interleave(rep, dim=2)


def recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    states_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The delta rule one token at a time.

    q, k [B, T, Hk, dk] (L2-normalized by the caller), v [B, T, Hv, dv], g (log decay, <= 0) and
    beta [B, T, Hv], initial_state [B, Hv, dk, dv] or None for zeros. states_out [B, T, Hv, dk, dv]
    fp32, when given, receives the state after every token (speculative verification rolls back to one).
    Returns (out [B, T, Hv, dv], final_state [B, Hv, dk, dv]), both fp32."""
    B, T, _, dk = k.shape
    Hv, dv = v.shape[-2:]
    q, k = _expand_heads(q, k, Hv)
    # (batch, head) pairs flattened into one bmm dimension; time last but one: [B*Hv, T, d]
    q, k, v = (x.transpose(1, 2).reshape(B * Hv, T, x.shape[-1]).float() for x in (q, k, v))
    g, beta = (x.transpose(1, 2).reshape(B * Hv, T, 1, 1).float() for x in (g, beta))
    q = q * dk**-0.5
    state = q.new_zeros(B * Hv, dk, dv) if initial_state is None else initial_state.reshape(B * Hv, dk, dv).float()
    out = q.new_empty(B * Hv, T, dv)
    # bmm and in-place rank-1 updates: the state (MiBs per sequence in real models) is read and
    # written as few times as possible, which is what decode speed depends on
    for t in range(T):
        state = state * g[:, t].exp()  # out of place: never writes into the caller's initial_state
        k_t = k[:, t : t + 1]  # [BH, 1, dk]
        delta = (v[:, t : t + 1] - torch.bmm(k_t, state)) * beta[:, t]  # beta (v - S'^T k)
        state.baddbmm_(k_t.transpose(1, 2), delta)  # S += k delta^T
        out[:, t : t + 1] = torch.bmm(q[:, t : t + 1], state)  # S^T q
        if states_out is not None:
            states_out[:, t] = state.view(B, Hv, dk, dv)
    return out.view(B, Hv, T, dv).transpose(1, 2), state.view(B, Hv, dk, dv)


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The delta rule `chunk_size` tokens at a time; same arguments and results as
    `recurrent_gated_delta_rule` (to fp32 rounding).

    Within a chunk the sequential updates collapse into a unit lower-triangular system (the "UT
    transform"): solving it gives every token's correction u at once, and the state is then read
    and written once per chunk instead of once per token."""
    B, T, _, dk = k.shape
    Hv, dv = v.shape[-2:]
    chunk_size = min(chunk_size, T)  # a short input is one chunk of its own length, not padded to 64
    q, k = _expand_heads(q, k, Hv)
    q, k, v, g, beta = (x.transpose(1, 2).float() for x in (q, k, v, g, beta))
    q = q * dk**-0.5
    # Zero padding is inert: k = 0 writes nothing, g = 0 decays nothing; padded outputs are cut off.
    pad = (chunk_size - T % chunk_size) % chunk_size
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    g, beta = (F.pad(x, (0, pad)) for x in (g, beta))
    n = (T + pad) // chunk_size
    k_beta = k * beta.unsqueeze(-1)
    v_beta = v * beta.unsqueeze(-1)
    q, k, k_beta, v_beta = (x.reshape(B, Hv, n, chunk_size, x.shape[-1]) for x in (q, k, k_beta, v_beta))
    g = g.reshape(B, Hv, n, chunk_size).cumsum(dim=-1)  # log decay from the chunk start to each position

    # decay[i, j] = exp(g_i - g_j) for j <= i: the decay a write at j sees by the time of i.
    future = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).triu(1)
    decay = (g.unsqueeze(-1) - g.unsqueeze(-2)).masked_fill(future, float("-inf")).exp()
    system = (k_beta @ k.transpose(-1, -2)) * decay  # unit lower-triangular once the diagonal is implied
    intra = (q @ k.transpose(-1, -2)) * decay  # causal q.k within the chunk, decayed
    u = torch.linalg.solve_triangular(system, v_beta, upper=False, unitriangular=True)
    k_read = torch.linalg.solve_triangular(system, k_beta * g.exp().unsqueeze(-1), upper=False, unitriangular=True)

    state = q.new_zeros(B, Hv, dk, dv) if initial_state is None else initial_state.float()
    out = torch.zeros_like(u)
    q = q * g.exp().unsqueeze(-1)  # reads of the state carried in from before the chunk
    k = k * (g[..., -1:] - g).exp().unsqueeze(-1)  # writes, decayed to the chunk end
    chunk_decay = g[..., -1].exp()[..., None, None]
    for i in range(n):
        u_i = u[:, :, i] - k_read[:, :, i] @ state  # what the carried-in state does not already predict
        out[:, :, i] = q[:, :, i] @ state + intra[:, :, i] @ u_i
        state = state * chunk_decay[:, :, i] + k[:, :, i].transpose(-1, -2) @ u_i
    out = out.reshape(B, Hv, -1, dv)[:, :, :T]
    return out.transpose(1, 2), state


def causal_conv1d(x: torch.Tensor, window: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SiLU of a causal depthwise conv over x [B, T, C], continuing after `window` [B, K-1, C] (the
    inputs just before x; zeros for a fresh sequence). weight [C, K].
    Returns (output [B, T, C] in x.dtype, the new window [B, K-1, C]).

    K shifted multiply-adds, accumulated in fp32, rather than F.conv1d: the same sums without the
    [B, C, T] transposes, and CPU F.conv1d (torch 2.13) took ~40 ms per call even for decode-sized
    inputs, against ~3 ms for a 32-sequence decode step at 27B width (conv_dim 10240) this way."""
    K = weight.shape[1]
    T = x.shape[1]
    xs = torch.cat([window.to(x.dtype), x], dim=1)  # [B, K-1+T, C]
    xs32, w32 = xs.float(), weight.float()
    out = xs32[:, :T] * w32[:, 0]
    for j in range(1, K):
        out.addcmul_(xs32[:, j : j + T], w32[:, j])
    return F.silu(out).to(x.dtype), xs[:, xs.shape[1] - (K - 1) :]


class GatedRMSNorm(nn.Module):
    """RMSNorm with a plain weight, then times SiLU(gate): the GDN output norm, per value head."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        # transformers casts back before the weight and applies the gate in fp32
        return (self.weight * x32.to(dtype) * F.silu(gate.float())).to(dtype)


class GatedDeltaNet(nn.Module):
    """One Qwen3.5 linear-attention layer over a varlen batch, state kept in engine-allocated slots.

    Checkpoint names (transformers): in_proj_qkv, in_proj_z, in_proj_b, in_proj_a, conv1d.weight
    [C, 1, K], A_log, dt_bias, norm.weight, out_proj. Here in_proj_qkv+in_proj_z and in_proj_b+in_proj_a
    are fused Linears (the model's LoadPlan maps the names to shards)."""

    def __init__(
        self,
        hidden_size: int,
        num_k_heads: int,
        num_v_heads: int,
        head_k_dim: int,
        head_v_dim: int,
        conv_kernel: int,
        eps: float,
        dtype: torch.dtype,
        prefix: str = "",
    ):
        super().__init__()
        if num_v_heads % num_k_heads:
            raise ValueError(f"{prefix}: {num_v_heads} value heads do not group evenly over {num_k_heads} key heads")
        self.num_k_heads, self.num_v_heads = num_k_heads, num_v_heads
        self.head_k_dim, self.head_v_dim = head_k_dim, head_v_dim
        self.key_dim, self.value_dim = num_k_heads * head_k_dim, num_v_heads * head_v_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.conv_kernel = conv_kernel
        self.dtype = dtype
        qkvz = [self.conv_dim, self.value_dim]
        self.in_proj_qkvz = Linear(hidden_size, qkvz, dtype=dtype, prefix=f"{prefix}.in_proj_qkvz")
        self.in_proj_ba = Linear(hidden_size, [num_v_heads, num_v_heads], dtype=dtype, prefix=f"{prefix}.in_proj_ba")
        # nn.Conv1d only holds the weight under the checkpoint's name and shape; forward uses causal_conv1d
        C = self.conv_dim
        self.conv1d = nn.Conv1d(C, C, conv_kernel, groups=C, bias=False, dtype=dtype)
        self.conv1d.weight.requires_grad_(False)
        self.A_log = nn.Parameter(torch.zeros(num_v_heads, dtype=dtype), requires_grad=False)
        self.dt_bias = nn.Parameter(torch.ones(num_v_heads, dtype=dtype), requires_grad=False)
        self.norm = GatedRMSNorm(head_v_dim, eps, dtype)
        self.out_proj = Linear(self.value_dim, hidden_size, dtype=dtype, prefix=f"{prefix}.out_proj")
        self.conv_state: torch.Tensor | None = None  # bound by the engine: [slots, K-1, conv_dim]
        self.recurrent_state: torch.Tensor | None = None  # [slots, Hv, dk, dv] fp32

    def cache_spec(self) -> StateSpec:
        return StateSpec(
            (
                ("conv_state", (self.conv_kernel - 1, self.conv_dim), self.dtype),
                ("recurrent_state", (self.num_v_heads, self.head_k_dim, self.head_v_dim), torch.float32),
            )
        )

    def bind_cache(self, conv_state: torch.Tensor, recurrent_state: torch.Tensor) -> None:
        self.conv_state, self.recurrent_state = conv_state, recurrent_state

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden]. All one-token rows of the step go through one vectorized
        recurrent step (decode speed); longer chunks go one sequence at a time through the chunked
        rule (on the Triton path, all in one varlen call)."""
        T = x.shape[0]
        qkv, z = self.in_proj_qkvz(x).split(self.in_proj_qkvz.output_sizes, dim=-1)
        b, a = self.in_proj_ba(x).split(self.in_proj_ba.output_sizes, dim=-1)
        beta = b.sigmoid()
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)  # fp32, or fp16 A would overflow
        triton = use_triton(x)
        if batch.decode_only:
            # every row, in order, no gathers: with the Triton kernels nothing here reads the device
            # from the host or makes a tensor from a list, so the step can be captured in a CUDA graph
            core = self._mix(qkv[:, None], g[:, None], beta[:, None], batch, slice(None), triton)[:, 0]
        else:
            core = self._mixed_step(qkv, g, beta, batch, triton)
        core = self.norm(core, z.view(T, self.num_v_heads, self.head_v_dim))
        return self.out_proj(core.view(T, self.value_dim))

    def _mixed_step(self, qkv, g, beta, batch: ForwardBatch, triton: bool) -> torch.Tensor:
        """A step with prefill chunks or verification rows: [T, Hv, dv], each kind of row batched apart."""
        core = qkv.new_empty(qkv.shape[0], self.num_v_heads, self.head_v_dim)
        drafts = batch.num_drafts or [0] * batch.num_seqs
        decode = [i for i, n in enumerate(batch.query_lens) if n == 1]
        if decode:
            rows = torch.tensor([batch.query_start[i] for i in decode], device=qkv.device)
            core[rows] = self._mix(qkv[rows, None], g[rows, None], beta[rows, None], batch, decode, triton)[:, 0]
        # Verification rows (last token + drafts): token by token, keeping the state after each in
        # batch.captures (for restore_verified), batched over the sequences that verify as many tokens.
        by_length: dict[int, list[int]] = {}
        for i, n in enumerate(batch.query_lens):
            if n != 1 and drafts[i]:
                by_length.setdefault(n, []).append(i)
        for n, seqs in by_length.items():
            rows = torch.cat([torch.arange(batch.query_start[i], batch.query_start[i] + n) for i in seqs]).to(qkv.device)
            shape = (len(seqs), n, -1)
            out = self._mix(
                qkv[rows].view(shape), g[rows].view(shape), beta[rows].view(shape), batch, seqs, triton, keep_states=True
            )
            core[rows] = out.flatten(0, 1)
        prefill = [i for i, n in enumerate(batch.query_lens) if n != 1 and not drafts[i]]
        if prefill and triton:
            self._prefill_triton(qkv, g, beta, batch, prefill, core)
            return core
        for i in prefill:
            rows = batch.seq_rows(i)
            core[rows] = self._mix(qkv[None, rows], g[None, rows], beta[None, rows], batch, [i], triton, chunked=True)[0]
        return core

    def _mix(
        self, qkv, g, beta, batch: ForwardBatch, seqs, triton: bool, chunked: bool = False, keep_states: bool = False
    ) -> torch.Tensor:
        """Conv + delta rule for sequences `seqs` (indices, or slice(None) for all), inputs [B, T, ...]:
        reads their slots (zeros for fresh sequences, whose slot may hold a previous owner's state),
        writes the final window and state back (and, with keep_states, what restore_verified needs,
        into batch.captures.verified).
        Returns [B, T, Hv, dv] in the model dtype."""
        slots, fresh = batch.state_slots[seqs], _fresh(batch, seqs, triton)
        q, k, v, conv_inputs = self._conv(qkv, slots, fresh, keep_inputs=keep_states)
        B, T = q.shape[:2]
        states = q.new_empty(B, T, self.num_v_heads, self.head_k_dim, self.head_v_dim) if keep_states else None
        if triton:
            from fp4serve.kernels.triton_gdn import fused_recurrent_gated_delta_rule

            out = fused_recurrent_gated_delta_rule(q, k, v, g, beta, self.recurrent_state, slots, fresh, states_out=states)
        else:
            state = self._read(self.recurrent_state, slots, fresh)
            if chunked:
                out, state = chunk_gated_delta_rule(q, k, v, g, beta, state)
            else:
                out, state = recurrent_gated_delta_rule(q, k, v, g, beta, state, states_out=states)
            self.recurrent_state[slots] = state
        if keep_states:
            verified = batch.captures.verified.setdefault(self, {})
            for b, i in enumerate(seqs):
                verified[i] = VerifiedStates(int(slots[b]), conv_inputs[b], states[b])
        return out.to(qkv.dtype)

    def _prefill_triton(self, qkv, g, beta, batch: ForwardBatch, seqs: list[int], core: torch.Tensor) -> None:
        """The prefill chunks of `seqs`: the conv one sequence at a time, then the delta rule for all
        of them in one varlen call (fla's chunked kernels on CUDA)."""
        from fp4serve.kernels.triton_gdn import prefill_gated_delta_rule

        slots, fresh = batch.state_slots[seqs], _fresh(batch, seqs, triton=True)
        parts = [self._conv(qkv[None, batch.seq_rows(i)], slots[j : j + 1], fresh[j : j + 1]) for j, i in enumerate(seqs)]
        q, k, v = (torch.cat([p[n] for p in parts], dim=1) for n in range(3))
        rows = torch.cat([torch.arange(batch.query_start[i], batch.query_start[i + 1]) for i in seqs]).to(qkv.device)
        cu_seqlens = torch.tensor([0] + [batch.query_lens[i] for i in seqs], device=qkv.device).cumsum(0)
        out = prefill_gated_delta_rule(q, k, v, g[None, rows], beta[None, rows], self.recurrent_state, slots, fresh, cu_seqlens)
        core[rows] = out[0].to(core.dtype)

    def _conv(self, qkv, slots, fresh, keep_inputs: bool = False):
        """The causal conv over qkv [B, T, C] from the slots' windows (written back): (q, k, v,
        the window and inputs [B, K-1+T, C] when keep_inputs), q and k L2-normalised in fp32."""
        window = self._read(self.conv_state, slots, fresh)
        conv_inputs = torch.cat([window.to(qkv.dtype), qkv], dim=1) if keep_inputs else None
        mixed, window = causal_conv1d(qkv, window, self.conv1d.weight.squeeze(1))
        self.conv_state[slots] = window.to(self.conv_state.dtype)
        B, T = mixed.shape[:2]
        q, k, v = mixed.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q = l2norm(q.reshape(B, T, self.num_k_heads, self.head_k_dim).float())
        k = l2norm(k.reshape(B, T, self.num_k_heads, self.head_k_dim).float())
        return q, k, v.reshape(B, T, self.num_v_heads, self.head_v_dim), conv_inputs

    def restore_verified(self, verified: dict[int, VerifiedStates], kept: dict[int, int]) -> None:
        """Put back the state after the first kept[i] tokens of verified sequence i (the last
        token and the accepted drafts): exactly the state had the rejected drafts never been seen.
        `verified` is this layer's entry of the step's captures."""
        for i, n in kept.items():
            self.save_verified(verified[i], n, verified[i].slot)

    def save_verified(self, record: VerifiedStates, n: int, slot: int) -> None:
        """Write the state after the first n tokens of a verified sequence's step into `slot`."""
        K = self.conv_kernel
        self.conv_state[slot] = record.conv_inputs[n : n + K - 1].to(self.conv_state.dtype)
        self.recurrent_state[slot] = record.states[n - 1]

    def copy_slots(self, sources: list[int], targets: list[int]) -> None:
        """State slot sources[j] -> targets[j]: GDN snapshots in and out of sequence slots."""
        src = torch.tensor(sources, device=self.conv_state.device)
        dst = torch.tensor(targets, device=self.conv_state.device)
        self.conv_state[dst] = self.conv_state[src]
        self.recurrent_state[dst] = self.recurrent_state[src]

    @staticmethod
    def _read(cache: torch.Tensor, slots: torch.Tensor, fresh: torch.Tensor | None) -> torch.Tensor:
        """cache[slots], a copy (the cache changes only when the new state is written back), zeros
        where fresh: torch.where, not masked assignment, which would read the mask on the host."""
        values = cache[slots]
        return values if fresh is None else torch.where(fresh.view(-1, *[1] * (values.dim() - 1)), 0, values)


def _fresh(batch: ForwardBatch, seqs, triton: bool) -> torch.Tensor | None:
    """[B] bool for `seqs`: sequences with nothing cached before this step. From device tensors
    (context_lens == query_len), not batch.num_computed, which captured decode steps fill with
    placeholders. None on the torch path when the host lists none as fresh: the state is then read
    without a second copy."""
    if not triton:
        listed = range(batch.num_seqs)[seqs] if isinstance(seqs, slice) else seqs
        if all(batch.num_computed[i] for i in listed):
            return None
    return batch.memo("gdn_fresh", lambda: batch.context_lens == batch.query_start_loc.diff())[seqs]
