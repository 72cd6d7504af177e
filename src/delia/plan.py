"""`delia run --plan`: what an experiment will cost, per arm and seed, before anything runs.

Tokens are counted with the model's tokenizer on the real data (the pool's prompts as `delia sample` renders
them, the task's rows, the pool's rows as `delia mix` draws them for reference arms); generated tokens are the
upper bound `max_new_tokens` per answer. FLOPs follow `delia.compute`; wall time divides them by a rate: the
given achieved FLOP/s (what a run really reaches, not the device's peak), or this machine's measured matmul peak
times the share of it that delia reached per stage (`delia.compute.STAGE_SHARE_OF_PEAK`). A pool still to be built
is estimated from its sources or its requested size, without building it.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from delia.artifacts import ArmCost, CostPlan, SampledTokens, TrainedTokens
from delia.compute import STAGE_SHARE_OF_PEAK, arm_cost
from delia.experiment import SCALED, Experiment
from delia.progress import ProgressCallback
from delia.stage import Stage


@dataclass
class PlanStage(Stage[CostPlan]):
    """The cost plan as a stage of `delia run`: made once, before the first run of these settings, and kept for
    the report's comparison of estimated and measured time. Its identity is the model's, the data's hashes, the
    rate and the experiment's arms, seeds, sampling and training."""

    name: ClassVar[str] = "plan"
    result: ClassVar[Any] = CostPlan

    exp: Experiment
    model: dict[str, Any]  # the model's identity
    data: dict[str, Any]  # the hashes of the experiment's files
    flops_per_s: float | None
    label: str = "costs"

    def identity(self) -> dict[str, Any]:
        return {"model": self.model, "data": self.data, "flops_per_s": self.flops_per_s,
                "experiment": self.exp.model_dump(mode="json", include={"arms", "seeds", "sample", "train"})}

    def run(self, folder: Path, progress: ProgressCallback | None = None) -> CostPlan:
        return plan_experiment(self.exp, self.flops_per_s)


def plan_experiment(exp: Experiment, flops_per_s: float | None = None) -> CostPlan:
    """Estimated tokens, FLOPs and wall time of every arm (per seed) of `exp`; data paths must be resolved."""
    from delia.compute import measure_matmul_flops
    from delia.data import read_chat
    from delia.models import load_tokenizer, resolve_model
    from delia.prompts import prompt_ids
    from delia.sample import sampled_prompts

    model_path = resolve_model(exp.model)
    tok = load_tokenizer(model_path, resolved=True)
    max_length = exp.train.max_length

    def row_tokens(messages: list[dict[str, str]]) -> int:
        return min(max_length, len(prompt_ids(tok, messages, add_generation_prompt=False)))

    task_rows = read_chat(exp.task.train).records
    task_tokens = sum(row_tokens(r["messages"]) for r in task_rows)

    sampling = exp.sample
    max_new, per_query = sampling.max_new_tokens, sampling.samples_per_query
    with tempfile.TemporaryDirectory(prefix="delia-plan-") as tmp:
        pool_file, pool_records, pool_rows, pool_note = _pool_for_plan(exp, task_rows, Path(tmp))
        queries, prompts = [], []
        if any(a.samples for a in exp.arms):  # the queries `delia sample` would answer, rendered as it renders them
            queries, prompts = sampled_prompts(pool_file, tok, sampling)
        references = []  # what `delia mix` draws for reference arms: the pool's rows as they are
        if any(a.ratio > 0 and not a.samples for a in exp.arms):
            references = [r["messages"] for r in pool_records]
    # a pool still to be built: its rows are `pool_rows`, their lengths those of the stand-in rows read
    scale = pool_rows / max(1, len(pool_records)) if pool_note else 1.0
    sampled = SampledTokens(queries=round(len(prompts) * scale), generated=round(len(prompts) * per_query * scale),
                            prompt_tokens=round(sum(map(len, prompts)) * per_query * scale),
                            completion_tokens=round(len(prompts) * per_query * max_new * scale))
    # a self-sampled training row: the query as a user turn, then an answer of at most max_new tokens
    self_row = (sum(row_tokens([{"role": "user", "content": q}, {"role": "assistant", "content": ""}])
                    for _, q, _ in queries) / max(1, len(queries)) + max_new)
    ref_row = sum(map(row_tokens, references)) / max(1, len(references))
    rewriting = _rewriting(exp, task_rows, tok) if any(a.rewrite for a in exp.arms) else None

    peak = None if flops_per_s else measure_matmul_flops()
    rates = {stage: flops_per_s or peak * share for stage, share in STAGE_SHARE_OF_PEAK.items()}
    rows: dict[str, ArmCost] = {}
    for arm in (a for a in exp.arms if a.kind != SCALED):
        available = sampled.generated if arm.samples else round(len(references) * scale)
        asked = exp.arm_mix(arm, exp.seeds[0]).diverse_asked(len(task_rows))
        diverse = min(available, asked)
        diverse_tokens = diverse * (self_row if arm.samples else ref_row)
        data_tokens = task_tokens + diverse_tokens
        trained = forward_only = 0.0  # summed over the arm's trainings; a soft prompt's trains on the task rows only
        for training in exp.arm_phases(arm, exp.seeds[0]):
            alone = training.trains_soft_prompt()
            phase_rows = len(task_rows) + (0 if alone else diverse)
            passes = float(training.epochs)
            if (steps := training.max_steps) > 0:  # max_steps wins over epochs (one process)
                passes = steps * training.batch_size * training.grad_accum / phase_rows
            trained += (task_tokens if alone else data_tokens) * passes
            forward_only += diverse_tokens * passes if arm.diverse_loss == "kl" and not alone else 0
        training_run = TrainedTokens(rows=len(task_rows) + diverse, train_tokens=data_tokens,
                                     tokens_trained=trained, tokens_forward_only=forward_only)
        share = diverse / sampled.generated if arm.samples and sampled.generated else 0.0
        cost = arm_cost(model_path, training_run, sampled, share, rewriting if arm.rewrite else None)
        cost["est_wall_s"] = cost["sample_flops"] / rates["sample"] + cost["train_flops"] / rates["train"]
        rows[arm.name] = ArmCost(arm=arm.name, kind=arm.kind, ratio=arm.ratio, diverse_rows=diverse,
                                 diverse_asked=asked if arm.ratio > 0 else 0, short=asked > available, **cost)
    # a scaled arm costs its `of` arm's sampling and training, which run once for both: nothing more to wait for
    arms = [rows[a.name] if a.kind != SCALED else
            rows[str(a.of)].model_copy(update={"arm": a.name, "kind": SCALED, "of": a.of, "short": False,
                                               "est_wall_s": 0.0})
            for a in exp.arms]
    return CostPlan(model=exp.model, seeds=len(exp.seeds), task_rows=len(task_rows),
                    sampling_run=sampled if prompts else None, matmul_peak_flops=peak, flops_per_s=flops_per_s,
                    rates=rates, arms=arms, pool_note=pool_note)


