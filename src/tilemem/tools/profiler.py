"""Record a Profile by running a checkpoint on a workload (greedy decoding, one request at a time).

Every MoE block's `on_route` observer reports the expert ids [T, K] it routed; the recorder counts
them per phase, accumulates co-activation (experts chosen by the same token) and the reuse distance
of each expert across the decode steps of a sequence. Shape legend: T tokens, K top-k, E experts.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from tilemem.errors import CheckpointError, ConfigError
from tilemem.layers.kv_cache import ForwardContext
from tilemem.loader.checkpoint import load_model
from tilemem.models.topology import Topology
from tilemem.placement.profile import REUSE_MAX, LayerProfile, ModelSignature, Profile, top_pairs
from tilemem.workloads import Request, Workload


class RoutingRecorder:
    """Collects routing statistics from `on_route` callbacks; `phase` and `step` are set by the caller."""

    def __init__(self, moe_layers: list[int], num_experts: int) -> None:
        self.experts = num_experts
        self.phase = "prefill"
        self.step = 0
        self.counts = {
            p: {i: torch.zeros(num_experts, dtype=torch.long) for i in moe_layers} for p in ("prefill", "decode")
        }
        self.tokens = {p: dict.fromkeys(moe_layers, 0) for p in ("prefill", "decode")}
        self.coact = {i: torch.zeros(num_experts, num_experts, dtype=torch.long) for i in moe_layers}
        self.reuse = {i: [0] * (REUSE_MAX + 1) for i in moe_layers}
        self.first = dict.fromkeys(moe_layers, 0)
        self.last_seen: dict[int, dict[int, int]] = {i: {} for i in moe_layers}

    def new_sequence(self) -> None:
        """Reuse distances are measured within one sequence."""
        self.step = 0
        for seen in self.last_seen.values():
            seen.clear()

    def __call__(self, layer: int, ids: torch.Tensor) -> None:
        ids = ids.detach().to("cpu", torch.long)  # [T, K]
        self.counts[self.phase][layer] += torch.bincount(ids.reshape(-1), minlength=self.experts)
        self.tokens[self.phase][layer] += ids.shape[0]
        onehot = torch.zeros(ids.shape[0], self.experts, dtype=torch.float32)  # [T, E]
        onehot.scatter_(1, ids, 1.0)
        self.coact[layer] += (onehot.T @ onehot).round().long()  # [E, E]; float sums are exact here
        if self.phase == "decode":
            seen = self.last_seen[layer]
            for e in ids.reshape(-1).tolist():
                if e in seen:
                    self.reuse[layer][min(self.step - seen[e], REUSE_MAX + 1) - 1] += 1
                else:
                    self.first[layer] += 1
                seen[e] = self.step

    def profile(self, topology: Topology, workload: str, source: str) -> Profile:
        """The recorded statistics as a Profile."""
        sig = ModelSignature.of(topology)
        layers = []
        for i in sig.moe_layers:
            m = self.coact[i]
            pairs = {(a, b): int(m[a, b]) for a in range(self.experts) for b in range(a + 1, self.experts)}
            layers.append(
                LayerProfile(
                    layer=i,
                    prefill_counts=tuple(self.counts["prefill"][i].tolist()),
                    decode_counts=tuple(self.counts["decode"][i].tolist()),
                    prefill_tokens=self.tokens["prefill"][i],
                    decode_tokens=self.tokens["decode"][i],
                    coactivation=top_pairs(pairs),
                    reuse_hist=tuple(self.reuse[i]),
                    reuse_first=self.first[i],
                )
            )
        return Profile(sig, tuple(layers), (workload,), source)


def profile_checkpoint(
    path: str | Path,
    workload: Workload,
    tokens: int,
    max_prompt_tokens: int = 512,
    dtype: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Profile:
    """Run `workload` on the checkpoint at `path` until `tokens` tokens (prefill + decode) were routed."""
    if tokens < 1:
        raise ConfigError(f"--tokens must be at least 1, got {tokens}.")
    model, ckpt = load_model(path, dtype)
    tok_path = Path(path) / "tokenizer.json"
    if not tok_path.exists():
        raise CheckpointError(f"'{path}' has no tokenizer.json; profiling needs the checkpoint's tokenizer.")
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tok_path))
    topology = Topology.from_config(ckpt.config)
    blocks = model.moe_blocks()
    recorder = RoutingRecorder(sorted(blocks), ckpt.config.num_experts)
    for block in blocks.values():
        block.on_route = recorder
    template = _chat_template(Path(path))
    max_len = ckpt.config.max_position_embeddings
    done, i = 0, 0
    try:
        while done < tokens:
            req = workload.requests[i % len(workload.requests)]
            i += 1
            left = tokens - done
            # Decode gets its share first, so a small token budget still sees both phases.
            steps = max(0, min(req.max_new_tokens, left - 1, max_len - 1))
            limit = max(1, min(max_prompt_tokens, left - steps, max_len - steps))
            ids = tokenizer.encode(_render(req, template)).ids[:limit] or [0]
            done += _run(model, recorder, ids, steps)
            if progress is not None:
                progress(min(done, tokens), tokens)
    finally:
        for block in blocks.values():
            block.on_route = None
    return recorder.profile(topology, workload.name, Path(path).name)


def _run(model, recorder: RoutingRecorder, ids: list[int], steps: int) -> int:
    """Prefill `ids`, then greedily decode `steps` tokens; returns tokens routed."""
    cache = model.allocate_cache(slots=1, length=len(ids) + steps)
    recorder.new_sequence()
    recorder.phase = "prefill"
    ctx = ForwardContext.build(cache, [0], [0], [len(ids)])
    logits = model(torch.tensor([ids]), ctx)  # [1, T, V]
    recorder.phase = "decode"
    pos = len(ids)
    for step in range(steps):
        recorder.step = step
        next_id = logits[0, -1].argmax()
        ctx = ForwardContext.build(cache, [0], [pos], [1])
        logits = model(next_id.view(1, 1), ctx)  # [1, 1, V]
        pos += 1
    return len(ids) + steps


def _chat_template(path: Path) -> str | None:
    cfg = path / "tokenizer_config.json"
    if not cfg.exists():
        return None
    import json

    try:
        return json.loads(cfg.read_text()).get("chat_template")
    except (json.JSONDecodeError, AttributeError):
        return None


def _render(req: Request, template: str | None) -> str:
    """The prompt text; chat messages through the checkpoint's template (plain text without one)."""
    if not req.messages:
        return req.prompt
    messages = [{"role": r, "content": c} for r, c in req.messages]
    if template:
        import jinja2

        env = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False)
        try:
            return env.from_string(template).render(messages=messages, add_generation_prompt=True)
        except jinja2.TemplateError:
            pass
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
