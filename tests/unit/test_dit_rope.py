"""3D RoPE: megatron-core's multimodal frequencies, norms kept, dot products that depend only on
the difference of the two (type, row, column) positions, applied by megatron's own function."""
import pytest
import torch

from models.dit.rope import Rotary3D, default_sections, grid_positions, sequence_positions

HEAD = 32


def _apply(x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """megatron-core's apply_rotary_pos_emb (what SelfAttention calls), x [s, b, heads, d]."""
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

    from engine.checkpoint.tools import single_process_parallel_state
    from models.common.transformer_config import make_transformer_config

    with single_process_parallel_state():
        config = make_transformer_config(num_layers=1, hidden_size=HEAD * 2, ffn_hidden_size=8, num_attention_heads=2,
                                         tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
        return apply_rotary_pos_emb(x, emb, config)


def test_default_sections():
    assert default_sections(64) == [8, 12, 12]  # Lumina-Next's 16/24/24 axes of a 64-wide head
    assert default_sections(32) == [4, 6, 6] and sum(default_sections(96)) == 48


def test_frequencies_are_megatron_cores(monkeypatch):
    from megatron.core.models.common.embeddings.rotary_pos_embedding import MultimodalRotaryEmbedding

    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")  # its constructor asks CUDA for a device
    reference = MultimodalRotaryEmbedding(kv_channels=HEAD, rotary_percent=1.0)
    positions = torch.cat([grid_positions(3, 4, 0), grid_positions(3, 4, 1)], dim=1).unsqueeze(1)
    ours = Rotary3D(HEAD, frequencies="shared")(positions)
    assert ours.shape == (24, 1, 1, HEAD)
    torch.testing.assert_close(ours, reference(positions, default_sections(HEAD)), atol=0, rtol=0)


def test_per_axis_frequencies_are_one_standard_rope_per_axis():
    """Section a of the default layout is the usual 1D RoPE of width 2 * sections[a] on axis a, in
    rotate-half order (the same angles in both halves of the head)."""
    sections = default_sections(HEAD)
    positions = torch.tensor([[2, 0, 1], [3, 5, 0], [1, 4, 7]]).unsqueeze(1)  # [3 axes, 1, 3 tokens]
    emb = Rotary3D(HEAD)(positions)[:, 0, 0]  # [3, HEAD]
    start = 0
    for axis, n in enumerate(sections):
        angles = positions[axis, 0, :, None].float() / (10000.0 ** (torch.arange(0, 2 * n, 2).float() / (2 * n)))
        torch.testing.assert_close(emb[:, start:start + n], angles)
        torch.testing.assert_close(emb[:, HEAD // 2 + start:HEAD // 2 + start + n], angles)
        start += n


def test_sequence_positions_layouts():
    add = sequence_positions(2, 3, "add")
    assert add.shape == (3, 1, 6) and add[0].eq(0).all()
    assert add[1, 0].tolist() == [0, 0, 0, 1, 1, 1] and add[2, 0].tolist() == [0, 1, 2, 0, 1, 2]
    concat = sequence_positions(2, 3, "concat", padding=2)
    assert concat.shape == (3, 1, 14) and concat[0, 0].tolist() == [0] * 6 + [1] * 6 + [0, 0]


@pytest.mark.parametrize("frequencies", ["per_axis", "shared"])
def test_rotation_keeps_norms_and_depends_only_on_position_differences(frequencies):
    gen = torch.Generator().manual_seed(0)
    rope = Rotary3D(HEAD, frequencies=frequencies)
    # Pairs of positions (type, row, column); the second pair is the first shifted by (1, 2, -3).
    p = torch.tensor([[0, 0], [1, 4], [5, 2]])  # columns: position a, position b
    shifted = p + torch.tensor([[1], [2], [-3]])
    q, k = torch.randn(1, 1, 1, HEAD, generator=gen), torch.randn(1, 1, 1, HEAD, generator=gen)

    def rotated_dot(positions):
        emb = rope(positions.unsqueeze(1))  # [2, 1, 1, HEAD]
        rq, rk = _apply(q.expand(2, 1, 1, HEAD), emb), _apply(k.expand(2, 1, 1, HEAD), emb)
        for rotated, original in ((rq, q), (rk, k)):
            torch.testing.assert_close(rotated.norm(dim=-1), original.norm(dim=-1).expand(2, 1, 1), atol=1e-5, rtol=1e-5)
        return (rq[0] * rk[1]).sum().item()

    assert rotated_dot(shifted) == pytest.approx(rotated_dot(p), abs=1e-4)
    # ... and it does depend on the difference along each axis (per-axis frequencies turn every axis
    # at full speed; megatron's shared ones leave the column axis with the slowest).
    for axis in range(3):
        moved = p.clone()
        moved[axis, 1] += 1
        assert abs(rotated_dot(moved) - rotated_dot(p)) > (1e-2 if frequencies == "per_axis" else 1e-5), axis


def test_bad_sections_are_refused():
    with pytest.raises(ValueError, match="sum"):
        Rotary3D(HEAD, sections=[4, 4, 4])
