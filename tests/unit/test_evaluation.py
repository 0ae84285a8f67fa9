import torch

from engine.evaluation import retrieval_recall, zero_shot_accuracy


def test_zero_shot_accuracy_and_attributes():
    classes = torch.eye(4)
    # true labels 0,1,2,3; predictions 0,1,3,0 (the third and fourth are wrong)
    images = torch.stack([classes[0], classes[1], classes[3], classes[0]])
    labels = torch.tensor([0, 1, 2, 3])
    attrs = {"color": ["red", "red", "blue", "blue"], "shape": ["a", "b", "a", "b"]}
    out = zero_shot_accuracy(images, labels, classes, topk=(1, 5), attributes=attrs)
    assert out["zero_shot_top1"] == 0.5
    assert "zero_shot_top5" not in out  # fewer than 5 classes
    # predicted 3 (blue b) for true 2 (blue a): colour right, shape wrong; 0 (red a) for 3 (blue b): both wrong
    assert out["zero_shot_color_acc"] == 0.75 and out["zero_shot_shape_acc"] == 0.5


def test_retrieval_recall():
    feats = torch.eye(3)
    texts = torch.stack([feats[0], feats[2], feats[1]])  # pairs 1 and 2 swapped
    out = retrieval_recall(feats, texts, ks=(1, 5))
    assert abs(out["image_to_text_R@1"] - 1 / 3) < 1e-6 and out["image_to_text_R@5"] == 1.0
    assert abs(out["text_to_image_R@1"] - 1 / 3) < 1e-6
