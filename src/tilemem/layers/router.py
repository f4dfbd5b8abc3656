"""Top-k routers: softmax or sigmoid scores, greedy or group-limited choice (DeepSeek)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tilemem.config import ModelConfig
from tilemem.kernels import bf16 as bf16_kernels
from tilemem.layers.linear import SLOW_HALF_GEMM, linear


class Router(nn.Module):
    """Maps hidden states [T, D] to (weights [T, K], expert ids [T, K])."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size, device="meta"))
        if cfg.router_bias:
            self.register_buffer("e_score_correction_bias", torch.empty(cfg.num_experts, device="meta"))
        self.fp32_logits = cfg.router_fp32
        self.portable = False
        """Few rows' logits through the portable kernel on any CPU, as `Linear.portable`."""

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Router logits [T, E] (also used by prefetch to predict the next layer's experts)."""
        if self.fp32_logits:
            w, rows = self.weight, x.numel() // x.shape[-1]
            few = rows <= bf16_kernels.MAX_ROWS and x.device.type == "cpu" and w.is_cpu and w.stride(-1) == 1
            slow = SLOW_HALF_GEMM[torch.bfloat16] or self.portable
            if few and w.dtype == torch.bfloat16 and slow and bf16_kernels.available():
                # the same fp32 products and sums, the bf16 weight widened in registers (what the portable one-call
                # decode layers compute, `kernels.portable_decode`)
                return bf16_kernels.matmul_nt(x.reshape(rows, -1).float(), w).view(*x.shape[:-1], w.shape[0])
            return F.linear(x.float(), w.float())
        return linear(x, self.weight, portable=self.portable)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        logits = self.logits(x)  # [T, E]
        if cfg.scoring_func == "sigmoid":
            scores = logits.sigmoid()
        else:
            scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
        if cfg.topk_method == "greedy":
            weights, ids = torch.topk(scores, cfg.top_k, dim=-1)
        else:
            weights, ids = self._group_limited(scores)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + (1e-20 if cfg.router_bias else 0.0))
        if cfg.routed_scaling_factor != 1.0:
            weights = weights * cfg.routed_scaling_factor
        if cfg.router_weights_in_model_dtype:
            weights = weights.to(x.dtype)
        return weights, ids  # [T, K] fp32 or model dtype, [T, K]

    def _group_limited(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        t, e, g = scores.shape[0], cfg.num_experts, cfg.n_group
        choice = scores + self.e_score_correction_bias if cfg.router_bias else scores
        grouped = choice.view(t, g, e // g)  # [T, G, E/G]
        if cfg.topk_method == "noaux_tc":
            group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)  # [T, G]
        else:
            group_scores = grouped.max(dim=-1).values
        group_idx = torch.topk(group_scores, k=cfg.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        keep = group_mask.unsqueeze(-1).expand(t, g, e // g).reshape(t, e).bool()
        if cfg.topk_method == "noaux_tc":
            ids = torch.topk(choice.masked_fill(~keep, float("-inf")), cfg.top_k, dim=-1, sorted=False)[1]
            return scores.gather(1, ids), ids
        return torch.topk(scores.masked_fill(~keep, 0.0), cfg.top_k, dim=-1, sorted=False)
