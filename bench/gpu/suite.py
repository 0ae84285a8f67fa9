"""GPU benchmark suite: CLIP B/32 and L/14 in BF16 O2 on this engine beside open_clip's own trainer,
the LLM at the Llama-3.2-1B shape and the global DiT at the seed's size.

    bash bench/gpu/run.sh --out /tmp/gpu_results            # full suite, under 8 minutes
    bash bench/gpu/run.sh --quick --out /tmp/gpu_results    # under 4 minutes
    bash bench/gpu/run.sh --dry-run                         # check the wheels import, print the plan

Rows (one GPU): the engine (`examples/pretrain_clip.py` through bench/engine_runner.py, the same
entry point users run) in BF16 O2 with SDPA (its flash kernel), and with flash-attn / Transformer
Engine attention when they import; open_clip's trainer (bench/openclip_trainer.py) on the same GPU,
tower dimensions, batch and shards in its bf16 autocast (`--precision amp_bf16`); L/14 with full
activation recompute; checkpoint save and load (bench/checkpoint_io.py); the LLM
(`examples/pretrain_llm.py`, configs/llm/llama3.2-1b.yaml: 8192-token sequences, BF16 O2, flash-attn
when it imports, else SDPA's flash kernel) on its synthetic Markov corpus, and the DiT
(`examples/pretrain_dit.py`, configs/dit/global_768.yaml) on random bfloat16 features of the seed's
shapes (bench/dit_features.py); both data sets are written on the machine, no network. Each engine
row reports samples/s (the LLM also tokens/s), TFLOP/s and MFU (engine/flops.py for CLIP, both
systems, and the LLM; models/dit/flops.py for the DiT), peak memory (`torch.cuda.max_memory_allocated`)
beside engine/memory_estimate.py's prediction for CLIP (the estimator is CLIP-only: the LLM and DiT
rows report the peak alone). Every row runs
under a time budget: a row that would not fit is skipped and says so; a row that fails is recorded
with its error and the suite goes on. Writes results.md and results.json to --out.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.dirname(HERE)
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, ROOT)
sys.path.insert(0, BENCH)

from clip_throughput import SHARD_OVERRIDES, SHARD_SET  # noqa: E402  the CPU benchmark's shard set

MODELS = {"b32": ("configs/clip/b32.yaml", 512), "l14": ("configs/clip/l14.yaml", 128)}  # config, batch per GPU
LABELS = {"b32": "B/32", "l14": "L/14", "llama1b": "Llama-3.2-1B", "dit768": "DiT global 768"}
# The other families' rows: entry point, config. Batches per GPU: the LLM 2 sequences of 8192 tokens on a
# device of 100 GiB or more (about 70 GiB by hand: 1.24B parameters x 20 bytes of BF16 O2 weights, fp32 main
# weights, gradients and Adam moments, ~1.5 GiB of activations per layer with flash attention, and the
# 128256-wide logits in fp32 with their gradient), 1 below; the DiT 128 samples of 256 tokens.
FAMILY_MODELS = {"llama1b": ("llm", "examples/pretrain_llm.py", "configs/llm/llama3.2-1b.yaml"),
                 "dit768": ("dit", "examples/pretrain_dit.py", "configs/dit/global_768.yaml")}
DIT_BATCH = 128
DIT_SAMPLES = 512  # random feature set: 2.5 MiB a sample in bfloat16 (256 x 4096 condition, 256 x 1024 target)
LLM_CORPUS = ["data.synthetic.num_train=4000", "data.synthetic.num_eval=0", "data.synthetic.docs_per_shard=1000"]
FULL_BUDGET_S, QUICK_BUDGET_S = 480.0, 240.0
# Planning assumptions (conservative, for the time estimate only; the budget is enforced at run time)
STARTUP_S = {"engine": 45.0, "open_clip": 35.0, "checkpoint": 75.0, "llm": 50.0,
             "dit": 60.0}  # the DiT's includes writing its random feature set (~1.3 GiB)
ASSUMED_MFU = 0.25
SAMPLES_PER_S_PER_WORKER = 300.0  # 64x64 JPEG decode + bicubic resize to 224 + normalise, one core
RECOMPUTE = [f"model.{tower}.activations_checkpoint_{key}={value}" for tower in ("vision", "text")
             for key, value in (("granularity", "full"), ("method", "uniform"), ("num_layers", 1))]
TARGETS = {"l14_mfu": 0.45, "l14_vs_open_clip": 1.3, "estimator_error": 0.10, "llm_1b_mfu": 0.45}  # issues 11, 12


@dataclass
class Row:
    key: str  # unique id, e.g. "l14-engine-sdpa"
    kind: str  # engine | open_clip | checkpoint | llm | dit
    model: str  # b32 | l14 | llama1b | dit768
    batch: int  # per GPU
    steps: int
    warmup: int
    attention: str = "sdpa"
    recompute: bool = False
    flops_per_sample: float = 0.0
    predicted_memory_gib: float | None = None
    estimate_s: float = 0.0
    overrides: list = field(default_factory=list)
    tokens_per_sample: int = 0  # the LLM's sequence length (tokens/s)

    @property
    def label(self) -> str:
        if self.kind == "checkpoint":
            return f"{LABELS[self.model]} checkpoint save / load"
        if self.kind in ("llm", "dit"):
            return f"{LABELS[self.model]} engine BF16 O2, {self.attention}"
        system = "open_clip_train (amp_bf16)" if self.kind == "open_clip" else f"engine BF16 O2, {self.attention}"
        return f"{LABELS[self.model]} {system}{', full recompute' if self.recompute else ''}"


def engine_config(model: str, batch: int, gpus: int, attention: str = "sdpa", recompute: bool = False):
    """The engine's config for a row, and the overrides that make it from the size's file."""
    from engine.config import load_config
    from engine.schema import BARE_KEYS
    from models.clip.config import CLIPExperimentConfig as ExperimentConfig

    overrides = ["trainer.precision=bf16", "model.megatron_amp_O2=true", f"trainer.micro_batch_size={batch}",
                 f"trainer.global_batch_size={batch * gpus}", "model.text.vocab_size=49408",
                 f"model.attention_backend={attention}", "optim.sched.warmup_steps=0", "data.shuffle_buffer=1000",
                 # the whole 77-token context, as open_clip runs it: the rows compare kernels and the MFU
                 # counts the text tower at full length (the shapes' short captions would be trimmed)
                 "model.text.trim_to_longest=false", *SHARD_OVERRIDES]
    overrides += RECOMPUTE if recompute else []
    return load_config(ExperimentConfig, os.path.join(ROOT, MODELS[model][0]), overrides, BARE_KEYS), overrides


def family_config(model: str, batch: int, gpus: int, attention: str, data_dir: str):
    """The LLM's or DiT's config for a row (BF16 O2, no evaluation), and its overrides. `data_dir`:
    where the row's synthetic data goes (the Markov corpus, the random features)."""
    from engine.config import load_config
    from engine.family import get_family
    from engine.schema import BARE_KEYS

    family, _script, config = FAMILY_MODELS[model]
    overrides = ["trainer.precision=bf16", "model.megatron_amp_O2=true", f"trainer.micro_batch_size={batch}",
                 f"trainer.global_batch_size={batch * gpus}", f"model.attention_backend={attention}",
                 "optim.sched.warmup_steps=0"]
    if family == "llm":
        overrides += [*LLM_CORPUS, f"data.synthetic.out_dir={data_dir}"]
    else:
        overrides += ["eval.enabled=false", f"data.train_dir={data_dir}", "data.eval_dir=null"]
    return load_config(get_family(family).config_cls, os.path.join(ROOT, config), overrides, BARE_KEYS), overrides


