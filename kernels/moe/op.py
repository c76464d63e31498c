"""The fused-MoE op: routed experts as two grouped Triton GEMMs over expert-sorted token slots.

A "slot" is one (token, k) pair, slot = token * K + k. `align_by_expert` sorts the slots by expert and pads
each expert's run to a multiple of BLOCK_M, so every BLOCK_M rows of the sorted list belong to one expert:

  1. gate_up GEMM: rows hidden[slot // K] x gate_up[e] -> act(gate) * up, written to mid[slot]   ([M*K, I])
  2. down GEMM:    rows mid[slot] x down[e] (+ bias) * topk_weights[slot], written to y[slot]   ([M*K, H])
  3. combine:      y.view(M, K, H).sum(1) (torch accumulates bf16/fp16 in fp32)

Both GEMMs accumulate in fp32. Expert parallelism: a rank holds global experts [offset, offset + E); the
align step drops the slots routed to other ranks' experts, so neither GEMM spends work on them, and their
rows of the per-slot output are zero (the ranks' outputs are then summed by an all-reduce).
`hfrewrite::fused_moe` runs this on GPUs; on CPU it runs `moe_reference` unless `force_triton` is passed and
TRITON_INTERPRET=1 is set (the tests). The kernels are jitted on first use, so TRITON_INTERPRET is read then.
"""
from __future__ import annotations

import functools
import os
from typing import Any

import torch

from hfrewrite.kernels.moe.autotune import DEFAULT_TUNER, INTERPRETER_CONFIG, Autotuner, MoeConfig, TileConfig
from hfrewrite.kernels.moe.reference import Activation, ExpertsLayout, moe_reference

try:
    import triton
    import triton.language as tl
    from triton.runtime.errors import OutOfResources
    _SKIP: tuple[type[Exception], ...] = (OutOfResources,)  # configs too big for shared memory: not candidates
except ImportError:  # CPU-only installs: the op keeps to the reference
    triton = None
    _SKIP = ()

ACT_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "gpt_oss": 3}


