"""The training loop: `fit` runs the step (csm_jax.train.step) where csm_jax.train.placement puts it, over the
batches of csm_jax.train.data, and keeps the run's files: OUT/metrics.jsonl (one JSON line per optimizer step),
orbax checkpoints in OUT/checkpoints (csm_jax.train.checkpoint), OUT/train_config.json at the end. A stopped run
resumes exactly where its last checkpoint left off: same data position, same parameters and optimizer state, the
metrics after the checkpoint dropped and made again.

In a multi-host run every process runs `fit` alike; only process 0 writes metrics and shows progress, and orbax
writes each checkpoint together from all processes.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import jax

from csm_jax.csm import CsmConfig
from csm_jax.train import data as D
from csm_jax.train.checkpoint import Checkpoints
from csm_jax.train.placement import Placement, check_batch, eval_metrics, train_step, training_mesh
from csm_jax.train.step import SettingError, TrainConfig, schedule, split_params


@dataclass
class RunOptions:
    out_dir: Path
    checkpoint_every: int = 100  # optimizer steps; 0: only at the end
    keep: int = 3
    eval_every: int = 100  # optimizer steps; 0: only at the end
    resume: bool = False
    progress: bool = True
    stop_after: int | None = None  # stop (checkpointed) after this many optimizer steps of this run
    mesh_data: int | None = None  # data-parallel devices (None: all devices left after mesh_model)
    mesh_model: int = 1  # tensor-parallel devices
    fsdp: bool = False  # also split parameters and optimizer state along "data"
    base: str = ""  # recorded in checkpoints: the frozen parameters' source
    extra: dict = field(default_factory=dict)


def fit(cfg: CsmConfig, params: dict, train_rows: list, eval_rows: list, tc: TrainConfig, run: RunOptions,
        log=print) -> tuple[dict, dict, list[dict]]:
    """Trains; -> (trainable, frozen, metrics lines). Writes run.out_dir/metrics.jsonl and checkpoints/."""
    tc = tc.check()
    mesh = training_mesh(run.mesh_data, run.mesh_model)
    check_batch(tc, mesh)
    pl = Placement(cfg, tc, mesh, run.fsdp)
    out = Path(run.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    primary = jax.process_index() == 0  # the process that writes metrics and shows progress
    metrics = _Metrics(out / "metrics.jsonl", primary)
    ckpt = Checkpoints(out / "checkpoints", run.keep)
    trainable, opt_state, frozen, (step, epoch, index) = _start(cfg, params, tc, run, pl, ckpt, metrics, log)
    if mesh is not None:
        log(f"training on a {mesh.shape['data']} (data) x {mesh.shape['model']} (model) mesh"
            f"{', parameters and optimizer state split along data (FSDP)' if run.fsdp else ''}")

    turns = max(D.max_turns(train_rows), D.max_turns(eval_rows) if eval_rows else 1)
    data = D.Batches(train_rows, tc.batch_size, tc.depth_ratio, tc.seed, turns).iterate(epoch, index)
    eval_sets = [pl.batch(b) for b in D.eval_batches(eval_rows, tc.batch_size, turns)] if eval_rows else []
    lr = schedule(tc)
    stop = tc.steps if run.stop_after is None else min(tc.steps, step + run.stop_after)
    bar = _progress_bar(tc.steps, step) if run.progress and primary else None
    t_run = time.perf_counter()
    while step < stop:
        t0 = time.perf_counter()
        trainable, opt_state, m, (epoch, index), frames, rows = _update(pl, trainable, opt_state, frozen, data)
        step += 1
        dt = time.perf_counter() - t0
        line = {"step": step, "epoch": epoch, "loss": m["loss"], "backbone_loss": m["backbone_loss"],
                "depth_loss": m["depth_loss"], "grad_norm": m["grad_norm"], "lr": float(lr(step - 1)),
                "frames": frames, "frames_per_s": frames / dt, "tokens_per_s": rows / dt, "step_s": dt,
                "elapsed_s": time.perf_counter() - t_run}
        if run.eval_every and eval_sets and (step % run.eval_every == 0 or step == tc.steps):
            line.update(eval_loss(pl, trainable, frozen, eval_sets))
        metrics.write(line)
        if bar is not None:
            bar.set_postfix(loss=f"{m['loss']:.3f}", fps=f"{frames / dt:.0f}", **(
                {"eval": f"{line['eval_loss']:.3f}"} if "eval_loss" in line else {}))
            bar.update(1)
        if (run.checkpoint_every and step % run.checkpoint_every == 0) or step == stop:
            ckpt.save(step, {"trainable": trainable, "opt_state": opt_state},
                      _record(tc, run, mesh, step, (epoch, index + 1)))
    if bar is not None:
        bar.close()
    ckpt.close()
    if primary:
        (out / "train_config.json").write_text(json.dumps(_jsonable(tc), indent=2))
    return trainable, frozen, metrics.lines


def _start(cfg, params, tc: TrainConfig, run: RunOptions, pl: Placement, ckpt: Checkpoints, metrics, log):
    """The run's state and data position: from the last checkpoint when resuming, else fresh.
    -> (trainable, opt_state, frozen, (step, epoch, batch index))."""
    latest = ckpt.latest()
    if latest is not None and not run.resume:
        ckpt.close()
        raise SettingError(f"{ckpt.dir} already holds checkpoints: set `resume` to continue them, or use another "
                           "`out_dir`")
    trainable, frozen = split_params(cfg, params, tc)
    if latest is None:
        if run.resume:
            log(f"nothing to resume: no checkpoint in {ckpt.dir} yet, starting from the beginning")
        else:
            metrics.restart()
        return *pl.state(trainable, frozen), (0, 0, 0)
    state, record = ckpt.restore(latest, pl.restore_target(trainable))
    if record["train_config"] != _jsonable(tc):
        ckpt.close()
        raise SettingError(f"`resume`: the checkpoint in {ckpt.dir} was made with other training settings; use the "
                           "same settings, or another `out_dir`")
    step, epoch, index = record["step"], record["epoch"], record["index"]
    log(f"resumed at step {step} (epoch {epoch}, batch {index}) from {ckpt.dir}")
    metrics.resume(step)
    return state["trainable"], state["opt_state"], pl.place_frozen(frozen), (step, epoch, index)


def _update(pl: Placement, trainable, opt_state, frozen, data):
    """One optimizer update: `accumulate` micro-batches from `data` through the step. -> (trainable, opt_state,
    mean metrics, (epoch, index) of the last batch, labelled frames, rows)."""
    accumulate = pl.tc.accumulate
    sums, frames, rows = {}, 0, 0
    for _ in range(accumulate):
        epoch, index, batch = next(data)
        frames += int((batch["labels"][..., 0] != D.IGNORE).sum())
        rows += int(batch["mask"].any(-1).sum())
        trainable, opt_state, m = train_step(pl, trainable, opt_state, frozen, pl.batch(batch))
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + v
    m = {k: float(v) / accumulate for k, v in jax.device_get(sums).items()}
    return trainable, opt_state, m, (epoch, index), frames, rows


def eval_loss(pl: Placement, trainable, frozen, batches) -> dict:
    """Token-weighted mean of the backbone and depth losses over held-out batches (placed by `pl`)."""
    tot = {"backbone": 0.0, "depth": 0.0, "nb": 0, "nd": 0}
    for batch in batches:
        m = jax.device_get(eval_metrics(pl, trainable, frozen, batch))
        tot["backbone"] += float(m["backbone_loss"]) * int(m["backbone_tokens"])
        tot["depth"] += float(m["depth_loss"]) * int(m["depth_tokens"])
        tot["nb"] += int(m["backbone_tokens"])
        tot["nd"] += int(m["depth_tokens"])
    b, d = tot["backbone"] / max(tot["nb"], 1), tot["depth"] / max(tot["nd"], 1)
    return {"eval_loss": b + d, "eval_backbone_loss": b, "eval_depth_loss": d}


class _Metrics:
    """OUT/metrics.jsonl, written by process 0 only, and the lines of this run (`lines`)."""

    def __init__(self, path: Path, primary: bool):
        self.path, self.primary, self.lines = path, primary, []

    def restart(self) -> None:
        if self.primary and self.path.exists():
            self.path.unlink()

    def resume(self, step: int) -> None:
        """Keeps the lines up to `step` (what came after the checkpoint is done again)."""
        lines = [json.loads(x) for x in self.path.read_text().splitlines()] if self.path.exists() else []
        if self.primary:
            self.path.write_text("".join(json.dumps(m) + "\n" for m in lines if m["step"] <= step))

    def write(self, line: dict) -> None:
        self.lines.append(line)
        if self.primary:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(line) + "\n")


def _progress_bar(total: int, done: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=done, unit="step", dynamic_ncols=True)


def _record(tc: TrainConfig, run: RunOptions, mesh, step: int, next_pos) -> dict:
    """What a checkpoint records beside the arrays: the step, the next batch's position, the settings."""
    return {"step": step, "epoch": next_pos[0], "index": next_pos[1], "seed": tc.seed,
            "train_config": _jsonable(tc), "base": run.base,
            "mesh": dict(mesh.shape) if mesh is not None else {"data": 1, "model": 1}, "fsdp": run.fsdp, **run.extra}


def _jsonable(tc: TrainConfig) -> dict:
    d = asdict(tc)
    d["lora_targets"] = list(d["lora_targets"])
    return d