def predicted_memory_gib(cfg, gpus: int) -> float:
    from engine.memory_estimate import estimate

    return estimate(cfg, tp=1, pp=1, dp=gpus)["total_bytes"] / 2**30


def plan(quick: bool, gpus: int = 1, device_memory_gib: float = 139.0, peak_tflops: float = 989.0,
         backends: tuple = (), workers: int = 8, data_root: str = "data_cache") -> list[Row]:
    """The rows to run, with batch sizes that the memory estimate says fit in 85% of the device,
    and a time estimate each. `backends`: the optional attention backends that import (flash, te).
    Order: the comparison rows, the LLM, then (full suite) the DiT, recompute, checkpoint I/O and the
    optional backends, so that what the budget skips when every backend imports is the last of those."""
    from engine.flops import BatchLayout, clip_flops_per_sample

    steps, warmup = (16, 4) if quick else (30, 8)
    rows = []

    def fitting_batch(model):  # every row of a model runs the batch its plain engine row fits
        batch = MODELS[model][1]
        while predicted_memory_gib(engine_config(model, batch, gpus)[0], gpus) > 0.85 * device_memory_gib and batch > 8:
            batch //= 2
        return batch

    def add(kind, model, attention="sdpa", recompute=False, key=None):
        batch = fitting_batch(model)
        cfg, overrides = engine_config(model, batch, gpus, attention, recompute)
        flops = clip_flops_per_sample(cfg.model, BatchLayout(batch, gpus))
        compute_s = flops * batch / (ASSUMED_MFU * peak_tflops * 1e12)
        data_s = batch / (SAMPLES_PER_S_PER_WORKER * workers)
        step_s = max(compute_s * (4 / 3 if recompute else 1), data_s)
        row = Row(key or f"{model}-{kind}-{attention}{'-recompute' if recompute else ''}", kind, model, batch,
                  steps, warmup, attention, recompute, flops, predicted_memory_gib(cfg, gpus), overrides=overrides)
        row.estimate_s = STARTUP_S[kind] + steps * step_s
        if kind == "checkpoint":  # real-size weights and Adam moments, no data, no training
            row.steps = row.warmup = row.batch = 0
            row.predicted_memory_gib, row.estimate_s = None, STARTUP_S[kind]
        rows.append(row)

    def add_family(model):
        from engine.flops import BatchLayout
        from models.dit.flops import training_flops_per_sample
        from models.llm.family import llm_flops_per_sequence

        kind = FAMILY_MODELS[model][0]
        if kind == "llm":
            batch, attention = (2 if device_memory_gib >= 100 else 1), ("flash" if "flash" in backends else "sdpa")
            row_steps, row_warmup = (8, 3) if quick else (12, 4)  # 16k tokens a step: few steps measure it
            data_dir = os.path.join(data_root, "gpu_bench_markov")
        else:
            batch, attention, (row_steps, row_warmup) = DIT_BATCH, "sdpa", (steps, warmup)
            data_dir = os.path.join(data_root, "gpu_bench_dit_features")
        cfg, overrides = family_config(model, batch, gpus, attention, data_dir)
        if kind == "llm":
            flops, tokens = llm_flops_per_sequence(cfg.model), cfg.model.seq_length
        else:
            flops = training_flops_per_sample(cfg.model, BatchLayout(batch, gpus).contrastive_batch)
            tokens = cfg.model.seq_length
        step_s = flops * batch / (ASSUMED_MFU * peak_tflops * 1e12)
        row = Row(f"{model}-{kind}-{attention}", kind, model, batch, row_steps, row_warmup, attention,
                  flops_per_sample=flops, tokens_per_sample=tokens, overrides=overrides)
        row.estimate_s = STARTUP_S[kind] + row_steps * step_s
        rows.append(row)

    for model in ("b32", "l14"):
        add("engine", model)
        add("open_clip", model)
    add_family("llama1b")
    if not quick:
        add_family("dit768")
        add("engine", "l14", recompute=True)
        add("checkpoint", "l14")
        for backend in ("flash", "te"):
            if backend in backends:
                add("engine", "l14", attention=backend)
    return rows


