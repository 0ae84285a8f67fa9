"""VLM sequences: the prompt template's loss mask turn by turn, image placeholder expansion at exact
positions (two images, two turns, written out by hand), truncation, collation offsets, and the
loader's modality mixing (the same text-only micro-batches on every data-parallel rank) and resume."""
import pytest
import torch

from models.vlm.config import TemplateConfig
from models.vlm.sequence import (
    IMAGE_PLACEHOLDER,
    collate,
    encode_conversation,
    expand_images,
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from data.tokenizers import build_tokenizer
    from data.vlm_synthetic import write_tokenizer

    return build_tokenizer("huggingface", write_tokenizer(str(tmp_path_factory.mktemp("vqa_tok"))))


def _ids(tokenizer, words: str) -> list:
    """Ids by vocabulary lookup, one word each (not through the code under test)."""
    return [tokenizer.tokenizer.token_to_id(w) for w in words.split()]


TURNS = [("<image> what shape is it", "circle"), ("<image> what colour is the shape", "red")]


def test_template_masks_responses_turn_by_turn(tokenizer):
    enc = encode_conversation(TURNS, tokenizer, TemplateConfig(), num_images=2)
    P = IMAGE_PLACEHOLDER
    want = (_ids(tokenizer, "<s> <|user|>") + [P] + _ids(tokenizer, "what shape is it <|end|> <|assistant|> circle <|end|>")
            + _ids(tokenizer, "<|user|>") + [P]
            + _ids(tokenizer, "what colour is the shape <|end|> <|assistant|> red <|end|>"))
    assert enc.ids == want
    # loss on each response and its end-of-turn only
    assert [i for i, m in enumerate(enc.loss_mask) if m] == [9, 10, 20, 21]
    # no image marker in the text: the image goes right after bos
    plain = encode_conversation([("what shape is it", "circle")], tokenizer, TemplateConfig(), num_images=1)
    assert plain.ids[:3] == [_ids(tokenizer, "<s>")[0], P, _ids(tokenizer, "<|user|>")[0]]
    with pytest.raises(ValueError, match="2 <image> markers but 1 images"):
        encode_conversation(TURNS, tokenizer, TemplateConfig(), num_images=1)
    custom = TemplateConfig(bos_token="", instruction_template="<|user|> {instruction} <|assistant|>",
                            response_template="{response} </s>")
    enc = encode_conversation([("what shape is it", "star")], tokenizer, custom)
    assert enc.ids == _ids(tokenizer, "<|user|> what shape is it <|assistant|> star </s>")
    assert enc.loss_mask == [0] * 6 + [1, 1]


def test_two_images_two_turns_expand_at_exact_positions(tokenizer):
    enc = encode_conversation(TURNS, tokenizer, TemplateConfig(), num_images=2)
    pad = tokenizer.pad_id
    out = expand_images(enc, image_tokens=2, max_length=32, pad_id=pad)
    # expanded: 0 <s> 1 <|user|> 2-3 image 0, 4-7 "what shape is it", 8 <|end|> 9 <|assistant|>
    # 10 circle 11 <|end|> 12 <|user|> 13-14 image 1, 15-19 "what colour is the shape" 20 <|end|>
    # 21 <|assistant|> 22 red 23 <|end|>: 24 positions, 23 inputs
    words = ["<s>", "<|user|>", "I", "I", "what", "shape", "is", "it", "<|end|>", "<|assistant|>", "circle", "<|end|>", "<|user|>", "I", "I", "what", "colour", "is", "the", "shape", "<|end|>", "<|assistant|>", "red", "<|end|>"]
    seq = [pad if w == "I" else tokenizer.tokenizer.token_to_id(w) for w in words]
    assert out.tokens.tolist() == seq[:-1]
    image_index = [-1] * 23
    image_index[2], image_index[3], image_index[13], image_index[14] = 0, 1, 2, 3
    assert out.image_index.tolist() == image_index
    labels = seq[1:]
    assert out.labels.tolist() == labels  # image positions hold pad in labels too
    assert [i for i, m in enumerate(out.loss_mask.tolist()) if m] == [9, 10, 21, 22]  # predicting the responses
    assert out.num_images == 2 and not out.truncated
    # cut after position 11: image 1 is gone, its loss too
    cut = expand_images(enc, image_tokens=2, max_length=12, pad_id=pad)
    assert cut.truncated and cut.num_images == 1 and len(cut.tokens) == 12
    assert cut.tokens.tolist() == seq[:12] and [i for i, m in enumerate(cut.loss_mask.tolist()) if m] == [9, 10]
    # cut inside image 1: it stays (its first position is in), partly used
    part = expand_images(enc, image_tokens=2, max_length=14, pad_id=pad)
    assert part.num_images == 2 and part.image_index.tolist()[13] == 2


def test_collate_offsets_image_rows(tokenizer):
    enc_two = encode_conversation(TURNS, tokenizer, TemplateConfig(), num_images=2)
    enc_none = encode_conversation([("what shape is it", "circle")], tokenizer, TemplateConfig(), num_images=0)
    enc_one = encode_conversation(TURNS[:1], tokenizer, TemplateConfig(), num_images=1)
    samples = [expand_images(e, 2, 40, tokenizer.pad_id) for e in (enc_two, enc_none, enc_one)]
    images = [torch.randn(2, 3, 4, 4), None, torch.randn(1, 3, 4, 4)]
    batch = collate(samples, images, tokenizer.pad_id, pad_to_multiple_of=8)
    assert batch["tokens"].shape == (3, 24)  # 23 rounded up to 8
    assert torch.equal(batch["images"], torch.cat([images[0], images[2]]))
    assert batch["image_index"][0, [2, 3, 13, 14]].tolist() == [0, 1, 2, 3]
    assert (batch["image_index"][1] == -1).all()
    assert batch["image_index"][2, [2, 3]].tolist() == [4, 5]  # after the first sample's 4 rows
    assert batch["attention_mask"].sum(1).tolist() == [23, len(samples[1].tokens), len(samples[2].tokens)]
    assert batch["loss_mask"][:, 23:].sum() == 0
    fixed = collate(samples, images, tokenizer.pad_id, length=30)
    assert fixed["tokens"].shape == (3, 30)
    with pytest.raises(ValueError, match="does not fit"):
        collate(samples, images, tokenizer.pad_id, length=20)


def _loader(tokenizer, dp_rank, fraction=0.5, dp_size=2):
    from data.vlm_synthetic import SyntheticVQA
    from models.vlm.data import VLMLoader

    train = SyntheticVQA(64, image_size=16, max_turns=2, seed=1)
    text = SyntheticVQA(64, image_size=16, max_turns=2, seed=1, text_only=True)
    return VLMLoader(train, tokenizer, TemplateConfig(), image_tokens=4, max_length=48, batch_size=4,
                     dp_rank=dp_rank, dp_size=dp_size, seed=3, text_dataset=text, text_batch_fraction=fraction)


def test_modality_mixing_agrees_over_data_parallel_ranks(tokenizer):
    streams = [list(zip(range(12), _loader(tokenizer, rank))) for rank in (0, 1)]
    kinds = [[batch["images"].shape[0] == 0 for _, batch in stream] for stream in streams]
    assert kinds[0] == kinds[1]  # text-only micro-batches at the same steps on both ranks
    assert 2 <= sum(kinds[0]) <= 10  # about half
    # each rank reads its own samples
    assert sum(a["qtypes"] != b["qtypes"] for (_, a), (_, b) in zip(*streams)) >= 10
    for _, batch in streams[0]:
        text_only = batch["images"].shape[0] == 0
        assert (batch["image_index"] >= 0).any() != text_only
        assert batch["loss_mask"].sum() > 0


def test_loader_resumes_exactly(tokenizer):
    loader = _loader(tokenizer, 0)
    it = iter(loader)
    for _ in range(5):
        next(it)
    state = loader.state_dict()
    want = [next(it) for _ in range(3)]
    resumed = _loader(tokenizer, 0)
    assert resumed.load_state_dict(state)
    got = [b for _, b in zip(range(3), resumed)]
    for a, b in zip(want, got):
        for key in ("tokens", "labels", "loss_mask", "image_index", "images"):
            assert torch.equal(a[key], b[key]), key
    assert not _loader(tokenizer, 0, dp_size=4).load_state_dict(state)  # another DP size: a fresh stream


def test_jsonl_conversations(tmp_path, tokenizer):
    import json

    from PIL import Image

    from models.vlm.data import JsonlConversations

    Image.new("RGB", (20, 10), (200, 10, 10)).save(tmp_path / "a.png")
    records = [{"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nwhat colour is the shape"},
                                                    {"from": "gpt", "value": "red"}]},
               {"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "what shape is it"},
                             {"role": "assistant", "content": "star"}]}]
    path = tmp_path / "conv.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    ds = JsonlConversations(str(path), image_size=16)
    assert len(ds) == 2
    first = ds[0]
    assert first["images"][0].shape == (3, 16, 16) and first["turns"] == [("<image>\nwhat colour is the shape", "red")]
    assert ds[1]["images"] == [] and ds[1]["turns"] == [("what shape is it", "star")]
    path.write_text(json.dumps({"conversations": [{"from": "gpt", "value": "hi"}]}) + "\n")
    with pytest.raises(ValueError, match="conv.jsonl:1: an assistant message without a user message"):
        JsonlConversations(str(path), image_size=16)


