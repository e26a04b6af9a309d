"""Training telemetry every `telemetry.interval` optimizer steps (the published run's monitoring).

    tele = Telemetry(engine, cfg)          # after parallelize: wraps the core iteration and
                                           # the base optimizer's step (cheap when not armed)
    tele.begin(step)                       # arms itself when the step is due
    result = stage.step(...)
    tele.end(step + 1, tracker)            # due: one all-reduce, then telemetry/* logged

Metrics (metrics.jsonl and MLflow, at the optimizer step they describe):

- telemetry/state_norm: mean over tokens of ||s_r|| (the last core iteration's latent state,
  last micro-batch of the step);
- telemetry/token_corr: mean cosine between the mean-centred token states of a sequence, minus
  1/S (0 for unrelated tokens, 1 for collapse), as the reference computes it;
- telemetry/rel_change: ||s_r - s_{r-1}|| / ||s_r|| of that last iteration;
- telemetry/grad_norm/<block> (embedding, prelude, adapter, core, coda, final_norm, head): the
  gradient norm the optimizer sees (after clipping), per block;
- telemetry/update_rms/<block> and telemetry/update_rms: RMS of the applied weight change;
- telemetry/effective_lr/<block>: update RMS / gradient RMS, the step taken per unit gradient
  (for Adam-like optimizers what the moments made of the scheduled lr);
- telemetry/param_norm/<block>.

Cost when not due: one Python branch per core iteration and per optimizer step. When due: a
few norms of the latent state, per-parameter sums over this rank's optimizer tensors, a copy
of this rank's (ZeRO-partitioned) fp32 weights for the update, and one all-reduce of a vector
of 4 values per parameter. Under ZeRO the base optimizer steps flat partitions; the
per-parameter sums use zero_layout's segments, so blocks are exact at every stage and TP size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pipeline.model.counting import PARTS, _part_of
from pipeline.training.zero_layout import tensor_layout


def base_optimizer(engine):
    """The torch optimizer that steps the (flat) fp32 tensors inside the DeepSpeed engine."""
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else opt


class Telemetry:
    """See the module docstring."""

    def __init__(self, engine, cfg) -> None:
        self.interval = cfg.telemetry.interval
        self.armed = False
        if not self.interval:
            return
        module = engine.module
        named = list(module.named_parameters())
        self.parts = [_part_of(n) for n, _ in named]
        tp = _tp_size()
        self.full_numel = [
            (getattr(p, "ds_numel", None) or p.numel())
            * (tp if getattr(p, "tensor_model_parallel", False) else 1)
            for _, p in named
        ]
        self.layout, self.n_keys = tensor_layout(engine)
        self.device = next(module.parameters()).device
        self._sums = None
        self._state = None
        self.optimizer = base_optimizer(engine)
        step = self.optimizer.step

        def stepped(*args, **kwargs):
            if not self.armed:
                return step(*args, **kwargs)
            before = self._before_step()
            out = step(*args, **kwargs)
            self._after_step(before)
            return out

        self.optimizer.step = stepped
        module.wrap_iteration(self._wrap_iteration)

    # ------------------------------------------------------------------ arming
    def due(self, step: int) -> bool:
        """Optimizer step `step` (0-based) is the interval-th since the last."""
        return bool(self.interval) and (step + 1) % self.interval == 0

    def begin(self, step: int) -> None:
        self.armed = self.due(step)
        if self.armed:
            self._sums = torch.zeros(4, self.n_keys, dtype=torch.float64, device=self.device)
            self._state = None

    def end(self, done: int, tracker=None) -> dict[str, float] | None:
        """Reduce and log the due step's telemetry (every rank must call it); None if not due."""
        if not self.armed:
            return None
        self.armed = False
        metrics = self._collect()
        if tracker is not None:
            tracker.log_metrics(metrics, done)
        return metrics

    # ------------------------------------------------------------------ latent state
    def _wrap_iteration(self, iteration):
        def run(s_SBH, e_SBH, rope):
            new = iteration(s_SBH, e_SBH, rope)
            if self.armed:
                with torch.no_grad():
                    self._state = _state_stats(s_SBH, new)
            return new

        return run

    # ------------------------------------------------------------------ optimizer
    def _tensors(self):
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                segs = self.layout.get(id(p))
                if segs is not None and p.grad is not None:
                    yield p, segs

    def _before_step(self):
        before = []
        for p, segs in self._tensors():
            g = p.grad.detach().reshape(-1).float()
            for s in segs:
                part = g[s.start : s.start + s.length]
                self._sums[0, s.key] += part.double().pow(2).sum()
                self._sums[3, s.key] += s.length
            before.append((p, segs, p.detach().reshape(-1).float().clone()))
        return before

    def _after_step(self, before) -> None:
        for p, segs, old in before:
            new = p.detach().reshape(-1).float()
            delta = new - old
            for s in segs:
                sl = slice(s.start, s.start + s.length)
                self._sums[1, s.key] += delta[sl].double().pow(2).sum()
                self._sums[2, s.key] += new[sl].double().pow(2).sum()

    # ------------------------------------------------------------------ reduce
    def _collect(self) -> dict[str, float]:
        state = self._state
        if state is None:
            state = torch.full((3,), float("nan"), dtype=torch.float64, device=self.device)
        vec = torch.cat([self._sums.reshape(-1), state.double().reshape(-1)])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(vec)
            world = dist.get_world_size()
        else:
            world = 1
        sums = vec[: 4 * self.n_keys].reshape(4, self.n_keys).cpu()
        state_mean = (vec[4 * self.n_keys :] / world).tolist()
        count = sums[3].clamp(min=1)
        # mean over the copies held (replicas, TP-replicated parameters), times the full size
        scale = torch.tensor(self.full_numel, dtype=torch.float64) / count
        grad_sq, upd_sq, par_sq = (sums[i] * scale for i in range(3))
        seen = sums[3] > 0
        out = {
            "telemetry/state_norm": state_mean[0],
            "telemetry/token_corr": state_mean[1],
            "telemetry/rel_change": state_mean[2],
        }
        numel = torch.tensor(self.full_numel, dtype=torch.float64)
        tot_upd = tot_n = 0.0
        for part in PARTS:
            idx = [i for i, p in enumerate(self.parts) if p == part and seen[i]]
            if not idx:
                continue
            n = float(numel[idx].sum())
            g2, u2, p2 = (float(t[idx].sum()) for t in (grad_sq, upd_sq, par_sq))
            out[f"telemetry/grad_norm/{part}"] = g2**0.5
            out[f"telemetry/update_rms/{part}"] = (u2 / n) ** 0.5
            out[f"telemetry/param_norm/{part}"] = p2**0.5
            grad_rms = (g2 / n) ** 0.5
            if grad_rms > 0:
                out[f"telemetry/effective_lr/{part}"] = (u2 / n) ** 0.5 / grad_rms
            tot_upd, tot_n = tot_upd + u2, tot_n + n
        if tot_n:
            out["telemetry/update_rms"] = (tot_upd / tot_n) ** 0.5
        return {k: v for k, v in out.items() if v == v}  # drop nan (no state seen)


def _state_stats(s_old: torch.Tensor, s_new: torch.Tensor) -> torch.Tensor:
    """[state norm, token correlation, relative change] of one core iteration ([S, B, H])."""
    x = s_new.float()
    S = x.shape[0]
    norm = x.norm(dim=-1).mean()
    c = x - x.mean(dim=-1, keepdim=True)
    u = c / c.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    corr = (u.sum(dim=0).pow(2).sum(dim=-1) / (S * S)).mean() - 1.0 / S  # mean of u_i . u_j
    rel = (x - s_old.float()).norm() / x.norm().clamp_min(1e-30)
    return torch.stack([norm, corr, rel])


def _tp_size() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
