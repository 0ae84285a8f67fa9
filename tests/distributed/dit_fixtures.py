"""Tiny inputs for the DiT tests: a shapes image set, a target CLIP checkpoint with its tokenizer,
tower specs, a small DiT config, and a structured embedding set written straight to the chunk
format (for training tests that need no towers)."""
from __future__ import annotations

import os

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLIP_TINY = os.path.join(REPO, "configs", "clip", "tiny.yaml")
IMAGE = 32


def tiny_shapes(root: str, shards: int = 3, per_shard: int = 12) -> list[str]:
    from data.synthetic import generate_shapes_dataset

    manifest = generate_shapes_dataset(root, num_train=shards * per_shard, num_eval=0, image_size=IMAGE,
                                       samples_per_shard=per_shard, seed=1)
    return [os.path.join(root, s["path"]) for s in manifest["train"]]


CONDITION_OVERRIDES = [f"model.vision.img_h={IMAGE}", f"model.vision.img_w={IMAGE}", "model.vision.patch_dim=8",
                       "model.vision.hidden_size=32", "model.vision.ffn_hidden_size=64", "model.vision.num_layers=2",
                       "model.vision.num_attention_heads=2"]


def condition_spec(layer: int = -1):
    from models.dit.towers import TowerSpec

    return TowerSpec(f"random:{CLIP_TINY}", layer=layer, overrides=list(CONDITION_OVERRIDES), seed=5)


def tiny_target_checkpoint(root: str, captions: list[str]) -> tuple[str, str]:
    """A randomly initialised tiny CLIP written as an engine checkpoint, and a SentencePiece model
    trained on `captions` (the target tower of the extraction tests)."""
    from data.tokenizers import build_tokenizer
    from engine.checkpoint.tools import single_process_parallel_state, write_model_checkpoint
    from engine.config import load_config
    from engine.schema import BARE_KEYS
    from models.clip.config import CLIPExperimentConfig
    from models.clip.model import CLIPModel

    tokenizer = build_tokenizer("sentencepiece", None, train_texts=captions, vocab_size=96,
                                cache_dir=os.path.join(root, "tokenizer"))
    exp = load_config(CLIPExperimentConfig, CLIP_TINY, [
        f"model.vision.img_h={IMAGE}", f"model.vision.img_w={IMAGE}", "model.vision.patch_dim=8",
        "model.vision.hidden_size=48", "model.vision.ffn_hidden_size=96", "model.vision.num_layers=2",
        "model.vision.num_attention_heads=2", "model.text.hidden_size=32", "model.text.ffn_hidden_size=64",
        "model.text.num_layers=1", "model.text.num_attention_heads=2", "model.text.vocab_size=128",
        "model.text.encoder_seq_length=24", "model.output_dim=16", f"data.tokenizer.path={tokenizer.model_path}"],
        BARE_KEYS)
    exp.model.text.eot_token_id = tokenizer.eot_id
    with single_process_parallel_state():
        torch.manual_seed(3)
        state = CLIPModel(exp.model, use_cpu_initialization=True).state_dict()
    path = os.path.join(root, "target_clip")
    write_model_checkpoint(path, exp, state)
    return path, tokenizer.model_path


def read_captions(shards: list[str]) -> list[str]:
    import tarfile

    out = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            out += [tar.extractfile(m).read().decode() for m in tar.getmembers() if m.name.endswith(".txt")]
    return out


def tiny_dit_overrides(cond_dim: int = 12, grid=(2, 3), out: int = 8, width: int = 16) -> list[str]:
    return [f"model.condition_dim={cond_dim}", f"model.condition_grid=[{grid[0]},{grid[1]}]", "model.num_layers=4",
            "model.hidden_size=32", "model.ffn_hidden_size=64", "model.num_attention_heads=4",
            "model.timestep_frequency_dim=16", "model.adapter_hidden_size=24", f"model.clip_width={width}",
            f"model.output_dim={out}"]


def write_structured_embeddings(directory: str, num_samples: int, *, grid=(2, 3), cond_dim: int = 12,
                                target_patches: int = 4, width: int = 16, out: int = 8, latent: int = 6,
                                chunk: int = 64, seed: int = 0, sample_seed: int = 0, noise: float = 0.1) -> dict:
    """An extraction directory whose conditioning and targets are functions of a shared latent per
    sample (so a model can learn the map): condition = token-wise linear maps of the latent, target
    patches likewise, caption embeddings = a noisy copy of the targets' projection. `seed` fixes the
    maps (a train and an eval set share it), `sample_seed` the samples."""
    from models.dit.embeddings import write_chunk, write_manifest, write_projection

    maps = torch.Generator().manual_seed(seed)
    tokens = grid[0] * grid[1]
    cond_maps = torch.randn(tokens, latent, cond_dim, generator=maps)
    target_maps = torch.randn(target_patches, latent, width, generator=maps)
    projection = torch.randn(out, width, generator=maps) / width ** 0.5
    gen = torch.Generator().manual_seed(seed * 7919 + sample_seed + 1)
    names = []
    for start in range(0, num_samples, chunk):
        n = min(chunk, num_samples - start)
        z = torch.randn(n, latent, generator=gen)
        cond = torch.einsum("bl,pld->bpd", z, cond_maps) + noise * torch.randn(n, tokens, cond_dim, generator=gen)
        patches = torch.einsum("bl,pld->bpd", z, target_maps) + noise * torch.randn(n, target_patches, width,
                                                                                     generator=gen)
        own = patches.mean(1) @ projection.T + noise * torch.randn(n, out, generator=gen)
        text = own + 0.5 * torch.randn(n, out, generator=gen)
        name = f"s{start // chunk:06d}-p0000"
        write_chunk(directory, name, {"condition": cond, "target_patches": patches, "target_embedding": own,
                                      "text_embedding": text},
                    [f"k{start + i}" for i in range(n)], [f"caption {start + i}" for i in range(n)],
                    {"shard": "synthetic", "shard_index": start // chunk, "part": 0})
        names.append(name)
    tensors = {"condition": {"shape": [tokens, cond_dim], "dtype": "float32"},
               "target_patches": {"shape": [target_patches, width], "dtype": "float32"},
               "target_embedding": {"shape": [out], "dtype": "float32"},
               "text_embedding": {"shape": [out], "dtype": "float32"}}
    return write_manifest(directory, names, tensors, condition_grid=grid, target_grid=(2, 2), towers={},
                          source_shards=["synthetic"], projection=write_projection(directory, projection))