def _rewriting(exp: Experiment, task_rows: list[dict[str, Any]], tok: Any) -> SampledTokens:
    """What `delia rewrite` of the task rows costs (as its summary counts it): each row's rewrite prompt, rendered as
    it renders it, and an answer of at most its token limit."""
    from delia.prompts import prompt_ids
    from delia.rewrite import rewrite_prompt

    limit = exp.rewrite.token_limit(tok, [r["messages"][-1]["content"] for r in task_rows])
    prompts = [prompt_ids(tok, rewrite_prompt(r["messages"])) for r in task_rows]
    return SampledTokens(queries=len(task_rows), generated=len(task_rows), prompt_tokens=sum(map(len, prompts)),
                         completion_tokens=len(prompts) * limit)


def _pool_for_plan(exp: Experiment, task_rows: list[dict[str, Any]], tmp: Path
                   ) -> tuple[Path, list[dict[str, Any]], int, str | None]:
    """The pool file the plan reads, its records, the rows the pool has, and, for a pool still to be built, how its
    rows were
    estimated (nothing is built: its local sources' rows, or the task's rows where all sources are on the hub,
    stand in for its queries, and its requested `size` for their number)."""
    from delia.data import read_chat
    from delia.files import write_jsonl

    if not isinstance(exp.pool, dict):
        if exp.pool is None:
            return tmp / "none.jsonl", [], 0, None
        records = read_chat(exp.pool).records
        return exp.pool, records, len(records), None
    local = [s for s in exp.pool["sources"] if not s.startswith("hf:")]
    rows = [r for s in local for r in read_chat(s, require_assistant=False, skip_invalid=True).records]
    stand_in = "its local sources' rows" if rows else "the task's rows (its sources are on the hub)"
    rows = rows or task_rows
    size = exp.pool.get("size")
    count = min(size, len(rows)) if size and local else size or len(rows)
    write_jsonl(tmp / "pool.jsonl", rows[:count])
    note = (f"the pool is still to be built: estimated as {count:,} rows (" + ("its requested size" if size else
            "before cleaning") + f"), their lengths from {stand_in}")
    return tmp / "pool.jsonl", rows[:count], count, note