def test_webdataset_conversations(tmp_path):
    import io
    import json
    import tarfile

    from PIL import Image

    from models.vlm.data import conversation_set

    def add(tar, name, payload):
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))

    def png(colour):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
        return buf.getvalue()

    with tarfile.open(tmp_path / "shard-0.tar", "w") as tar:
        add(tar, "a.json", json.dumps({"conversations": [{"from": "human", "value": "<image> what colour is it"},
                                                         {"from": "gpt", "value": "red"}]}).encode())
        add(tar, "a.png", png((255, 0, 0)))
        add(tar, "b.json", json.dumps({"messages": [{"role": "user", "content": "<image> <image> same colour"},
                                                    {"role": "assistant", "content": "no"}]}).encode())
        add(tar, "b.0.png", png((0, 0, 255)))
        add(tar, "b.1.png", png((0, 255, 0)))
    ds = conversation_set(str(tmp_path / "shard-*.tar"), 16, None, "<image>")
    assert len(ds) == 2
    a, b = ds[0], ds[1]
    assert a["turns"] == [("<image> what colour is it", "red")] and len(a["images"]) == 1
    assert a["images"][0].shape == (3, 16, 16) and a["images"][0][0].mean() > a["images"][0][2].mean()  # red
    assert len(b["images"]) == 2 and b["images"][0][2].mean() > b["images"][1][2].mean()  # blue first, by name
    (tmp_path / "c.jsonl").write_text("")
    with pytest.raises(ValueError, match="mixes .tar shards and jsonl"):
        conversation_set(f"{tmp_path}/shard-0.tar,{tmp_path}/c.jsonl", 16, None, "<image>")
