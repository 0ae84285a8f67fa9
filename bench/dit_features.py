"""A random embedding set at a DiT config's shapes, in the extraction format (models/dit/embeddings.py),
for throughput benchmarks on a machine without towers, images or network (the GPU suite's DiT row).

    python bench/dit_features.py --config configs/dit/global_768.yaml --out data_cache/dit_features --samples 1024

Conditioning patch features [P, condition_dim], target patch features [P_target, clip_width], target
and text embeddings [output_dim], a random target projection; Gaussian, bfloat16 by default (what an
extraction with --dtype bfloat16 writes). The numbers carry no signal: the set measures speed, not
learning. An existing set with the same settings is kept (settings.json).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DTYPES = {"bfloat16", "float32"}


def write_random_features(out_dir: str, model_cfg, num_samples: int, samples_per_chunk: int = 128,
                          dtype: str = "bfloat16", target_grid: tuple = (16, 16), seed: int = 0) -> dict:
    """Write (or keep) the set; returns its manifest."""
    import torch

    from models.dit.embeddings import (
        read_json,
        write_chunk,
        write_json_atomic,
        write_manifest,
        write_projection,
    )

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: use one of {sorted(DTYPES)}")
    m = model_cfg
    settings = {"kind": "random features (bench/dit_features.py)", "num_samples": num_samples,
                "samples_per_chunk": samples_per_chunk, "dtype": dtype, "condition_grid": list(m.condition_grid),
                "condition_dim": m.condition_dim, "target_grid": list(target_grid), "clip_width": m.clip_width,
                "output_dim": m.output_dim, "seed": seed}
    settings_path, manifest_path = os.path.join(out_dir, "settings.json"), os.path.join(out_dir, "manifest.json")
    if os.path.exists(manifest_path) and os.path.exists(settings_path) and \
            read_json(settings_path, "settings") == settings:
        return read_json(manifest_path, "embedding manifest")
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(manifest_path):
        os.remove(manifest_path)  # other settings: written again
    write_json_atomic(settings_path, settings)
    torch_dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(seed)
    patches, target_patches = m.num_patches, target_grid[0] * target_grid[1]
    names = []
    for start in range(0, num_samples, samples_per_chunk):
        n = min(samples_per_chunk, num_samples - start)
        tensors = {"condition": torch.randn(n, patches, m.condition_dim, generator=gen).to(torch_dtype),
                   "target_patches": torch.randn(n, target_patches, m.clip_width, generator=gen).to(torch_dtype),
                   "target_embedding": torch.randn(n, m.output_dim, generator=gen).to(torch_dtype),
                   "text_embedding": torch.randn(n, m.output_dim, generator=gen).to(torch_dtype)}
        name = f"s{start // samples_per_chunk:06d}-p0000"
        write_chunk(out_dir, name, tensors, [f"random{start + i}" for i in range(n)],
                    [f"random caption {start + i}" for i in range(n)],
                    {"shard": "random", "shard_index": start // samples_per_chunk, "part": 0})
        names.append(name)
    shapes = {"condition": [patches, m.condition_dim], "target_patches": [target_patches, m.clip_width],
              "target_embedding": [m.output_dim], "text_embedding": [m.output_dim]}
    projection = torch.randn(m.output_dim, m.clip_width, generator=gen) / m.clip_width ** 0.5
    return write_manifest(out_dir, names, {k: {"shape": v, "dtype": dtype} for k, v in shapes.items()},
                          condition_grid=m.condition_grid, target_grid=target_grid, towers={},
                          source_shards=["random"], projection=write_projection(out_dir, projection))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "configs/dit/global_768.yaml"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--samples-per-chunk", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides of the config")
    args = parser.parse_args(argv)
    from engine.config import load_config
    from engine.schema import BARE_KEYS
    from models.dit.config import DiTExperimentConfig

    cfg = load_config(DiTExperimentConfig, args.config, args.overrides, BARE_KEYS)
    manifest = write_random_features(args.out, cfg.model, args.samples, args.samples_per_chunk, args.dtype)
    print(json.dumps({"out": args.out, "num_samples": manifest["num_samples"], "chunks": manifest["num_chunks"],
                      "tensors": manifest["tensors"]}))


if __name__ == "__main__":
    main()
