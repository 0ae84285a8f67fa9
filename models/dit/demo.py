"""The DiT's default run without data: everything it needs, made from the synthetic shapes.

1. the synthetic shapes set (data_cache/shapes, the README CLIP demo's; reused when there);
2. a target CLIP: the README demo's checkpoint (runs/clip_tiny/checkpoints) when present, otherwise
   a small one trained here through the engine (configs/clip/tiny.yaml with `clip_overrides`);
3. a conditioning tower that differs from it: a randomly initialised CLIP vision tower of another
   width (`condition_tower_overrides`, `condition_tower_seed`);
4. both extracted over `train_shards` training shards (train) and the next `eval_shards` (eval:
   unseen images of the training distribution) with examples/extract_embeddings.py's code.

It runs in a process of its own (`python -m models.dit.demo`, started by rank 0 of the DiT run with
a clean environment: the CLIP run and the extraction make their own process groups); the other
ranks wait for its READY file. A finished preparation with the same settings is reused at once.

    python -m models.dit.demo --config configs/dit/tiny.yaml     # prepare only; prints the two directories
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
import time

log = logging.getLogger("engine")
READY = "READY.json"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Launch variables a child process must not inherit: it is a world of its own.
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
               "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS")


def _settings(demo) -> dict:
    return dataclasses.asdict(demo)


def ready(demo) -> dict | None:
    """The READY record of a finished preparation with these settings, else None."""
    path = os.path.join(demo.out_dir, READY)
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        record = json.load(fh)
    if record.get("settings") != _settings(demo):
        return None
    if not all(os.path.exists(os.path.join(record[k], "manifest.json")) for k in ("train_dir", "eval_dir")):
        return None
    return record


def expected_shapes(demo) -> dict:
    """What the demo's extraction will hold, from its configs alone (the model must match it)."""
    from engine.config import load_config
    from engine.schema import BARE_KEYS
    from models.clip.config import CLIPExperimentConfig

    target = load_config(CLIPExperimentConfig, demo.clip_config, list(demo.clip_overrides), BARE_KEYS).model
    condition = load_config(CLIPExperimentConfig, demo.clip_config, list(demo.condition_tower_overrides),
                            BARE_KEYS).model.vision
    return {"model.condition_dim": condition.hidden_size,
            "model.condition_grid": [condition.img_h // condition.patch_dim, condition.img_w // condition.patch_dim],
            "model.clip_width": target.vision.hidden_size, "model.output_dim": target.output_dim}


def _complete_checkpoint(path: str) -> str | None:
    from engine.checkpoint.manager import resolve_checkpoint

    try:
        return resolve_checkpoint(path)
    except Exception:  # noqa: BLE001 - no checkpoint there
        return None


def target_checkpoint(demo, device: str) -> str:
    """The README demo's CLIP checkpoint, or this demo's own, trained now when missing."""
    for candidate in (demo.clip_checkpoint, os.path.join(demo.clip_run_dir, "checkpoints")):
        found = _complete_checkpoint(candidate)
        if found is not None:
            log.info("demo: target CLIP from %s", found)
            return found
    log.info("demo: no CLIP checkpoint at %s; training a small target CLIP into %s", demo.clip_checkpoint,
             demo.clip_run_dir)
    from engine.run import run

    run("clip", ["--config", demo.clip_config, *demo.clip_overrides, f"trainer.output_dir={demo.clip_run_dir}",
                 f"device={device}"])
    return _complete_checkpoint(os.path.join(demo.clip_run_dir, "checkpoints"))


def prepare(demo, device: str = "auto") -> dict:
    """Steps 1-4 in this process (which must not be inside a process group); returns the READY record."""
    from data.synthetic import generate_shapes_dataset
    from engine.config import load_config
    from engine.schema import BARE_KEYS
    from models.clip.config import CLIPExperimentConfig
    from models.dit.extraction import extract
    from models.dit.towers import TowerSpec
    from parallel.context import destroy_parallel, initialize_parallel

    tic = time.time()
    clip_cfg = load_config(CLIPExperimentConfig, demo.clip_config, list(demo.clip_overrides), BARE_KEYS)
    syn = clip_cfg.data.synthetic
    manifest = generate_shapes_dataset(syn.out_dir, num_train=syn.num_train, num_eval=syn.num_eval,
                                       image_size=syn.image_size, samples_per_shard=syn.samples_per_shard, seed=syn.seed)
    shards = [os.path.join(syn.out_dir, s["path"]) for s in manifest["train"]]
    if len(shards) < demo.train_shards + demo.eval_shards:
        raise ValueError(f"the synthetic set has {len(shards)} train shards; data.demo.train_shards + eval_shards = "
                         f"{demo.train_shards + demo.eval_shards}")
    checkpoint = target_checkpoint(demo, device)
    target = TowerSpec(f"checkpoint:{checkpoint}")
    condition = TowerSpec(f"random:{demo.clip_config}", overrides=list(demo.condition_tower_overrides),
                          seed=demo.condition_tower_seed)
    dirs = {"train_dir": os.path.join(demo.out_dir, "train"), "eval_dir": os.path.join(demo.out_dir, "eval")}
    splits = {"train_dir": shards[:demo.train_shards],
              "eval_dir": shards[demo.train_shards:demo.train_shards + demo.eval_shards]}
    ctx = initialize_parallel(1, 1, device)
    try:
        for key, out in dirs.items():
            extract(out, splits[key], condition, target, device=ctx.device, samples_per_chunk=demo.samples_per_chunk,
                    dtype="float32", batch_size=250)
    finally:
        destroy_parallel()
    record = {"settings": _settings(demo), "target_checkpoint": checkpoint, **dirs,
              "seconds": round(time.time() - tic, 1)}
    with open(os.path.join(demo.out_dir, READY + ".tmp"), "w") as fh:
        json.dump(record, fh, indent=1)
    os.replace(os.path.join(demo.out_dir, READY + ".tmp"), os.path.join(demo.out_dir, READY))
    log.info("demo data ready in %.0f s: %s", time.time() - tic, json.dumps(dirs))
    return record


def prepare_in_subprocess(demo, device: str) -> None:
    """Run `prepare` in a clean child process (no inherited launch variables), raising if it fails."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    os.makedirs(demo.out_dir, exist_ok=True)
    cmd = [sys.executable, "-m", "models.dit.demo", "--settings", json.dumps(_settings(demo)), "--device", device]
    log.info("demo: preparing the target CLIP, the conditioning tower and their embeddings (%s)", demo.out_dir)
    result = subprocess.run(cmd, env=env, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"the DiT demo preparation failed (exit status {result.returncode}); run "
                           f"`python -m models.dit.demo --config <dit config>` to see why")


def wait_for_ready(demo, timeout_s: float = 3600.0, poll_s: float = 2.0) -> dict:
    """Ranks other than 0 wait here (no collective, so no collective timeout) for rank 0's preparation."""
    start = time.time()
    while time.time() - start < timeout_s:
        record = ready(demo)
        if record is not None:
            return record
        if os.path.exists(os.path.join(demo.out_dir, "FAILED")):
            raise RuntimeError(f"the DiT demo preparation failed on rank 0 (see its log; {demo.out_dir}/FAILED)")
        time.sleep(poll_s)
    raise TimeoutError(f"no demo data in {demo.out_dir} after {timeout_s:.0f} s")


def main(argv=None) -> None:
    from engine.run import quiet_optional_extra_warnings
    from models.dit.config import DemoConfig, DiTExperimentConfig

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a DiT config (its data.demo section)")
    parser.add_argument("--settings", help="data.demo as JSON (what the DiT run passes)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the DiT config")
    args = parser.parse_args(argv)
    quiet_optional_extra_warnings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("megatron.core.distributed.fsdp").setLevel(logging.WARNING)  # import-time chatter
    if args.settings:
        demo = DemoConfig(**json.loads(args.settings))
    else:
        from engine.config import load_config
        from engine.schema import BARE_KEYS

        demo = load_config(DiTExperimentConfig, args.config, args.overrides, BARE_KEYS).data.demo
    record = ready(demo)
    if record is None:
        try:
            record = prepare(demo, args.device)
        except BaseException:
            os.makedirs(demo.out_dir, exist_ok=True)
            with open(os.path.join(demo.out_dir, "FAILED"), "w") as fh:
                fh.write("see the log of the preparation\n")
            raise
    print(json.dumps({k: record[k] for k in ("train_dir", "eval_dir", "target_checkpoint")}))


if __name__ == "__main__":
    main()