def available_backends() -> tuple:
    """flash-attn and Transformer Engine, when they import here (they need CUDA builds)."""
    found = []
    for backend, module in (("flash", "flash_attn"), ("te", "transformer_engine")):
        try:
            __import__(module)
            found.append(backend)
        except Exception:  # noqa: BLE001 - an unusable install counts as absent
            pass
    return tuple(found)


# -- running -----------------------------------------------------------------------------------------

def run_row(row: Row, shards_dir: str, workers: int, gpus: int, out_dir: str, timeout: float) -> dict:
    from clip_throughput import openclip_args, openclip_dims
    from engine_runner import run_engine, run_process_group
    from openclip_trainer import run_openclip_trainer

    if row.kind in ("llm", "dit"):
        family, script, config = FAMILY_MODELS[row.model]
        if family == "dit":  # random features of the seed's shapes, written here (kept when already there)
            from dit_features import write_random_features

            write_random_features(row_data_dir(row), family_config(row.model, row.batch, gpus, row.attention,
                                                                   row_data_dir(row))[0].model,
                                  max(DIT_SAMPLES, 4 * row.batch * gpus))  # 4 micro-batches per DP rank at least
        res = run_engine(config, gpus, row.overrides, row.steps, row.warmup, None, python=sys.executable,
                         device="cuda", timeout=timeout, script=script)
        out = {"samples_per_s": row.batch * gpus / res["step_time_s"], "step_time_s": res["step_time_s"],
               "mfu_logged": res["mfu_logged"], "peak_memory_gib": res["peak_memory_gib"]}
        if row.tokens_per_sample and family == "llm":
            out["tokens_per_s"] = out["samples_per_s"] * row.tokens_per_sample
        return out
    if row.kind == "engine":
        res = run_engine(MODELS[row.model][0], gpus, row.overrides + [f"data.num_workers={workers}"], row.steps,
                         row.warmup, shards_dir, python=sys.executable, device="cuda", timeout=timeout)
        return {"samples_per_s": row.batch * gpus / res["step_time_s"], "step_time_s": res["step_time_s"],
                "mfu_logged": res["mfu_logged"], "peak_memory_gib": res["peak_memory_gib"]}
    if row.kind == "open_clip":
        spec = os.path.join(shards_dir, "train-{000000..000007}.tar")
        config = os.path.join(ROOT, MODELS[row.model][0])
        res = run_openclip_trainer(spec, row.steps, row.batch, dims=openclip_dims(config), extra_args=openclip_args(config),
                                   workers=workers, warmup_steps=row.warmup, precision="amp_bf16", device="cuda",
                                   python=sys.executable, timeout=timeout)
        return {"samples_per_s": res["samples_per_s"], "step_time_s": res["step_time_s"],
                "data_time_s": res["data_time_s"]}
    results = os.path.join(out_dir, "checkpoint_io_gpu")
    cmd = [sys.executable, os.path.join(BENCH, "checkpoint_io.py"), "--config", MODELS[row.model][0], "--tp", "1",
           "--device", "cuda", "--repeats", "1", "--no-reshard", "--results", results]
    proc = run_process_group(cmd, timeout, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    with open(results + ".json") as fh:
        data = json.load(fh)
    return {"gib": data["mib"] / 1024, "operations": data["rows"]}


def row_data_dir(row: Row) -> str:
    """The data directory a family row's overrides name."""
    key = "data.synthetic.out_dir=" if row.kind == "llm" else "data.train_dir="
    return next(o[len(key):] for o in row.overrides if o.startswith(key))


def summarize(rows: list[Row], results: dict, peak: float | None, gpus: int) -> dict:
    """Derived figures: TFLOP/s and MFU, estimator error, engine vs open_clip, recompute cost."""
    for row in rows:
        r = results[row.key]
        if "samples_per_s" in r:
            r["tflops_per_gpu"] = row.flops_per_sample * r["samples_per_s"] / gpus / 1e12
            r["mfu"] = r["tflops_per_gpu"] / peak if peak else None
        if r.get("peak_memory_gib") and row.predicted_memory_gib is not None:  # the estimator is CLIP's
            r["predicted_memory_gib"] = row.predicted_memory_gib
            r["estimator_error"] = row.predicted_memory_gib / r["peak_memory_gib"] - 1
    for row in rows:
        r = results[row.key]
        ref = results.get(f"{row.model}-open_clip-sdpa", {})
        if row.kind == "engine" and "samples_per_s" in r and "samples_per_s" in ref:
            # per GPU: open_clip's runner is one process on one GPU
            r["vs_open_clip"] = r["samples_per_s"] / gpus / ref["samples_per_s"]
        base = results.get(f"{row.model}-engine-sdpa", {})
        if row.recompute and "samples_per_s" in r and "samples_per_s" in base:
            r["recompute_time_cost"] = base["samples_per_s"] / r["samples_per_s"] - 1
            if r.get("peak_memory_gib") and base.get("peak_memory_gib"):
                r["recompute_memory_saved_gib"] = base["peak_memory_gib"] - r["peak_memory_gib"]
    l14 = results.get("l14-engine-sdpa", {})
    checks = {}
    if l14.get("mfu") is not None:
        checks[f"L/14 MFU >= {TARGETS['l14_mfu']:.0%}"] = l14["mfu"] >= TARGETS["l14_mfu"]
    if "vs_open_clip" in l14:
        checks[f"L/14 >= {TARGETS['l14_vs_open_clip']}x open_clip"] = l14["vs_open_clip"] >= TARGETS["l14_vs_open_clip"]
    llm = next((results[r.key] for r in rows if r.model == "llama1b"), {})
    if llm.get("mfu") is not None:
        checks[f"Llama-3.2-1B MFU >= {TARGETS['llm_1b_mfu']:.0%}"] = llm["mfu"] >= TARGETS["llm_1b_mfu"]
    errors = [abs(results[r.key]["estimator_error"]) for r in rows if "estimator_error" in results[r.key]]
    if errors:
        checks[f"memory estimate within {TARGETS['estimator_error']:.0%}"] = max(errors) <= TARGETS["estimator_error"]
    return checks


def fmt(value, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def markdown(header: str, rows: list[Row], results: dict, checks: dict) -> str:
    lines = [header, "", "| row | batch/GPU | samples/s | TFLOP/s/GPU | MFU | vs open_clip | peak mem (GiB) | "
             "estimated (GiB) | estimate error | notes |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        r = results[row.key]
        if row.kind == "checkpoint" and "operations" in r:
            note = "; ".join(f"{op['operation']}: {op['gb_per_s']:.2f} GB/s" for op in r["operations"])
            lines.append(f"| {row.label} | - | - | - | - | - | - | - | - | {r['gib']:.1f} GiB; {note} |")
            continue
        note = r.get("error") or r.get("skipped") or ""
        if "recompute_time_cost" in r:
            note = (f"time cost {r['recompute_time_cost']:+.0%}, memory saved "
                    f"{fmt(r.get('recompute_memory_saved_gib'), '.1f', ' GiB')}")
        if "data_time_s" in r:
            note = f"data wait {r['data_time_s']:.3f} s/step"
        batch = row.batch
        if row.kind == "llm":
            batch = f"{row.batch} x {row.tokens_per_sample} tokens"
            if "tokens_per_s" in r:
                note = f"{r['tokens_per_s']:.0f} tokens/s; " + note
        if row.kind in ("llm", "dit") and "samples_per_s" in r:
            note += "memory estimator is CLIP-only: peak alone"
        lines.append(
            f"| {row.label} | {batch} | {fmt(r.get('samples_per_s'), '.0f')} | {fmt(r.get('tflops_per_gpu'), '.1f')} | "
            f"{fmt(r.get('mfu') and 100 * r['mfu'], '.1f', '%')} | {fmt(r.get('vs_open_clip'), '.2f', 'x')} | "
            f"{fmt(r.get('peak_memory_gib'), '.1f')} | {fmt(row.predicted_memory_gib, '.1f')} | "
            f"{fmt(r.get('estimator_error') and 100 * r['estimator_error'], '+.1f', '%')} | {note} |")
    if checks:
        lines += ["", "Targets: " + "; ".join(f"{name}: {'met' if ok else 'NOT met'}" for name, ok in checks.items())]
    return "\n".join(lines)


# -- dry run -----------------------------------------------------------------------------------------

def wheel_specs() -> list[tuple[str, str, str]]:
    """(distribution, version, import name) from wheels.txt."""
    specs = []
    with open(os.path.join(HERE, "wheels.txt")) as fh:
        for line in fh:
            line = line.split("#")[0].split()
            if line:
                name, version = line[0].split("==")
                specs.append((name, version, line[1]))
    return specs


# Present on the GPU machine and not shipped (its own builds), with what needs them.
MACHINE_MODULES = ["torch", "torchvision", "transformers", "sentencepiece", "safetensors", "tensorboard", "numpy",
                   "PIL", "yaml", "regex", "tqdm", "huggingface_hub", "fsspec", "packaging"]
ENTRY_MODULES = ["models.clip.family", "models.llm.family", "models.dit.family",
                 "open_clip_train.main"]  # what the suite's runs import


def _wheel_kind(filename: str) -> str:
    tags = filename[:-4].split("-")[-3:]  # python tag, abi tag, platform tag
    if tags[2] == "any":
        return "pure"
    return "abi3" if tags[1] == "abi3" else f"{tags[0]} binary"


def check_imports(site: str) -> list[dict]:
    """Import every module in a fresh interpreter that sees only `site`, the repository and this
    interpreter's own packages; say where each came from."""
    code = r"""
import importlib, json, sys, warnings
warnings.filterwarnings("ignore")
out = {}
for name in sys.argv[1:]:
    try:
        module = importlib.import_module(name)
        out[name] = {"ok": True, "file": getattr(module, "__file__", None) or "",
                     "version": str(getattr(module, "__version__", ""))}
    except BaseException as exc:
        out[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
try:
    import torch
    out["__cuda__"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
except BaseException:
    out["__cuda__"] = None
print(json.dumps(out))
"""
    names = [s[2] for s in wheel_specs()] + MACHINE_MODULES + ENTRY_MODULES
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(PYTHONPATH=os.pathsep.join([site, ROOT]), PYTHONNOUSERSITE="1", CUDA_VISIBLE_DEVICES=env.get(
        "CUDA_VISIBLE_DEVICES", ""))
    proc = subprocess.run([sys.executable, "-s", "-c", code, *names], capture_output=True, text=True, env=env,
                          cwd="/", timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    return [{"module": n, **found[n]} for n in names] + [{"module": "__cuda__", "device": found["__cuda__"]}]


def dry_run(site: str, args) -> int:
    wheels_dir = os.path.join(HERE, "wheels")
    files = sorted(f for f in os.listdir(wheels_dir) if f.endswith(".whl")) if os.path.isdir(wheels_dir) else []
    size = sum(os.path.getsize(os.path.join(wheels_dir, f)) for f in files)
    on_312 = sys.version_info[:2] == (3, 12)
    print(f"dry run on Python {platform.python_version()} ({sys.executable}); the GPU machine runs 3.12")
    print(f"wheels: {len(files)} in {wheels_dir}, {size / 2**20:.1f} MiB (limit 64 MiB)")
    imports = {r["module"]: r for r in check_imports(site)}
    problems = 0
    for dist, version, module in wheel_specs():
        wheel = next((f for f in files if f.lower().startswith(f"{dist.replace('-', '_').lower()}-{version}-")), None)
        result = imports[module]
        if wheel is None:
            status, problems = "MISSING wheel (run bench/gpu/prepare.sh)", problems + 1
        elif result["ok"] and result["file"].startswith(site):
            status = "imports from the wheel"
            if _wheel_kind(wheel).endswith("binary") and not on_312:
                status += f" (its {_wheel_kind(wheel)} extensions not loaded on {platform.python_version()})"
        elif result["ok"]:
            status, problems = f"imported from {result['file']}, not from the wheel", problems + 1
        elif _wheel_kind(wheel).endswith("binary") and not on_312:
            status = f"installed; import needs CPython 3.12 ({_wheel_kind(wheel)}): checked only on the GPU machine"
        else:
            status, problems = f"import FAILED: {result['error']}", problems + 1
        print(f"  {dist + '==' + version:<30} {_wheel_kind(wheel) if wheel else '':<13} {module:<14} {status}")
    print("on the GPU machine already (not shipped):")
    for module in MACHINE_MODULES:
        r = imports[module]
        print(f"  {module:<16} {'ok ' + r['version'] if r['ok'] else 'missing here: ' + r['error']}")
    print("the suite's entry points:")
    for module in ENTRY_MODULES:
        r = imports[module]
        if r["ok"]:
            print(f"  {module:<22} imports")
        elif on_312:
            print(f"  {module:<22} import FAILED: {r['error']}")
            problems += 1
        else:  # e.g. open_clip's trainer imports pandas, a cp312 binary here
            print(f"  {module:<22} not checkable on {platform.python_version()} ({r['error']}); checked on the GPU machine")
    cuda = imports["__cuda__"]["device"]
    print(f"GPU: {cuda or 'none visible (the plan assumes an H200: 139 GiB, 989 TFLOP/s, 8 workers)'}")
    print_plan(args)
    print(f"dry run: {problems} problem(s)")
    return 1 if problems else 0


def print_plan(args) -> list[Row]:
    rows = plan(args.quick, args.gpus, args.device_memory_gib, args.peak_tflops, available_backends(), args.workers,
                args.data_root)
    budget = QUICK_BUDGET_S if args.quick else FULL_BUDGET_S
    print(f"plan ({'quick' if args.quick else 'full'}, {args.gpus} GPU, {args.device_memory_gib:.0f} GiB, peak "
          f"{args.peak_tflops:.0f} TFLOP/s, {args.workers} data workers per system; budget {budget:.0f} s):")
    for row in rows:
        mem = f"{row.predicted_memory_gib:.1f} GiB est." if row.predicted_memory_gib is not None else ""
        mem = "peak only" if row.kind in ("llm", "dit") else mem  # engine/memory_estimate.py is CLIP's
        steps = f"{row.steps} steps ({row.warmup} warm-up)" if row.steps else ""
        batch = f"batch {row.batch}" if row.batch else ""
        batch = f"{row.batch} x {row.tokens_per_sample} tok" if row.kind == "llm" else batch
        print(f"  {row.label:<48} {batch:<13} {steps:<22} {mem:<14} ~{row.estimate_s:.0f} s")
    cumulative = 0.0
    for row in rows:
        cumulative += row.estimate_s
        if cumulative > budget:
            print(f"  beyond the budget by the estimate, skipped at run time unless earlier rows finish sooner: "
                  f"{row.label}")
    print(f"  estimated total {sum(r.estimate_s for r in rows):.0f} s")
    return rows


# -- main ----------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="B/32 and L/14, engine and open_clip only (< 4 min)")
    parser.add_argument("--dry-run", action="store_true", help="check the installed wheels import; print the plan")
    parser.add_argument("--out", default=None, help="folder for results.md and results.json")
    parser.add_argument("--site", default=None, help="where run.sh installed the wheels")
    parser.add_argument("--gpus", type=int, default=1, help="engine ranks (open_clip runs on one GPU; its "
                        "comparison is per GPU)")
    parser.add_argument("--workers", type=int, default=None,
                        help="data-loader workers, the same for both systems (default: half the cores, at most 8)")
    parser.add_argument("--device-memory-gib", type=float, default=None, help="default: read from the GPU (139 dry)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="default: engine/flops.py's table")
    parser.add_argument("--budget-s", type=float, default=None)
    parser.add_argument("--shards", default=os.path.join(ROOT, "data_cache/gpu_bench_shapes"))
    parser.add_argument("--data-root", default=os.path.join(ROOT, "data_cache"),
                        help="where the LLM's Markov corpus and the DiT's random features are written")
    args = parser.parse_args(argv)

    if args.dry_run:  # plan for the GPU machine (16 cores), not for this one
        args.workers = args.workers or 8
        args.device_memory_gib = args.device_memory_gib or 139.0
        args.peak_tflops = args.peak_tflops or 989.0
        return dry_run(args.site or "", args)

    import torch

    from engine.flops import peak_tflops

    if not torch.cuda.is_available():
        print("error: no CUDA device visible; use --dry-run to check the set-up on a machine without one",
              file=sys.stderr)
        return 2
    args.workers = args.workers or min(8, max(1, (os.cpu_count() or 2) // 2))
    device = torch.cuda.get_device_name(0)
    args.device_memory_gib = args.device_memory_gib or torch.cuda.get_device_properties(0).total_memory / 2**30
    args.peak_tflops = args.peak_tflops or peak_tflops(device) or 989.0
    budget = args.budget_s or (QUICK_BUDGET_S if args.quick else FULL_BUDGET_S)
    out_dir = args.out or os.path.join(ROOT, "runs", "gpu_bench")
    os.makedirs(out_dir, exist_ok=True)
    start = time.time()
    from data.synthetic import generate_shapes_dataset

    generate_shapes_dataset(args.shards, **SHARD_SET)
    rows = print_plan(args)
    results = {}
    for row in rows:
        left = budget - (time.time() - start)
        if row.estimate_s > left:
            results[row.key] = {"skipped": f"skipped: {left:.0f} s of the {budget:.0f} s budget left, ~{row.estimate_s:.0f} s needed"}
            print(f"[suite] {row.label}: {results[row.key]['skipped']}", flush=True)
            continue
        tic = time.time()
        try:
            results[row.key] = run_row(row, args.shards, args.workers, args.gpus, out_dir, timeout=left)
        except Exception as exc:  # noqa: BLE001 - one failed row must not lose the others
            results[row.key] = {"error": f"failed: {type(exc).__name__}: {str(exc)[-500:]}".replace("\n", " ")}
        results[row.key]["wall_s"] = time.time() - tic
        print(f"[suite] {row.label}: {json.dumps(results[row.key])[:400]}", flush=True)
    checks = summarize(rows, results, args.peak_tflops, args.gpus)
    header = (f"Training on {args.gpus}x {device} ({args.device_memory_gib:.0f} GiB, peak {args.peak_tflops:.0f} "
              f"TFLOP/s dense BF16), torch {torch.__version__}, CUDA {torch.version.cuda}, "
              f"{'quick' if args.quick else 'full'} suite in {time.time() - start:.0f} s; {args.workers} data workers "
              f"per system; CLIP: synthetic 64 px shards upscaled to 224, MFU from engine/flops.py for both systems; LLM: "
              f"synthetic Markov corpus, 8192-token sequences; DiT: random bfloat16 features of the seed's shapes")
    table = markdown(header, rows, results, checks)
    print(table)
    with open(os.path.join(out_dir, "results.md"), "w") as fh:
        fh.write(table + "\n")
    with open(os.path.join(out_dir, "results.json"), "w") as fh:
        json.dump({"header": header, "device": device, "rows": [dataclasses.asdict(r) for r in rows],
                   "results": results, "targets": checks}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