def _gate_up_kernel(x_ptr, w_ptr, b_ptr, out_ptr, slot_ptr, block_expert_ptr, num_blocks, num_slots, top_k, n_out, n_in,
                    stride_xm, stride_xk, stride_we, stride_wn, stride_wk, stride_be, stride_bn,
                    stride_om, stride_on, gate_step, up_offset, alpha, limit,
                    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, FP32_DOT: tl.constexpr, GROUP_M: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One BLOCK_M x BLOCK_N tile of act(x @ gate) * (x @ up); gate column j sits at j * gate_step of the
    2I axis and up column j at j * gate_step + up_offset (concatenated: 1, I; interleaved: 2, 1)."""
    # GROUP_M row blocks at a time, column tiles within: programs in flight share rows and weight tiles in L2.
    num_n = tl.cdiv(n_out, BLOCK_N)
    first_m = tl.program_id(0) // (GROUP_M * num_n) * GROUP_M
    within = tl.program_id(0) % (GROUP_M * num_n)
    pid_m = first_m + within % tl.minimum(num_blocks - first_m, GROUP_M)
    pid_n = within // tl.minimum(num_blocks - first_m, GROUP_M)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(slot_ptr + offs_m).to(tl.int64)
    row_ok = slots < num_slots
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < n_out
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + (slots // top_k)[:, None] * stride_xm + offs_k[None, :] * stride_xk
    g_ptrs = w_ptr + expert * stride_we + (offs_n * gate_step)[None, :] * stride_wn + offs_k[:, None] * stride_wk
    u_ptrs = g_ptrs + up_offset * stride_wn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(n_in, BLOCK_K)):
        k_ok = offs_k < n_in - k0 * BLOCK_K
        x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & col_ok[None, :]
        g = tl.load(g_ptrs, mask=w_mask, other=0.0)
        u = tl.load(u_ptrs, mask=w_mask, other=0.0)
        if FP32_DOT:
            x, g, u = x.to(tl.float32), g.to(tl.float32), u.to(tl.float32)
            acc_g = tl.dot(x, g, acc_g, input_precision="ieee")
            acc_u = tl.dot(x, u, acc_u, input_precision="ieee")
        else:
            acc_g = tl.dot(x, g, acc_g)
            acc_u = tl.dot(x, u, acc_u)
        x_ptrs += BLOCK_K * stride_xk
        g_ptrs += BLOCK_K * stride_wk
        u_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        b_ptrs = b_ptr + expert * stride_be + offs_n * gate_step * stride_bn
        acc_g += tl.load(b_ptrs, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        acc_u += tl.load(b_ptrs + up_offset * stride_bn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if ACT == 0:
        res = acc_g * tl.sigmoid(acc_g) * acc_u
    elif ACT == 1:
        res = 0.5 * acc_g * (1.0 + tl.erf(acc_g * 0.7071067811865476)) * acc_u
    elif ACT == 2:
        inner = 1.5957691216057308 * (acc_g + 0.044715 * acc_g * acc_g * acc_g)  # 2 * sqrt(2 / pi) * (...)
        res = acc_g * tl.sigmoid(inner) * acc_u
    else:
        gate = tl.minimum(acc_g, limit)
        up = tl.minimum(tl.maximum(acc_u, -limit), limit)
        res = (up + 1.0) * gate * tl.sigmoid(gate * alpha)
    out_ptrs = out_ptr + slots[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, res.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _down_kernel(a_ptr, w_ptr, b_ptr, rw_ptr, out_ptr, slot_ptr, block_expert_ptr, num_blocks, num_slots, n_out, n_in,
                 stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_be, stride_bn, stride_om, stride_on,
                 HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr, GROUP_M: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One BLOCK_M x BLOCK_N tile of (mid @ down + bias) * routing weight, rows addressed by slot."""
    # GROUP_M row blocks at a time, column tiles within: programs in flight share rows and weight tiles in L2.
    num_n = tl.cdiv(n_out, BLOCK_N)
    first_m = tl.program_id(0) // (GROUP_M * num_n) * GROUP_M
    within = tl.program_id(0) % (GROUP_M * num_n)
    pid_m = first_m + within % tl.minimum(num_blocks - first_m, GROUP_M)
    pid_n = within // tl.minimum(num_blocks - first_m, GROUP_M)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(slot_ptr + offs_m).to(tl.int64)
    row_ok = slots < num_slots
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < n_out
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + slots[:, None] * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(n_in, BLOCK_K)):
        k_ok = offs_k < n_in - k0 * BLOCK_K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if FP32_DOT:
            acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        acc += tl.load(b_ptr + expert * stride_be + offs_n * stride_bn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    acc *= tl.load(rw_ptr + slots, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    out_ptrs = out_ptr + slots[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _align_kernel(ids_ptr, sorted_ptr, block_expert_ptr, scratch_ptr, total_ptr, num_slots, num_experts, capacity,
                  num_blocks, expert_offset, BLOCK_M: tl.constexpr, E_POW2: tl.constexpr, CHUNK: tl.constexpr,
                  BLOCK_CHUNK: tl.constexpr):
    """One program: count rows per expert (atomics), pad each count to BLOCK_M, label every block with its
    expert (-1 past the end), then drop each slot at its expert's cursor. Rows within an expert come out in
    any order, which changes no result: every row is computed and written on its own. Slots whose expert
    (id - expert_offset) is not in [0, num_experts) belong to another rank and are left out."""
    experts = tl.arange(0, E_POW2)
    lanes = tl.arange(0, CHUNK)
    tl.store(scratch_ptr + experts, tl.zeros((E_POW2,), dtype=tl.int32), mask=experts < num_experts)
    tl.debug_barrier()
    for start in range(0, num_slots, CHUNK):
        ok = start + lanes < num_slots
        ids = tl.load(ids_ptr + start + lanes, mask=ok, other=0).to(tl.int32) - expert_offset
        ok = ok & (ids >= 0) & (ids < num_experts)
        tl.atomic_add(scratch_ptr + ids, 1, mask=ok)
    tl.debug_barrier()
    counts = tl.load(scratch_ptr + experts, mask=experts < num_experts, other=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    padded_end = tl.cumsum(padded, axis=0)
    total = tl.sum(padded, axis=0)
    tl.debug_barrier()
    tl.store(scratch_ptr + experts, padded_end - padded, mask=experts < num_experts)  # now each expert's cursor
    tl.store(total_ptr, total)
    for start in range(0, capacity, CHUNK):
        tl.store(sorted_ptr + start + lanes, tl.zeros((CHUNK,), dtype=tl.int32) + num_slots,
                 mask=start + lanes < capacity)
    blocks = tl.arange(0, BLOCK_CHUNK)
    for start in range(0, num_blocks, BLOCK_CHUNK):
        rows = (start + blocks) * BLOCK_M
        expert = tl.sum((padded_end[None, :] <= rows[:, None]).to(tl.int32), axis=1)
        tl.store(block_expert_ptr + start + blocks, tl.where(rows < total, expert, -1),
                 mask=start + blocks < num_blocks)
    tl.debug_barrier()
    for start in range(0, num_slots, CHUNK):
        ok = start + lanes < num_slots
        ids = tl.load(ids_ptr + start + lanes, mask=ok, other=0).to(tl.int32) - expert_offset
        ok = ok & (ids >= 0) & (ids < num_experts)
        pos = tl.atomic_add(scratch_ptr + ids, 1, mask=ok)
        tl.store(sorted_ptr + pos, start + lanes, mask=ok)


@functools.cache
def _jitted(interpret: bool) -> tuple[Any, Any, Any]:
    """Jit on first use, keyed by the interpreter flag (triton decides interpreted-or-compiled at jit time)."""
    del interpret  # only part of the cache key
    return triton.jit(_align_kernel), triton.jit(_gate_up_kernel), triton.jit(_down_kernel)


def interpreting() -> bool:
    """Whether Triton kernels would run in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int,
                    expert_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Slots sorted by expert, each expert's run padded to a multiple of block_m (padding = M*K, "no slot").
    Experts are ids - expert_offset; slots of experts outside [0, num_experts) are dropped.

    Returns (sorted_slots [C] int32, block_expert [C / block_m] int32 with -1 for unused blocks, padded total [1]).
    C is a static bound, M*K + min(E, M*K) * (block_m - 1) rounded up, so there is no host sync; one launch,
    since a dozen small torch ops cost more host time than the GEMMs at decode sizes.
    """
    flat = topk_ids.reshape(-1)
    slots = flat.numel()
    capacity = -(-(slots + min(num_experts, slots) * (block_m - 1)) // block_m) * block_m
    num_blocks = capacity // block_m
    buf = torch.empty(capacity + num_blocks + num_experts + 1, dtype=torch.int32, device=flat.device)
    sorted_slots, block_expert = buf[:capacity], buf[capacity:capacity + num_blocks]
    e_pow2 = triton.next_power_of_2(num_experts)
    _jitted(interpreting())[0][(1,)](flat, sorted_slots, block_expert, buf[capacity + num_blocks:-1], buf[-1:], slots,
                                     num_experts, capacity, num_blocks, expert_offset, BLOCK_M=block_m, E_POW2=e_pow2, CHUNK=1024,
                                     BLOCK_CHUNK=max(16, 8192 // e_pow2), num_warps=4)
    return sorted_slots, block_expert, buf[-1:]


def _strides(w: torch.Tensor, transposed: bool) -> tuple[int, int, int]:
    """(expert, out-feature, in-feature) strides of a [E, out, in] or, transposed, [E, in, out] weight."""
    return (w.stride(0), w.stride(2), w.stride(1)) if transposed else (w.stride(0), w.stride(1), w.stride(2))


def fused_moe_triton(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, gate_up: torch.Tensor,
                     down: torch.Tensor, layout: ExpertsLayout = ExpertsLayout(), act: Activation = Activation(),
                     gate_up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None,
                     tuner: Autotuner | None = None, config: MoeConfig | None = None,
                     expert_offset: int = 0, expert_parallel: bool = False) -> torch.Tensor:
    """The Triton path, callable directly (tests, benchmarks); `config` overrides the tuner's choice.
    expert_parallel: the weights are global experts [expert_offset, expert_offset + E) and ids may name others."""
    if triton is None:
        raise RuntimeError("fused_moe_triton needs triton installed")
    experts, hid, inter = layout.sizes(gate_up, down)
    tokens, top_k = topk_ids.shape
    slots = tokens * top_k
    if slots == 0:
        return hidden.new_zeros(tokens, hid)
    _, gate_up_kernel, down_kernel = _jitted(interpreting())
    mid = torch.empty(slots, inter, dtype=hidden.dtype, device=hidden.device)
    # Slots of other ranks' experts are never written: they must read as zero in the combine.
    per_slot = (torch.zeros if expert_parallel else torch.empty)(slots, hid, dtype=hidden.dtype, device=hidden.device)
    route = topk_weights.reshape(-1).contiguous()
    gate_step, up_offset = (2, 1) if layout.interleaved else (1, inter)
    gu_b = (0, 0) if gate_up_bias is None else gate_up_bias.stride()
    d_b = (0, 0) if down_bias is None else down_bias.stride()
    # fp32 inputs: exact fp32 products (no tf32). bf16 under the interpreter: its dot multiplies the raw bf16
    # bits (stored as uint16) as integers, so upcast first; on GPUs bf16 tiles go to the tensor cores as they are.
    fp32_dot = hidden.dtype == torch.float32 or (hidden.dtype == torch.bfloat16 and interpreting())
    aligned: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def run(block_m: int, stage: str, tile: TileConfig) -> None:
        if block_m not in aligned:
            aligned[block_m] = align_by_expert(topk_ids, experts, block_m, expert_offset)
        sorted_slots, block_expert, _ = aligned[block_m]
        blocks = block_expert.numel()
        launch = dict(BLOCK_M=block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, FP32_DOT=fp32_dot, GROUP_M=8,
                      num_warps=tile.num_warps, num_stages=tile.num_stages)
        if stage == "gate_up":
            gate_up_kernel[(blocks * triton.cdiv(inter, tile.block_n),)](
                hidden, gate_up, gate_up_bias, mid, sorted_slots, block_expert, blocks, slots, top_k, inter, hid,
                *hidden.stride(), *_strides(gate_up, layout.transposed), *gu_b, *mid.stride(), gate_step, up_offset,
                act.alpha, act.limit, HAS_BIAS=gate_up_bias is not None, ACT=ACT_CODES[act.kind], **launch)
        else:
            down_kernel[(blocks * triton.cdiv(hid, tile.block_n),)](
                mid, down, down_bias, route, per_slot, sorted_slots, block_expert, blocks, slots, hid, inter,
                *mid.stride(), *_strides(down, layout.transposed), *d_b, *per_slot.stride(),
                HAS_BIAS=down_bias is not None, **launch)

    if config is None and interpreting():
        config = INTERPRETER_CONFIG
    elif config is None:
        variant = f"{int(layout.transposed)}{int(layout.interleaved)}{int(gate_up_bias is not None)}{act.kind}" \
                  f"{'-ep' if expert_parallel else ''}"
        key = Autotuner.key(tokens, experts, hid, inter, top_k, hidden.dtype, hidden.device, variant)
        config = (tuner or DEFAULT_TUNER).config(key, tokens, top_k, experts, hidden.device, run, skip=_SKIP)
    run(config.block_m, "gate_up", config.gate_up)
    run(config.block_m, "down", config.down)
    # torch sums bf16/fp16 in fp32 and rounds once; one launch instead of an upcast, a sum and a downcast.
    return per_slot if top_k == 1 else per_slot.view(tokens, top_k, hid).sum(1)


@torch.library.custom_op("hfrewrite::fused_moe", mutates_args=())
def fused_moe(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, gate_up: torch.Tensor,
              down: torch.Tensor, gate_up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None,
              activation: str = "silu", alpha: float = 1.702, limit: float = 7.0, transposed: bool = False,
              interleaved: bool = False, force_triton: bool = False, expert_offset: int = 0,
              expert_parallel: bool = False) -> torch.Tensor:
    """hidden [M, H], topk_ids/topk_weights [M, K] -> [M, H]; layout and activation as in moe_reference.

    expert_parallel: this rank holds global experts [expert_offset, expert_offset + E) (E = gate_up.shape[0]);
    the other ids contribute zero, and an all-reduce over the ranks completes the sum."""
    layout, act = ExpertsLayout(transposed, interleaved), Activation(activation, alpha, limit)
    on_gpu = hidden.device.type != "cpu"
    if triton is not None and (on_gpu or (force_triton and interpreting())):
        return fused_moe_triton(hidden, topk_ids, topk_weights, gate_up, down, layout, act, gate_up_bias, down_bias,
                                expert_offset=expert_offset, expert_parallel=expert_parallel)
    return moe_reference(hidden, topk_ids, topk_weights, gate_up, down, layout, act, gate_up_bias, down_bias,
                         expert_offset)


@fused_moe.register_fake
def _fused_moe_fake(hidden: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    """Shapes only, for torch.compile / FakeTensor tracing: the output is like hidden."""
    return hidden.new_empty(hidden.shape)


def moe_experts(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, gate_up: torch.Tensor,
                down: torch.Tensor, layout: ExpertsLayout, act: Activation, gate_up_bias: torch.Tensor | None = None,
                down_bias: torch.Tensor | None = None, force_triton: bool = False) -> torch.Tensor:
    """The op with the layout and activation given as dataclasses."""
    return torch.ops.hfrewrite.fused_moe(hidden, topk_ids, topk_weights, gate_up, down, gate_up_bias, down_bias,
                                         act.kind, act.alpha, act.limit, layout.transposed, layout.interleaved,
                                         force_triton)


def experts_forward(module: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor, force_triton: bool = False) -> torch.Tensor:
    """Drop-in for a transformers 5 experts module's forward (the ExpertsInterface signature)."""
    bias = getattr(module, "has_bias", False)
    return moe_experts(hidden_states, top_k_index, top_k_weights, module.gate_up_proj, module.down_proj,
                       ExpertsLayout.from_module(module), Activation.from_module(module),
                       module.gate_up_proj_bias if bias else None, module.down_proj_bias if bias else None,
                       force_triton)
