"""Image-caption data: a synthetic shapes generator, WebDataset pipelines, tokenizers, transforms."""
